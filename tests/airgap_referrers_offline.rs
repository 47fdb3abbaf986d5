//! Owns the air-gap test for referrers end to end: an image and two referrers (an SBOM and a
//! signature, OCI 1.1 manifests with a `subject`) pushed to a real registry are prefetched,
//! exported by the `regcache` binary with the image (a layout directory and a tar; left out
//! with `--no-referrers`), imported into fresh caches, and answered from the disk by a
//! regcache whose upstream is offline or unreachable: the referrers list, its
//! `artifactType` filter, the referrer manifests and their blobs.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use support::image::{self, sha256_digest};
use support::peers::{dead_port, require_peer, run_ok, which};
use support::proxy::{Proxy, hub_config};
use support::registry::{Registry, RegistryAuth};

const MT: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const EMPTY: &str = "application/vnd.oci.empty.v1+json";
const SBOM: &str = "application/spdx+json";
const SIG: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
const REPO: &str = "team/app";

/// Runs the binary with a config file and a cache folder; whether it succeeded.
async fn regcache(config: &Path, cache: &Path, args: &[&str]) -> bool {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_regcache"));
    for var in [
        "REGCACHE_CONFIG",
        "REGCACHE_LISTEN",
        "REGCACHE_CACHE_DIR",
        "REGCACHE_OFFLINE",
        "RUST_LOG",
    ] {
        c.env_remove(var);
    }
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        c.arg("--config")
            .arg(config)
            .arg("--cache-dir")
            .arg(cache)
            .args(args)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("regcache {args:?} did not finish within 300 s"))
    .unwrap();
    eprintln!(
        "regcache {args:?} -> {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success()
}

/// One Docker-Hub-style upstream `hub` at `url`, the default (as `support::proxy::HUB`).
fn write_config(dir: &Path, url: &str) -> PathBuf {
    let path = dir.join("regcache.toml");
    std::fs::write(
        &path,
        format!(
            "default_upstream = \"hub\"\n\n[[upstream]]\nname = \"hub\"\nurl = \"{url}\"\ndocker_hub = true\n"
        ),
    )
    .unwrap();
    path
}

/// Pushes a blob with a monolithic upload; its digest.
async fn push_blob(c: &reqwest::Client, base: &str, data: &[u8]) -> String {
    let d = sha256_digest(data);
    let r = c
        .post(format!("{base}/v2/{REPO}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "upload start");
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let mut url = url::Url::parse(base).unwrap().join(&location).unwrap();
    url.query_pairs_mut().append_pair("digest", &d);
    let r = c
        .put(url)
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "upload of {d}");
    d
}

/// Pushes a manifest under `reference`; its digest.
async fn push_manifest(
    c: &reqwest::Client,
    base: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> String {
    let r = c
        .put(format!("{base}/v2/{REPO}/manifests/{reference}"))
        .header("content-type", media_type)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(status, 201, "{reference}: {}", r.text().await.unwrap());
    sha256_digest(body)
}

fn desc(media_type: &str, digest: &str, size: usize) -> serde_json::Value {
    serde_json::json!({"mediaType": media_type, "digest": digest, "size": size})
}

/// What was pushed: the image's digest, and each referrer's digest and its own blob.
struct Pushed {
    image: String,
    sbom: (String, String),
    sig: (String, String),
}

/// `team/app:1` and two referrers of it, listed by the referrers tag schema
/// (`sha256-<hex>`), as cosign and oras write them to a registry without the referrers API.
async fn push_image_and_referrers(base: &str) -> Pushed {
    let c = reqwest::Client::new();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_d = push_blob(&c, base, config).await;
    let layer = b"not really a tar, the registry does not look";
    let layer_d = push_blob(&c, base, layer).await;
    let image = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": MT,
        "config": desc("application/vnd.oci.image.config.v1+json", &config_d, config.len()),
        "layers": [desc("application/vnd.oci.image.layer.v1.tar", &layer_d, layer.len())],
    }))
    .unwrap();
    let image_d = push_manifest(&c, base, "1", MT, &image).await;
    let empty_d = push_blob(&c, base, b"{}").await;
    let mut index = Vec::new();
    let referrer = |artifact: &str, blob: Vec<u8>| {
        let c = c.clone();
        let (image_d, empty_d) = (image_d.clone(), empty_d.clone());
        let artifact = artifact.to_owned();
        let image_len = image.len();
        async move {
            let blob_d = push_blob(&c, base, &blob).await;
            let m = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2, "mediaType": MT, "artifactType": artifact,
                "config": desc(EMPTY, &empty_d, 2),
                "layers": [desc(&artifact, &blob_d, blob.len())],
                "subject": desc(MT, &image_d, image_len),
                "annotations": {"org.example.kind": artifact},
            }))
            .unwrap();
            let d = sha256_digest(&m);
            let d = push_manifest(&c, base, &d, MT, &m).await;
            let mut entry = desc(MT, &d, m.len());
            entry["artifactType"] = artifact.into();
            (d, blob_d, entry)
        }
    };
    let (sbom_d, sbom_blob, e) = referrer(SBOM, br#"{"spdxVersion":"SPDX-2.3"}"#.to_vec()).await;
    index.push(e);
    let (sig_d, sig_blob, e) = referrer(SIG, b"signature bytes".to_vec()).await;
    index.push(e);
    let list = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": INDEX, "manifests": index,
    }))
    .unwrap();
    let tag = format!("sha256-{}", image_d.trim_start_matches("sha256:"));
    push_manifest(&c, base, &tag, INDEX, &list).await;
    Pushed {
        image: image_d,
        sbom: (sbom_d, sbom_blob),
        sig: (sig_d, sig_blob),
    }
}

/// The layout's `index.json` entries: `(digest, ref name, artifactType)`.
fn layout_entries(dir: &Path) -> Vec<(String, Option<String>, Option<String>)> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = |x: &serde_json::Value| x.as_str().map(str::to_owned);
            (
                s(&e["digest"]).unwrap(),
                s(&e["annotations"]["org.opencontainers.image.ref.name"]),
                s(&e["artifactType"]),
            )
        })
        .collect()
}

fn layout_has(dir: &Path, digest: &str) -> bool {
    dir.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
        .is_file()
}

/// The digests and artifact types a referrers answer lists, sorted.
async fn referrers(proxy: &Proxy, subject: &str, filter: Option<&str>) -> Vec<(String, String)> {
    let mut url =
        url::Url::parse(&format!("{}/v2/{REPO}/referrers/{subject}", proxy.url())).unwrap();
    if let Some(f) = filter {
        // Encoded as clients do (`+` would read as a space).
        url.query_pairs_mut().append_pair("artifactType", f);
    }
    let r = reqwest::get(url.clone()).await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    assert_eq!(r.headers()["content-type"], INDEX);
    assert_eq!(
        r.headers()
            .get("oci-filters-applied")
            .map(|v| v.to_str().unwrap().to_owned()),
        filter.map(|_| "artifactType".to_owned())
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["mediaType"], INDEX);
    let mut out: Vec<(String, String)> = v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["mediaType"], MT);
            assert!(d["size"].as_u64().unwrap() > 0);
            assert_eq!(d["annotations"]["org.example.kind"], d["artifactType"]);
            (
                d["digest"].as_str().unwrap().to_owned(),
                d["artifactType"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

async fn get(proxy: &Proxy, path: &str) -> (u16, Vec<u8>) {
    let r = reqwest::get(format!("{}{path}", proxy.url()))
        .await
        .unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

/// The referrers of the pushed image answered from the disk, filtered, and served.
async fn serves_referrers(proxy: &Proxy, p: &Pushed) {
    let mut all = vec![
        (p.sbom.0.clone(), SBOM.to_owned()),
        (p.sig.0.clone(), SIG.to_owned()),
    ];
    all.sort();
    assert_eq!(referrers(proxy, &p.image, None).await, all);
    assert_eq!(
        referrers(proxy, &p.image, Some(SBOM)).await,
        vec![(p.sbom.0.clone(), SBOM.to_owned())]
    );
    assert_eq!(
        referrers(proxy, &p.image, Some("application/none")).await,
        vec![]
    );
    for (manifest, blob) in [&p.sbom, &p.sig] {
        let (status, body) = get(proxy, &format!("/v2/{REPO}/manifests/{manifest}")).await;
        assert_eq!(status, 200, "referrer manifest {manifest}");
        assert_eq!(sha256_digest(&body), *manifest);
        let (status, body) = get(proxy, &format!("/v2/{REPO}/blobs/{blob}")).await;
        assert_eq!(status, 200, "referrer blob {blob}");
        assert_eq!(sha256_digest(&body), *blob);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_travel_through_export_and_import_and_are_served_offline() {
    let reg = require_peer!(Registry::start(RegistryAuth::None).await);
    let pushed = push_image_and_referrers(&reg.url()).await;
    let work = tempfile::tempdir().unwrap();
    let config = write_config(work.path(), &reg.url());
    let cache_a = work.path().join("cache-a");

    // 1. Prefetch through regcache carries the referrers into cache A.
    assert!(regcache(&config, &cache_a, &["prefetch", "team/app:1"]).await);

    // 2. Export: a directory and a tar with the referrers, a directory without.
    let dir = work.path().join("layout");
    let tar = work.path().join("images.tar");
    let bare = work.path().join("bare");
    for (out, extra) in [(&dir, None), (&tar, None), (&bare, Some("--no-referrers"))] {
        let out = out.to_str().unwrap();
        let mut args = vec!["export", "team/app:1", "-o", out];
        args.extend(extra);
        assert!(regcache(&config, &cache_a, &args).await, "export {args:?}");
    }
    let mut entries = layout_entries(&dir);
    entries.sort();
    let mut want = vec![
        (
            pushed.image.clone(),
            Some("hub/team/app:1".to_owned()),
            None,
        ),
        (pushed.sbom.0.clone(), None, Some(SBOM.to_owned())),
        (pushed.sig.0.clone(), None, Some(SIG.to_owned())),
    ];
    want.sort();
    assert_eq!(entries, want, "referrers listed without a ref name");
    for d in [&pushed.sbom.0, &pushed.sbom.1, &pushed.sig.0, &pushed.sig.1] {
        assert!(layout_has(&dir, d), "{d} in the layout");
    }
    assert_eq!(
        layout_entries(&bare),
        vec![(
            pushed.image.clone(),
            Some("hub/team/app:1".to_owned()),
            None
        )]
    );
    for d in [&pushed.sbom.0, &pushed.sbom.1, &pushed.sig.1] {
        assert!(!layout_has(&bare, d), "{d} left out with --no-referrers");
    }
    // Exporting into the same layout again lists each referrer once.
    let out = dir.to_str().unwrap();
    assert!(regcache(&config, &cache_a, &["export", "team/app:1", "-o", out]).await);
    assert_eq!(layout_entries(&dir).len(), 3);
    // skopeo still reads the image out of a layout holding unnamed entries.
    if which("skopeo").is_some() {
        let (mut cmd, _tmp) = image::skopeo_cmd().unwrap();
        let layout_ref = format!("oci:{}:hub/team/app:1", dir.display());
        let raw = run_ok(
            cmd.args(["inspect", "--raw", &layout_ref]),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        assert_eq!(sha256_digest(raw.trim_end().as_bytes()), pushed.image);
    } else {
        println!("SKIPPED: skopeo is not installed; the layout was not read by skopeo");
    }

    // 3. Import the directory into cache B, serve it offline; the tar into cache C, serve it
    // with the upstream at a dead loopback port.
    let cache_b = work.path().join("cache-b");
    let cache_c = work.path().join("cache-c");
    assert!(regcache(&config, &cache_b, &["import", dir.to_str().unwrap()]).await);
    assert!(regcache(&config, &cache_c, &["import", tar.to_str().unwrap()]).await);
    drop(reg);

    let mut offline = hub_config(&format!("http://127.0.0.1:{}", dead_port()), &cache_b);
    offline.upstreams[0].offline = true;
    let mut proxy = Proxy::start_with(offline).await.unwrap();
    serves_referrers(&proxy, &pushed).await;
    // The subject is cached and has no referrers of its own: an empty index.
    assert_eq!(referrers(&proxy, &pushed.sbom.0, None).await, vec![]);
    // A subject the cache does not know is not answered offline.
    let unknown = sha256_digest(b"unknown");
    let (status, _) = get(&proxy, &format!("/v2/{REPO}/referrers/{unknown}")).await;
    assert_eq!(status, 404, "unknown subject offline");
    proxy.stop().await;

    let unreachable = hub_config(&format!("http://127.0.0.1:{}", dead_port()), &cache_c);
    let mut proxy = Proxy::start_with(unreachable).await.unwrap();
    serves_referrers(&proxy, &pushed).await;
    let r = reqwest::get(format!(
        "{}/v2/{REPO}/referrers/{}",
        proxy.url(),
        pushed.image
    ))
    .await
    .unwrap();
    assert!(r.headers().contains_key("warning"), "marked as not fresh");
    proxy.stop().await;
}

//! Owns the air-gap end-to-end tests: the `regcache` binary prefetches a multi-arch and a single-arch image from a real registry, exports them as an OCI layout directory and tar that skopeo reads, imports them into a fresh cache, and an offline regcache on that cache serves skopeo and dockerd with the original digests after the registry is gone.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::image::{self, HELLO, Layer, OciLayout};
use support::peers::{Dockerd, Skip, require_peer, run_ok, which};
use support::registry::{Registry, RegistryAuth};

/// What one run of the binary said.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// The binary with a config file and a cache folder, none of the environment overrides.
fn regcache(config: &Path, cache: &Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_regcache"));
    for var in [
        "REGCACHE_CONFIG",
        "REGCACHE_LISTEN",
        "REGCACHE_CACHE_DIR",
        "REGCACHE_LOG_FORMAT",
        "REGCACHE_OFFLINE",
        "RUST_LOG",
    ] {
        c.env_remove(var);
    }
    c.arg("--config")
        .arg(config)
        .arg("--cache-dir")
        .arg(cache)
        .stdin(Stdio::null());
    c
}

async fn run(config: &Path, cache: &Path, args: &[&str]) -> Run {
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        regcache(config, cache).args(args).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("regcache {args:?} did not finish within 300 s"))
    .unwrap();
    let r = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "regcache {args:?} -> {:?}\n{}{}",
        r.code, r.stdout, r.stderr
    );
    r
}

/// A configuration with one Docker-Hub-style upstream `hub` at `url`, the default.
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

/// Every file under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    for rel in files(from) {
        let dest = to.join(&rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(from.join(&rel), dest).unwrap();
    }
}

/// Where the cache keeps a blob.
fn cached_blob(cache: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    cache.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// Every config and layer digest of the layouts' images.
fn blob_digests(layouts: &[&OciLayout]) -> Vec<String> {
    let mut all: Vec<String> = layouts
        .iter()
        .flat_map(|l| l.images.iter())
        .flat_map(|i| std::iter::once(i.config.digest.clone()).chain(i.layer_digests()))
        .collect();
    all.sort();
    all.dedup();
    all
}

/// How often the registry served each of `digests` (after its log settled).
async fn blob_gets(reg: &Registry, digests: &[String]) -> BTreeMap<String, usize> {
    reg.settle_log().await;
    digests
        .iter()
        .map(|d| (d.clone(), reg.blob_get_count(d)))
        .collect()
}

/// `skopeo ARGS` (private auth file and registries.conf, no egress); stdout.
async fn skopeo(args: &[&str]) -> anyhow::Result<String> {
    let (mut cmd, _tmp) = image::skopeo_cmd()?;
    run_ok(cmd.args(args), Duration::from_secs(120)).await
}

/// regcache serving a cache on a loopback port; killed by PID on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    /// Starts the binary with `extra` flags on `127.0.0.1:0` and waits for its ready line.
    fn start(config: &Path, cache: &Path, extra: &[&str]) -> Server {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_regcache"));
        for var in ["REGCACHE_CONFIG", "REGCACHE_LISTEN", "REGCACHE_CACHE_DIR"] {
            cmd.env_remove(var);
        }
        let mut child = cmd
            .arg("--config")
            .arg(config)
            .arg("--cache-dir")
            .arg(cache)
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("regcache exited before it was ready")
                .unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["message"] == "regcache ready" {
                break v["listen"].as_str().unwrap().to_owned();
            }
        };
        // Keep reading its log so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
        Server { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_export_import_then_serve_offline_with_the_original_digests() {
    let started = Instant::now();
    if which("skopeo").is_none() {
        Skip::new("`skopeo` not found: install Debian package skopeo").report();
        return;
    }
    let mut reg = require_peer!(Registry::start(RegistryAuth::None).await);
    let multi = image::multi_arch("1").unwrap();
    let hello =
        image::single_arch_with_layers("1", &[Layer::deterministic(300 * 1024, 41)]).unwrap();
    image::push(&multi, &format!("{}/library/multi:1", reg.host()), None)
        .await
        .unwrap();
    image::push(&hello, &format!("{}/library/hello:1", reg.host()), None)
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let config = write_config(w, &reg.url());
    let cache_a = w.join("cache-a");
    let all_blobs = blob_digests(&[&multi, &hello]);
    let once: BTreeMap<String, usize> = all_blobs.iter().map(|d| (d.clone(), 1)).collect();

    // 1. Prefetch both images, every platform of the index.
    let r = run(&config, &cache_a, &["prefetch", "hello:1", "multi:1"]).await;
    assert!(r.ok(), "prefetch failed");
    assert!(r.stdout.contains(&format!("hello:1: {}", hello.digest())));
    assert!(
        r.stdout
            .contains(&format!("multi:1: {} (3 manifests", multi.digest())),
        "index and both platform manifests: {}",
        r.stdout
    );
    for d in &all_blobs {
        assert!(cached_blob(&cache_a, d).is_file(), "{d} cached");
    }
    assert_eq!(
        blob_gets(&reg, &all_blobs).await,
        once,
        "each blob fetched once"
    );

    // 2. An interrupted run: one blob never arrived and a download was left half-written.
    // The next run fetches that blob alone and no manifest again.
    let arm = multi.image("arm64").unwrap();
    let arm_layer = arm.layers[0].digest.clone();
    std::fs::remove_file(cached_blob(&cache_a, &arm_layer)).unwrap();
    let stale = cache_a
        .join("tmp")
        .join(format!("{}.0.part", arm_layer.replace(':', "-")));
    std::fs::write(&stale, b"half a download").unwrap();
    // Manifest GETs other than the referrers lookups: this registry has no referrers API,
    // so prefetch reads each image's `sha256-<hex>` tag (absent here) on every run.
    let manifest_gets = || {
        reg.access_log()
            .iter()
            .filter(|e| {
                e.method == "GET"
                    && e.path.contains("/manifests/")
                    && !e.path.contains("/manifests/sha256-")
            })
            .count()
    };
    let manifest_gets_before = manifest_gets();
    let r = run(&config, &cache_a, &["prefetch", "hello:1", "multi:1"]).await;
    assert!(r.ok(), "resumed prefetch failed");
    let line = |out: &str, image: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{image}: ")))
            .unwrap_or_else(|| panic!("no line for {image} in {out}"))
            .to_owned()
    };
    assert!(
        line(&r.stdout, "hello:1").contains("3 blobs: 0 fetched, 3 cached"),
        "{}",
        r.stdout
    );
    assert!(
        line(&r.stdout, "multi:1").contains("4 blobs: 1 fetched, 3 cached"),
        "{}",
        r.stdout
    );
    let mut expected = once.clone();
    expected.insert(arm_layer.clone(), 2);
    assert_eq!(blob_gets(&reg, &all_blobs).await, expected);
    assert_eq!(
        manifest_gets(),
        manifest_gets_before,
        "cached manifests are not fetched again (tags are revalidated with a HEAD)"
    );
    assert!(!stale.exists(), "stale partial download cleared");

    // 3. Nothing left to fetch; a failing image is reported and the others still run.
    let r = run(
        &config,
        &cache_a,
        &["prefetch", "nothere:1", "hello:1", "multi:1"],
    )
    .await;
    assert_eq!(r.code, Some(1), "a failed image makes the run fail");
    assert!(r.stderr.contains("nothere:1: failed"), "{}", r.stderr);
    assert_eq!(
        r.stdout.matches(" fetched, ").count(),
        2,
        "both other images done: {}",
        r.stdout
    );
    assert_eq!(r.stdout.matches("0 fetched").count(), 2, "{}", r.stdout);
    assert_eq!(
        blob_gets(&reg, &all_blobs).await,
        expected,
        "nothing fetched"
    );

    // 4. Export as a directory and as a tar, read by skopeo.
    let layout = w.join("layout");
    let tar = w.join("images.tar");
    for out in [&layout, &tar] {
        let r = run(
            &config,
            &cache_a,
            &["export", "hello:1", "multi:1", "-o", out.to_str().unwrap()],
        )
        .await;
        assert!(r.ok(), "export to {}", out.display());
        assert!(
            r.stdout.contains("hello:1: ") && r.stdout.contains("as hub/library/hello:1"),
            "{}",
            r.stdout
        );
    }
    let raw = skopeo(&[
        "inspect",
        "--raw",
        &format!("oci:{}:hub/library/multi:1", layout.display()),
    ])
    .await
    .unwrap();
    assert_eq!(
        raw.as_bytes(),
        multi.index_bytes.as_deref().unwrap(),
        "index bytes unchanged"
    );
    let copy_multi = w.join("copy-multi");
    skopeo(&[
        "copy",
        "--all",
        "--preserve-digests",
        &format!("oci:{}:hub/library/multi:1", layout.display()),
        &format!("oci:{}", copy_multi.display()),
    ])
    .await
    .unwrap();
    assert_eq!(
        image::layout_index_digests(&copy_multi).unwrap(),
        vec![multi.digest().to_owned()]
    );
    let copy_hello = w.join("copy-hello");
    skopeo(&[
        "copy",
        &format!("oci-archive:{}:hub/library/hello:1", tar.display()),
        &format!("oci:{}", copy_hello.display()),
    ])
    .await
    .unwrap();
    assert_eq!(
        image::layout_index_digests(&copy_hello).unwrap(),
        vec![hello.digest().to_owned()]
    );

    // 5. An image only partly cached is not exported unless asked, naming what is missing.
    let cache_p = w.join("cache-partial");
    let r = run(
        &config,
        &cache_p,
        &["prefetch", "--platform", "linux/amd64", "multi:1"],
    )
    .await;
    assert!(r.ok());
    assert!(r.stdout.contains("(2 manifests"), "{}", r.stdout);
    let partial = w.join("partial");
    let r = run(
        &config,
        &cache_p,
        &["export", "multi:1", "-o", partial.to_str().unwrap()],
    )
    .await;
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr
            .contains(&format!("linux/arm64/v8 manifest {}", arm.manifest.digest)),
        "{}",
        r.stderr
    );
    assert!(!partial.join("index.json").exists(), "nothing written");
    let r = run(
        &config,
        &cache_p,
        &[
            "export",
            "multi:1",
            "-o",
            partial.to_str().unwrap(),
            "--allow-partial",
        ],
    )
    .await;
    assert!(r.ok());
    assert!(r.stderr.contains("left out"), "{}", r.stderr);

    // 6. Import into fresh caches: from the tar, and from the directory.
    let cache_b = w.join("cache-b");
    let r = run(&config, &cache_b, &["import", tar.to_str().unwrap()]).await;
    assert!(r.ok(), "import of the tar");
    assert!(
        r.stdout.contains("tag 1 of hub/library/multi")
            && r.stdout.contains("tag 1 of hub/library/hello"),
        "{}",
        r.stdout
    );
    let cache_d = w.join("cache-d");
    let r = run(&config, &cache_d, &["import", layout.to_str().unwrap()]).await;
    assert!(r.ok(), "import of the directory");
    assert_eq!(
        files(&cache_b),
        files(&cache_d),
        "the tar and the directory give the same cache"
    );
    // A tar skopeo wrote (Go's archive/tar) imports the same way.
    let skopeo_tar = w.join("skopeo.tar");
    skopeo(&[
        "copy",
        "--all",
        "--preserve-digests",
        &format!("oci:{}:hub/library/multi:1", layout.display()),
        &format!("oci-archive:{}:hub/library/multi:1", skopeo_tar.display()),
    ])
    .await
    .unwrap();
    let cache_e = w.join("cache-e");
    let r = run(&config, &cache_e, &["import", skopeo_tar.to_str().unwrap()]).await;
    assert!(r.ok(), "import of skopeo's tar");
    assert!(
        r.stdout.contains(&format!(
            "hub/library/multi:1: {}, tag 1 of hub/library/multi",
            multi.digest()
        )),
        "{}",
        r.stdout
    );
    for d in &all_blobs {
        assert!(cached_blob(&cache_b, d).is_file(), "{d} imported");
    }

    // 7. A damaged blob: the layout is refused, the digest named, nothing lands.
    let damaged = w.join("damaged");
    copy_dir(&layout, &damaged);
    let victim = hello.images[0].layers[1].digest.clone();
    let victim_path = damaged
        .join("blobs/sha256")
        .join(victim.strip_prefix("sha256:").unwrap());
    let mut bytes = std::fs::read(&victim_path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&victim_path, &bytes).unwrap();
    let cache_c = w.join("cache-c");
    let r = run(&config, &cache_c, &["import", damaged.to_str().unwrap()]).await;
    assert_eq!(r.code, Some(1), "a damaged layout is refused");
    assert!(
        r.stderr.contains(&victim) && r.stderr.contains("hashes to"),
        "{}",
        r.stderr
    );
    assert_eq!(files(&cache_c), Vec::<String>::new(), "nothing landed");

    // 8. The registry is gone; regcache serves cache B offline.
    reg.stop();
    let server = Server::start(&config, &cache_b, &["--offline"]);
    let host = server.addr.clone();
    let pulled = w.join("pulled");
    std::fs::create_dir_all(&pulled).unwrap();
    let pull = |reference: String, sub: &str, extra: &'static [&'static str]| {
        let dest = pulled.join(sub);
        async move {
            image::skopeo_pull(&reference, &dest, extra)
                .await
                .unwrap_or_else(|e| panic!("skopeo pull {reference}: {e:#}"))
        }
    };
    assert_eq!(
        pull(format!("{host}/hello:1"), "hello-tag", &[]).await,
        vec![hello.digest().to_owned()]
    );
    assert_eq!(
        pull(format!("{host}/multi:1"), "multi-tag", &["--all"]).await,
        vec![multi.digest().to_owned()]
    );
    assert_eq!(
        pull(
            format!("{host}/library/hello@{}", hello.digest()),
            "hello-digest",
            &[]
        )
        .await,
        vec![hello.digest().to_owned()]
    );
    assert_eq!(
        pull(
            format!("{host}/multi@{}", arm.manifest.digest),
            "arm-digest",
            &[]
        )
        .await,
        vec![arm.manifest.digest.clone()]
    );
    let raw = image::skopeo_inspect_raw(&format!("{host}/multi:1"), &[])
        .await
        .unwrap();
    assert_eq!(raw, multi.index_bytes.clone().unwrap());
    eprintln!("skopeo part done after {:?}", started.elapsed());

    // 9. dockerd with regcache as its mirror: Docker Hub names, served offline.
    let docker = require_peer!(Dockerd::start(&[host.as_str()], &[host.as_str()]).await);
    for (name, digest) in [("hello:1", hello.digest()), ("multi:1", multi.digest())] {
        docker.docker_ok(&["pull", name]).await.unwrap();
        let repo_digests = docker
            .docker_ok(&[
                "image",
                "inspect",
                "--format",
                "{{json .RepoDigests}}",
                name,
            ])
            .await
            .unwrap();
        assert!(
            repo_digests.contains(digest),
            "{name}: {repo_digests} has {digest}"
        );
    }
    let id = docker
        .docker_ok(&["image", "inspect", "--format", "{{.Id}}", "hello:1"])
        .await
        .unwrap();
    assert_eq!(id.trim(), hello.images[0].config.digest, "same image");
    let out = docker
        .docker_ok(&["run", "--rm", "--network", "none", "hello:1"])
        .await
        .unwrap();
    assert_eq!(out.trim(), HELLO);
    let log = std::fs::read_to_string(docker.log_path()).unwrap();
    assert!(
        !log.contains("registry-1.docker.io"),
        "no fallback to Docker Hub was attempted"
    );
    drop(server);
    eprintln!(
        "prefetch_export_import_then_serve_offline_with_the_original_digests took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn importing_a_layout_whose_ref_names_are_only_tags() {
    // The layouts test support writes are what `skopeo copy … oci:DIR:1` makes: the ref
    // name is a bare tag.
    let layout =
        image::single_arch_with_layers("1", &[Layer::deterministic(64 * 1024, 42)]).unwrap();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let config = write_config(w, "http://127.0.0.1:9");
    let cache = w.join("cache");
    let path = layout.path().to_str().unwrap();
    let r = run(&config, &cache, &["import", path]).await;
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("--repository"), "{}", r.stderr);
    assert!(
        files(&cache).is_empty(),
        "nothing landed: {:?}",
        files(&cache)
    );
    let r = run(
        &config,
        &cache,
        &["import", path, "--repository", "team/app"],
    )
    .await;
    assert!(r.ok());
    assert!(
        r.stdout
            .contains(&format!("1: {}, tag 1 of hub/team/app", layout.digest())),
        "{}",
        r.stdout
    );
    for d in blob_digests(&[&layout]) {
        assert!(cached_blob(&cache, &d).is_file(), "{d}");
    }
    // Served offline by tag to a client that names it as it would through regcache.
    let server = Server::start(&config, &cache, &["--offline"]);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = client
        .get(format!("http://{}/v2/team/app/manifests/1", server.addr))
        .header("accept", image::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["docker-content-digest"], layout.digest());

    // Importing into the folder an offline regcache serves: the new tag is served at once.
    let second =
        image::single_arch_with_layers("2", &[Layer::deterministic(64 * 1024, 43)]).unwrap();
    let r = run(
        &config,
        &cache,
        &[
            "import",
            second.path().to_str().unwrap(),
            "--repository",
            "team/app",
        ],
    )
    .await;
    assert!(r.ok());
    let resp = client
        .get(format!("http://{}/v2/team/app/manifests/2", server.addr))
        .header("accept", image::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["docker-content-digest"], second.digest());
}

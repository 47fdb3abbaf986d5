//! Owns the status-page test in a real browser: headless Chromium loads the page while a
//! big blob download is held half-way by the fake upstream, and the DOM it built must show
//! that download with its progress, the hit ratio, the cache size against its limit, the
//! upstream's health, the most pulled repository and the charts of the last hour. A
//! screenshot is kept as a test artefact (`target/test-artifacts/status.png`).

mod fake;
mod scrape;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fake::*;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CHROMIUM: &str = "/usr/bin/chromium";

/// What a Chromium run gave.
enum Run {
    /// It ran; its standard output.
    Ran(String),
    /// It could not start or load anything; why.
    CannotStart(String),
}

/// Runs headless Chromium with a fresh profile and `action` (`--dump-dom`,
/// `--screenshot=...`) on `url`; killed (its whole process group) after a minute.
async fn chromium(action: &str, url: &str) -> Run {
    if !Path::new(CHROMIUM).exists() {
        return Run::CannotStart(format!(
            "{CHROMIUM} is not installed (Debian package chromium)"
        ));
    }
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1100",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(action)
    .arg(url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0)
    .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Run::CannotStart(format!("cannot run {CHROMIUM}: {e}")),
    };
    let pgid = child.id();
    match tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await {
        Ok(Ok(out)) => {
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            if !out.status.success() && stdout.is_empty() {
                let err = String::from_utf8_lossy(&out.stderr);
                let tail: Vec<&str> = err.lines().rev().take(8).collect();
                return Run::CannotStart(format!("{}: {}", out.status, tail.join(" | ")));
            }
            Run::Ran(stdout)
        }
        Ok(Err(e)) => Run::CannotStart(e.to_string()),
        Err(_) => {
            if let Some(pgid) = pgid {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pgid}")])
                    .status();
            }
            panic!("chromium did not finish {action} {url} within a minute");
        }
    }
}

/// The text content of the element with `id` in a serialized DOM, and its opening tag.
fn element(dom: &str, id: &str) -> (String, String) {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the DOM:\n{dom}"));
    let open = dom[..at].rfind('<').unwrap();
    let close = at + dom[at..].find('>').unwrap();
    let tag = dom[open..=close].to_owned();
    let text_end = close + 1 + dom[close + 1..].find('<').unwrap();
    (tag, dom[close + 1..text_end].trim().to_owned())
}

fn artefact(name: &str) -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

async fn written_so_far(proxy: &Proxy) -> f64 {
    scrape::scrape(&proxy.url("/metrics"))
        .await
        .get("regcache_downloads_in_flight_written_bytes", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_a_held_download_the_hit_ratio_and_the_cache_size() {
    let up = FakeUpstream::start().await;
    let small = blob_of(5000, 1);
    let img = push_image(
        &up,
        "team/app",
        "1.0",
        std::slice::from_ref(&small),
        OCI_MANIFEST,
    );
    let big = blob_of(64 * CHUNK, 2);
    let big_digest = up.add_blob(big.clone());
    let mut cfg = config_for(&up.url());
    cfg.cache.max_size = Some(regcache::units::ByteSize(64 << 20));
    let proxy = Proxy::start(cfg).await;

    // Two pulls of the small image: a miss, then a hit, for the tag and its one layer.
    for _ in 0..2 {
        let r = client()
            .get(proxy.url("/v2/team/app/manifests/1.0"))
            .header("Accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        let r = client()
            .get(proxy.url(&format!("/v2/team/app/blobs/{}", img.layers[0])))
            .send()
            .await
            .unwrap();
        same(&r.bytes().await.unwrap(), &small);
    }
    // The big blob: the upstream sends 10 of its 64 chunks, then holds.
    let gate = up.gate();
    gate.add_permits(10);
    let url = proxy.url(&format!("/v2/team/app/blobs/{big_digest}"));
    let reader = tokio::spawn(async move { client().get(url).send().await?.bytes().await });
    let held_at = (10 * CHUNK) as f64;
    for _ in 0..2000 {
        if written_so_far(&proxy).await >= held_at {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        written_so_far(&proxy).await,
        held_at,
        "download held at 10 chunks"
    );

    let page = proxy.url("/");
    // The charts draw the interval since start once it is a second long.
    let mut charted = false;
    for _ in 0..200 {
        let html = client()
            .get(&page)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if html.contains("id=\"chart-bytes\"") {
            charted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(charted, "the charts never appeared");
    let dom = match chromium("--dump-dom", &page).await {
        Run::Ran(dom) => dom,
        Run::CannotStart(why) => {
            eprintln!(
                "SKIPPED chromium_shows_a_held_download_the_hit_ratio_and_the_cache_size: chromium cannot start: {why}"
            );
            up.ungate();
            return;
        }
    };
    // The download under way, with its progress.
    let row = format!(
        "<tr class=\"download\" data-digest=\"{big_digest}\" data-written=\"{}\" data-total=\"{}\">",
        10 * CHUNK,
        big.len()
    );
    assert!(dom.contains(&row), "{row} not in:\n{dom}");
    assert!(
        dom.contains(&format!(
            "<progress value=\"{}\" max=\"{}\">",
            10 * CHUNK,
            big.len()
        )),
        "{dom}"
    );
    assert!(dom.contains("640.0 KiB / 4.0 MiB"), "{dom}");
    assert!(dom.contains("15.6%"), "10 of 64 chunks: {dom}");
    // Hits: the tag and the layer once each; misses: both once, and the big blob.
    let (tag, text) = element(&dom, "hit-ratio");
    assert_eq!(text, "40.0%");
    assert!(tag.contains("data-ratio=\"0.4000\""), "{tag}");
    // The cache holds the layer and the manifest (after its media-type line); the config
    // was never asked for.
    let cached = small.len() + img.manifest.len() + OCI_MANIFEST.len() + 1;
    let (tag, _) = element(&dom, "cache-size");
    assert!(
        tag.contains(&format!("data-bytes=\"{cached}\""))
            && tag.contains(&format!("data-limit=\"{}\"", 64 << 20)),
        "{tag}, expected {cached} bytes"
    );
    assert_eq!(element(&dom, "cache-entries").1, "2");
    assert!(
        dom.contains("<tr class=\"upstream\" data-name=\"up\" data-state=\"up\">"),
        "{dom}"
    );
    assert!(
        dom.contains("<td>up/team/app</td><td class=\"n\">2</td>"),
        "{dom}"
    );
    // The charts of the last hour: three inline SVGs, each with a drawn line.
    for id in ["chart-bytes", "chart-hit-ratio", "chart-requests"] {
        let (tag, _) = element(&dom, id);
        assert!(tag.starts_with("<figure"), "{tag}");
        assert!(!tag.contains("data-intervals=\"0\""), "{tag}");
    }
    assert_eq!(dom.matches("<svg").count(), 3, "{dom}");
    for series in [
        "served from the cache",
        "fetched upstream",
        "lookups answered from the cache",
        "requests answered",
    ] {
        let marker = format!("data-series=\"{series}\" d=\"");
        let at = dom
            .find(&marker)
            .unwrap_or_else(|| panic!("no line for {series}:\n{dom}"))
            + marker.len();
        let d = &dom[at..at + dom[at..].find('"').unwrap()];
        assert!(d.starts_with('M') && d.contains('L'), "{series}: {d}");
    }
    let (tag, _) = element(&dom, "chart-hit-ratio");
    if tag.contains("data-intervals=\"1\"") {
        // One interval since start: the same 2 hits of 5 lookups as the card.
        assert!(
            dom.contains("lookups answered from the cache (now 40%)"),
            "{dom}"
        );
    }
    // Nothing on the page asks for a script.
    assert!(!dom.contains("<script"));

    let shot = artefact("status.png");
    let _ = std::fs::remove_file(&shot);
    match chromium(&format!("--screenshot={}", shot.display()), &page).await {
        Run::Ran(_) => {}
        Run::CannotStart(why) => {
            panic!("chromium dumped the DOM but cannot take a screenshot: {why}")
        }
    }
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("{}: {e}", shot.display()));
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "a real PNG"
    );
    eprintln!("status page screenshot: {}", shot.display());

    // Released: the download completes and leaves the page.
    up.ungate();
    same(&reader.await.unwrap().unwrap(), &big);
    assert!(
        proxy.app.downloads_in_flight() == 0 || {
            until(|| proxy.app.downloads_in_flight() == 0).await;
            true
        }
    );
    let html = client()
        .get(proxy.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("id=\"no-downloads\""), "{html}");
}

#[tokio::test]
async fn on_the_registry_listener_the_page_needs_pull_access() {
    use std::io::Write as _;
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let mut f = std::fs::File::create(&htpasswd).unwrap();
    writeln!(f, "ops:{}", bcrypt::hash("ops-secret", 4).unwrap()).unwrap();
    let mut cfg = config_for(&up.url());
    cfg.auth.htpasswd = Some(htpasswd);
    cfg.auth.anonymous_pull = false;
    let proxy = Proxy::start(cfg).await;
    let r = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"regcache\"");
    let r = client()
        .get(proxy.url("/"))
        .basic_auth("ops", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(proxy.url("/"))
        .basic_auth("ops", Some("ops-secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    assert!(
        r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("default-src 'none'")
    );
    assert!(r.text().await.unwrap().contains("<h1>regcache</h1>"));
    // Health and metrics stay open for probes and scrapers.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = client().get(proxy.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
}

//! Blob behaviour against the fake upstream: single flight, streaming to late joiners, ranges
//! on downloading and cached blobs, corruption, disconnects, redirects, restart.

mod fake;

use std::sync::Arc;

use fake::*;
use futures_util::StreamExt;
use tokio::sync::Barrier;

async fn setup() -> (FakeUpstream, Proxy) {
    let up = FakeUpstream::start().await;
    let proxy = Proxy::start(config_for(&up.url())).await;
    (up, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_cold_gets_fetch_upstream_once() {
    let (up, proxy) = setup().await;
    let data = blob_of(3 * 1024 * 1024 + 17, 1);
    let d = up.add_blob(data.clone());
    let barrier = Arc::new(Barrier::new(32));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (b, url, d) = (
            barrier.clone(),
            proxy.url(&format!("/v2/lib/app/blobs/{d}")),
            d.clone(),
        );
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            let r = client().get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["docker-content-digest"], d.as_str());
            r.bytes().await.unwrap()
        }));
    }
    for t in tasks {
        same(&t.await.unwrap(), &data);
    }
    assert_eq!(up.blob_gets(&d), 1);
    // Served from disk afterwards.
    let r = client()
        .get(proxy.url(&format!("/v2/lib/app/blobs/{d}")))
        .send()
        .await
        .unwrap();
    same(&r.bytes().await.unwrap(), &data);
    assert_eq!(up.blob_gets(&d), 1);
}

#[tokio::test]
async fn headers_arrive_before_the_body_and_a_late_joiner_gets_everything() {
    let (up, proxy) = setup().await;
    let data = blob_of(20 * CHUNK, 2);
    let d = up.add_blob(data.clone());
    let gate = up.gate();
    gate.add_permits(3);
    let url = proxy.url(&format!("/v2/lib/app/blobs/{d}"));
    // Headers come back while the upstream has sent only 3 of 20 chunks.
    let first = client().get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.content_length(), Some(data.len() as u64));
    let mut s1 = first.bytes_stream();
    let mut got1 = Vec::new();
    while got1.len() < 2 * CHUNK {
        got1.extend_from_slice(&s1.next().await.unwrap().unwrap());
    }
    // A late joiner mid-download.
    let late = client().get(&url).send().await.unwrap();
    assert_eq!(late.status(), 200);
    up.ungate();
    let got2 = late.bytes().await.unwrap();
    while let Some(c) = s1.next().await {
        got1.extend_from_slice(&c.unwrap());
    }
    same(&got1, &data);
    same(&got2, &data);
    assert_eq!(up.blob_gets(&d), 1);
}

#[tokio::test]
async fn ranges_on_a_blob_still_downloading_use_the_same_download() {
    let (up, proxy) = setup().await;
    let data = blob_of(16 * CHUNK, 3);
    let d = up.add_blob(data.clone());
    let gate = up.gate();
    gate.add_permits(1);
    let url = proxy.url(&format!("/v2/lib/app/blobs/{d}"));
    let whole = client().get(&url).send().await.unwrap();
    // containerd-style parallel open-ended ranges while the download runs.
    let mut ranged = Vec::new();
    for (i, spec) in [
        "bytes=0-99",
        "bytes=100000-",
        "bytes=500000-",
        "bytes=-1000",
    ]
    .iter()
    .enumerate()
    {
        let r = client()
            .get(&url)
            .header("Range", *spec)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206, "{spec}");
        ranged.push((i, spec.to_string(), r));
    }
    up.ungate();
    let len = data.len();
    for (_, spec, r) in ranged {
        let cr = r.headers()["content-range"].to_str().unwrap().to_owned();
        let body = r.bytes().await.unwrap();
        let (start, end) = match spec.as_str() {
            "bytes=0-99" => (0, 99),
            "bytes=100000-" => (100000, len - 1),
            "bytes=500000-" => (500000, len - 1),
            _ => (len - 1000, len - 1),
        };
        assert_eq!(cr, format!("bytes {start}-{end}/{len}"));
        same(&body, &data.slice(start..=end));
    }
    same(&whole.bytes().await.unwrap(), &data);
    assert_eq!(up.blob_gets(&d), 1);
}

#[tokio::test]
async fn ranges_on_a_cached_blob() {
    let (up, proxy) = setup().await;
    let data = blob_of(1000, 4);
    let d = up.add_blob(data.clone());
    let url = proxy.url(&format!("/v2/lib/app/blobs/{d}"));
    same(
        &client()
            .get(&url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        &data,
    );
    let r = client()
        .get(&url)
        .header("Range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/1000");
    assert_eq!(r.headers()["content-length"], "10");
    same(&r.bytes().await.unwrap(), &data.slice(10..20));
    let r = client()
        .get(&url)
        .header("Range", "bytes=-5")
        .send()
        .await
        .unwrap();
    same(&r.bytes().await.unwrap(), &data.slice(995..));
    let r = client()
        .get(&url)
        .header("Range", "bytes=990-")
        .send()
        .await
        .unwrap();
    same(&r.bytes().await.unwrap(), &data.slice(990..));
    let r = client()
        .get(&url)
        .header("Range", "bytes=1000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */1000");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "RANGE_INVALID");
    let r = client().head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "1000");
    assert_eq!(r.headers()["etag"], format!("\"{d}\"").as_str());
    assert_eq!(up.blob_gets(&d), 1);
}

#[tokio::test]
async fn a_corrupt_blob_is_never_committed_and_a_fixed_upstream_then_works() {
    let (up, proxy) = setup().await;
    let data = blob_of(5 * CHUNK, 5);
    let d = up.add_blob(data.clone());
    up.set_corrupt(true);
    let url = proxy.url(&format!("/v2/lib/app/blobs/{d}"));
    let r = client().get(&url).send().await.unwrap();
    // Headers went out before the end; the body must then fail, not end cleanly.
    assert!(
        r.bytes().await.is_err(),
        "a corrupt body must not complete cleanly"
    );
    let blob_file = proxy.blob_path(&d);
    fake::until(|| proxy.app.downloads_in_flight() == 0).await;
    assert!(!blob_file.exists());
    assert_eq!(
        std::fs::read_dir(proxy.dir.path().join("tmp"))
            .unwrap()
            .count(),
        0
    );
    up.set_corrupt(false);
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    same(&r.bytes().await.unwrap(), &data);
    proxy.committed().await;
    assert!(blob_file.exists());
    assert_eq!(up.blob_gets(&d), 2);
}

#[tokio::test]
async fn a_leader_hanging_up_does_not_abort_the_fill() {
    let (up, proxy) = setup().await;
    let data = blob_of(12 * CHUNK, 6);
    let d = up.add_blob(data.clone());
    let gate = up.gate();
    gate.add_permits(2);
    let url = proxy.url(&format!("/v2/lib/app/blobs/{d}"));
    let r = client().get(&url).send().await.unwrap();
    let mut s = r.bytes_stream();
    let _ = s.next().await.unwrap().unwrap();
    drop(s);
    up.ungate();
    fake::until(|| proxy.app.downloads_in_flight() == 0).await;
    let r = client().get(&url).send().await.unwrap();
    same(&r.bytes().await.unwrap(), &data);
    assert_eq!(up.blob_gets(&d), 1);
}

#[tokio::test]
async fn missing_blob_is_an_oci_404_and_nothing_is_cached() {
    let (up, proxy) = setup().await;
    let d = sha(b"never uploaded");
    let url = proxy.url(&format!("/v2/lib/app/blobs/{d}"));
    for _ in 0..2 {
        let r = client().get(&url).send().await.unwrap();
        assert_eq!(r.status(), 404);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
    }
    let r = client().head(&url).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(up.blob_gets(&d), 2);
    assert_eq!(proxy.app.downloads_in_flight(), 0);
}

#[tokio::test]
async fn redirects_are_followed_without_the_registry_authorization() {
    let up = FakeUpstream::start().await;
    let cdn = FakeUpstream::start().await;
    up.set_auth(AuthMode::Bearer { creds: None });
    let data = blob_of(3000, 7);
    let d = up.add_blob(data.clone());
    cdn.add_blob(data.clone());
    up.redirect_blobs_to(&cdn.url());
    let proxy = Proxy::start(config_for(&up.url())).await;
    let r = client()
        .get(proxy.url(&format!("/v2/lib/app/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    same(&r.bytes().await.unwrap(), &data);
    let registry_get = up
        .seen()
        .into_iter()
        .find(|s| s.path.contains("/blobs/") && s.authorization.is_some())
        .expect("the registry request carried the token");
    assert!(registry_get.authorization.unwrap().starts_with("Bearer "));
    let cdn_hits = cdn.seen();
    assert_eq!(cdn_hits.len(), 1);
    assert_eq!(
        cdn_hits[0].authorization, None,
        "Authorization leaked to the redirect target"
    );
}

#[tokio::test]
async fn a_blob_head_does_not_download_and_the_cache_survives_a_restart() {
    let up = FakeUpstream::start().await;
    let data = blob_of(4000, 8);
    let d = up.add_blob(data.clone());
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let cfg = config_for(&up.url());
    let proxy = Proxy::start_in(cfg.clone(), dir.clone()).await;
    let url = proxy.url(&format!("/v2/lib/app/blobs/{d}"));
    let r = client().head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "4000");
    assert_eq!(up.blob_gets(&d), 0);
    client()
        .get(&url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    proxy.stop().await;
    // A stale temp file from a "crash" is cleared at start-up.
    std::fs::write(dir.path().join("tmp/leftover.part"), b"partial").unwrap();
    up.set_down(true);
    let proxy = Proxy::start_in(cfg, dir.clone()).await;
    assert!(!dir.path().join("tmp/leftover.part").exists());
    let r = client()
        .get(proxy.url(&format!("/v2/lib/app/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    same(&r.bytes().await.unwrap(), &data);
    assert_eq!(up.blob_gets(&d), 1);
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_with_no_internals() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = Proxy::start(config_for(&format!("http://{dead}"))).await;
    let r = client()
        .get(proxy.url(&format!("/v2/lib/app/blobs/{}", sha(b"x"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let text = r.text().await.unwrap();
    assert!(text.contains("\"errors\""));
    assert!(!text.contains(&dead.port().to_string()), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_stalled_upstream_is_abandoned_and_every_waiter_gets_an_error() {
    let up = FakeUpstream::start().await;
    let data = blob_of(8 * CHUNK, 10);
    let d = up.add_blob(data.clone());
    let gate = up.gate();
    gate.add_permits(2);
    let mut cfg = config_for(&up.url());
    cfg.timeouts.read_idle = regcache::units::HumanDuration(std::time::Duration::from_secs(30));
    let proxy = Proxy::start(cfg).await;
    let url = proxy.url(&format!("/v2/lib/app/blobs/{d}"));
    let a = client().get(&url).send().await.unwrap();
    let b = client().get(&url).send().await.unwrap();
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    // The upstream never sends the third chunk; paused time runs to the idle timeout.
    assert!(a.bytes().await.is_err());
    assert!(b.bytes().await.is_err());
    assert_eq!(proxy.app.downloads_in_flight(), 0);
    // Nothing was committed, and the next request starts a fresh download.
    up.ungate();
    let r = client().get(&url).send().await.unwrap();
    same(&r.bytes().await.unwrap(), &data);
    assert_eq!(up.blob_gets(&d), 2);
}

#[tokio::test]
async fn a_redirect_loop_is_refused_and_nothing_is_cached() {
    let up = FakeUpstream::start().await;
    let data = blob_of(1000, 20);
    let d = up.add_blob(data);
    up.redirect_blobs_to(&up.url());
    up.set_redirect_loop(true);
    let proxy = Proxy::start(config_for(&up.url())).await;
    let r = client()
        .get(proxy.url(&format!("/v2/lib/app/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("redirects"),
        "{v}"
    );
    // One registry request plus at most MAX_REDIRECTS hops, then it gave up.
    let hops = up.count("GET", "/cdn/");
    assert_eq!(hops, regcache::upstream::client::MAX_REDIRECTS);
}

#[tokio::test]
async fn a_wrong_content_length_is_never_cached() {
    for delta in [100i64, -100] {
        let up = FakeUpstream::start().await;
        let data = blob_of(5 * CHUNK, 21);
        let d = up.add_blob(data.clone());
        up.lie_about_length(delta);
        let proxy = Proxy::start(config_for(&up.url())).await;
        let url = proxy.url(&format!("/v2/lib/app/blobs/{d}"));
        let r = client().get(&url).send().await.unwrap();
        let body = r.bytes().await;
        assert!(
            body.is_err() || body.as_ref().unwrap().as_ref() != data.as_ref(),
            "delta {delta}: a body with a lying length must not arrive as the blob"
        );
        fake::until(|| proxy.app.downloads_in_flight() == 0).await;
        let blob_file = proxy.blob_path(&d);
        assert!(!blob_file.exists(), "delta {delta}: committed");
        // Fixed upstream: the next request works.
        up.lie_about_length(0);
        let r = client().get(&url).send().await.unwrap();
        same(&r.bytes().await.unwrap(), &data);
    }
}

#[tokio::test]
async fn garbage_collection_while_serving_is_safe() {
    use regcache::cache::store::{BlobStore, FsStore};
    let (up, proxy) = setup().await;
    let old = blob_of(3 * CHUNK, 50);
    let fresh = blob_of(1000, 51);
    let (d_old, d_fresh) = (up.add_blob(old.clone()), up.add_blob(fresh.clone()));
    let url = |d: &str| proxy.url(&format!("/v2/lib/app/blobs/{d}"));
    for d in [&d_old, &d_fresh] {
        client()
            .get(url(d))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    }
    proxy.committed().await;
    // A reader has `old` open; then `old` is made to look unused for 40 days.
    let reader = client().get(url(&d_old)).send().await.unwrap();
    let path = proxy.blob_path(&d_old);
    let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(40 * 86400);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(long_ago)
        .unwrap();
    let store = FsStore::open_shared(proxy.dir.path()).unwrap();
    let report = store
        .collect_garbage(std::time::Duration::from_secs(30 * 86400))
        .await
        .unwrap();
    assert_eq!(report.files, 1);
    assert!(!path.exists());
    // The open reader still gets the whole, correct body; the next request fetches it again.
    same(&reader.bytes().await.unwrap(), &old);
    same(
        &client()
            .get(url(&d_old))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        &old,
    );
    assert_eq!(up.blob_gets(&d_old), 2);
    same(
        &client()
            .get(url(&d_fresh))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        &fresh,
    );
    assert_eq!(up.blob_gets(&d_fresh), 1);
}

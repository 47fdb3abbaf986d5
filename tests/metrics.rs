//! Owns the `/metrics` tests against the in-process fake upstream, where exact counts are
//! known: misses then hits by kind, bytes served and fetched, stale answers and errors,
//! bounded labels, request ids, and the split onto `admin_listen`.

mod fake;
mod scrape;

use std::sync::Arc;

use bytes::Bytes;
use fake::*;
use scrape::scrape;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Pulls `repo:tag` the way a client does: the manifest by tag, then each blob. Returns the
/// body bytes received (manifest, blobs).
async fn pull(proxy: &Proxy, repo: &str, tag: &str, img: &Image) -> (usize, usize) {
    let r = client()
        .get(proxy.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let manifest = r.bytes().await.unwrap().len();
    let mut blobs = 0;
    for d in std::iter::once(&img.config).chain(img.layers.iter()) {
        let r = client()
            .get(proxy.url(&format!("/v2/{repo}/blobs/{d}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{d}");
        blobs += r.bytes().await.unwrap().len();
    }
    proxy.committed().await;
    (manifest, blobs)
}

fn metrics_url(proxy: &Proxy) -> String {
    proxy.url("/metrics")
}

#[tokio::test]
async fn a_cold_then_a_warm_pull_move_the_counters_by_exact_amounts() {
    let up = FakeUpstream::start().await;
    let layers = [blob_of(300_000, 1), blob_of(70_001, 2)];
    let img = push_image(&up, "team/app", "1.0", &layers, OCI_MANIFEST);
    let config_len = client_len(&up, &img.config).await;
    let blob_total = (layers[0].len() + layers[1].len() + config_len) as f64;
    let manifest_len = img.manifest.len() as f64;
    let proxy = Proxy::start(config_for(&up.url())).await;

    let before = scrape(&metrics_url(&proxy)).await;
    let (m, b) = pull(&proxy, "team/app", "1.0", &img).await;
    assert_eq!((m as f64, b as f64), (manifest_len, blob_total));
    let cold = scrape(&metrics_url(&proxy)).await;
    let cache =
        |kind: &'static str, result: &'static str| [("kind", kind), ("result", result)].to_vec();
    let d = |after: &scrape::Metrics, before: &scrape::Metrics, name: &str, l: &[(&str, &str)]| {
        after.delta(before, name, l)
    };
    assert_eq!(
        d(
            &cold,
            &before,
            "regcache_cache_requests_total",
            &cache("tag", "miss")
        ),
        1.0
    );
    assert_eq!(
        d(
            &cold,
            &before,
            "regcache_cache_requests_total",
            &cache("blob", "miss")
        ),
        3.0
    );
    assert_eq!(
        d(
            &cold,
            &before,
            "regcache_cache_requests_total",
            &[("result", "hit")]
        ),
        0.0
    );
    assert_eq!(
        d(
            &cold,
            &before,
            "regcache_upstream_fetched_bytes_total",
            &[("upstream", "up"), ("kind", "blob")]
        ),
        blob_total
    );
    assert_eq!(
        d(
            &cold,
            &before,
            "regcache_upstream_fetched_bytes_total",
            &[("upstream", "up"), ("kind", "manifest")]
        ),
        manifest_len
    );
    assert_eq!(
        d(
            &cold,
            &before,
            "regcache_served_bytes_total",
            &[("kind", "blob"), ("source", "upstream")]
        ),
        blob_total
    );
    assert_eq!(
        d(
            &cold,
            &before,
            "regcache_served_bytes_total",
            &[("kind", "tag"), ("source", "upstream")]
        ),
        manifest_len
    );
    assert_eq!(
        d(
            &cold,
            &before,
            "regcache_served_bytes_total",
            &[("source", "cache")]
        ),
        0.0
    );
    assert_eq!(
        d(
            &cold,
            &before,
            "regcache_blob_downloads_total",
            &[("upstream", "up"), ("outcome", "complete")]
        ),
        3.0
    );
    assert_eq!(
        d(
            &cold,
            &before,
            "regcache_http_requests_total",
            &[("route", "blob"), ("status", "2xx")]
        ),
        3.0
    );
    assert_eq!(
        d(
            &cold,
            &before,
            "regcache_http_requests_total",
            &[("route", "manifest"), ("status", "2xx")]
        ),
        1.0
    );
    // One manifest GET and three blob GETs went upstream, each timed.
    let upstream_2xx = d(
        &cold,
        &before,
        "regcache_upstream_requests_total",
        &[("upstream", "up"), ("outcome", "2xx")],
    );
    assert_eq!(upstream_2xx, 4.0);
    assert_eq!(
        d(
            &cold,
            &before,
            "regcache_upstream_request_duration_seconds_count",
            &[("upstream", "up")]
        ),
        upstream_2xx
    );
    assert_eq!(
        cold.get("regcache_upstream_reachable", &[("upstream", "up")]),
        1.0
    );
    assert_eq!(cold.get("regcache_downloads_in_flight", &[]), 0.0);
    assert_eq!(
        cold.get("regcache_cache_entries", &[]),
        4.0,
        "three blobs and the manifest"
    );
    // On disk a manifest is stored after a line giving its media type.
    assert_eq!(
        cold.get("regcache_cache_size_bytes", &[]),
        blob_total + manifest_len + (OCI_MANIFEST.len() + 1) as f64
    );

    // The same pull again: hits only, served from the cache, nothing more fetched.
    let (m, b) = pull(&proxy, "team/app", "1.0", &img).await;
    assert_eq!((m as f64, b as f64), (manifest_len, blob_total));
    let warm = scrape(&metrics_url(&proxy)).await;
    assert_eq!(
        d(
            &warm,
            &cold,
            "regcache_cache_requests_total",
            &cache("tag", "hit")
        ),
        1.0
    );
    assert_eq!(
        d(
            &warm,
            &cold,
            "regcache_cache_requests_total",
            &cache("blob", "hit")
        ),
        3.0
    );
    assert_eq!(
        d(
            &warm,
            &cold,
            "regcache_cache_requests_total",
            &[("result", "miss")]
        ),
        0.0
    );
    assert_eq!(
        d(&warm, &cold, "regcache_upstream_fetched_bytes_total", &[]),
        0.0
    );
    assert_eq!(
        d(
            &warm,
            &cold,
            "regcache_served_bytes_total",
            &[("kind", "blob"), ("source", "cache")]
        ),
        blob_total
    );
    assert_eq!(
        d(
            &warm,
            &cold,
            "regcache_served_bytes_total",
            &[("kind", "tag"), ("source", "cache")]
        ),
        manifest_len
    );
    // Over both pulls: fetched once, served twice.
    assert_eq!(
        warm.delta(&before, "regcache_served_bytes_total", &[("kind", "blob")]),
        2.0 * warm.delta(
            &before,
            "regcache_upstream_fetched_bytes_total",
            &[("kind", "blob")]
        )
    );

    // A manifest by digest is a manifest hit; a HEAD of a cached blob a blob hit.
    let r = client()
        .get(proxy.url(&format!("/v2/team/app/manifests/{}", img.manifest_digest)))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let r = client()
        .head(proxy.url(&format!("/v2/team/app/blobs/{}", img.layers[0])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let last = scrape(&metrics_url(&proxy)).await;
    assert_eq!(
        d(
            &last,
            &warm,
            "regcache_cache_requests_total",
            &cache("manifest", "hit")
        ),
        1.0
    );
    assert_eq!(
        d(
            &last,
            &warm,
            "regcache_cache_requests_total",
            &cache("blob", "hit")
        ),
        1.0
    );
    assert_eq!(
        d(
            &last,
            &warm,
            "regcache_served_bytes_total",
            &[("kind", "blob")]
        ),
        0.0,
        "a HEAD sends no body"
    );

    // Labels stay bounded: no repository, tag or digest anywhere in the exposition.
    for s in ["team/app", "team", "1.0", "sha256"] {
        assert!(
            !last.all_label_values().iter().any(|v| v.contains(s)),
            "{s} in a label: {:?}",
            last.all_label_values()
        );
    }
    assert!(!last.text.contains("sha256:"));
    for name in last.names() {
        assert!(name.starts_with("regcache_"), "{name}");
    }
    assert_eq!(
        last.label_values("upstream")
            .into_iter()
            .collect::<Vec<_>>(),
        ["up"]
    );
}

/// The config blob's length as the fake serves it.
async fn client_len(up: &FakeUpstream, digest: &str) -> usize {
    client()
        .get(format!("{}/v2/team/app/blobs/{digest}", up.url()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .len()
}

#[tokio::test]
async fn stale_answers_errors_and_upstream_health_are_counted() {
    let up = FakeUpstream::start().await;
    let img = push_image(&up, "team/app", "1.0", &[blob_of(1000, 3)], OCI_MANIFEST);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let proxy = Proxy::start_in(config_for(&up.url()), dir.clone()).await;
    pull(&proxy, "team/app", "1.0", &img).await;
    proxy.stop().await;
    // After a restart the tag answer must be revalidated, and the upstream is failing.
    up.set_down(true);
    let proxy = Proxy::start_in(config_for(&up.url()), dir.clone()).await;
    let before = scrape(&metrics_url(&proxy)).await;
    let r = client()
        .get(proxy.url("/v2/team/app/manifests/1.0"))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("warning").is_some());
    r.bytes().await.unwrap();
    // A blob the cache does not have cannot be served.
    let missing = up.add_blob(Bytes::from_static(b"not cached"));
    let r = client()
        .get(proxy.url(&format!("/v2/team/app/blobs/{missing}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    // Bad input is counted as such (under route "unknown": the path did not parse). A
    // malformed name: a malformed tag is answered 404 MANIFEST_UNKNOWN, as registries do.
    let r = client()
        .get(proxy.url("/v2/Team/app/manifests/1.0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let after = scrape(&metrics_url(&proxy)).await;
    let d = |name: &str, l: &[(&str, &str)]| after.delta(&before, name, l);
    assert_eq!(
        d(
            "regcache_cache_requests_total",
            &[("kind", "tag"), ("result", "stale")]
        ),
        1.0
    );
    assert_eq!(
        d(
            "regcache_cache_requests_total",
            &[("kind", "blob"), ("result", "miss")]
        ),
        1.0
    );
    assert_eq!(
        d(
            "regcache_served_bytes_total",
            &[("kind", "tag"), ("source", "cache")]
        ),
        img.manifest.len() as f64
    );
    assert_eq!(
        d(
            "regcache_request_errors_total",
            &[("reason", "upstream_status")]
        ),
        1.0
    );
    assert_eq!(
        d(
            "regcache_request_errors_total",
            &[("reason", "bad_request")]
        ),
        1.0
    );
    assert_eq!(
        d(
            "regcache_http_requests_total",
            &[("route", "blob"), ("status", "5xx")]
        ),
        1.0
    );
    assert_eq!(
        d(
            "regcache_http_requests_total",
            &[("route", "unknown"), ("status", "4xx")]
        ),
        1.0
    );
    assert!(
        d(
            "regcache_upstream_requests_total",
            &[("upstream", "up"), ("outcome", "5xx")]
        ) >= 2.0
    );
    assert_eq!(
        d(
            "regcache_blob_downloads_total",
            &[("outcome", "upstream_error")]
        ),
        1.0
    );
    // Answering 503 is reachable but failing; readiness says so and stays ready.
    assert_eq!(
        after.get("regcache_upstream_reachable", &[("upstream", "up")]),
        1.0
    );
}

#[tokio::test]
async fn request_ids_are_sent_back_and_a_sane_client_id_is_kept() {
    let up = FakeUpstream::start().await;
    let proxy = Proxy::start(config_for(&up.url())).await;
    let a = client().get(proxy.url("/v2/")).send().await.unwrap();
    let b = client().get(proxy.url("/v2/")).send().await.unwrap();
    let id = |r: &reqwest::Response| r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(id(&a), id(&b), "each request has its own id");
    let kept = client()
        .get(proxy.url("/v2/"))
        .header("X-Request-Id", "lb-7f3a.42")
        .send()
        .await
        .unwrap();
    assert_eq!(id(&kept), "lb-7f3a.42");
    let replaced = client()
        .get(proxy.url("/v2/"))
        .header("X-Request-Id", "x\"><script>")
        .send()
        .await
        .unwrap();
    assert_ne!(id(&replaced), "x\"><script>");
    // Errors carry one too.
    let e = client().get(proxy.url("/nope")).send().await.unwrap();
    assert_eq!(e.status(), 404);
    assert!(!id(&e).is_empty());
}

#[tokio::test]
async fn with_admin_listen_the_operator_endpoints_leave_the_registry_listener() {
    let up = FakeUpstream::start().await;
    let mut cfg = config_for(&up.url());
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    let proxy = Proxy::start(cfg).await;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(regcache::server::serve_admin(
        admin,
        proxy.app.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    for path in ["/metrics", "/healthz", "/readyz", "/"] {
        let r = client().get(proxy.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path} on the registry listener");
        let r = client()
            .get(format!("http://{admin_addr}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path} on the admin listener");
    }
    // The registry API is not on the admin listener.
    let r = client()
        .get(format!("http://{admin_addr}/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let m = scrape(&format!("http://{admin_addr}/metrics")).await;
    assert_eq!(
        m.get(
            "regcache_http_requests_total",
            &[("route", "unknown"), ("status", "4xx")]
        ),
        4.0,
        "the registry listener counted its four 404s"
    );
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

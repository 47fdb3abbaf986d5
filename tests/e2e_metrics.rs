//! Owns the end-to-end metrics test: real `skopeo copy` pulls through an in-process regcache
//! from a real token-auth `docker-registry`, with `/metrics` scraped before and after each pull.

mod scrape;
mod support;

use std::collections::BTreeMap;

use scrape::scrape;
use support::image::{self, Layer};
use support::proxy::{HUB, Hub, Proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_move_the_counters_by_the_image_sizes() {
    let hub = Hub::start().await.unwrap();
    let layout =
        image::single_arch_with_layers("1", &[Layer::deterministic(400 * 1024, 7)]).unwrap();
    hub.push(&layout, "library/hello:1").await.unwrap();
    let img = &layout.images[0];
    // Every blob of the image, and its size, as the registry holds them.
    let blobs: BTreeMap<String, u64> = std::iter::once(&img.config)
        .chain(img.layers.iter())
        .map(|d| (d.digest.clone(), d.size))
        .collect();
    let blob_bytes: u64 = blobs.values().sum();
    let n = blobs.len() as f64;
    hub.token.reset_counts();

    let proxy = Proxy::start(&hub.url()).await.unwrap();
    let metrics = format!("{}/metrics", proxy.url());
    let out = tempfile::tempdir().unwrap();
    let reference = format!("{}/hello:1", proxy.host());

    let before = scrape(&metrics).await;
    let got = image::skopeo_pull(&reference, &out.path().join("cold"), &[])
        .await
        .unwrap();
    assert_eq!(got, [layout.digest().to_owned()]);
    assert!(proxy.wait_idle().await);
    let cold = scrape(&metrics).await;
    let cache = |kind: &'static str, result: &'static str| [("kind", kind), ("result", result)];
    assert_eq!(
        cold.delta(
            &before,
            "regcache_cache_requests_total",
            &cache("blob", "miss")
        ),
        n,
        "one miss per blob: {}",
        cold.text
    );
    assert_eq!(
        cold.delta(
            &before,
            "regcache_cache_requests_total",
            &cache("tag", "miss")
        ),
        1.0
    );
    assert_eq!(
        cold.delta(
            &before,
            "regcache_cache_requests_total",
            &[("result", "hit")]
        ),
        0.0
    );
    assert_eq!(
        cold.delta(
            &before,
            "regcache_upstream_fetched_bytes_total",
            &[("upstream", HUB), ("kind", "blob")]
        ),
        blob_bytes as f64,
        "each blob fetched upstream once"
    );
    assert_eq!(
        cold.delta(
            &before,
            "regcache_upstream_fetched_bytes_total",
            &[("upstream", HUB), ("kind", "manifest")]
        ),
        img.manifest_bytes.len() as f64
    );
    assert_eq!(
        cold.delta(
            &before,
            "regcache_served_bytes_total",
            &[("kind", "blob"), ("source", "upstream")]
        ),
        blob_bytes as f64
    );
    // The registry agrees: each blob left it once.
    assert_eq!(
        hub.blob_gets().await,
        blobs.keys().map(|d| (d.clone(), 1)).collect()
    );
    assert_eq!(
        cold.get(
            "regcache_upstream_token_fetches_total",
            &[("upstream", HUB)]
        ),
        proxy.token_fetches() as f64
    );
    assert_eq!(proxy.token_fetches(), 1, "one token for the one scope");

    // The second pull is served from the cache.
    let got = image::skopeo_pull(&reference, &out.path().join("warm"), &[])
        .await
        .unwrap();
    assert_eq!(got, [layout.digest().to_owned()]);
    let warm = scrape(&metrics).await;
    assert_eq!(
        warm.delta(
            &cold,
            "regcache_cache_requests_total",
            &cache("blob", "hit")
        ),
        n
    );
    assert_eq!(
        warm.delta(&cold, "regcache_cache_requests_total", &cache("tag", "hit")),
        1.0
    );
    assert_eq!(
        warm.delta(
            &cold,
            "regcache_cache_requests_total",
            &[("result", "miss")]
        ),
        0.0
    );
    assert_eq!(
        warm.delta(&cold, "regcache_upstream_fetched_bytes_total", &[]),
        0.0
    );
    assert_eq!(
        warm.delta(
            &cold,
            "regcache_served_bytes_total",
            &[("kind", "blob"), ("source", "cache")]
        ),
        blob_bytes as f64
    );
    // Fetched once, served twice.
    assert_eq!(
        warm.delta(&before, "regcache_served_bytes_total", &[("kind", "blob")]),
        2.0 * blob_bytes as f64
    );
    assert_eq!(
        warm.get("regcache_upstream_reachable", &[("upstream", HUB)]),
        1.0
    );
    assert!(!warm.text.contains("library/hello"), "no repository label");
}

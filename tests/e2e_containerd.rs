//! Owns the containerd end-to-end test: `ctr image pull` through regcache as the `docker.io` mirror in `hosts.toml` (requests carry `?ns=docker.io`), cold and then into a fresh containerd.

mod support;

use std::collections::BTreeMap;
use std::time::Instant;

use support::image;
use support::peers::{Containerd, require_peer, write_hosts_toml};
use support::proxy::{Hub, Proxy, Tap};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_regcache_with_ns_and_fetches_blobs_once() {
    let started = Instant::now();
    let hub = Hub::start().await.unwrap();
    let hello = image::single_arch("1").unwrap();
    hub.push(&hello, "library/hello:1").await.unwrap();
    hub.token.reset_counts();
    let img = &hello.images[0];
    let layer = img.layers[0].digest.clone();
    let config = img.config.digest.clone();
    let once: BTreeMap<String, usize> = [(layer.clone(), 1), (config.clone(), 1)].into();

    let proxy = Proxy::start(&hub.url()).await.unwrap();
    // The tap relays to regcache unchanged and records what containerd sent.
    let tap = Tap::start(proxy.addr()).await.unwrap();
    let hosts = tempfile::tempdir().unwrap();
    // `server` is a dead loopback port, so nothing but the mirror can answer.
    write_hosts_toml(hosts.path(), "docker.io", &tap.host()).unwrap();
    let reference = "docker.io/library/hello:1";

    let mut first = require_peer!(Containerd::start().await);
    eprintln!("containerd up after {:?}", started.elapsed());
    first.pull(reference, hosts.path()).await.unwrap();
    let images = first.ctr_ok(&["image", "ls"]).await.unwrap();
    let line = images
        .lines()
        .find(|l| l.starts_with(reference))
        .unwrap_or_else(|| panic!("{reference} listed: {images}"));
    assert!(
        line.contains(hello.digest()),
        "manifest digest kept: {line}"
    );

    let seen = tap.requests();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|r| r.query() == Some("ns=docker.io")),
        "containerd sends ?ns=docker.io on every request: {seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|r| r.path() == "/v2/library/hello/manifests/1"),
        "resolved by tag through regcache: {seen:#?}"
    );
    for d in [&layer, &config] {
        let path = format!("/v2/library/hello/blobs/{d}");
        assert_eq!(
            seen.iter()
                .filter(|r| r.method == "GET" && r.path() == path)
                .count(),
            1,
            "GET {path}?ns=docker.io: {seen:#?}"
        );
    }
    assert_eq!(
        hub.blob_gets().await,
        once,
        "upstream served each blob once"
    );
    assert!(proxy.wait_idle().await);
    let cached = proxy.cached_blobs();
    assert!(
        cached.contains(&layer) && cached.contains(&config),
        "{cached:?}"
    );
    first.stop();

    // A fresh containerd has no content: it fetches every blob again, from regcache's cache.
    tap.clear();
    let second = require_peer!(Containerd::start().await);
    second.pull(reference, hosts.path()).await.unwrap();
    let images = second.ctr_ok(&["image", "ls", "-q"]).await.unwrap();
    assert!(images.contains(reference), "{images}");
    let seen = tap.requests();
    for d in [&layer, &config] {
        let path = format!("/v2/library/hello/blobs/{d}");
        assert!(
            seen.iter().any(|r| r.method == "GET"
                && r.path() == path
                && r.query() == Some("ns=docker.io")),
            "second containerd fetched {path} from regcache: {seen:#?}"
        );
    }
    assert_eq!(
        hub.blob_gets().await,
        once,
        "second pull fetched no blob from upstream"
    );
    assert_eq!(
        hub.registry.manifest_get_count("1"),
        1,
        "the tag was fetched upstream once (tag_ttl 300 s)"
    );
    assert_eq!(
        proxy.token_fetches(),
        1,
        "one token for repository:library/hello:pull: {:#?}",
        hub.token.requests()
    );
    assert_eq!(hub.token.scope_count("repository:library/hello:pull"), 1);
    eprintln!(
        "containerd_pulls_through_regcache_with_ns_and_fetches_blobs_once took {:?}",
        started.elapsed()
    );
}

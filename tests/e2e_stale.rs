//! The upstream goes away mid-test: a real `docker-registry` is stopped after a first pull,
//! and pulls by tag and by digest keep working through regcache with skopeo and the Docker
//! daemon, served from the cache (tags marked stale after their TTL).

mod support;

use std::time::Duration;

use regcache::units::HumanDuration;
use support::image;
use support::peers::{Dockerd, require_peer};
use support::proxy::{Hub, Proxy, hub_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_keep_working_with_the_upstream_stopped() {
    let mut hub = Hub::start().await.unwrap();
    let hello = image::single_arch("1").unwrap();
    let digest = hub.push(&hello, "library/hello:1").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = hub_config(&hub.url(), dir.path());
    // Every tag answer is due for revalidation by the next request, so the pulls below go
    // through the failed-revalidation path rather than a fresh answer.
    cfg.cache.tag_ttl = HumanDuration(Duration::from_millis(1));
    let proxy = Proxy::start_with(cfg).await.unwrap();
    let docker = Dockerd::start(&[proxy.host().as_str()], &[proxy.host().as_str()]).await;

    // Warm the cache while the upstream is up (skopeo, and dockerd when it can run here).
    let out = tempfile::tempdir().unwrap();
    let got = image::skopeo_pull(
        &format!("{}/hello:1", proxy.host()),
        &out.path().join("a"),
        &[],
    )
    .await
    .unwrap();
    assert!(got.contains(&digest));
    if let Ok(d) = &docker {
        d.docker_ok(&["pull", "hello:1"]).await.unwrap();
        d.docker_ok(&["rmi", "hello:1"]).await.unwrap();
    }
    assert!(proxy.wait_idle().await);

    hub.registry.stop();

    for reference in ["hello:1".to_string(), format!("library/hello@{digest}")] {
        let dest = tempfile::tempdir().unwrap();
        let got = image::skopeo_pull(
            &format!("{}/{reference}", proxy.host()),
            &dest.path().join("oci"),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("skopeo pull {reference} with the upstream stopped: {e:#}"));
        assert!(got.contains(&digest), "{reference}: {got:?}");
    }
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = c
        .get(format!("{}/v2/library/hello/manifests/1", proxy.url()))
        .header("Accept", image::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("warning").is_some(),
        "a tag served after a failed revalidation says it is stale"
    );

    let docker = require_peer!(docker);
    docker.docker_ok(&["pull", "hello:1"]).await.unwrap();
    let out = docker
        .docker_ok(&["run", "--rm", "--network", "none", "hello:1"])
        .await
        .unwrap();
    assert!(out.contains("hello from regcache"), "{out}");
    docker.docker_ok(&["rmi", "hello:1"]).await.unwrap();
    docker
        .docker_ok(&["pull", &format!("{}/library/hello@{digest}", proxy.host())])
        .await
        .unwrap();
}

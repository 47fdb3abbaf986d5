//! Owns the Docker daemon end-to-end test: a real `dockerd` pulls through regcache as its `registry-mirrors` entry and by explicit `127.0.0.1:PORT/name`, then runs what it pulled.

mod support;

use std::collections::BTreeMap;
use std::time::Instant;

use support::image::{self, HELLO};
use support::peers::{Dockerd, require_peer};
use support::proxy::{Hub, Proxy, Tap};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_pulls_through_regcache_mirror_and_runs() {
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
    // The tap relays to regcache unchanged and records what dockerd sent.
    let tap = Tap::start(proxy.addr()).await.unwrap();
    let mirror = tap.host();
    // Dockerd gets support's no-egress proxy environment: a fallback to
    // registry-1.docker.io would hit a dead loopback port, never the network.
    let docker = require_peer!(Dockerd::start(&[mirror.as_str()], &[mirror.as_str()]).await);
    eprintln!("dockerd up after {:?}", started.elapsed());

    // 1. Docker Hub short name: goes to the mirror, normalised to library/hello.
    docker.docker_ok(&["pull", "hello:1"]).await.unwrap();
    let seen = tap.requests();
    let manifest_reqs: Vec<_> = seen
        .iter()
        .filter(|r| r.path() == "/v2/library/hello/manifests/1")
        .collect();
    assert!(!manifest_reqs.is_empty(), "mirror asked by tag: {seen:#?}");
    assert!(
        manifest_reqs
            .iter()
            .all(|r| r.header_values("accept").len() > 1),
        "dockerd sends separate Accept lines: {manifest_reqs:#?}"
    );
    for d in [&layer, &config] {
        let path = format!("/v2/library/hello/blobs/{d}");
        assert!(
            seen.iter().any(|r| r.method == "GET" && r.path() == path),
            "GET {path} via the mirror: {seen:#?}"
        );
    }
    assert_eq!(
        hub.blob_gets().await,
        once,
        "upstream served each blob once"
    );
    assert!(
        hub.registry
            .count_requests("GET", "/v2/library/hello/manifests/")
            >= 1,
        "regcache fetched the manifest upstream"
    );
    assert!(proxy.wait_idle().await);
    let cached = proxy.cached_blobs();
    assert!(
        cached.contains(&layer) && cached.contains(&config),
        "{cached:?}"
    );

    let id = docker
        .docker_ok(&["image", "inspect", "--format", "{{.Id}}", "hello:1"])
        .await
        .unwrap();
    assert_eq!(id.trim(), config, "image id is the config digest");
    let repo_digests = docker
        .docker_ok(&[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            "hello:1",
        ])
        .await
        .unwrap();
    assert!(
        repo_digests.contains(hello.digest()),
        "manifest digest kept: {repo_digests}"
    );
    let out = docker
        .docker_ok(&["run", "--rm", "--network", "none", "hello:1"])
        .await
        .unwrap();
    assert_eq!(out.trim(), HELLO);

    // 2. Explicit name against the proxy: arrives un-normalised as /v2/hello/...; the
    // local image is removed first so dockerd must fetch config and layer again.
    docker.docker_ok(&["rmi", "hello:1"]).await.unwrap();
    tap.clear();
    let explicit = format!("{mirror}/hello:1");
    docker.docker_ok(&["pull", &explicit]).await.unwrap();
    let seen = tap.requests();
    assert!(
        seen.iter()
            .any(|r| r.path().starts_with("/v2/hello/manifests/")),
        "explicit name arrives un-normalised: {seen:#?}"
    );
    assert!(
        seen.iter()
            .all(|r| r.path() == "/v2/" || r.path().starts_with("/v2/hello/")),
        "{seen:#?}"
    );
    for d in [&layer, &config] {
        let path = format!("/v2/hello/blobs/{d}");
        assert!(
            seen.iter().any(|r| r.method == "GET" && r.path() == path),
            "GET {path}: {seen:#?}"
        );
    }
    assert_eq!(
        hub.blob_gets().await,
        once,
        "explicit-name pull served from regcache's cache"
    );
    let out = docker
        .docker_ok(&["run", "--rm", "--network", "none", &explicit])
        .await
        .unwrap();
    assert_eq!(out.trim(), HELLO);

    assert_eq!(
        proxy.token_fetches(),
        1,
        "one token for repository:library/hello:pull: {:#?}",
        hub.token.requests()
    );
    assert_eq!(hub.token.scope_count("repository:library/hello:pull"), 1);
    let log = std::fs::read_to_string(docker.log_path()).unwrap();
    assert!(
        !log.contains("registry-1.docker.io"),
        "no fallback to Docker Hub was attempted"
    );
    eprintln!(
        "dockerd_pulls_through_regcache_mirror_and_runs took {:?}",
        started.elapsed()
    );
}

//! Owns `config/mirror-registry.toml`, the copy-paste example for mirroring a registry that
//! is not Docker Hub: it is valid, it routes what Docker, containerd and podman send where
//! its comments say, and a misrouted request's 404 names the key to set.

mod fake;

use fake::*;
use regcache::config::Config;
use regcache::rewrite::RoutingTable;
use serde_json::Value;

fn example() -> Config {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/mirror-registry.toml");
    Config::from_file(std::path::Path::new(path))
        .unwrap()
        .validate()
        .unwrap()
}

#[test]
fn the_example_is_valid_and_routes_every_client_as_documented() {
    let config = example();
    let table = RoutingTable::new(&config);
    let route = |name: &str, ns: Option<&str>| {
        let t = table.resolve(&name.parse().unwrap(), None, ns).unwrap();
        (table.name(t.upstream).to_owned(), t.repository.to_string())
    };
    let at = |u: &str, r: &str| (u.to_owned(), r.to_owned());
    // podman's mirror and `docker pull cache:5000/team/app`: no prefix, no ns.
    assert_eq!(route("team/app", None), at("example", "team/app"));
    // containerd's hosts.toml for registry.example.com sends ?ns=registry.example.com.
    assert_eq!(
        route("team/app", Some("registry.example.com")),
        at("example", "team/app")
    );
    assert_eq!(
        route("team/app", Some("registry.example.com:443")),
        at("example", "team/app")
    );
    // Docker Hub stays: Docker's registry-mirrors sends library/ names, containerd ?ns=.
    assert_eq!(
        route("docker.io/library/alpine", None),
        at("docker.io", "library/alpine")
    );
    assert_eq!(
        route("library/alpine", Some("docker.io")),
        at("docker.io", "library/alpine")
    );
    assert!(
        table
            .resolve(&"x/y".parse().unwrap(), None, Some("ghcr.io"))
            .is_err()
    );
}

#[tokio::test]
async fn the_example_serves_through_a_registry_and_404s_carry_hints() {
    let hub = FakeUpstream::start().await;
    let up = FakeUpstream::start().await;
    let mut config = example();
    config.upstreams[0].url = Some(hub.url().parse().unwrap());
    config.upstreams[1].url = Some(up.url().parse().unwrap());
    // The example's registry host, as containerd names it, now served by the fake.
    config.upstreams[1].registry_hosts = vec!["registry.example.com".into()];
    config.upstreams[0].docker_hub = Some(true);
    config.cache_dir = Config::default().cache_dir;
    let proxy = Proxy::start(config).await;
    push_image(
        &up,
        "team/app",
        "1",
        &[blob_of(100, 1)],
        regcache::media::OCI_MANIFEST,
    );
    let get = |path: String| {
        let c = client();
        async move {
            let r = c
                .get(path)
                .header("accept", regcache::media::OCI_MANIFEST)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or_default();
            (
                status,
                body["errors"][0]["detail"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            )
        }
    };
    let (status, _) = get(proxy.url("/v2/team/app/manifests/1?ns=registry.example.com")).await;
    assert_eq!(status, 200, "containerd");
    let (status, _) = get(proxy.url("/v2/team/app/manifests/1")).await;
    assert_eq!(status, 200, "podman's mirror");

    let (status, detail) = get(proxy.url("/v2/x/y/manifests/1?ns=ghcr.io")).await;
    assert_eq!(status, 404);
    assert!(
        detail.contains("add \"ghcr.io\" to registry_hosts"),
        "{detail}"
    );
    // A one-component name on the example upstream, which has no Docker Hub naming.
    let (status, detail) = get(proxy.url("/v2/alpine/manifests/1")).await;
    assert_eq!(status, 404);
    assert!(detail.contains("set docker_hub = true"), "{detail}");
    // Docker Hub naming: the name was looked up as library/alpine, no hint needed.
    let (status, detail) = get(proxy.url("/v2/docker.io/alpine/manifests/1")).await;
    assert_eq!(status, 404);
    assert!(!detail.contains("docker_hub"), "{detail}");
    assert!(hub.count("GET", "/v2/library/alpine/manifests/1") >= 1);
}

//! Owns the smoke tests of the real-peer test support (tests/support) without regcache: registry + token server + skopeo, htpasswd, dockerd and containerd.

mod support;

use std::time::Instant;

use support::image::{self, HELLO, Layer};
use support::peers::{Containerd, Dockerd, require_peer, write_hosts_toml};
use support::registry::{ProxyUpstream, Registry, RegistryAuth, RegistryOptions};
use support::token::{TokenServer, TokenServerConfig, parse_scope};

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_push_pull_single_and_multi_arch() {
    let started = Instant::now();
    let token = TokenServer::start().await.expect("token server");
    let reg = Registry::start(token.registry_auth())
        .await
        .expect("registry in token mode");

    // Without a token the registry challenges with our realm.
    let resp = http()
        .get(format!("{}/v2/", reg.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    assert!(challenge.contains(&token.realm()), "{challenge}");

    let single = image::single_arch("v1").unwrap();
    let multi = image::multi_arch("v1").unwrap();
    assert_eq!(multi.images.len(), 2);
    let busybox_layer = single.images[0].layers[0].digest.clone();
    assert_eq!(
        multi.image("amd64").unwrap().layers[0].digest,
        busybox_layer,
        "amd64 image of the index shares the busybox layer"
    );
    let arm_layer = multi.image("arm64").unwrap().layers[0].digest.clone();

    let single_ref = format!("{}/e2e/busybox:v1", reg.host());
    let multi_ref = format!("{}/e2e/multi:v1", reg.host());
    let pushed = image::push(&single, &single_ref, None).await.unwrap();
    assert_eq!(pushed, single.digest());
    let pushed = image::push(&multi, &multi_ref, None).await.unwrap();
    assert_eq!(pushed, multi.digest());

    // skopeo had to get tokens, for pull+push on each repository.
    assert!(token.request_count() >= 2, "{:?}", token.requests());
    assert!(token.scope_count("repository:e2e/busybox:pull,push") >= 1);
    assert!(token.scope_count("repository:e2e/multi:pull,push") >= 1);
    assert!(token.requests().iter().all(|r| r.status == 200));
    assert_eq!(token.authorized_request_count(), 0, "anonymous skopeo");
    let scope = parse_scope("repository:127.0.0.1:5000/a/b:pull,push").unwrap();
    assert_eq!(
        (scope.kind.as_str(), scope.name.as_str()),
        ("repository", "127.0.0.1:5000/a/b")
    );
    assert_eq!(scope.actions, ["pull", "push"]);

    reg.settle_log().await;
    assert_eq!(
        reg.blob_get_count(&busybox_layer),
        0,
        "push does not GET blobs"
    );

    // Inspect answers the pushed digests.
    assert_eq!(
        image::skopeo_inspect_digest(&single_ref, &[])
            .await
            .unwrap(),
        single.digest()
    );
    assert_eq!(
        image::skopeo_inspect_digest(&multi_ref, &[]).await.unwrap(),
        multi.digest()
    );

    // Pull back, directly from the registry.
    let out = tempfile::tempdir().unwrap();
    let got = image::skopeo_pull(&single_ref, &out.path().join("single"), &[])
        .await
        .unwrap();
    assert_eq!(got, vec![single.digest().to_string()]);
    reg.settle_log().await;
    assert_eq!(reg.blob_get_count(&busybox_layer), 1);
    assert_eq!(
        reg.manifest_get_count("v1"),
        3,
        "2 inspects + 1 pull by tag"
    );

    let got = image::skopeo_pull(&multi_ref, &out.path().join("multi"), &["--all"])
        .await
        .unwrap();
    assert_eq!(got, vec![multi.digest().to_string()]);
    reg.settle_log().await;
    assert_eq!(reg.blob_get_count(&busybox_layer), 2);
    assert_eq!(reg.blob_get_count(&arm_layer), 1);
    let arm_manifest = &multi.image("arm64").unwrap().manifest.digest;
    assert_eq!(reg.manifest_get_count(arm_manifest), 1);

    // One platform only: the layout holds the arm64 manifest.
    let got = image::skopeo_pull(
        &multi_ref,
        &out.path().join("arm"),
        &["--override-arch", "arm64"],
    )
    .await
    .unwrap();
    assert_eq!(got, vec![arm_manifest.clone()]);
    assert!(reg.count_requests("GET", "/v2/e2e/multi/manifests/") >= 3);
    assert!(token.repository_request_count("e2e/multi") >= 2);
    eprintln!(
        "token_auth_push_pull_single_and_multi_arch took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_server_with_required_credentials() {
    let started = Instant::now();
    let token = TokenServer::start_with(TokenServerConfig {
        credentials: Some(("alice".to_string(), "s3cret".to_string())),
        ..TokenServerConfig::default()
    })
    .await
    .unwrap();
    let reg = Registry::start(token.registry_auth()).await.unwrap();
    let layout = image::single_arch_with_layers("v1", &[Layer::random(64 * 1024)]).unwrap();
    let dest = format!("{}/e2e/private:v1", reg.host());

    // Anonymous: the token server answers 401, so skopeo cannot push.
    assert!(image::push(&layout, &dest, None).await.is_err());
    assert!(token.requests().iter().any(|r| r.status == 401));

    let pushed = image::push(&layout, &dest, Some(("alice", "s3cret")))
        .await
        .unwrap();
    assert_eq!(pushed, layout.digest());
    assert!(token.authorized_request_count() >= 1);
    assert!(
        token
            .requests()
            .iter()
            .any(|r| r.status == 200 && r.username.as_deref() == Some("alice"))
    );

    let out = tempfile::tempdir().unwrap();
    let got = image::skopeo_pull(&dest, out.path(), &["--src-creds", "alice:s3cret"])
        .await
        .unwrap();
    assert_eq!(got, vec![layout.digest().to_string()]);

    // The OAuth2 password grant (containerd's way) works too; wrong passwords do not.
    let form = [
        ("grant_type", "password"),
        ("username", "alice"),
        ("password", "s3cret"),
        ("service", token.service()),
        ("scope", "repository:e2e/private:pull"),
        ("client_id", "smoke"),
    ];
    let resp = http().post(token.realm()).form(&form).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    let bearer = body["access_token"].as_str().unwrap().to_string();
    assert_eq!(body["expires_in"], 300);
    let resp = http()
        .get(format!("{}/v2/e2e/private/manifests/v1", reg.url()))
        .bearer_auth(&bearer)
        .header("accept", image::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = http()
        .get(token.realm())
        .query(&[("service", token.service())])
        .basic_auth("alice", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    eprintln!(
        "token_server_with_required_credentials took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn htpasswd_push_pull() {
    let started = Instant::now();
    let mut reg = Registry::start(RegistryAuth::Htpasswd {
        user: "bob".to_string(),
        password: "hunter2".to_string(),
    })
    .await
    .unwrap();
    let shared = Layer::deterministic(256 * 1024, 42);
    let a = image::single_arch_with_layers("a", std::slice::from_ref(&shared)).unwrap();
    let b = image::single_arch_with_layers("b", &[shared.clone(), Layer::random(1000)]).unwrap();
    assert_eq!(a.images[0].layers[1], b.images[0].layers[1]);

    let dest_a = format!("{}/e2e/a:1", reg.host());
    let dest_b = format!("{}/e2e/b:1", reg.host());
    assert!(image::push(&a, &dest_a, None).await.is_err(), "needs creds");
    image::push(&a, &dest_a, Some(("bob", "hunter2")))
        .await
        .unwrap();
    image::push(&b, &dest_b, Some(("bob", "hunter2")))
        .await
        .unwrap();

    let out = tempfile::tempdir().unwrap();
    assert!(
        image::skopeo_pull(&dest_b, &out.path().join("anon"), &[])
            .await
            .is_err()
    );
    let got = image::skopeo_pull(
        &dest_b,
        &out.path().join("b"),
        &["--src-creds", "bob:hunter2"],
    )
    .await
    .unwrap();
    assert_eq!(got, vec![b.digest().to_string()]);
    assert_eq!(
        image::skopeo_inspect_digest(&dest_a, &["--creds", "bob:hunter2"])
            .await
            .unwrap(),
        a.digest()
    );
    reg.settle_log().await;
    assert_eq!(reg.blob_get_count(shared.digest()), 1);
    assert!(reg.count_requests("GET", "/v2/") > 0);

    // Stop and restart on the same port with the same storage.
    let port = reg.port();
    reg.stop();
    assert!(!reg.is_running());
    assert!(
        http()
            .get(format!("{}/v2/", reg.url()))
            .send()
            .await
            .is_err()
    );
    reg.restart().await.unwrap();
    assert_eq!(reg.port(), port);
    assert_eq!(
        image::skopeo_inspect_digest(&dest_b, &["--creds", "bob:hunter2"])
            .await
            .unwrap(),
        b.digest()
    );
    eprintln!("htpasswd_push_pull took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_proxy_mode_baseline() {
    let started = Instant::now();
    let (upstream, layout) = registry_with_hello().await;
    let mirror = Registry::start_with(RegistryOptions {
        proxy: Some(ProxyUpstream {
            remote_url: upstream.url(),
            username: None,
            password: None,
        }),
        ..RegistryOptions::default()
    })
    .await
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let got = image::skopeo_pull(
        &format!("{}/library/hello:1", mirror.host()),
        out.path(),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(got, vec![layout.digest().to_string()]);
    upstream.settle_log().await;
    mirror.settle_log().await;
    let layer = &layout.images[0].layers[0].digest;
    assert_eq!(mirror.blob_get_count(layer), 1);
    assert!(upstream.blob_get_count(layer) >= 1);
    eprintln!(
        "registry_proxy_mode_baseline took {:?} (upstream blob GETs: {})",
        started.elapsed(),
        upstream.blob_get_count(layer)
    );
}

/// Pushes the busybox image as `library/hello:1` to a fresh anonymous registry.
async fn registry_with_hello() -> (Registry, image::OciLayout) {
    let reg = Registry::start(RegistryAuth::None).await.unwrap();
    let layout = image::single_arch("1").unwrap();
    image::push(&layout, &format!("{}/library/hello:1", reg.host()), None)
        .await
        .unwrap();
    (reg, layout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_comes_up_pulls_via_mirror_and_runs() {
    let started = Instant::now();
    let (reg, layout) = registry_with_hello().await;
    let host = reg.host();
    let mut docker = require_peer!(Dockerd::start(&[host.as_str()], &[host.as_str()]).await);
    eprintln!("dockerd up after {:?}", started.elapsed());

    docker.docker_ok(&["pull", "hello:1"]).await.unwrap();
    let out = docker
        .docker_ok(&["run", "--rm", "--network", "none", "hello:1"])
        .await
        .unwrap();
    assert_eq!(out.trim(), HELLO);
    reg.settle_log().await;
    assert_eq!(reg.blob_get_count(&layout.images[0].layers[0].digest), 1);
    assert!(reg.count_requests("HEAD", "/v2/library/hello/manifests/1") >= 1);

    // A name the mirror lacks: dockerd falls back to Docker Hub, which the no-egress proxy
    // environment turns into a refused loopback connection, without any DNS lookup.
    let out = docker
        .docker(&["pull", "regcache-e2e-absent:1"])
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("proxyconnect tcp: dial tcp 127.0.0.1:"),
        "{stderr}"
    );
    let log = std::fs::read_to_string(docker.log_path()).unwrap();
    assert!(!log.contains("lookup registry-1.docker.io"), "{log}");

    docker.stop();
    assert!(
        !docker.socket_path().exists(),
        "socket removed on graceful stop"
    );
    eprintln!(
        "dockerd_comes_up_pulls_via_mirror_and_runs took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_comes_up_and_pulls_via_hosts_toml() {
    let started = Instant::now();
    let (reg, layout) = registry_with_hello().await;
    let containerd = require_peer!(Containerd::start().await);
    eprintln!("containerd up after {:?}", started.elapsed());

    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(hosts.path(), "docker.io", &reg.host()).unwrap();
    containerd
        .pull("docker.io/library/hello:1", hosts.path())
        .await
        .unwrap();
    let images = containerd.ctr_ok(&["image", "ls", "-q"]).await.unwrap();
    assert!(images.contains("docker.io/library/hello:1"), "{images}");
    reg.settle_log().await;
    assert_eq!(reg.blob_get_count(&layout.images[0].layers[0].digest), 1);
    let ns = reg
        .access_log()
        .iter()
        .filter(|e| e.query.as_deref() == Some("ns=docker.io"))
        .count();
    assert!(ns >= 2, "containerd sends ?ns=docker.io");
    eprintln!(
        "containerd_comes_up_and_pulls_via_hosts_toml took {:?}",
        started.elapsed()
    );
}

//! Push through regcache to a real `docker-registry` (htpasswd upstream auth): skopeo and the
//! Docker daemon push, only new layers travel on a second push, a pull right after a push is
//! served from the cache, and client access control answers 401/403 as it should.

mod support;

use std::io::Write;

use regcache::config::{AuthConfig, Config, UpstreamConfig};
use support::image::{self, Layer};
use support::peers::{Dockerd, require_peer};
use support::proxy::Proxy;
use support::registry::{Registry, RegistryAuth};

const UP_USER: &str = "robot";
const UP_PASS: &str = "upstream-secret-4711";

struct Setup {
    registry: Registry,
    proxy: Proxy,
    _dir: tempfile::TempDir,
}

/// A real registry behind regcache (upstream `up`, basic auth with regcache's own
/// credentials) with push on for the htpasswd users `ci` (may push) and `reader` (may not).
async fn setup() -> Setup {
    let registry = Registry::start(RegistryAuth::Htpasswd {
        user: UP_USER.into(),
        password: UP_PASS.into(),
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let mut f = std::fs::File::create(&htpasswd).unwrap();
    for (u, p) in [("ci", "ci-pass"), ("reader", "read-pass")] {
        writeln!(f, "{u}:{}", bcrypt::hash(p, 4).unwrap()).unwrap();
    }
    let mut up = UpstreamConfig::new("up", registry.url().parse().unwrap());
    up.username = Some(UP_USER.into());
    up.password = Some(UP_PASS.into());
    let cfg = Config {
        cache_dir: dir.path().join("cache"),
        default_upstream: "up".into(),
        upstreams: vec![up],
        auth: AuthConfig {
            htpasswd: Some(htpasswd),
            push: true,
            push_users: vec!["ci".into()],
            anonymous_pull: true,
            ..AuthConfig::default()
        },
        ..Config::default()
    };
    let proxy = Proxy::start_with(cfg).await.unwrap();
    Setup {
        registry,
        proxy,
        _dir: dir,
    }
}

/// Blob uploads completed at the upstream (each ends with one `PUT .../blobs/uploads/...`).
fn blob_writes(reg: &Registry) -> usize {
    reg.access_log()
        .iter()
        .filter(|e| e.method == "PUT" && e.path.contains("/blobs/uploads/") && e.status == 201)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_push_through_regcache_then_pull_from_cache() {
    let s = setup().await;
    let shared = Layer::deterministic(300_000, 11);
    let v1 = image::single_arch_with_layers("1", std::slice::from_ref(&shared)).unwrap();
    let dest = format!("docker://{}/team/app:1", s.proxy.host());
    let pushed = image::push(&v1, &dest, Some(("ci", "ci-pass")))
        .await
        .unwrap();
    // The upstream holds the same digest.
    let upstream_ref = format!("docker://{}/team/app:1", s.registry.host());
    let at_upstream = image::skopeo_inspect_digest(
        &upstream_ref,
        &[
            "--tls-verify=false",
            "--creds",
            &format!("{UP_USER}:{UP_PASS}"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(at_upstream, pushed);
    assert_eq!(at_upstream, v1.digest());
    s.registry.settle_log().await;
    let first_writes = blob_writes(&s.registry);
    assert_eq!(
        first_writes, 3,
        "config, busybox and the shared layer uploaded once each"
    );

    // A second image sharing the busybox and `shared` layers: only its new layer and config go up.
    let v2 =
        image::single_arch_with_layers("2", &[shared, Layer::deterministic(200_000, 12)]).unwrap();
    image::push(
        &v2,
        &format!("docker://{}/team/app:2", s.proxy.host()),
        Some(("ci", "ci-pass")),
    )
    .await
    .unwrap();
    s.registry.settle_log().await;
    let second_writes = blob_writes(&s.registry) - first_writes;
    assert_eq!(
        second_writes, 2,
        "only the new layer and the new config are uploaded"
    );

    // A pull right after the push is served from the cache: no upstream blob GETs.
    let out = tempfile::tempdir().unwrap();
    let got = image::skopeo_pull(
        &format!("docker://{}/team/app:2", s.proxy.host()),
        &out.path().join("oci"),
        &[],
    )
    .await
    .unwrap();
    assert!(
        got.iter().any(|d| d == v2.digest()),
        "{got:?} vs {}",
        v2.digest()
    );
    s.registry.settle_log().await;
    let blob_gets = s
        .registry
        .access_log()
        .iter()
        .filter(|e| e.method == "GET" && e.path.contains("/blobs/sha256:"))
        .count();
    assert_eq!(blob_gets, 0, "pull after push fetched blobs upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_control_on_writes() {
    let s = setup().await;
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let start = format!("{}/v2/team/app/blobs/uploads/", s.proxy.url());
    // No credentials: 401 with a Basic challenge.
    let r = c.post(&start).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        format!(
            "Bearer realm=\"{}/auth/token\",service=\"regcache\",\
             scope=\"repository:team/app:pull,push\"",
            s.proxy.url()
        )
        .as_str()
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "UNAUTHORIZED");
    // Wrong password: 401.
    let r = c
        .post(&start)
        .basic_auth("ci", Some("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A read-only user: 403 DENIED.
    let r = c
        .post(&start)
        .basic_auth("reader", Some("read-pass"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "DENIED");
    // The pusher gets an upload on regcache's own path; the upstream's Location stays hidden.
    let r = c
        .post(&start)
        .basic_auth("ci", Some("ci-pass"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(loc.starts_with("/v2/team/app/blobs/uploads/"), "{loc}");
    assert!(!loc.contains(&s.registry.port().to_string()));
    // An upstream refusal comes back intact: a manifest naming a blob the upstream lacks.
    let missing = format!("sha256:{}", "ab".repeat(32));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": missing, "size": 2},
        "layers": []
    });
    let r = c
        .put(format!("{}/v2/team/app/manifests/broken", s.proxy.url()))
        .basic_auth("ci", Some("ci-pass"))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "MANIFEST_BLOB_UNKNOWN", "{v}");
    // The token endpoint: anonymous tokens pull but cannot push; a user's token pushes.
    let token = |creds: Option<(&str, &str)>| {
        let mut b = c.get(format!(
            "{}/auth/token?service=regcache&scope=repository:team/app:pull,push",
            s.proxy.url()
        ));
        if let Some((u, p)) = creds {
            b = b.basic_auth(u, Some(p));
        }
        b.send()
    };
    let anon: serde_json::Value = token(None).await.unwrap().json().await.unwrap();
    let anon = anon["token"].as_str().unwrap().to_owned();
    assert_eq!(token(Some(("ci", "wrong"))).await.unwrap().status(), 401);
    let ci: serde_json::Value = token(Some(("ci", "ci-pass")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ci = ci["token"].as_str().unwrap().to_owned();
    assert_eq!(
        c.post(&start)
            .bearer_auth(&anon)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        c.post(&start)
            .bearer_auth(&ci)
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    assert_eq!(
        c.get(format!("{}/v2/", s.proxy.url()))
            .bearer_auth(&anon)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // /v2/ challenges so that docker login checks the password; a pull stays anonymous.
    let r = c
        .get(format!("{}/v2/", s.proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(format!("{}/v2/", s.proxy.url()))
        .basic_auth("ci", Some("ci-pass"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("{}/v2/team/app/tags/list", s.proxy.url()))
        .send()
        .await
        .unwrap();
    assert!(r.status() == 200 || r.status() == 404, "{}", r.status());
    // Upstream credentials never reach a client.
    let text = format!("{loc}{v}");
    assert!(!text.contains(UP_PASS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_is_refused_when_switched_off() {
    let registry = Registry::start(RegistryAuth::None).await.unwrap();
    let proxy = Proxy::start(&registry.url()).await.unwrap();
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = c
        .post(format!("{}/v2/team/app/blobs/uploads/", proxy.url()))
        .basic_auth("ci", Some("ci-pass"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "UNSUPPORTED");
    // /v2/ does not challenge: nothing needs credentials.
    let r = c.get(format!("{}/v2/", proxy.url())).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_login_and_push_through_regcache() {
    let s = setup().await;
    let host = s.proxy.host();
    let docker = require_peer!(Dockerd::start(&[], &[host.as_str()]).await);
    // Load a runnable image into the daemon from an OCI layout served by the upstream.
    let img = image::single_arch_with_layers("1", &[Layer::deterministic(100_000, 21)]).unwrap();
    let src = format!("{}/seed/app:1", s.registry.host());
    image::push(&img, &format!("docker://{src}"), Some((UP_USER, UP_PASS)))
        .await
        .unwrap();
    let proxied = format!("{host}/seed/app:1");
    docker
        .docker_ok(&["login", &host, "-u", "ci", "-p", "ci-pass"])
        .await
        .unwrap();
    docker.docker_ok(&["pull", &proxied]).await.unwrap();
    let target = format!("{host}/team/pushed:1");
    docker.docker_ok(&["tag", &proxied, &target]).await.unwrap();
    docker.docker_ok(&["push", &target]).await.unwrap();
    // The upstream now holds the image under the new name.
    let at_upstream = image::skopeo_inspect_digest(
        &format!("docker://{}/team/pushed:1", s.registry.host()),
        &[
            "--tls-verify=false",
            "--creds",
            &format!("{UP_USER}:{UP_PASS}"),
        ],
    )
    .await
    .unwrap();
    let through_proxy =
        image::skopeo_inspect_digest(&format!("docker://{target}"), &["--tls-verify=false"])
            .await
            .unwrap();
    assert_eq!(at_upstream, through_proxy);
    // A wrong password is refused by docker login.
    assert!(
        docker
            .docker_ok(&["login", &host, "-u", "ci", "-p", "wrong"])
            .await
            .is_err()
    );
    // With push on, an anonymous docker pull still works (anonymous token from the realm).
    docker.docker_ok(&["logout", &host]).await.unwrap();
    docker.docker_ok(&["rmi", &target, &proxied]).await.unwrap();
    docker.docker_ok(&["pull", &target]).await.unwrap();
    let out = docker
        .docker_ok(&["run", "--rm", "--network", "none", &target])
        .await
        .unwrap();
    assert!(out.contains("hello from regcache"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_repository_mount_and_monolithic_upload() {
    let s = setup().await;
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    // Monolithic upload: start, then one PUT with ?digest= carrying the whole blob.
    let data = b"a small blob pushed in one request".to_vec();
    let d = image::sha256_digest(&data);
    let r = c
        .post(format!("{}/v2/team/one/blobs/uploads/", s.proxy.url()))
        .basic_auth("ci", Some("ci-pass"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    let r = c
        .put(format!("{}{loc}?digest={d}", s.proxy.url()))
        .basic_auth("ci", Some("ci-pass"))
        .header("Content-Type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    // The upload id is spent.
    let r = c
        .put(format!("{}{loc}?digest={d}", s.proxy.url()))
        .basic_auth("ci", Some("ci-pass"))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Mount it into another repository without sending it again.
    let r = c
        .post(format!(
            "{}/v2/team/two/blobs/uploads/?mount={d}&from=team/one",
            s.proxy.url()
        ))
        .basic_auth("ci", Some("ci-pass"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        r.headers()["location"].to_str().unwrap(),
        format!("/v2/team/two/blobs/{d}")
    );
    // The pushed blob was written through: served from the cache with no upstream GET.
    let r = c
        .get(format!("{}/v2/team/two/blobs/{d}", s.proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), data.as_slice());
    s.registry.settle_log().await;
    assert_eq!(s.registry.blob_get_count(&d), 0);
    // The pusher's existence check goes upstream: present in team/two, absent in team/three.
    let head = |repo: &str| {
        c.head(format!("{}/v2/{repo}/blobs/{d}", s.proxy.url()))
            .basic_auth("ci", Some("ci-pass"))
            .send()
    };
    assert_eq!(head("team/two").await.unwrap().status(), 200);
    assert_eq!(head("team/three").await.unwrap().status(), 404);
}

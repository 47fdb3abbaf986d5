//! Manifests, tags, auth and routing against the fake upstream: Accept handling, tag
//! revalidation with paused time, token reuse, bad input, and upstream selection.

mod fake;

use std::sync::Arc;
use std::time::Duration;

use fake::*;
use regcache::config::UpstreamConfig;
use regcache::media::{DOCKER_LIST, DOCKER_V1_SIGNED, DOCKER_V2, OCI_INDEX, OCI_MANIFEST};
use tokio::sync::Barrier;

const DOCKER_SIX: [&str; 6] = [
    DOCKER_V2,
    DOCKER_LIST,
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_V1_SIGNED,
    "application/json",
];

fn get_with_accept(url: &str, accept: &[&str]) -> reqwest::RequestBuilder {
    let mut b = client().get(url);
    for a in accept {
        b = b.header("Accept", *a);
    }
    b
}

#[tokio::test]
async fn base_endpoint_and_unknown_routes() {
    let up = FakeUpstream::start().await;
    let proxy = Proxy::start(config_for(&up.url())).await;
    let r = client().get(proxy.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    assert_eq!(r.headers()["content-type"], "application/json");
    let r = client().get(proxy.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["errors"][0]["code"].is_string());
    let r = client()
        .delete(proxy.url("/v2/a/manifests/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn bad_input_is_a_clear_4xx_and_never_reaches_upstream_or_cache() {
    let up = FakeUpstream::start().await;
    let proxy = Proxy::start(config_for(&up.url())).await;
    let long = format!("/v2/{}/manifests/latest", "a".repeat(300));
    let cases: Vec<(String, u16, &str)> = vec![
        (
            "/v2/../../etc/passwd/manifests/latest".into(),
            400,
            "NAME_INVALID",
        ),
        ("/v2/a/../b/manifests/latest".into(), 400, "NAME_INVALID"),
        ("/v2/UPPER/manifests/latest".into(), 400, "NAME_INVALID"),
        (long, 400, "NAME_INVALID"),
        // No manifest can be named by a malformed tag: not there, as a registry answers.
        ("/v2/a/manifests/-bad".into(), 404, "MANIFEST_UNKNOWN"),
        ("/v2/a/blobs/sha256:1234".into(), 400, "DIGEST_INVALID"),
        (
            "/v2/a/blobs/md5:d41d8cd98f00b204e9800998ecf8427e".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            format!("/v2/a/blobs/sha256:{}", "G".repeat(64)),
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/a/tags/list?n=-1".into(),
            400,
            "PAGINATION_NUMBER_INVALID",
        ),
        ("/v2/a%2f..%2fb/manifests/x".into(), 400, "NAME_INVALID"),
        (
            "/v2/a/manifests/x?ns=evil.example".into(),
            404,
            "NAME_UNKNOWN",
        ),
        (
            format!("/v2/a/referrers/{}", "x".repeat(3)),
            400,
            "DIGEST_INVALID",
        ),
    ];
    for (path, status, code) in cases {
        let (got, body) = raw_get(proxy.addr, &path).await;
        assert_eq!(got, status, "{path}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], code, "{path}");
    }
    assert!(
        up.seen().is_empty(),
        "invalid requests reached upstream: {:?}",
        up.seen()
    );
    for d in ["blobs", "manifests", "tags"] {
        let n = walk(&proxy.dir.path().join(d));
        assert_eq!(n, 0, "{d} touched");
    }
}

fn walk(p: &std::path::Path) -> usize {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn accept_lines_are_merged_and_unaccepted_types_never_served() {
    let up = FakeUpstream::start().await;
    let amd = push_image(
        &up,
        "library/app",
        "amd64-only",
        &[blob_of(100, 1)],
        OCI_MANIFEST,
    );
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": amd.manifest_digest, "size": amd.manifest.len(),
                        "platform": {"architecture": "amd64", "os": "linux"}}]
    })
    .to_string();
    let index_digest = up.add_manifest("library/app", "1.0", OCI_INDEX, index.as_bytes());
    let proxy = Proxy::start(config_for(&up.url())).await;

    // Six separate Accept lines as Docker and podman send them: the index is accepted.
    let r = get_with_accept(&proxy.url("/v2/library/app/manifests/1.0"), &DOCKER_SIX)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    assert_eq!(r.headers()["docker-content-digest"], index_digest.as_str());
    assert_eq!(r.headers()["etag"], format!("\"{index_digest}\"").as_str());
    assert_eq!(
        r.headers()["content-length"],
        index.len().to_string().as_str()
    );
    same(&r.bytes().await.unwrap(), index.as_bytes());
    // Upstream received every line merged.
    let seen = up
        .seen()
        .into_iter()
        .find(|s| s.path.ends_with("/manifests/1.0"))
        .unwrap();
    for t in DOCKER_SIX {
        assert!(
            seen.accept.iter().any(|a| a == t),
            "{t} not forwarded: {:?}",
            seen.accept
        );
    }

    // A client that accepts only Docker schema 2 never receives the OCI index.
    let r = get_with_accept(&proxy.url("/v2/library/app/manifests/1.0"), &[DOCKER_V2])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = get_with_accept(
        &proxy.url(&format!("/v2/library/app/manifests/{index_digest}")),
        &[DOCKER_V2],
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "MANIFEST_UNKNOWN");

    // The per-platform manifest by digest works for a client that takes OCI manifests.
    let r = get_with_accept(
        &proxy.url(&format!(
            "/v2/library/app/manifests/{}",
            amd.manifest_digest
        )),
        &[OCI_MANIFEST],
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
    // HEAD carries the same headers and no body.
    let r = client()
        .head(proxy.url(&format!(
            "/v2/library/app/manifests/{}",
            amd.manifest_digest
        )))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        amd.manifest.len().to_string().as_str()
    );
    assert_eq!(r.bytes().await.unwrap().len(), 0);
}

#[tokio::test]
async fn missing_manifest_is_an_oci_404() {
    let up = FakeUpstream::start().await;
    let proxy = Proxy::start(config_for(&up.url())).await;
    for path in [
        "/v2/library/app/manifests/nope".to_string(),
        format!("/v2/library/app/manifests/{}", sha(b"none")),
    ] {
        let r = client().get(proxy.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 404);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], "MANIFEST_UNKNOWN");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_pull_uses_one_token_and_concurrent_manifest_gets_coalesce() {
    let up = FakeUpstream::start().await;
    up.set_auth(AuthMode::Bearer { creds: None });
    let img = push_image(
        &up,
        "library/app",
        "1.0",
        &[blob_of(5000, 1), blob_of(6000, 2), blob_of(7000, 3)],
        OCI_MANIFEST,
    );
    let proxy = Proxy::start(config_for(&up.url())).await;
    let barrier = Arc::new(Barrier::new(8));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (b, url) = (barrier.clone(), proxy.url("/v2/library/app/manifests/1.0"));
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            let r = client()
                .get(url)
                .header("Accept", OCI_MANIFEST)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap()
        }));
    }
    for t in tasks {
        same(&t.await.unwrap(), &img.manifest);
    }
    for d in std::iter::once(&img.config).chain(img.layers.iter()) {
        let r = client()
            .get(proxy.url(&format!("/v2/library/app/blobs/{d}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let authorized_gets = up
        .seen()
        .iter()
        .filter(|s| {
            s.method == "GET" && s.path.ends_with("/manifests/1.0") && s.authorization.is_some()
        })
        .count();
    assert_eq!(authorized_gets, 1, "manifest GETs were not coalesced");
    // One anonymous attempt learned the challenge; nothing else went out unauthenticated.
    assert_eq!(up.count("GET", "/manifests/1.0"), 2);
    assert_eq!(up.tokens_issued(), 1, "one token for the whole pull");
    assert_eq!(proxy.app.upstream("up").unwrap().token_fetches(), 1);
}

#[tokio::test]
async fn credentials_go_to_the_token_realm_and_client_authorization_is_never_forwarded() {
    let up = FakeUpstream::start().await;
    up.set_auth(AuthMode::Bearer {
        creds: Some(("robot".into(), "s3cret".into())),
    });
    let img = push_image(&up, "team/private", "v1", &[blob_of(100, 9)], OCI_MANIFEST);
    let mut cfg = config_for(&up.url());
    cfg.upstreams[0].username = Some("robot".into());
    cfg.upstreams[0].password = Some("s3cret".into());
    let proxy = Proxy::start(cfg).await;
    let r = client()
        .get(proxy.url("/v2/team/private/manifests/v1"))
        .header("Authorization", "Basic dXNlcjpodW50ZXIy")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    same(&r.bytes().await.unwrap(), &img.manifest);
    for s in up.seen() {
        let a = s.authorization.unwrap_or_default();
        assert!(
            !a.contains("dXNlcjpodW50ZXIy"),
            "client credentials forwarded to {}",
            s.path
        );
        if s.path.starts_with("/token") {
            assert!(a.starts_with("Basic "), "token request without credentials");
        }
    }
}

#[tokio::test]
async fn basic_auth_upstreams_work_and_missing_credentials_are_a_clear_401() {
    let up = FakeUpstream::start().await;
    up.set_auth(AuthMode::Basic {
        user: "u".into(),
        pass: "p".into(),
    });
    let img = push_image(&up, "x/y", "1", &[blob_of(10, 1)], OCI_MANIFEST);
    let proxy = Proxy::start(config_for(&up.url())).await;
    let r = client()
        .get(proxy.url("/v2/x/y/manifests/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "UNAUTHORIZED");
    let mut cfg = config_for(&up.url());
    cfg.upstreams[0].username = Some("u".into());
    cfg.upstreams[0].password = Some("p".into());
    let proxy = Proxy::start(cfg).await;
    let r = client()
        .get(proxy.url("/v2/x/y/manifests/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    same(&r.bytes().await.unwrap(), &img.manifest);
    let r = client()
        .get(proxy.url(&format!("/v2/x/y/blobs/{}", img.layers[0])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn tags_are_revalidated_with_head_after_the_ttl() {
    let up = FakeUpstream::start().await;
    let v1 = push_image(
        &up,
        "library/app",
        "latest",
        &[blob_of(10, 1)],
        OCI_MANIFEST,
    );
    let mut cfg = config_for(&up.url());
    cfg.cache.tag_ttl = regcache::units::HumanDuration(Duration::from_secs(60));
    let proxy = Proxy::start(cfg).await;
    let url = proxy.url("/v2/library/app/manifests/latest");
    let get = || async {
        let r = client()
            .get(&url)
            .header("Accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        let stale = r.headers().get("warning").is_some();
        (
            r.status().as_u16(),
            r.headers()["docker-content-digest"]
                .to_str()
                .unwrap_or("")
                .to_owned(),
            stale,
        )
    };
    assert_eq!(get().await, (200, v1.manifest_digest.clone(), false));
    // Within the TTL: no upstream contact at all.
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(get().await.1, v1.manifest_digest);
    assert_eq!(up.count("GET", "/manifests/latest"), 1);
    assert_eq!(up.count("HEAD", "/manifests/latest"), 0);
    // After it: one HEAD, same digest, no GET.
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(get().await.1, v1.manifest_digest);
    assert_eq!(up.count("HEAD", "/manifests/latest"), 1);
    assert_eq!(up.count("GET", "/manifests/"), 1);
    // The tag moves upstream: the next revalidation picks it up.
    let v2 = up.retag(
        "library/app",
        "latest",
        OCI_MANIFEST,
        br#"{"schemaVersion":2,"config":{},"layers":[],"v":2}"#,
    );
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(get().await.1, v2);
    // The upstream fails: the cached answer is served, marked stale, with no GET spent.
    up.set_down(true);
    tokio::time::advance(Duration::from_secs(61)).await;
    let gets_before = up.count("GET", "/manifests/");
    let (status, d, stale) = get().await;
    assert_eq!((status, d.as_str(), stale), (200, v2.as_str(), true));
    assert_eq!(up.count("GET", "/manifests/"), gets_before);
    // A 404 from a healthy upstream is honoured.
    up.set_down(false);
    up.remove_tag("library/app", "latest");
    let r = client()
        .get(&url)
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn tag_answers_survive_a_restart_and_are_revalidated() {
    let up = FakeUpstream::start().await;
    let img = push_image(&up, "library/app", "1.0", &[blob_of(10, 1)], OCI_MANIFEST);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let proxy = Proxy::start_in(config_for(&up.url()), dir.clone()).await;
    let url = "/v2/library/app/manifests/1.0";
    let r = client()
        .get(proxy.url(url))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    proxy.stop().await;
    up.set_down(true);
    let proxy = Proxy::start_in(config_for(&up.url()), dir.clone()).await;
    let r = client()
        .get(proxy.url(url))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-content-digest"],
        img.manifest_digest.as_str()
    );
    assert!(
        r.headers().get("warning").is_some(),
        "served stale after a failed revalidation"
    );
    assert_eq!(up.count("GET", "/manifests/"), 1);
}

#[tokio::test]
async fn a_manifest_that_does_not_match_its_digest_or_is_too_large_is_refused() {
    let up = FakeUpstream::start().await;
    let body = br#"{"schemaVersion":2,"config":{},"layers":[]}"#;
    up.add_manifest("a/b", "t", OCI_MANIFEST, body);
    let proxy = Proxy::start(config_for(&up.url())).await;
    // Asking by a digest the upstream's bytes do not hash to.
    let wrong = sha(b"something else");
    // Make the fake answer that digest with the other body.
    let r = client()
        .get(proxy.url(&format!("/v2/a/b/manifests/{wrong}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let mut cfg = config_for(&up.url());
    cfg.cache.max_manifest_size = regcache::units::ByteSize(10);
    let proxy = Proxy::start(cfg).await;
    let r = client()
        .get(proxy.url("/v2/a/b/manifests/t"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("larger")
    );
}

#[tokio::test]
async fn routing_by_prefix_ns_host_and_default_only_reaches_configured_upstreams() {
    let hub = FakeUpstream::start().await;
    let other = FakeUpstream::start().await;
    let h = push_image(&hub, "library/alpine", "3", &[blob_of(10, 1)], OCI_MANIFEST);
    let o = push_image(&other, "team/app", "1", &[blob_of(10, 2)], OCI_MANIFEST);
    let mut cfg = config_for(&hub.url());
    cfg.upstreams[0].docker_hub = Some(true);
    cfg.upstreams[0].registry_hosts = vec!["docker.io".into()];
    let mut second = UpstreamConfig::new("quay", other.url().parse().unwrap());
    second.registry_hosts = vec!["quay.example".into()];
    second.virtual_hosts = vec!["quay.cache.local".into()];
    cfg.upstreams.push(second);
    let proxy = Proxy::start(cfg).await;
    let c = client();
    let ok = |r: reqwest::Response, want: &str| {
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], want);
    };
    // Docker Hub shorthand and prefixes on the default upstream.
    for p in [
        "/v2/alpine/manifests/3",
        "/v2/library/alpine/manifests/3",
        "/v2/docker.io/alpine/manifests/3",
        "/v2/index.docker.io/library/alpine/manifests/3",
        "/v2/library/alpine/manifests/3?ns=docker.io",
        "/v2/alpine/manifests/3?ns=docker.io",
    ] {
        ok(
            c.get(proxy.url(p)).send().await.unwrap(),
            &h.manifest_digest,
        );
    }
    // Path prefix, ns= and virtual host for the second upstream.
    ok(
        c.get(proxy.url("/v2/quay/team/app/manifests/1"))
            .send()
            .await
            .unwrap(),
        &o.manifest_digest,
    );
    ok(
        c.get(proxy.url("/v2/team/app/manifests/1?ns=quay.example"))
            .send()
            .await
            .unwrap(),
        &o.manifest_digest,
    );
    ok(
        c.get(proxy.url("/v2/team/app/manifests/1"))
            .header("Host", "quay.cache.local:5000")
            .send()
            .await
            .unwrap(),
        &o.manifest_digest,
    );
    // A host that is not configured is refused, not contacted.
    let r = c
        .get(proxy.url("/v2/team/app/manifests/1?ns=127.0.0.1:1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(
        other
            .seen()
            .iter()
            .all(|s| s.path.starts_with("/v2/team/app/"))
    );
}

#[tokio::test]
async fn tags_list_passes_n_and_last_through_and_rewrites_link() {
    let up = FakeUpstream::start().await;
    for t in ["a", "b", "c", "d"] {
        up.add_manifest(
            "team/app",
            t,
            OCI_MANIFEST,
            format!("{{\"t\":\"{t}\"}}").as_bytes(),
        );
    }
    let mut cfg = config_for(&up.url());
    cfg.upstreams[0].name = "up".into();
    let proxy = Proxy::start(cfg).await;
    let r = client()
        .get(proxy.url("/v2/up/team/app/tags/list?n=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let link = r.headers()["link"].to_str().unwrap().to_owned();
    assert!(link.starts_with("</v2/up/team/app/tags/list?"), "{link}");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["a", "b"]));
    let r = client()
        .get(proxy.url("/v2/up/team/app/tags/list?n=2&last=b"))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["c", "d"]));
    let r = client()
        .get(proxy.url("/v2/up/none/here/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn an_absurd_token_lifetime_is_clamped_not_a_crash() {
    let up = FakeUpstream::start().await;
    up.set_auth(AuthMode::Bearer { creds: None });
    up.set_token_lifetime(u64::MAX);
    let img = push_image(&up, "library/app", "1", &[blob_of(10, 1)], OCI_MANIFEST);
    let proxy = Proxy::start(config_for(&up.url())).await;
    for _ in 0..2 {
        let r = client()
            .get(proxy.url("/v2/library/app/manifests/1"))
            .header("Accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        same(&r.bytes().await.unwrap(), &img.manifest);
        let r = client()
            .get(proxy.url(&format!("/v2/library/app/blobs/{}", img.layers[0])))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(up.tokens_issued(), 1);
}

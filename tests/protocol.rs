//! The whole distribution protocol through regcache with push and delete on: a client that
//! takes the token scope only from the challenge (as the OCI conformance suite does) gets the
//! same status codes through regcache as from a real `docker-registry` directly, a retried
//! chunk is refused with 416 before it reaches the upstream, deletes evict the cache, and the
//! referrers API and `/v2/_catalog` answer as the spec says.

mod fake;
mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use http::{HeaderMap, Method, header};
use regcache::config::{AuthConfig, Config, RuleConfig, UpstreamConfig};
use support::registry::{Registry, RegistryOptions};
use support::token::{TokenServer, TokenServerConfig};

const INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// The parameters of a `Bearer` challenge.
fn challenge_params(value: &str) -> HashMap<String, String> {
    let rest = value.strip_prefix("Bearer ").unwrap_or(value);
    rest.split("\",")
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

/// A client that follows the token protocol literally: on a 401 it asks the challenge's
/// realm for exactly the challenge's scope (with `creds`, if any) and retries once.
struct Client {
    http: reqwest::Client,
    creds: Option<(String, String)>,
}

impl Client {
    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> reqwest::Response {
        let first = self
            .http
            .request(method.clone(), url)
            .headers(headers.clone())
            .body(body.clone())
            .send()
            .await
            .unwrap();
        if first.status() != 401 {
            return first;
        }
        let ch = challenge_params(first.headers()[header::WWW_AUTHENTICATE].to_str().unwrap());
        let mut q = vec![("service", ch["service"].clone())];
        if let Some(s) = ch.get("scope") {
            q.push(("scope", s.clone()));
        }
        let mut t = self.http.get(&ch["realm"]).query(&q);
        if let Some((u, p)) = &self.creds {
            t = t.basic_auth(u, Some(p));
        }
        let tok: serde_json::Value = t.send().await.unwrap().json().await.unwrap();
        self.http
            .request(method, url)
            .headers(headers)
            .bearer_auth(tok["token"].as_str().unwrap())
            .body(body)
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, url: &str) -> reqwest::Response {
        self.send(Method::GET, url, HeaderMap::new(), Bytes::new())
            .await
    }
}

fn h(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (k, v) in pairs {
        m.insert(k.clone(), v.parse().unwrap());
    }
    m
}

fn sha(b: &[u8]) -> String {
    fake::sha(b)
}

/// What a step gave: its status and what the client reads from it (a digest, a body).
type Step = (&'static str, u16, String);

fn header_of(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Push, pull, discovery and management steps; returns `(step, status, result)` for each.
/// `retry`: send the first chunk a second time (not compared: `docker-registry` 2.8 accepts
/// it and corrupts the upload, regcache refuses it with 416 as the spec asks).
async fn sequence(c: &Client, base: &str, retry: bool) -> Vec<Step> {
    let mut out = Vec::new();
    let repo = "team/app";
    let data: Bytes =
        Bytes::from_static(b"{\"architecture\":\"amd64\",\"os\":\"linux\",\"rootfs\":{}}");
    let d = sha(&data);
    let half = data.len() / 2;
    let r = c
        .send(
            Method::POST,
            &format!("{base}/v2/{repo}/blobs/uploads/"),
            HeaderMap::new(),
            Bytes::new(),
        )
        .await;
    out.push(("upload start", r.status().as_u16(), String::new()));
    let base_url = url::Url::parse(base).unwrap();
    let mut location = base_url
        .join(r.headers()[header::LOCATION].to_str().unwrap())
        .unwrap();
    let chunk = |loc: &url::Url, from: usize, to: usize| {
        let headers = h(&[
            (header::CONTENT_TYPE, "application/octet-stream"),
            (header::CONTENT_RANGE, &format!("{from}-{}", to - 1)),
        ]);
        let body = data.slice(from..to);
        let loc = loc.to_string();
        async move { c.send(Method::PATCH, &loc, headers, body).await }
    };
    let r = chunk(&location, 0, half).await;
    out.push(("first chunk", r.status().as_u16(), header_of(&r, "range")));
    location = base_url
        .join(r.headers()[header::LOCATION].to_str().unwrap())
        .unwrap();
    if retry {
        let r = chunk(&location, 0, half).await;
        assert_eq!(r.status(), 416, "a retried chunk is refused");
        assert_eq!(
            r.headers()[header::RANGE],
            format!("0-{}", half - 1).as_str()
        );
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], "BLOB_UPLOAD_INVALID");
    }
    let r = chunk(&location, half, data.len()).await;
    out.push(("second chunk", r.status().as_u16(), header_of(&r, "range")));
    location = base_url
        .join(r.headers()[header::LOCATION].to_str().unwrap())
        .unwrap();
    location.query_pairs_mut().append_pair("digest", &d);
    let r = c
        .send(
            Method::PUT,
            location.as_str(),
            h(&[(header::CONTENT_LENGTH, "0")]),
            Bytes::new(),
        )
        .await;
    out.push((
        "upload close",
        r.status().as_u16(),
        header_of(&r, "docker-content-digest"),
    ));
    let r = c.get(&format!("{base}/v2/{repo}/blobs/{d}")).await;
    let status = r.status().as_u16();
    out.push(("blob get", status, sha(&r.bytes().await.unwrap())));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d, "size": data.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": data.len()}],
    })
    .to_string();
    let md = sha(manifest.as_bytes());
    let r = c
        .send(
            Method::PUT,
            &format!("{base}/v2/{repo}/manifests/v1"),
            h(&[(
                header::CONTENT_TYPE,
                "application/vnd.oci.image.manifest.v1+json",
            )]),
            Bytes::from(manifest.clone()),
        )
        .await;
    out.push((
        "manifest put",
        r.status().as_u16(),
        header_of(&r, "docker-content-digest"),
    ));
    let accept = h(&[(header::ACCEPT, "application/vnd.oci.image.manifest.v1+json")]);
    let r = c
        .send(
            Method::GET,
            &format!("{base}/v2/{repo}/manifests/v1"),
            accept.clone(),
            Bytes::new(),
        )
        .await;
    let status = r.status().as_u16();
    let digest = header_of(&r, "docker-content-digest");
    let body = sha(&r.bytes().await.unwrap());
    out.push(("manifest by tag", status, format!("{digest} {body}")));
    let r = c
        .get(&format!(
            "{base}/v2/{repo}/manifests/.INVALID_MANIFEST_NAME"
        ))
        .await;
    // Status only: docker-registry's router answers a plain-text 404 here, regcache the
    // spec's MANIFEST_UNKNOWN body (checked below).
    out.push(("invalid tag", r.status().as_u16(), String::new()));
    let r = c.get(&format!("{base}/v2/{repo}/tags/list")).await;
    let status = r.status().as_u16();
    out.push(("tags list", status, r.text().await.unwrap()));
    // A second tag on the same manifest, read once (cached), deleted by tag, read again.
    let r = c
        .send(
            Method::PUT,
            &format!("{base}/v2/{repo}/manifests/v2"),
            h(&[(
                header::CONTENT_TYPE,
                "application/vnd.oci.image.manifest.v1+json",
            )]),
            Bytes::from(manifest),
        )
        .await;
    out.push(("second tag put", r.status().as_u16(), String::new()));
    for step in ["second tag get", "tag delete", "second tag after delete"] {
        let method = match step {
            "tag delete" => Method::DELETE,
            _ => Method::GET,
        };
        let r = c
            .send(
                method,
                &format!("{base}/v2/{repo}/manifests/v2"),
                accept.clone(),
                Bytes::new(),
            )
            .await;
        let status = r.status().as_u16();
        out.push((step, status, error_code(r).await));
    }
    let r = c
        .send(
            Method::DELETE,
            &format!("{base}/v2/{repo}/manifests/{md}"),
            HeaderMap::new(),
            Bytes::new(),
        )
        .await;
    out.push(("manifest delete", r.status().as_u16(), String::new()));
    let r = c
        .send(
            Method::GET,
            &format!("{base}/v2/{repo}/manifests/{md}"),
            accept.clone(),
            Bytes::new(),
        )
        .await;
    out.push((
        "manifest after delete",
        r.status().as_u16(),
        error_code(r).await,
    ));
    let r = c
        .send(
            Method::GET,
            &format!("{base}/v2/{repo}/manifests/v1"),
            accept,
            Bytes::new(),
        )
        .await;
    out.push(("tag after delete", r.status().as_u16(), error_code(r).await));
    let r = c
        .send(
            Method::DELETE,
            &format!("{base}/v2/{repo}/blobs/{d}"),
            HeaderMap::new(),
            Bytes::new(),
        )
        .await;
    out.push(("blob delete", r.status().as_u16(), String::new()));
    let r = c.get(&format!("{base}/v2/{repo}/blobs/{d}")).await;
    out.push((
        "blob after delete",
        r.status().as_u16(),
        error_code(r).await,
    ));
    out
}

/// The OCI error code of an answer (empty when it is not an error body).
async fn error_code(r: reqwest::Response) -> String {
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn htpasswd(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("htpasswd");
    let mut f = std::fs::File::create(&path).unwrap();
    for (u, p) in [("ci", "ci-pass"), ("reader", "read-pass")] {
        writeln!(f, "{u}:{}", bcrypt::hash(p, 4).unwrap()).unwrap();
    }
    path
}

fn push_config(upstream: &str, dir: &std::path::Path, delete: bool) -> Config {
    Config {
        cache_dir: dir.join("cache"),
        default_upstream: "up".into(),
        upstreams: vec![UpstreamConfig::new("up", upstream.parse().unwrap())],
        auth: AuthConfig {
            htpasswd: Some(htpasswd(dir)),
            push: true,
            delete,
            push_users: vec!["ci".into()],
            ..AuthConfig::default()
        },
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_answers_through_regcache_as_from_the_registry_directly() {
    // A registry behind Docker-Hub-style token auth: the client meets the same token protocol
    // directly (the registry's realm) as through regcache (regcache's own realm).
    let tokens = TokenServer::start_with(TokenServerConfig {
        credentials: Some(("ci".into(), "ci-pass".into())),
        ..TokenServerConfig::default()
    })
    .await
    .unwrap();
    let registry = Registry::start_with(RegistryOptions {
        auth: tokens.registry_auth(),
        ..RegistryOptions::default()
    })
    .await
    .unwrap();
    let direct = Client {
        http: http(),
        creds: Some(("ci".into(), "ci-pass".into())),
    };
    let want = sequence(&direct, &registry.url(), false).await;
    registry.settle_log().await;
    let patches_direct = registry.count_requests("PATCH", "/blobs/uploads/");

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = push_config(&registry.url(), dir.path(), true);
    cfg.upstreams[0].username = Some("ci".into());
    cfg.upstreams[0].password = Some("ci-pass".into());
    let proxy = support::proxy::Proxy::start_with(cfg).await.unwrap();
    let through = Client {
        http: http(),
        creds: Some(("ci".into(), "ci-pass".into())),
    };
    let got = sequence(&through, &proxy.url(), true).await;
    for (w, g) in want.iter().zip(&got) {
        println!(
            "{:<22} direct {} {:<40} regcache {} {}",
            w.0, w.1, w.2, g.1, g.2
        );
    }
    assert_eq!(got, want, "through regcache vs directly");
    // The refused retry never reached the upstream.
    registry.settle_log().await;
    let patches = registry.count_requests("PATCH", "/blobs/uploads/") - patches_direct;
    assert_eq!(
        patches, 2,
        "two chunks sent upstream, the retry refused by regcache"
    );
    let steps: HashMap<_, _> = got.into_iter().map(|(s, code, r)| (s, (code, r))).collect();
    assert_eq!(steps["upload close"].0, 201);
    let r = through
        .get(&format!(
            "{}/v2/team/app/manifests/.INVALID_MANIFEST_NAME",
            proxy.url()
        ))
        .await;
    assert_eq!(
        (r.status().as_u16(), error_code(r).await),
        (404, "MANIFEST_UNKNOWN".into())
    );
    assert_eq!(
        steps["manifest after delete"],
        (404, "MANIFEST_UNKNOWN".into())
    );
    assert_eq!(steps["blob after delete"], (404, "BLOB_UNKNOWN".into()));

    // Discovery that a cache answers differently: docker-registry 2.8 has no referrers API
    // (404); regcache reads the tag-schema fallback and answers an index either way.
    let d = format!("sha256:{}", "0".repeat(64));
    let r = direct
        .get(&format!("{}/v2/team/app/referrers/{d}", registry.url()))
        .await;
    assert_eq!(r.status(), 404);
    let r = through
        .get(&format!("{}/v2/team/app/referrers/{d}", proxy.url()))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[header::CONTENT_TYPE], INDEX);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"], serde_json::json!([]));
}

#[tokio::test]
async fn challenges_name_the_scope_the_request_needs() {
    let up = fake::FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = fake::Proxy::start(push_config(&up.url(), dir.path(), false)).await;
    let c = http();
    let scope_of = |r: &reqwest::Response| {
        challenge_params(r.headers()[header::WWW_AUTHENTICATE].to_str().unwrap())
    };
    let r = c
        .post(proxy.url("/v2/team/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let ch = scope_of(&r);
    assert_eq!(ch["scope"], "repository:team/app:pull,push");
    assert!(!ch.contains_key("error"));
    let d = format!("sha256:{}", "1".repeat(64));
    let r = c
        .post(proxy.url(&format!(
            "/v2/team/app/blobs/uploads/?mount={d}&from=other/lib"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(
        scope_of(&r)["scope"],
        "repository:team/app:pull,push repository:other/lib:pull"
    );
    // A token for pull only: too narrow for a push.
    let tok: serde_json::Value = c
        .get(proxy.url("/auth/token"))
        .query(&[
            ("service", "regcache"),
            ("scope", "repository:team/app:pull"),
        ])
        .basic_auth("ci", Some("ci-pass"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = c
        .post(proxy.url("/v2/team/app/blobs/uploads/"))
        .bearer_auth(tok["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let ch = scope_of(&r);
    assert_eq!(ch["scope"], "repository:team/app:pull,push");
    assert_eq!(ch["error"], "insufficient_scope");
    // Deletes are off here: 405 UNSUPPORTED, whoever asks.
    let r = c
        .delete(proxy.url(&format!("/v2/team/app/manifests/{d}")))
        .basic_auth("ci", Some("ci-pass"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "UNSUPPORTED");
}

#[tokio::test]
async fn deletes_need_the_delete_permission() {
    let up = fake::FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = fake::Proxy::start(push_config(&up.url(), dir.path(), true)).await;
    let c = http();
    let d = format!("sha256:{}", "2".repeat(64));
    let url = proxy.url(&format!("/v2/team/app/manifests/{d}"));
    let r = c.delete(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(scope_of_header(&r), "repository:team/app:delete");
    let r = c
        .delete(&url)
        .basic_auth("reader", Some("read-pass"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        up.count("DELETE", "/manifests/"),
        0,
        "refused deletes stay here"
    );
}

#[tokio::test]
async fn a_tag_deleted_through_regcache_is_not_served_from_the_cache() {
    // docker-registry 2.8 refuses deleting by tag (400 DIGEST_INVALID, passed on as it is in
    // the sequence above); registries that accept it get the cached answers evicted.
    let up = fake::FakeUpstream::start().await;
    let mt = "application/vnd.oci.image.manifest.v1+json";
    up.add_manifest("team/app", "v1", mt, br#"{"schemaVersion":2,"tag":"v1"}"#);
    let dir = tempfile::tempdir().unwrap();
    let proxy = fake::Proxy::start(push_config(&up.url(), dir.path(), true)).await;
    let c = http();
    let url = proxy.url("/v2/team/app/manifests/v1");
    let get = |head: bool| {
        let r = if head { c.head(&url) } else { c.get(&url) };
        r.header(header::ACCEPT, mt)
            .basic_auth("ci", Some("ci-pass"))
            .send()
    };
    assert_eq!(get(false).await.unwrap().status(), 200);
    assert_eq!(get(true).await.unwrap().status(), 200, "cached");
    let r = c
        .delete(&url)
        .basic_auth("ci", Some("ci-pass"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(up.count("DELETE", "/manifests/v1"), 1);
    let r = get(false).await.unwrap();
    assert_eq!(r.status(), 404, "not the cached answer");
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    assert_eq!(get(true).await.unwrap().status(), 404);
}

fn scope_of_header(r: &reqwest::Response) -> String {
    challenge_params(r.headers()[header::WWW_AUTHENTICATE].to_str().unwrap())["scope"].clone()
}

#[tokio::test]
async fn the_catalog_lists_cached_repositories_by_page_and_by_access() {
    let up = fake::FakeUpstream::start().await;
    let mt = "application/vnd.oci.image.manifest.v1+json";
    for repo in ["a/one", "b/two", "c/three"] {
        up.add_manifest(
            repo,
            "v1",
            mt,
            format!("{{\"schemaVersion\":2,\"r\":\"{repo}\"}}").as_bytes(),
        );
    }
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let proxy = fake::Proxy::start_in(fake::config_for(&up.url()), dir.clone()).await;
    let c = http();
    for repo in ["a/one", "b/two", "c/three"] {
        let r = c
            .get(proxy.url(&format!("/v2/{repo}/manifests/v1")))
            .header(header::ACCEPT, mt)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = c.get(proxy.url("/v2/_catalog?n=2")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let link = r.headers()[header::LINK].to_str().unwrap().to_owned();
    assert_eq!(link, "</v2/_catalog?last=b/two&n=2>; rel=\"next\"");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["a/one", "b/two"]));
    let r = c
        .get(proxy.url("/v2/_catalog?n=2&last=b/two"))
        .send()
        .await
        .unwrap();
    assert!(r.headers().get(header::LINK).is_none());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["c/three"]));
    proxy.stop().await;

    // The same cache behind access rules: anonymous clients see what they may pull.
    let mut cfg = fake::config_for(&up.url());
    cfg.auth.anonymous_pull = false;
    cfg.auth.htpasswd = Some(htpasswd(dir.path()));
    cfg.auth.rules = vec![
        RuleConfig {
            anonymous: true,
            users: Vec::new(),
            upstreams: vec!["*".into()],
            repositories: vec!["a/*".into()],
            allow: vec![regcache::config::Permission::Pull],
        },
        RuleConfig {
            anonymous: false,
            users: vec!["reader".into()],
            upstreams: vec!["*".into()],
            repositories: vec!["b/*".into()],
            allow: vec![regcache::config::Permission::Pull],
        },
    ];
    let proxy = fake::Proxy::start_in(cfg, dir.clone()).await;
    let v: serde_json::Value = c
        .get(proxy.url("/v2/_catalog"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["a/one"]));
    let v: serde_json::Value = c
        .get(proxy.url("/v2/_catalog"))
        .basic_auth("reader", Some("read-pass"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["a/one", "b/two"]));
}

/// An upstream with the referrers API: one subject with two referrers; counts requests and
/// can be switched off.
async fn referrers_upstream() -> (String, Arc<AtomicUsize>, Arc<AtomicBool>) {
    use hyper::service::service_fn;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let down = Arc::new(AtomicBool::new(false));
    let (h2, d2) = (hits.clone(), down.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (hits, down) = (h2.clone(), d2.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (hits, down) = (hits.clone(), down.clone());
                    async move {
                        let mut r = http::Response::new(http_body_util::Full::new(Bytes::new()));
                        if down.load(Ordering::SeqCst) {
                            *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                        } else if req.uri().path().contains("/referrers/") {
                            hits.fetch_add(1, Ordering::SeqCst);
                            let body = serde_json::json!({
                                "schemaVersion": 2,
                                "mediaType": INDEX,
                                "manifests": [
                                    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", "a".repeat(64)), "size": 10, "artifactType": "application/vnd.dev.cosign.simplesigning.v1+json"},
                                    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", "b".repeat(64)), "size": 10, "artifactType": "application/spdx+json"},
                                ],
                            });
                            r = http::Response::new(http_body_util::Full::new(Bytes::from(
                                body.to_string(),
                            )));
                            r.headers_mut()
                                .insert(header::CONTENT_TYPE, INDEX.parse().unwrap());
                        } else {
                            *r.status_mut() = http::StatusCode::NOT_FOUND;
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), hits, down)
}

#[tokio::test]
async fn referrers_are_passed_through_filtered_cached_and_served_stale() {
    let (url, hits, down) = referrers_upstream().await;
    let mut cfg = fake::config_for(&url);
    cfg.retry.attempts = 1;
    let proxy = fake::Proxy::start(cfg).await;
    let c = http();
    let subject = format!("sha256:{}", "c".repeat(64));
    let path = format!("/v2/lib/app/referrers/{subject}");
    let r = c.get(proxy.url(&path)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[header::CONTENT_TYPE], INDEX);
    assert!(r.headers().get("oci-filters-applied").is_none());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 2);
    let r = c
        .get(proxy.url(&format!("{path}?artifactType=application/spdx%2Bjson")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(v["manifests"][0]["artifactType"], "application/spdx+json");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the second answer came from the cache"
    );

    // With a short TTL and the upstream down, the cached answer is served stale.
    let mut cfg = fake::config_for(&url);
    cfg.retry.attempts = 1;
    cfg.cache.tag_ttl = regcache::units::HumanDuration(std::time::Duration::from_millis(1));
    let proxy = fake::Proxy::start(cfg).await;
    assert_eq!(c.get(proxy.url(&path)).send().await.unwrap().status(), 200);
    down.store(true, Ordering::SeqCst);
    let mut stale = None;
    for _ in 0..200 {
        let r = c.get(proxy.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        if r.headers().get(header::WARNING).is_some() {
            stale = Some(r);
            break;
        }
    }
    let v: serde_json::Value = stale.expect("a stale answer").json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn without_the_api_the_referrers_tag_schema_is_read() {
    let up = fake::FakeUpstream::start().await;
    let subject = format!("sha256:{}", "d".repeat(64));
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", "e".repeat(64)), "size": 5, "artifactType": "application/vnd.example.sbom"}],
    })
    .to_string();
    up.add_manifest(
        "lib/app",
        &format!("sha256-{}", "d".repeat(64)),
        INDEX,
        index.as_bytes(),
    );
    let proxy = fake::Proxy::start(fake::config_for(&up.url())).await;
    let r = http()
        .get(proxy.url(&format!(
            "/v2/lib/app/referrers/{subject}?artifactType=application/vnd.example.sbom"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["mediaType"], INDEX);
    assert_eq!(
        v["manifests"][0]["artifactType"],
        "application/vnd.example.sbom"
    );
}

#[tokio::test]
async fn two_range_headers_are_refused() {
    let up = fake::FakeUpstream::start().await;
    let data = fake::blob_of(1000, 9);
    let d = up.add_blob(data.clone());
    let proxy = fake::Proxy::start(fake::config_for(&up.url())).await;
    let url = proxy.url(&format!("/v2/lib/app/blobs/{d}"));
    let one = http()
        .get(&url)
        .header(header::RANGE, "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 206);
    let two = http()
        .get(&url)
        .header(header::RANGE, "bytes=0-9")
        .header(header::RANGE, "bytes=20-29")
        .send()
        .await
        .unwrap();
    assert_eq!(two.status(), 400);
    let v: serde_json::Value = two.json().await.unwrap();
    assert_eq!(v["errors"][0]["detail"], "more than one Range header");
}

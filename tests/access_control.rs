//! Owns the access-control tests: anonymous pulls per upstream and repository pattern, users
//! with pull or push rights, static CI tokens per upstream and repository, wrong credentials,
//! the failed-login limit per client address (paused time), the token endpoint's scoped
//! tokens, and skopeo pulling with a CI token through regcache from real registries.

mod fake;
mod support;

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use fake::{FakeUpstream, push_image};
use regcache::config::Config;
use support::image::{self, ImageSpec, Layer, OciLayout, Platform};
use support::peers::{require_binaries, require_peer};
use support::registry::{Registry, RegistryAuth};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The static token of the token named `build` (kept in a file, never in the config).
const BUILD_TOKEN: &str = "build-token-5f0c2b9e81d4a7c3";

/// Two fake upstreams behind regcache: `hub` (Docker Hub naming, the default upstream) and
/// `internal` (reached as `internal/<repo>` or with `ns=<its host>`). Both hold the images
/// `library/alpine:1`, `team/app:1` and `other/app:1`. htpasswd users: `ci` (`ci-pass`),
/// `reader` (`read-pass`); static token `build` ([`BUILD_TOKEN`]).
struct Env {
    hub: FakeUpstream,
    internal: FakeUpstream,
    dir: tempfile::TempDir,
}

impl Env {
    async fn new() -> Env {
        let hub = FakeUpstream::start().await;
        let internal = FakeUpstream::start().await;
        for up in [&hub, &internal] {
            for repo in ["library/alpine", "team/app", "other/app"] {
                push_image(up, repo, "1", &[fake::blob_of(1000, 1)], OCI_MANIFEST);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let mut f = std::fs::File::create(dir.path().join("htpasswd")).unwrap();
        for (u, p) in [("ci", "ci-pass"), ("reader", "read-pass")] {
            writeln!(f, "{u}:{}", bcrypt::hash(p, 4).unwrap()).unwrap();
        }
        std::fs::write(dir.path().join("build-token"), format!("{BUILD_TOKEN}\n")).unwrap();
        Env { hub, internal, dir }
    }

    /// `internal`'s registry host, for `ns=`.
    fn internal_host(&self) -> String {
        self.internal.addr.to_string()
    }

    /// The configuration with `auth` (plain keys first, then `[[auth.rule]]` tables) added to
    /// `[auth]`.
    fn config(&self, auth: &str) -> Config {
        let text = format!(
            r#"default_upstream = "hub"
[auth]
htpasswd = "{htpasswd}"
{auth}
[[auth.token]]
name = "build"
token_file = "{token}"
[[upstream]]
name = "hub"
url = "{hub}"
docker_hub = true
[[upstream]]
name = "internal"
url = "{internal}"
"#,
            htpasswd = self.dir.path().join("htpasswd").display(),
            token = self.dir.path().join("build-token").display(),
            hub = self.hub.url(),
            internal = self.internal.url(),
        );
        Config::from_toml(&text).unwrap()
    }

    async fn proxy(&self, auth: &str) -> fake::Proxy {
        fake::Proxy::start(self.config(auth)).await
    }
}

#[derive(Clone, Copy)]
enum Creds<'a> {
    None,
    Basic(&'a str, &'a str),
    Bearer(&'a str),
}

/// The status, OCI error code (if any) and `WWW-Authenticate` of a request.
#[derive(Debug)]
struct Answer {
    status: u16,
    code: Option<String>,
    challenge: Option<String>,
    retry_after: Option<String>,
}

async fn send(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    creds: Creds<'_>,
) -> Answer {
    let mut b = c.request(method, url);
    b = match creds {
        Creds::None => b,
        Creds::Basic(u, p) => b.basic_auth(u, Some(p)),
        Creds::Bearer(t) => b.bearer_auth(t),
    };
    let r = b.send().await.unwrap();
    let header = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
    let (challenge, retry_after) = (header("www-authenticate"), header("retry-after"));
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    Answer {
        status,
        code: body["errors"][0]["code"].as_str().map(str::to_owned),
        challenge,
        retry_after,
    }
}

/// `GET` of manifest `<name>:1` through the proxy, `?ns=` when given.
async fn pull(p: &fake::Proxy, name: &str, ns: Option<&str>, creds: Creds<'_>) -> Answer {
    let query = ns.map(|n| format!("?ns={n}")).unwrap_or_default();
    let url = p.url(&format!("/v2/{name}/manifests/1{query}"));
    send(&fake::client(), reqwest::Method::GET, url, creds).await
}

/// `POST` of an upload start for `name` through the proxy.
async fn push(p: &fake::Proxy, name: &str, creds: Creds<'_>) -> Answer {
    let url = p.url(&format!("/v2/{name}/blobs/uploads/"));
    send(&fake::client(), reqwest::Method::POST, url, creds).await
}

#[track_caller]
fn assert_unauthenticated(a: &Answer, p: &fake::Proxy) {
    assert_eq!(a.status, 401, "{a:?}");
    assert_eq!(a.code.as_deref(), Some("UNAUTHORIZED"), "{a:?}");
    // Followed by the scope the request needs (tested in tests/protocol.rs).
    let want = format!(
        "Bearer realm=\"http://{}/auth/token\",service=\"regcache\"",
        p.addr
    );
    assert!(
        a.challenge.as_deref().is_some_and(|c| c.starts_with(&want)),
        "{a:?}"
    );
}

#[track_caller]
fn assert_denied(a: &Answer) {
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(a.code.as_deref(), Some("DENIED"), "{a:?}");
}

#[tokio::test]
async fn anonymous_pull_everywhere_by_default_and_only_where_a_rule_allows_it_otherwise() {
    let env = Env::new().await;
    let open = env.proxy("").await;
    for name in ["alpine", "team/app", "internal/team/app"] {
        assert_eq!(
            pull(&open, name, None, Creds::None).await.status,
            200,
            "{name}"
        );
    }
    assert_eq!(
        send(
            &fake::client(),
            reqwest::Method::GET,
            open.url("/v2/"),
            Creds::None
        )
        .await
        .status,
        200,
        "nothing needs credentials: no challenge"
    );

    let p = env
        .proxy(
            r#"anonymous_pull = false
[[auth.rule]]
anonymous = true
upstreams = ["hub"]
repositories = ["library/*"]
allow = ["pull"]
"#,
        )
        .await;
    let internal = env.internal_host();
    // `alpine` is `library/alpine` at the Docker Hub upstream: the rule sees the rewritten name.
    assert_eq!(pull(&p, "alpine", None, Creds::None).await.status, 200);
    assert_eq!(
        pull(&p, "library/alpine", Some("docker.io"), Creds::None)
            .await
            .status,
        200
    );
    // Another repository at the same upstream, the same repository at another one (by path
    // prefix or by `ns=`): 401 with a challenge, and the upstream is never asked.
    let before = (env.hub.seen().len(), env.internal.seen().len());
    for (name, ns) in [
        ("team/app", None),
        ("internal/library/alpine", None),
        ("library/alpine", Some(internal.as_str())),
    ] {
        assert_unauthenticated(&pull(&p, name, ns, Creds::None).await, &p);
    }
    assert_eq!(
        (env.hub.seen().len(), env.internal.seen().len()),
        before,
        "a refused pull reached the upstream"
    );
    // Blobs and tag lists are checked the same way.
    let c = fake::client();
    let tags = |name: &str| p.url(&format!("/v2/{name}/tags/list"));
    assert_eq!(
        send(&c, reqwest::Method::GET, tags("alpine"), Creds::None)
            .await
            .status,
        200
    );
    assert_unauthenticated(
        &send(&c, reqwest::Method::GET, tags("team/app"), Creds::None).await,
        &p,
    );
    let blob = fake::sha(&fake::blob_of(1000, 1));
    let blob_url = |name: &str| p.url(&format!("/v2/{name}/blobs/{blob}"));
    assert_eq!(
        send(&c, reqwest::Method::GET, blob_url("alpine"), Creds::None)
            .await
            .status,
        200
    );
    assert_unauthenticated(
        &send(
            &c,
            reqwest::Method::GET,
            blob_url("internal/team/app"),
            Creds::None,
        )
        .await,
        &p,
    );
    // `/v2/` challenges, so clients fetch (anonymous) tokens from the realm.
    assert_unauthenticated(
        &send(&c, reqwest::Method::GET, p.url("/v2/"), Creds::None).await,
        &p,
    );
}

#[tokio::test]
async fn a_pull_only_user_pulls_but_may_not_push_and_a_push_user_does_both() {
    let env = Env::new().await;
    let p = env
        .proxy(
            r#"push = true
anonymous_pull = false
[[auth.rule]]
users = ["reader"]
allow = ["pull"]
[[auth.rule]]
users = ["ci"]
upstreams = ["internal"]
repositories = ["team/*"]
allow = ["pull", "push"]
"#,
        )
        .await;
    let reader = Creds::Basic("reader", "read-pass");
    let ci = Creds::Basic("ci", "ci-pass");
    // The reader pulls everywhere and pushes nowhere.
    assert_eq!(
        pull(&p, "internal/team/app", None, reader).await.status,
        200
    );
    assert_eq!(pull(&p, "alpine", None, reader).await.status, 200);
    assert_denied(&push(&p, "internal/team/app", reader).await);
    // The pusher pulls and pushes inside its pattern, and nothing outside it.
    assert_eq!(pull(&p, "internal/team/app", None, ci).await.status, 200);
    assert_eq!(push(&p, "internal/team/app", ci).await.status, 202);
    assert_eq!(env.internal.count("POST", "/v2/team/app/blobs/uploads/"), 1);
    assert_denied(&push(&p, "internal/other/app", ci).await);
    assert_denied(&pull(&p, "internal/other/app", None, ci).await);
    assert_denied(&push(&p, "team/app", ci).await);
    assert_denied(&pull(&p, "team/app", None, ci).await);
    // Anonymous clients may do nothing here.
    assert_unauthenticated(&pull(&p, "internal/team/app", None, Creds::None).await, &p);
    assert_unauthenticated(&push(&p, "internal/team/app", Creds::None).await, &p);
    assert_eq!(
        env.internal.count("POST", "/blobs/uploads/"),
        1,
        "refused pushes stay here"
    );
    // A manifest push is checked like an upload.
    let put = |name: &str, creds| {
        let url = p.url(&format!("/v2/{name}/manifests/2"));
        async move { send(&fake::client(), reqwest::Method::PUT, url, creds).await }
    };
    assert_denied(&put("internal/team/app", reader).await);
    assert_denied(&put("internal/other/app", ci).await);
}

#[tokio::test]
async fn a_static_ci_token_works_for_its_upstream_and_repositories_only() {
    let env = Env::new().await;
    let p = env
        .proxy(
            r#"anonymous_pull = false
[[auth.rule]]
users = ["build"]
upstreams = ["internal"]
repositories = ["team/*"]
allow = ["pull"]
"#,
        )
        .await;
    let internal = env.internal_host();
    for creds in [
        Creds::Bearer(BUILD_TOKEN),
        Creds::Basic("build", BUILD_TOKEN),
    ] {
        // The permitted upstream, by path prefix and by `ns=`.
        assert_eq!(pull(&p, "internal/team/app", None, creds).await.status, 200);
        assert_eq!(
            pull(&p, "team/app", Some(&internal), creds).await.status,
            200
        );
        // The same repository at another upstream.
        assert_denied(&pull(&p, "team/app", None, creds).await);
        assert_denied(&pull(&p, "team/app", Some("docker.io"), creds).await);
        // Another repository at the permitted upstream.
        assert_denied(&pull(&p, "internal/other/app", None, creds).await);
        assert_denied(&pull(&p, "other/app", Some(&internal), creds).await);
    }
    assert_eq!(env.hub.count("GET", "/manifests/"), 0);
    assert_eq!(env.internal.count("GET", "/other/app/"), 0);
}

#[tokio::test]
async fn a_wrong_password_or_token_is_401() {
    let env = Env::new().await;
    let p = env
        .proxy("anonymous_pull = false\nmax_failed_logins = 100\n")
        .await;
    assert_eq!(
        pull(&p, "alpine", None, Creds::Basic("ci", "ci-pass"))
            .await
            .status,
        200
    );
    assert_eq!(
        pull(&p, "alpine", None, Creds::Bearer(BUILD_TOKEN))
            .await
            .status,
        200
    );
    let seen = env.hub.seen().len();
    for creds in [
        Creds::None,
        Creds::Basic("ci", "wrong"),
        Creds::Basic("nobody", "ci-pass"),
        Creds::Basic("build", "build-token-wrong-0000"),
        Creds::Basic("ci", BUILD_TOKEN),
        Creds::Bearer("build-token-wrong-0000"),
        Creds::Bearer(""),
    ] {
        assert_unauthenticated(&pull(&p, "alpine", None, creds).await, &p);
        let c = fake::client();
        assert_unauthenticated(
            &send(&c, reqwest::Method::GET, p.url("/v2/"), creds).await,
            &p,
        );
    }
    // The token endpoint refuses them as well.
    let c = fake::client();
    let token_url = p.url("/auth/token?service=regcache&scope=repository:alpine:pull");
    for creds in [
        Creds::None,
        Creds::Basic("ci", "wrong"),
        Creds::Bearer("nope-nope-nope-nope"),
    ] {
        assert_eq!(
            send(&c, reqwest::Method::GET, token_url.clone(), creds)
                .await
                .status,
            401
        );
    }
    assert_eq!(
        env.hub.seen().len(),
        seen,
        "a refused pull reached the upstream"
    );
}

fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .local_address(ip.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn failed_logins_are_limited_per_client_address() {
    let env = Env::new().await;
    let p = env
        .proxy("anonymous_pull = false\nmax_failed_logins = 3\nfailed_login_window = \"1m\"\n")
        .await;
    let one = client_from("127.0.0.1");
    let two = client_from("127.0.0.2");
    let base = p.url("/v2/");
    let get = |c: &reqwest::Client, creds| {
        let (c, url) = (c.clone(), base.clone());
        async move { send(&c, reqwest::Method::GET, url, creds).await }
    };
    assert_eq!(get(&one, Creds::Basic("ci", "ci-pass")).await.status, 200);
    for creds in [
        Creds::Basic("ci", "wrong"),
        Creds::Bearer("a-guessed-token-000000"),
        Creds::Basic("build", "another-guess-000000"),
    ] {
        assert_unauthenticated(&get(&one, creds).await, &p);
        tokio::time::advance(Duration::from_secs(10)).await;
    }
    // Blocked for what is left of the minute since the first failure, right password or not.
    for creds in [Creds::Basic("ci", "ci-pass"), Creds::Bearer(BUILD_TOKEN)] {
        let a = get(&one, creds).await;
        assert_eq!(a.status, 429, "{a:?}");
        assert_eq!(a.code.as_deref(), Some("TOOMANYREQUESTS"));
        assert_eq!(a.retry_after.as_deref(), Some("30"));
    }
    let token = send(
        &one,
        reqwest::Method::GET,
        p.url("/auth/token?service=regcache"),
        Creds::Basic("ci", "ci-pass"),
    )
    .await;
    assert_eq!(token.status, 429);
    // Another address is not blocked, and its failures are its own.
    assert_eq!(get(&two, Creds::Basic("ci", "ci-pass")).await.status, 200);
    assert_eq!(get(&two, Creds::Bearer(BUILD_TOKEN)).await.status, 200);
    assert_unauthenticated(&get(&two, Creds::Basic("ci", "wrong")).await, &p);
    // Still blocked one second before the window ends, let in when it is over.
    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(
        get(&one, Creds::Basic("ci", "ci-pass"))
            .await
            .retry_after
            .as_deref(),
        Some("1")
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(get(&one, Creds::Basic("ci", "ci-pass")).await.status, 200);
    assert_eq!(
        pull(&p, "alpine", None, Creds::Bearer(BUILD_TOKEN))
            .await
            .status,
        200
    );
}

/// The claims of a token regcache issued: `(subject, [(repository, actions)])`.
fn claims(token: &str) -> (Option<String>, Vec<(String, Vec<String>)>) {
    let body = token.split('.').next().unwrap();
    let json: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap(),
    )
    .unwrap();
    let access = json["access"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            assert_eq!(g["type"], "repository");
            let actions = g["actions"].as_array().unwrap();
            (
                g["name"].as_str().unwrap().to_owned(),
                actions
                    .iter()
                    .map(|a| a.as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect();
    (json["sub"].as_str().map(str::to_owned), access)
}

#[tokio::test]
async fn the_token_endpoint_issues_only_the_granted_scope() {
    let env = Env::new().await;
    let p = env
        .proxy(
            r#"push = true
anonymous_pull = false
[[auth.rule]]
anonymous = true
upstreams = ["hub"]
repositories = ["library/*"]
allow = ["pull"]
[[auth.rule]]
users = ["ci"]
upstreams = ["internal"]
repositories = ["team/*"]
allow = ["pull", "push"]
[[auth.rule]]
users = ["reader", "build"]
upstreams = ["internal"]
allow = ["pull"]
"#,
        )
        .await;
    let c = fake::client();
    let token = |scopes: &[&str], creds| {
        let query: String = scopes.iter().map(|s| format!("&scope={s}")).collect();
        let url = p.url(&format!("/auth/token?service=regcache{query}"));
        let c = c.clone();
        async move {
            let mut b = c.get(url);
            b = match creds {
                Creds::Basic(u, pw) => b.basic_auth(u, Some(pw)),
                Creds::Bearer(t) => b.bearer_auth(t),
                Creds::None => b,
            };
            let r = b.send().await.unwrap();
            assert_eq!(r.status(), 200);
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(v["token"], v["access_token"]);
            assert_eq!(v["expires_in"], 300);
            v["token"].as_str().unwrap().to_owned()
        }
    };
    let asked = [
        "repository:internal/team/app:pull,push",
        "repository:internal/other/app:pull,push",
        "repository:alpine:pull,push",
        "registry:catalog:*",
    ];
    let pp = || vec!["pull".to_string(), "push".to_string()];
    let pl = || vec!["pull".to_string()];

    let ci = token(&asked, Creds::Basic("ci", "ci-pass")).await;
    assert_eq!(
        claims(&ci),
        (
            Some("ci".into()),
            vec![("internal/team/app".into(), pp()), ("alpine".into(), pl())]
        )
    );
    let reader = token(&asked, Creds::Basic("reader", "read-pass")).await;
    assert_eq!(
        claims(&reader),
        (
            Some("reader".into()),
            vec![
                ("internal/team/app".into(), pl()),
                ("internal/other/app".into(), pl()),
                ("alpine".into(), pl()),
            ]
        )
    );
    // A static token as the password, or as the bearer credential, gets its own grants.
    for creds in [
        Creds::Basic("build", BUILD_TOKEN),
        Creds::Bearer(BUILD_TOKEN),
    ] {
        let t = token(&asked[..1], creds).await;
        assert_eq!(
            claims(&t),
            (
                Some("build".into()),
                vec![("internal/team/app".into(), pl())]
            )
        );
    }
    let anon = token(&asked, Creds::None).await;
    assert_eq!(claims(&anon), (None, vec![("alpine".into(), pl())]));
    let login = token(&[], Creds::Basic("ci", "ci-pass")).await;
    assert_eq!(claims(&login), (Some("ci".into()), vec![]));

    // The tokens do what they say and no more.
    assert_eq!(
        push(&p, "internal/team/app", Creds::Bearer(&ci))
            .await
            .status,
        202
    );
    assert_eq!(
        pull(&p, "internal/team/app", None, Creds::Bearer(&ci))
            .await
            .status,
        200
    );
    assert_denied(&pull(&p, "internal/other/app", None, Creds::Bearer(&ci)).await);
    assert_denied(&push(&p, "internal/team/app", Creds::Bearer(&reader)).await);
    assert_eq!(
        pull(&p, "alpine", None, Creds::Bearer(&anon)).await.status,
        200
    );
    assert_unauthenticated(
        &pull(&p, "internal/team/app", None, Creds::Bearer(&anon)).await,
        &p,
    );
    assert_unauthenticated(&push(&p, "alpine", Creds::Bearer(&anon)).await, &p);
    // A login token (no scope) proves who the client is at `/v2/`, and opens no repository
    // the user may not pull anonymously.
    let base = send(
        &c,
        reqwest::Method::GET,
        p.url("/v2/"),
        Creds::Bearer(&login),
    )
    .await;
    assert_eq!(base.status, 200);
    assert_unauthenticated(
        &pull(&p, "internal/team/app", None, Creds::Bearer(&login)).await,
        &p,
    );
    // A token narrower than the user's rights: the rest sends the client back for a new one.
    let narrow = token(
        &["repository:internal/team/app:pull"],
        Creds::Basic("reader", "read-pass"),
    )
    .await;
    assert_eq!(
        pull(&p, "internal/team/app", None, Creds::Bearer(&narrow))
            .await
            .status,
        200
    );
    assert_unauthenticated(
        &pull(&p, "internal/other/app", None, Creds::Bearer(&narrow)).await,
        &p,
    );
    // Issued tokens cannot be traded in for new ones, nor be altered.
    let r = send(
        &c,
        reqwest::Method::GET,
        p.url("/auth/token?service=regcache&scope=repository:internal/other/app:pull"),
        Creds::Bearer(&narrow),
    )
    .await;
    assert_eq!(r.status, 401);
    let (_, sig) = narrow.split_once('.').unwrap();
    let wider = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
        serde_json::json!({"sub": "reader", "exp": u64::MAX / 2, "access": [
            {"type": "repository", "name": "internal/other/app", "actions": ["pull"]}
        ]})
        .to_string(),
    );
    assert_unauthenticated(
        &pull(
            &p,
            "internal/other/app",
            None,
            Creds::Bearer(&format!("{wider}.{sig}")),
        )
        .await,
        &p,
    );
}

/// A small single-layer image (no busybox needed).
fn tiny_image(tag: &str) -> OciLayout {
    let spec = ImageSpec {
        platform: Platform::amd64(),
        layers: vec![Layer::text_files(&[("etc/access-control", tag)])],
        cmd: vec!["/bin/false".into()],
        env: vec![],
    };
    OciLayout::single(tag, &spec).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_with_a_ci_token_and_is_refused_at_another_upstream() {
    require_peer!(require_binaries(&["skopeo", "docker-registry"]));
    let internal = require_peer!(Registry::start(RegistryAuth::None).await);
    let vendor = require_peer!(Registry::start(RegistryAuth::None).await);
    let img = tiny_image("1");
    for reg in [&internal, &vendor] {
        for name in ["team/app:1", "other/app:1"] {
            image::push(&img, &format!("{}/{name}", reg.host()), None)
                .await
                .unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let token_file: PathBuf = dir.path().join("ci-token");
    std::fs::write(&token_file, format!("{BUILD_TOKEN}\n")).unwrap();
    let text = format!(
        r#"default_upstream = "internal"
[auth]
anonymous_pull = false
[[auth.token]]
name = "ci"
token_file = "{}"
[[auth.rule]]
users = ["ci"]
upstreams = ["internal"]
repositories = ["team/*"]
allow = ["pull"]
[[upstream]]
name = "internal"
url = "{}"
[[upstream]]
name = "vendor"
url = "{}"
"#,
        token_file.display(),
        internal.url(),
        vendor.url()
    );
    let p = fake::Proxy::start(Config::from_toml(&text).unwrap()).await;
    vendor.settle_log().await;
    let vendor_gets = vendor.count_requests("GET", "/manifests/");
    let creds = format!("ci:{BUILD_TOKEN}");
    let out = tempfile::tempdir().unwrap();
    let skopeo = |reference: &str, sub: &str, with_creds: Option<&str>| {
        let src = format!("{}/{reference}", p.addr);
        let dest = out.path().join(sub);
        let extra: Vec<String> = with_creds
            .map(|c| vec!["--src-creds".to_string(), c.to_string()])
            .unwrap_or_default();
        async move {
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            image::skopeo_pull(&src, &dest, &extra).await
        }
    };
    // Granted: the internal upstream's team/ repositories.
    let got = skopeo("internal/team/app:1", "ok", Some(&creds))
        .await
        .unwrap();
    assert_eq!(got, vec![img.digest().to_string()]);
    let got = skopeo("team/app:1", "ok-default", Some(&creds))
        .await
        .unwrap();
    assert_eq!(got, vec![img.digest().to_string()]);
    // Refused: the same repository at another upstream, another repository, no or wrong
    // credentials.
    for (reference, sub, c, why) in [
        (
            "vendor/team/app:1",
            "vendor",
            Some(creds.as_str()),
            "denied",
        ),
        (
            "internal/other/app:1",
            "other",
            Some(creds.as_str()),
            "denied",
        ),
        ("internal/team/app:1", "anonymous", None, "unauthorized"),
        (
            "internal/team/app:1",
            "wrong",
            Some("ci:not-the-token-000000"),
            "unauthorized",
        ),
    ] {
        let e = skopeo(reference, sub, c).await.unwrap_err();
        let text = format!("{e:#}").to_lowercase();
        assert!(text.contains(why), "{reference} with {c:?}: {text}");
    }
    vendor.settle_log().await;
    assert_eq!(
        vendor.count_requests("GET", "/manifests/"),
        vendor_gets,
        "a refused pull reached the upstream"
    );
}

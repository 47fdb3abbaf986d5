//! An in-process fake upstream registry with hit counters and fault switches, and a harness
//! that runs regcache in-process on 127.0.0.1:0 in front of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use regcache::app::App;
use regcache::config::{Config, UpstreamConfig};
use regcache::reference::Digest;
use sha2::Digest as _;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};

/// Chunk size the fake serves blobs in.
pub const CHUNK: usize = 64 * 1024;

type FakeBody = BoxBody<Bytes, Infallible>;

/// How the fake wants clients to authenticate.
#[derive(Clone, Debug)]
pub enum AuthMode {
    /// Anonymous access.
    None,
    /// Bearer tokens from its own `/token` realm; `creds` are required there when set.
    Bearer { creds: Option<(String, String)> },
    /// Basic auth on every registry request.
    Basic { user: String, pass: String },
}

/// One request the fake saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub authorization: Option<String>,
    pub accept: Vec<String>,
}

type Variant = (String, Bytes);

#[derive(Default)]
struct State {
    blobs: Mutex<HashMap<String, Bytes>>,
    // (repository, tag) → variants (media type, body); by-digest lookups are derived.
    tags: Mutex<HashMap<(String, String), Vec<Variant>>>,
    manifests: Mutex<HashMap<String, (String, Bytes)>>,
    auth: Mutex<Option<AuthMode>>,
    gate: Mutex<Option<Arc<Semaphore>>>,
    // Manifest `HEAD` answers wait for one permit each.
    head_gate: Mutex<Option<Arc<Semaphore>>>,
    corrupt: AtomicBool,
    down: AtomicBool,
    redirect_to: Mutex<Option<String>>,
    // Every `/cdn/` request redirects to itself.
    redirect_loop: AtomicBool,
    // Added to the true Content-Length of blob answers (a lying upstream).
    length_lie: std::sync::atomic::AtomicI64,
    seen: Mutex<Vec<Seen>>,
    tokens_issued: AtomicU64,
    // Repositories whose next upload start answers 404 NAME_UNKNOWN (once each).
    missing_once: Mutex<Vec<String>>,
    uploads_started: AtomicU64,
    token_lifetime: AtomicU64,
    // (status, how many more) for registry requests that carry an `Authorization` header.
    refuse: Mutex<Option<(StatusCode, u64)>>,
}

/// The fake registry.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    _stop: oneshot::Sender<()>,
}

pub fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// Deterministic pseudo-random bytes.
pub fn blob_of(len: usize, seed: u8) -> Bytes {
    let mut x: u32 = 0x9e3779b9 ^ seed as u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

impl FakeUpstream {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0").await
    }

    pub async fn start_on(bind: &str) -> Self {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        state.token_lifetime.store(300, Ordering::SeqCst);
        let (tx, mut rx) = oneshot::channel();
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = &mut rx => break,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(st, addr, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeUpstream {
            addr,
            state,
            _stop: tx,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn add_blob(&self, data: Bytes) -> String {
        let d = sha(&data);
        self.state.blobs.lock().unwrap().insert(d.clone(), data);
        d
    }

    /// Adds a manifest variant for `repo:tag` and returns its digest.
    pub fn add_manifest(&self, repo: &str, tag: &str, media_type: &str, body: &[u8]) -> String {
        let d = sha(body);
        let b = Bytes::copy_from_slice(body);
        self.state
            .manifests
            .lock()
            .unwrap()
            .insert(d.clone(), (media_type.to_owned(), b.clone()));
        self.state
            .tags
            .lock()
            .unwrap()
            .entry((repo.to_owned(), tag.to_owned()))
            .or_default()
            .push((media_type.to_owned(), b));
        d
    }

    /// Points `repo:tag` at a single new manifest.
    pub fn retag(&self, repo: &str, tag: &str, media_type: &str, body: &[u8]) -> String {
        self.state
            .tags
            .lock()
            .unwrap()
            .remove(&(repo.to_owned(), tag.to_owned()));
        self.add_manifest(repo, tag, media_type, body)
    }

    pub fn remove_tag(&self, repo: &str, tag: &str) {
        self.state
            .tags
            .lock()
            .unwrap()
            .remove(&(repo.to_owned(), tag.to_owned()));
    }

    pub fn set_auth(&self, mode: AuthMode) {
        *self.state.auth.lock().unwrap() = Some(mode);
    }

    /// The next `n` registry requests that carry an `Authorization` header (right or wrong)
    /// are answered `status` as a registry that refuses the credentials would: 401 with a
    /// `Basic` challenge, 403 `DENIED`, or 400 with an expired-token message. `u64::MAX`
    /// refuses for good; `n = 0` turns it off.
    pub fn refuse_authenticated(&self, status: u16, n: u64) {
        let status = StatusCode::from_u16(status).unwrap();
        *self.state.refuse.lock().unwrap() = (n > 0).then_some((status, n));
    }

    /// The next upload start in `repo` answers 404 NAME_UNKNOWN, as ECR does for a
    /// repository that does not exist; later ones succeed.
    pub fn missing_once(&self, repo: &str) {
        self.state
            .missing_once
            .lock()
            .unwrap()
            .push(repo.to_owned());
    }

    pub fn set_token_lifetime(&self, secs: u64) {
        self.state.token_lifetime.store(secs, Ordering::SeqCst);
    }

    /// Blob bodies then wait for one permit per chunk.
    pub fn gate(&self) -> Arc<Semaphore> {
        let s = Arc::new(Semaphore::new(0));
        *self.state.gate.lock().unwrap() = Some(s.clone());
        s
    }

    /// Manifest `HEAD` answers then wait for one permit each.
    pub fn gate_manifest_heads(&self) -> Arc<Semaphore> {
        let s = Arc::new(Semaphore::new(0));
        *self.state.head_gate.lock().unwrap() = Some(s.clone());
        s
    }

    pub fn ungate(&self) {
        if let Some(s) = self.state.gate.lock().unwrap().take() {
            s.add_permits(1 << 20);
        }
    }

    pub fn set_corrupt(&self, on: bool) {
        self.state.corrupt.store(on, Ordering::SeqCst);
    }

    pub fn set_down(&self, on: bool) {
        self.state.down.store(on, Ordering::SeqCst);
    }

    /// Blob GETs answer 307 to `base` + the same path.
    /// `/cdn/` answers redirect to themselves forever.
    pub fn set_redirect_loop(&self, on: bool) {
        self.state.redirect_loop.store(on, Ordering::SeqCst);
    }

    /// Blob answers declare a Content-Length off by `delta` from what they send.
    pub fn lie_about_length(&self, delta: i64) {
        self.state.length_lie.store(delta, Ordering::SeqCst);
    }

    pub fn redirect_blobs_to(&self, base: &str) {
        *self.state.redirect_to.lock().unwrap() = Some(base.to_owned());
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Requests with this method whose path contains `part`.
    pub fn count(&self, method: &str, part: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.method == method && s.path.contains(part))
            .count()
    }

    pub fn blob_gets(&self, digest: &str) -> usize {
        self.count("GET", &format!("/blobs/{digest}"))
    }

    pub fn tokens_issued(&self) -> u64 {
        self.state.tokens_issued.load(Ordering::SeqCst)
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<FakeBody> {
    let b: Bytes = body.into();
    let mut r = Response::new(Full::new(b.clone()).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, b.len().into());
    r
}

fn oci_error(status: StatusCode, code: &str) -> Response<FakeBody> {
    let mut r = full(
        status,
        format!(r#"{{"errors":[{{"code":"{code}","message":"fake"}}]}}"#),
    );
    r.headers_mut()
        .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    r
}

fn accepts(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(|s| s.split(';').next().unwrap_or("").trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

async fn handle(st: Arc<State>, addr: SocketAddr, req: Request<Incoming>) -> Response<FakeBody> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let authz = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("").to_owned());
    st.seen.lock().unwrap().push(Seen {
        method: req.method().clone(),
        path: if query.is_empty() {
            path.clone()
        } else {
            format!("{path}?{query}")
        },
        authorization: authz.clone(),
        accept: accepts(req.headers()),
    });
    if st.down.load(Ordering::SeqCst) {
        return oci_error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE");
    }
    let auth = st.auth.lock().unwrap().clone().unwrap_or(AuthMode::None);
    if path == "/token" {
        if let AuthMode::Bearer {
            creds: Some((u, p)),
        } = &auth
        {
            use base64::Engine;
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            );
            if authz.as_deref() != Some(want.as_str()) {
                return full(StatusCode::UNAUTHORIZED, "bad credentials");
            }
        }
        let n = st.tokens_issued.fetch_add(1, Ordering::SeqCst) + 1;
        let life = st.token_lifetime.load(Ordering::SeqCst);
        return full(
            StatusCode::OK,
            format!(r#"{{"token":"tok-{n}","expires_in":{life}}}"#),
        );
    }
    let rest = match path.strip_prefix("/v2/") {
        Some(r) => r.to_owned(),
        None if path == "/v2" => String::new(),
        None => {
            // The "CDN" side of a redirect: blobs by digest, no auth.
            if st.redirect_loop.load(Ordering::SeqCst) {
                let mut r = full(StatusCode::TEMPORARY_REDIRECT, "");
                r.headers_mut()
                    .insert(header::LOCATION, path.parse().unwrap());
                return r;
            }
            if let Some(d) = path.rsplit('/').next() {
                let found = st.blobs.lock().unwrap().get(d).cloned();
                if let Some(b) = found {
                    return blob_response(&st, b, req.method() == Method::HEAD).await;
                }
            }
            return full(StatusCode::NOT_FOUND, "not found");
        }
    };
    let repo_of = |rest: &str| -> String {
        for kw in ["/manifests/", "/blobs/", "/tags/list"] {
            if let Some((n, _)) = rest.rsplit_once(kw) {
                return n.to_owned();
            }
        }
        String::new()
    };
    let repo = repo_of(&rest);
    if authz.is_some() {
        if let Some(r) = refusal(&st) {
            return r;
        }
    }
    match &auth {
        AuthMode::None => {}
        AuthMode::Bearer { .. } => {
            if !authz
                .as_deref()
                .is_some_and(|a| a.starts_with("Bearer tok-"))
            {
                let mut r = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
                let ch = format!(
                    r#"Bearer realm="http://{addr}/token",service="fake",scope="repository:{repo}:pull""#
                );
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, ch.parse().unwrap());
                return r;
            }
        }
        AuthMode::Basic { user, pass } => {
            use base64::Engine;
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
            );
            if authz.as_deref() != Some(want.as_str()) {
                let mut r = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    r#"Basic realm="fake""#.parse().unwrap(),
                );
                return r;
            }
        }
    }
    let head = req.method() == Method::HEAD;
    if rest.is_empty() {
        return full(StatusCode::OK, "{}");
    }
    if req.method() == Method::POST && rest.ends_with("/blobs/uploads/") {
        let repo = rest.trim_end_matches("/blobs/uploads/").to_owned();
        let missing = {
            let mut m = st.missing_once.lock().unwrap();
            let found = m.iter().position(|r| *r == repo);
            found.map(|i| m.remove(i)).is_some()
        };
        if missing {
            return oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
        }
        let n = st.uploads_started.fetch_add(1, Ordering::SeqCst);
        let mut r = full(StatusCode::ACCEPTED, "");
        r.headers_mut().insert(
            header::LOCATION,
            format!("/v2/{repo}/blobs/uploads/upload-{n}")
                .parse()
                .unwrap(),
        );
        return r;
    }
    if let Some((_, reference)) = rest.rsplit_once("/manifests/") {
        if req.method() == Method::DELETE {
            // A registry that deletes tags as well as manifests by digest.
            let gone = if reference.starts_with("sha256:") {
                st.manifests.lock().unwrap().remove(reference).is_some()
            } else {
                let key = (repo.clone(), reference.to_owned());
                st.tags.lock().unwrap().remove(&key).is_some()
            };
            return if gone {
                full(StatusCode::ACCEPTED, "")
            } else {
                oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
            };
        }
        let gate = st.head_gate.lock().unwrap().clone();
        if let (true, Some(g)) = (head, gate) {
            if let Ok(p) = g.acquire().await {
                p.forget();
            }
        }
        let found = if reference.starts_with("sha256:") {
            st.manifests.lock().unwrap().get(reference).cloned()
        } else {
            let acc = accepts(req.headers());
            st.tags
                .lock()
                .unwrap()
                .get(&(repo.clone(), reference.to_owned()))
                .and_then(|vs| {
                    vs.iter()
                        .find(|(mt, _)| acc.is_empty() || acc.iter().any(|a| a == mt || a == "*/*"))
                        .cloned()
                })
        };
        let Some((mt, body)) = found else {
            return oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
        };
        let d = sha(&body);
        let mut r = full(
            StatusCode::OK,
            if head { Bytes::new() } else { body.clone() },
        );
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, body.len().into());
        r.headers_mut()
            .insert(header::CONTENT_TYPE, mt.parse().unwrap());
        r.headers_mut()
            .insert("docker-content-digest", d.parse().unwrap());
        return r;
    }
    if let Some((_, digest)) = rest.rsplit_once("/blobs/") {
        let found = st.blobs.lock().unwrap().get(digest).cloned();
        let Some(b) = found else {
            return oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
        };
        let redirect = st.redirect_to.lock().unwrap().clone();
        if let Some(base) = redirect {
            let mut r = full(StatusCode::TEMPORARY_REDIRECT, "");
            r.headers_mut().insert(
                header::LOCATION,
                format!("{base}/cdn/{digest}").parse().unwrap(),
            );
            return r;
        }
        return blob_response(&st, b, head).await;
    }
    if rest.ends_with("/tags/list") {
        let mut tags: Vec<String> = st
            .tags
            .lock()
            .unwrap()
            .keys()
            .filter(|(r, _)| *r == repo)
            .map(|(_, t)| t.clone())
            .collect();
        tags.sort();
        if tags.is_empty() {
            return oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
        }
        let params: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        if let Some(last) = params.get("last") {
            tags.retain(|t| t > last);
        }
        let mut r;
        if let Some(n) = params.get("n").and_then(|n| n.parse::<usize>().ok()) {
            let more = tags.len() > n;
            tags.truncate(n);
            r = full(
                StatusCode::OK,
                serde_json::json!({"name": repo, "tags": tags}).to_string(),
            );
            if more {
                let link = format!(
                    "</v2/{repo}/tags/list?last={}&n={n}>; rel=\"next\"",
                    tags.last().unwrap()
                );
                r.headers_mut().insert(header::LINK, link.parse().unwrap());
            }
        } else {
            r = full(
                StatusCode::OK,
                serde_json::json!({"name": repo, "tags": tags}).to_string(),
            );
        }
        return r;
    }
    oci_error(StatusCode::NOT_FOUND, "NOT_FOUND")
}

/// Takes one refusal off the `refuse_authenticated` counter, if any is left.
fn refusal(st: &State) -> Option<Response<FakeBody>> {
    let mut refuse = st.refuse.lock().unwrap();
    let (status, left) = (*refuse)?;
    *refuse = (left > 1).then_some((status, left.saturating_sub(1)));
    Some(match status {
        StatusCode::UNAUTHORIZED => {
            let mut r = oci_error(status, "UNAUTHORIZED");
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                r#"Basic realm="fake""#.parse().unwrap(),
            );
            r
        }
        StatusCode::FORBIDDEN => oci_error(status, "DENIED"),
        _ => {
            let mut r = full(
                status,
                r#"{"errors":[{"code":"DENIED","message":"Your authorization token has expired. Reauthenticate and try again."}]}"#,
            );
            r.headers_mut()
                .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
            r
        }
    })
}

async fn blob_response(st: &State, b: Bytes, head: bool) -> Response<FakeBody> {
    let len = b.len();
    let mut data = b.to_vec();
    if st.corrupt.load(Ordering::SeqCst) && !data.is_empty() {
        let last = data.len() - 1;
        data[last] ^= 0xff;
    }
    let gate = st.gate.lock().unwrap().clone();
    let body: FakeBody = if head {
        Full::new(Bytes::new()).boxed()
    } else {
        let chunks: Vec<Bytes> = data.chunks(CHUNK).map(Bytes::copy_from_slice).collect();
        let stream = futures_util::stream::iter(chunks).then(move |c| {
            let gate = gate.clone();
            async move {
                if let Some(g) = gate {
                    if let Ok(p) = g.acquire().await {
                        p.forget();
                    }
                }
                Ok::<_, Infallible>(Frame::data(c))
            }
        });
        BodyExt::boxed(StreamBody::new(stream))
    };
    let mut r = Response::new(body);
    let declared = (len as i64 + st.length_lie.load(Ordering::SeqCst)).max(0) as u64;
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, declared.into());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/octet-stream".parse().unwrap(),
    );
    r
}

/// regcache running in-process on 127.0.0.1:0.
pub struct Proxy {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    pub dir: Arc<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A config with one upstream named `up` (the default) at `url`.
pub fn config_for(url: &str) -> Config {
    let mut c = Config {
        default_upstream: "up".into(),
        upstreams: vec![UpstreamConfig::new("up", url.parse().unwrap())],
        ..Config::default()
    };
    c.retry.backoff = regcache::units::HumanDuration(Duration::from_millis(10));
    c
}

impl Proxy {
    pub async fn start(config: Config) -> Self {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        Self::start_in(config, dir).await
    }

    /// Starts on `config`, whose cache_dir is replaced by `dir` unless already set elsewhere.
    pub async fn start_in(mut config: Config, dir: Arc<tempfile::TempDir>) -> Self {
        if config.cache_dir == Config::default().cache_dir {
            config.cache_dir = dir.path().to_owned();
        }
        let config = config.validate().unwrap();
        let app = App::new(config).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let a = app.clone();
        let task = tokio::spawn(async move {
            regcache::server::serve(listener, a, None, Duration::from_secs(5), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Proxy {
            addr,
            app,
            dir,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Waits until every blob download has been committed (or has failed): clients get
    /// their last byte once a blob is verified, a moment before it is committed.
    pub async fn committed(&self) {
        self.app.downloads_settled().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `GET` of blob `d` of `lib/app` through the proxy, with a fresh test client.
    pub async fn get_blob(&self, d: &str) -> reqwest::Response {
        client()
            .get(self.url(&format!("/v2/lib/app/blobs/{d}")))
            .send()
            .await
            .unwrap()
    }

    /// Where the cache keeps the committed blob `d` (`sha256:<hex>`).
    pub fn blob_path(&self, d: &str) -> std::path::PathBuf {
        self.dir
            .path()
            .join("blobs/sha256")
            .join(&d[7..9])
            .join(&d[7..])
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// Reads a whole body; `Err` when the response ends with an error.
pub async fn body_of(resp: reqwest::Response) -> Result<Bytes, reqwest::Error> {
    resp.bytes().await
}

/// Waits (bounded) until `cond` holds, yielding to the runtime between checks.
pub async fn until(mut cond: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("condition not reached");
}

/// Every file under `dir`, recursively (none when it does not exist).
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| {
            if e.path().is_dir() {
                files_under(&e.path())
            } else {
                vec![e.path()]
            }
        })
        .collect()
}

/// Asserts two bodies are equal without printing megabytes on failure.
#[track_caller]
pub fn same(got: &[u8], want: &[u8]) {
    assert!(
        got == want,
        "body differs: got {} bytes (sha {}), want {} bytes (sha {})",
        got.len(),
        sha(got),
        want.len(),
        sha(want)
    );
}

/// Sends a request line exactly as given (no client-side path normalisation) and returns the
/// status code and body text.
pub async fn raw_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub fn digest(s: &str) -> Digest {
    s.parse().unwrap()
}

/// A tiny OCI image: config + layers, manifest JSON, returned with its digests.
pub struct Image {
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub config: String,
    pub layers: Vec<String>,
}

pub fn push_image(
    up: &FakeUpstream,
    repo: &str,
    tag: &str,
    layers: &[Bytes],
    media_type: &str,
) -> Image {
    let cfg = Bytes::from(format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"tag":"{tag}"}}"#
    ));
    let config = up.add_blob(cfg.clone());
    let mut ls = Vec::new();
    let mut descs = Vec::new();
    for l in layers {
        let d = up.add_blob(l.clone());
        descs.push(serde_json::json!({"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":d,"size":l.len()}));
        ls.push(d);
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType":"application/vnd.oci.image.config.v1+json","digest":config,"size":cfg.len()},
        "layers": descs,
    })
    .to_string()
    .into_bytes();
    let manifest_digest = up.add_manifest(repo, tag, media_type, &manifest);
    Image {
        manifest,
        manifest_digest,
        config,
        layers: ls,
    }
}

/// Runs the openssl CLI in `dir`; panics with its error output when it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian package openssl) is needed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private CA (`ca.pem`) and certificates for 127.0.0.1 signed by it, each with its own
/// key: `<name>.pem`, `<name>.key`.
pub fn certificates(dir: &std::path::Path, names: &[&str]) -> std::path::PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=regcache test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    for name in names {
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
                "-out",
                &pem,
            ],
        );
    }
    dir.join("ca.pem")
}

//! Owns the counting HTTP relay of the fleet tests: a reverse proxy on `127.0.0.1:0` in front
//! of one server (the object store, or the upstream registry) that records every request
//! (method, path, query, `Range`, conditional headers, status, body bytes passed back), can
//! strip request headers (a store that ignores `If-None-Match`), and can hold response bodies
//! after K bytes until the test opens the gate, so "mid-fill" is a state, not a moment.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

type Body = BoxBody<Bytes, hyper::Error>;

/// One request that went through the relay.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// Path as sent (percent-encoding kept).
    pub path: String,
    /// Query string without `?`.
    pub query: Option<String>,
    /// The `Range` header.
    pub range: Option<String>,
    /// `If-None-Match` / `If-Match` as sent by the client (before any stripping).
    pub if_none_match: Option<String>,
    /// `If-Match` as sent.
    pub if_match: Option<String>,
    /// Response status (0 while the answer has not come; 502 when the server was unreachable).
    pub status: u16,
    /// Response body bytes passed to the client so far.
    pub bytes: u64,
    /// When the request arrived.
    pub at: Instant,
}

struct State {
    target: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
    seen: Mutex<Vec<Seen>>,
    strip: Mutex<Vec<String>>,
    /// Response bodies of GETs whose path contains `gated` pass at most this many bytes each.
    gate: watch::Sender<u64>,
    gated: Mutex<Option<String>>,
}

/// The relay; its accept loop is aborted on drop.
pub struct HttpRelay {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpRelay {
    /// Relays `127.0.0.1:<free port>` to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<HttpRelay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let state = Arc::new(State {
            target,
            client: Client::builder(TokioExecutor::new()).build(connector),
            seen: Mutex::new(Vec::new()),
            strip: Mutex::new(Vec::new()),
            gate: watch::Sender::new(u64::MAX),
            gated: Mutex::new(None),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| forward(st.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(HttpRelay { addr, state, task })
    }

    /// `127.0.0.1:PORT` of the relay.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` of the relay.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Removes request header `name` before forwarding (e.g. `if-none-match`: a store that
    /// lets every conditional create win).
    pub fn strip_request_header(&self, name: &str) {
        self.state
            .strip
            .lock()
            .unwrap()
            .push(name.to_ascii_lowercase());
    }

    /// From now on, each `GET` response whose path contains `path_part` passes its first
    /// `bytes` body bytes and then waits for [`HttpRelay::open_gate`].
    pub fn hold_after(&self, path_part: &str, bytes: u64) {
        *self.state.gated.lock().unwrap() = Some(path_part.to_string());
        self.state.gate.send_replace(bytes);
    }

    /// Lets every held body continue, and every later one pass freely.
    pub fn open_gate(&self) {
        self.state.gate.send_replace(u64::MAX);
    }

    /// Everything seen so far, in arrival order.
    pub fn requests(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Forgets what was recorded.
    pub fn clear(&self) {
        self.state.seen.lock().unwrap().clear();
    }

    /// Requests with `method` whose path contains `path_part`.
    pub fn matching(&self, method: &str, path_part: &str) -> Vec<Seen> {
        self.requests()
            .into_iter()
            .filter(|s| s.method == method && s.path.contains(path_part))
            .collect()
    }

    /// How many requests with `method` had a path containing `path_part`.
    pub fn count(&self, method: &str, path_part: &str) -> usize {
        self.matching(method, path_part).len()
    }

    /// Body bytes passed back for requests with `method` whose path contains `path_part`.
    pub fn bytes(&self, method: &str, path_part: &str) -> u64 {
        self.matching(method, path_part)
            .iter()
            .map(|s| s.bytes)
            .sum()
    }

    /// Waits (≤ `limit`, polling) until `cond` holds over the recorded requests.
    pub async fn wait_for(&self, limit: Duration, cond: impl Fn(&[Seen]) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if cond(&self.requests()) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for HttpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn header(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn forward(st: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let seen = Seen {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        query: req.uri().query().map(str::to_string),
        range: header(&req, "range"),
        if_none_match: header(&req, "if-none-match"),
        if_match: header(&req, "if-match"),
        status: 0,
        bytes: 0,
        at: Instant::now(),
    };
    let gated = req.method() == http::Method::GET
        && st
            .gated
            .lock()
            .unwrap()
            .as_deref()
            .is_some_and(|p| seen.path.contains(p));
    let index = {
        let mut all = st.seen.lock().unwrap();
        all.push(seen);
        all.len() - 1
    };
    // The request body is read whole before it is forwarded: a server that answers early
    // (a 412 before the body) then never waits on a half-sent body. Test bodies are small.
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let mut r = Response::new(
                Full::new(Bytes::from(format!("relay: request body: {e}")))
                    .map_err(|never| match never {})
                    .boxed(),
            );
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(r);
        }
    };
    let mut req = Request::from_parts(parts, Full::new(body));
    for name in st.strip.lock().unwrap().iter() {
        req.headers_mut().remove(name.as_str());
    }
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    *req.uri_mut() = format!("http://{}{path_and_query}", st.target)
        .parse()
        .expect("loopback URI");
    let answer = st.client.request(req).await;
    let set_status = |status: u16| {
        if let Some(s) = st.seen.lock().unwrap().get_mut(index) {
            s.status = status;
        }
    };
    match answer {
        Ok(resp) => {
            set_status(resp.status().as_u16());
            let (parts, body) = resp.into_parts();
            Ok(Response::from_parts(
                parts,
                counted(body, st.clone(), index, gated),
            ))
        }
        Err(e) => {
            set_status(502);
            let mut r = Response::new(
                Full::new(Bytes::from(format!("relay: {e}")))
                    .map_err(|never| match never {})
                    .boxed(),
            );
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            Ok(r)
        }
    }
}

/// The response body, counted into `seen[index].bytes`, and held at the gate when `gated`.
fn counted(body: Incoming, st: Arc<State>, index: usize, gated: bool) -> Body {
    struct S {
        body: BodyStream<Incoming>,
        st: Arc<State>,
        index: usize,
        gated: bool,
        sent: u64,
        pending: Option<Bytes>,
    }
    let init = S {
        body: BodyStream::new(body),
        st,
        index,
        gated,
        sent: 0,
        pending: None,
    };
    let stream = futures_util::stream::unfold(init, |mut s| async move {
        loop {
            let mut chunk = match s.pending.take() {
                Some(c) => c,
                None => match s.body.next().await? {
                    Err(e) => return Some((Err(e), s)),
                    Ok(frame) => match frame.into_data() {
                        Ok(d) => d,
                        Err(other) => return Some((Ok(other), s)),
                    },
                },
            };
            if chunk.is_empty() {
                continue;
            }
            if s.gated {
                let mut rx = s.st.gate.subscribe();
                let limit = loop {
                    let limit = *rx.borrow_and_update();
                    if limit > s.sent {
                        break limit;
                    }
                    // Held: the test opens the gate (or drops the relay).
                    rx.changed().await.ok()?;
                };
                let allowed = usize::try_from(limit - s.sent).unwrap_or(usize::MAX);
                if chunk.len() > allowed {
                    s.pending = Some(chunk.split_off(allowed));
                }
            }
            s.sent += chunk.len() as u64;
            if let Some(seen) = s.st.seen.lock().unwrap().get_mut(s.index) {
                seen.bytes += chunk.len() as u64;
            }
            return Some((Ok(Frame::data(chunk)), s));
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}

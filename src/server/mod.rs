//! The accept loop: plain TCP or rustls (certificates reloadable), HTTP/1.1 and HTTP/2, the
//! connection limits (`[limits]`: connection count, request head size, header-read and idle
//! timeouts, framing checks) and graceful shutdown driven by a future the caller passes in.
//! Plain connections start in the [`fast`] loop and move to hyper when it hands them over.

pub mod fast;
pub mod http1;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::{HeaderValue, Request, Response, Version, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::access::ClientAddr;
use crate::app::App;
use crate::body::{self, Body};
use crate::config::LimitsConfig;
use crate::error::Error;
use fast::Outcome;
use http1::{Notes, Scanned};

/// The TLS configuration served: built from PEM files at start-up and re-read from them by
/// [`Tls::reload`] (SIGHUP) without a restart.
#[derive(Debug)]
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    // Read (an `Arc` clone) once per handshake, replaced whole on reload; a std lock, never
    // held across an `.await`. Handshakes under way keep the configuration they started with.
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl Tls {
    /// Loads the certificate chain and key; the error names the file at fault.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Tls>, String> {
        let config = server_config(cert, key)?;
        Ok(Arc::new(Tls {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Arc::new(config)),
        }))
    }

    /// Reads the files again and serves the new certificate to every later handshake. When the
    /// files do not make a valid configuration (unreadable, no certificate, a key that does
    /// not match) the current one stays and the error says why.
    pub fn reload(&self) -> Result<(), String> {
        let config = Arc::new(server_config(&self.cert, &self.key)?);
        // Writers replace the whole value, so a poisoned lock still holds a valid config.
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// rustls' safe defaults: TLS 1.2 and 1.3 only, AEAD suites with forward secrecy (aws-lc-rs
/// provider), ALPN `h2` then `http/1.1`.
fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("tls.cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("tls.cert {}: no certificate found", cert.display()));
    }
    let key_path = key;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls.key {}: {e}", key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("tls: {e}"))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| {
        format!(
            "tls.cert {} with tls.key {}: {e}",
            cert.display(),
            key_path.display()
        )
    })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The HTTP/1 and HTTP/2 settings from `[limits]`.
fn http_builder(limits: &LimitsConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // The request head must fit in the read buffer (431 otherwise); validation keeps the
    // size within what hyper allows (at least 8 KiB).
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout.0)
        .max_buf_size(usize::try_from(limits.max_header_bytes.0).unwrap_or(usize::MAX))
        .max_headers(limits.max_headers);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes.0).unwrap_or(u32::MAX));
    b
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open requests finish for
/// up to `grace`. The connection limits come from `app.config.limits`.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    tls: Option<Arc<Tls>>,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let limits = app.config.limits.clone();
    let builder = Arc::new(http_builder(&limits));
    // One permit per open connection, TLS handshakes included: the connection limit, and at
    // shutdown the way to learn that every connection has ended.
    let open = Arc::new(Semaphore::new(limits.max_connections as usize));
    // Turns `true` when shutdown begins: every connection then finishes its requests and closes.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut refusals = Refusals::default();
    let head_limits = fast::Limits {
        max_head: usize::try_from(limits.max_header_bytes.0).unwrap_or(usize::MAX),
        max_headers: limits.max_headers,
        head_timeout: limits.header_read_timeout.0,
        idle_timeout: limits.idle_timeout.0,
    };
    tokio::pin!(shutdown);
    while let Some((stream, peer)) = accept(&listener, shutdown.as_mut(), "accept failed").await {
        let Ok(permit) = open.clone().try_acquire_owned() else {
            // Refused at once rather than queued: a client waiting on a full server learns it
            // now, and the connections already open keep being served.
            refuse(stream, tls.is_some());
            refusals.note(limits.max_connections);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            app: app.clone(),
            builder: builder.clone(),
            peer,
            stop: stop_rx.clone(),
            limits: head_limits,
        };
        let tls = tls.clone();
        // One task per connection; it ends when the client closes, on a timeout, or after
        // shutdown. Its permit goes back when it ends.
        tokio::spawn(async move {
            conn.run(stream, tls).await;
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("shutting down; letting open requests finish");
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + grace;
    tokio::select! {
        _ = open.acquire_many(limits.max_connections) => tracing::info!("all connections closed"),
        _ = tokio::time::sleep_until(deadline) => tracing::warn!("shutdown grace period over; closing open connections"),
    }
    // Downloads whose clients have every byte may still be syncing and committing.
    if !app.inflight.is_empty() {
        tokio::select! {
            _ = app.inflight.drained() => tracing::info!("downloads under way committed"),
            _ = tokio::time::sleep_until(deadline) => tracing::warn!(
                downloads = app.inflight.len(),
                "shutdown grace period over; downloads under way are dropped"
            ),
        }
    }
    Ok(())
}

/// The next connection on `listener`, or `None` once `shutdown` resolves (accepting stops
/// at once). An accept error (out of file descriptors and the like) is logged as `failed`
/// and retried after a short pause instead of spinning.
pub(crate) async fn accept<F: Future>(
    listener: &TcpListener,
    mut shutdown: Pin<&mut F>,
    failed: &'static str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.as_mut() => return None,
            accepted = listener.accept() => match accepted {
                Ok(a) => return Some(a),
                Err(e) => {
                    tracing::warn!(error = %e, "{failed}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Answers a connection over the limit and closes it. Plain HTTP clients get a 503 (best
/// effort: written only if the socket takes it at once); TLS clients just see the close.
fn refuse(stream: TcpStream, tls: bool) {
    if !tls {
        let _ = stream.try_write(
            b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\nretry-after: 1\r\n\r\n",
        );
    }
}

/// Refused connections, logged at most every 10 s so that a flood does not flood the log.
#[derive(Default)]
struct Refusals {
    since_log: u64,
    logged: Option<Instant>,
}

impl Refusals {
    fn note(&mut self, max: u32) {
        self.since_log += 1;
        let now = Instant::now();
        if self
            .logged
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            tracing::warn!(
                refused = self.since_log,
                max_connections = max,
                "connection limit reached; refusing new connections"
            );
            self.since_log = 0;
            self.logged = Some(now);
        }
    }
}

/// One accepted connection.
struct Connection {
    app: Arc<App>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
    // The head size and timeouts of `[limits]`, for the fast loop and hyper's path alike.
    limits: fast::Limits,
}

impl Connection {
    async fn run(mut self, stream: TcpStream, tls: Option<Arc<Tls>>) {
        let Some(tls) = tls else {
            // Plain HTTP/1.1 starts in the fast loop (sendfile for cached blobs); hyper takes
            // over for anything the loop does not serve itself.
            let outcome = fast::serve(
                stream,
                self.peer,
                self.app.clone(),
                self.limits,
                self.stop.clone(),
            )
            .await;
            return match outcome {
                Ok(Outcome::Handoff(io)) => self.serve(io).await,
                Ok(Outcome::Closed) => {}
                Err(e) => {
                    tracing::debug!(error = %e, peer = %self.peer, "connection ended with an error")
                }
            };
        };
        let peer = self.peer;
        let handshake =
            tokio::time::timeout(self.limits.head_timeout, tls.acceptor().accept(stream));
        let stream = tokio::select! {
            r = handshake => match r {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, %peer, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            },
            _ = self.stop.wait_for(|stop| *stop) => return,
        };
        self.serve(stream).await
    }

    async fn serve<I>(mut self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = self.peer;
        let notes = Notes::default();
        let activity = Activity::new();
        let service = {
            let (app, notes, activity) = (self.app.clone(), notes.clone(), activity.clone());
            service_fn(move |req: Request<Incoming>| {
                // Claimed here, in the order hyper parsed the requests.
                let busy = activity.begin();
                let note = if req.version() <= Version::HTTP_11 {
                    notes.next()
                } else {
                    None
                };
                let app = app.clone();
                async move {
                    let resp = answer(&app, req, note, peer).await;
                    // The request counts as in flight until its body is sent or dropped.
                    Ok::<_, Infallible>(resp.map(|b| body::hold(b, busy)))
                }
            })
        };
        let conn = self
            .builder
            .serve_connection(TokioIo::new(Scanned::new(io, notes)), service);
        tokio::pin!(conn);
        let (mut closing, mut stopping) = (false, false);
        let mut idle_from = Instant::now();
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                    return;
                }
                _ = activity.idle(self.limits.head_timeout, self.limits.idle_timeout, idle_from) => {
                    if closing {
                        // Asked to close a while ago and still nothing in flight.
                        return;
                    }
                    tracing::debug!(%peer, "closing idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                    idle_from = Instant::now();
                }
                _ = self.stop.wait_for(|stop| *stop), if !stopping => {
                    conn.as_mut().graceful_shutdown();
                    stopping = true;
                }
            }
        }
    }
}

/// Refuses a request whose framing is ambiguous, or hands it to the app.
async fn answer(
    app: &Arc<App>,
    mut req: Request<Incoming>,
    note: Option<http1::HeadNote>,
    peer: SocketAddr,
) -> Response<Body> {
    match http1::check(&req, note) {
        Err(why) => {
            tracing::info!(%peer, method = %req.method(), why, "malformed request refused");
            let mut r = Error::Malformed(why).into_response(req.method() == http::Method::HEAD);
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
        Ok(close) => {
            req.extensions_mut().insert(ClientAddr(peer));
            let mut r = app.handle(req).await;
            if close {
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            r
        }
    }
}

/// Requests in flight on one connection, how many have started, and when either last changed.
#[derive(Debug, Clone, Copy)]
struct Load {
    in_flight: usize,
    started: u64,
    since: Instant,
}

/// A connection's [`Load`], published on a `watch` so that the idle timer restarts whenever a
/// request starts or ends. Updates are `send_modify` calls: no lock is held across an `.await`.
struct Activity(watch::Sender<Load>);

/// One request counted as in flight until dropped.
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity(watch::Sender::new(Load {
            in_flight: 0,
            started: 0,
            since: Instant::now(),
        })))
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.0.send_modify(|l| {
            l.in_flight += 1;
            l.started += 1;
            l.since = Instant::now();
        });
        Busy(self.clone())
    }

    /// Resolves once no request has been in flight for `idle` (`first` before any request
    /// started), counted from `from` at the earliest.
    async fn idle(&self, first: Duration, idle: Duration, from: Instant) {
        let mut rx = self.0.subscribe();
        loop {
            let load = *rx.borrow_and_update();
            if load.in_flight == 0 {
                let limit = if load.started == 0 { first } else { idle };
                tokio::select! {
                    _ = tokio::time::sleep_until(load.since.max(from) + limit) => return,
                    _ = rx.changed() => {}
                }
            } else {
                // The sender lives in `self`, so this only returns on a change.
                let _ = rx.changed().await;
            }
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.0.send_modify(|l| {
            l.in_flight -= 1;
            l.since = Instant::now();
        });
    }
}

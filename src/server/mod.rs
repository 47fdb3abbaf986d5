//! The accept loops: the registry listener (plain TCP or rustls, HTTP/1.1 and HTTP/2) with
//! the connection limits of `[limits]` (connection count, request head size, header-read
//! and idle timeouts) and graceful shutdown driven by a future the caller passes in, and the
//! plain-HTTP operator listener of `admin_listen`. Plain registry connections start in the
//! [`fast`] loop and move to [`hyper`](self::hyper) when it hands them over.

pub mod edge;
pub mod fast;
pub mod fds;
pub mod http1;
pub mod hyper;
pub mod tls;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::app::App;
use crate::config::LimitsConfig;
use fast::Outcome;
pub use tls::Tls;

/// The per-connection limits of `[limits]`, for the fast loop and hyper's path alike.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest request head (request line and headers).
    pub max_head: usize,
    /// Most header fields in a request head (more: hyper answers 431).
    pub max_headers: usize,
    /// Time allowed to receive a whole request head, counted from when the connection
    /// starts waiting for it (as hyper's `header_read_timeout`).
    pub head_timeout: Duration,
    /// Time an idle keep-alive connection is kept (the shorter of the two applies while
    /// waiting for the next head).
    pub idle_timeout: Duration,
}

impl Limits {
    fn of(limits: &LimitsConfig) -> Limits {
        Limits {
            max_head: usize::try_from(limits.max_header_bytes.0).unwrap_or(usize::MAX),
            max_headers: limits.max_headers,
            head_timeout: limits.header_read_timeout.0,
            idle_timeout: limits.idle_timeout.0,
        }
    }
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
    let builder = Arc::new(hyper::builder(&limits));
    // One permit per open connection, TLS handshakes included: the connection limit, and at
    // shutdown the way to learn that every connection has ended.
    let open = Arc::new(Semaphore::new(limits.max_connections as usize));
    // Turns `true` when shutdown begins: every connection then finishes its requests and closes.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut refusals = Refusals::default();
    let head_limits = Limits::of(&limits);
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
async fn accept<F: Future>(
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

/// One accepted registry connection.
struct Connection {
    app: Arc<App>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
    limits: Limits,
}

impl Connection {
    async fn run(mut self, stream: TcpStream, tls: Option<Arc<Tls>>) {
        let peer = self.peer;
        let Some(tls) = tls else {
            // Plain HTTP/1.1 starts in the fast loop (sendfile for cached blobs); hyper takes
            // over for anything the loop does not serve itself.
            let outcome = fast::serve(
                stream,
                peer,
                self.app.clone(),
                self.limits,
                self.stop.clone(),
            )
            .await;
            return match outcome {
                Ok(Outcome::Handoff(io)) => self.hyper(io).await,
                Ok(Outcome::Closed) => {}
                Err(e) => {
                    tracing::debug!(error = %e, %peer, "connection ended with an error")
                }
            };
        };
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
        self.hyper(stream).await
    }

    async fn hyper<I>(self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        hyper::serve(
            io,
            self.app,
            &self.builder,
            self.peer,
            self.limits,
            self.stop,
        )
        .await
    }
}

/// Serves the operator endpoints alone on `listener` (plain HTTP, the `admin_listen`
/// address) until `shutdown` resolves; any other path is a `404`. Operator requests are
/// short: shutdown waits at most 5 s for open ones.
pub async fn serve_admin(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    // Tells each connection's task when shutdown begins; it finishes its request and closes.
    let graceful = GracefulShutdown::new();
    let builder = hyper::admin_builder();
    tokio::pin!(shutdown);
    while let Some((stream, peer)) =
        accept(&listener, shutdown.as_mut(), "admin accept failed").await
    {
        hyper::spawn_admin(&builder, &graceful, stream, peer, app.clone());
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

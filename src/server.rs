//! The accept loop: plain TCP or rustls, HTTP/1.1 and HTTP/2, and graceful shutdown driven by a
//! future the caller passes in.

use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::app::App;
use crate::fastpath::{self, Outcome};

// Plain connections in the fast loop, so shutdown can wait for them as hyper's are waited for.
#[derive(Default)]
struct Active {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

struct ActiveGuard(Arc<Active>);

impl ActiveGuard {
    fn new(a: &Arc<Active>) -> Self {
        a.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ActiveGuard(a.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

impl Active {
    async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            if self.count.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// Builds a TLS acceptor from PEM certificate chain and key files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("tls.cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("tls.cert {}: no certificate found", cert.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls.key {}: {e}", key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("tls: {e}"))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("tls: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open requests finish for
/// up to `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    tls: Option<TlsAcceptor>,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let active = Arc::new(Active::default());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            // Stop accepting as soon as shutdown is asked for.
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let fast_app = app.clone();
        let app = app.clone();
        let service = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            // The access checks count failed logins per client address.
            req.extensions_mut().insert(crate::access::ClientAddr(peer));
            let app = app.clone();
            async move { Ok::<_, std::convert::Infallible>(app.handle(req).await) }
        });
        match &tls {
            None => {
                // Plain HTTP starts in the fast loop (sendfile for cached blobs) and moves to
                // hyper for anything it does not serve itself.
                let builder = builder.clone();
                let watcher = graceful.watcher();
                let (app, stopping, guard) =
                    (fast_app, stopping.clone(), ActiveGuard::new(&active));
                // One task per connection; it ends when the client closes or on shutdown.
                tokio::spawn(async move {
                    let outcome =
                        fastpath::serve(stream, peer, app, fastpath::Limits::default(), stopping)
                            .await;
                    drop(guard);
                    match outcome {
                        Ok(Outcome::Handoff(io)) => {
                            let conn = builder.serve_connection(TokioIo::new(io), service);
                            if let Err(e) = watcher.watch(conn.into_owned()).await {
                                tracing::debug!(error = %e, %peer, "connection ended with an error");
                            }
                        }
                        Ok(Outcome::Closed) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, %peer, "connection ended with an error")
                        }
                    }
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(
                        Duration::from_secs(10),
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let conn = builder.serve_connection(TokioIo::new(tls), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    tracing::info!("shutting down; letting open requests finish");
    let _ = stop.send(true);
    tokio::select! {
        _ = async { tokio::join!(graceful.shutdown(), active.drained()) } => {
            tracing::info!("all connections closed")
        }
        _ = tokio::time::sleep(grace) => tracing::warn!("shutdown grace period over; closing open connections"),
    }
    Ok(())
}

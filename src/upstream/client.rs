//! The HTTP client towards one upstream: hyper-util + rustls (webpki roots plus an optional
//! extra CA file), connect/response timeouts, retries of idempotent requests on connection
//! errors, and redirects that never carry the registry's `Authorization` to another host.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, header};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::{CertificateDer, pem::PemObject};
use url::Url;

use super::redirect::{GuardedConnector, RedirectPolicy};
use crate::body::{self, Body};
use crate::config::RetryConfig;
use crate::error::UpstreamError;

/// Most redirects followed for one request.
pub const MAX_REDIRECTS: usize = 5;
const USER_AGENT: &str = concat!("regcache/", env!("CARGO_PKG_VERSION"));

/// Marks a response that came from another origin than the registry, after a redirect.
#[derive(Debug, Clone, Copy)]
pub struct FromRedirectTarget;

type Pooled = Client<HttpsConnector<GuardedConnector>, Body>;

/// A pooled HTTP/1.1 + HTTP/2 client for one upstream.
#[derive(Clone)]
pub struct HttpClient {
    inner: Pooled,
    /// For redirect hops off the registry's origin: connects only where the upstream's
    /// [`RedirectPolicy`] permits (its own pool, so no connection made without the check is
    /// ever reused for a redirect).
    redirect: Pooled,
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    response_timeout: Duration,
    retry: RetryConfig,
    /// The upstream's configured name, put in front of every error this client reports.
    label: Arc<str>,
}

/// Errors building a client (start-up only).
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    /// The CA file could not be read or holds no certificate.
    #[error("cannot load CA file {0}: {1}")]
    Ca(String, String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

impl HttpClient {
    /// Builds a client trusting the webpki roots and, if given, the certificates in `ca_file`.
    pub fn new(
        ca_file: Option<&Path>,
        connect_timeout: Duration,
        response_timeout: Duration,
        retry: RetryConfig,
    ) -> Result<Self, ClientBuildError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            let shown = path.display().to_string();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| ClientBuildError::Ca(shown.clone(), e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| ClientBuildError::Ca(shown.clone(), e.to_string()))?;
            if certs.is_empty() {
                return Err(ClientBuildError::Ca(shown, "no certificate found".into()));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| ClientBuildError::Ca(shown.clone(), e.to_string()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientBuildError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let inner = pooled(
            &tls,
            GuardedConnector::unguarded(tcp_connector(connect_timeout)),
        );
        let redirect = pooled(
            &tls,
            GuardedConnector::new(
                tcp_connector(connect_timeout),
                RedirectPolicy::public_only(),
            ),
        );
        Ok(HttpClient {
            inner,
            redirect,
            tls,
            connect_timeout,
            response_timeout,
            retry,
            label: Arc::from(""),
        })
    }

    /// This client, naming upstream `name` in the errors it reports.
    pub fn named(mut self, name: &str) -> Self {
        self.label = Arc::from(name);
        self
    }

    /// This client, following redirects only where `policy` permits (by default: public
    /// addresses only).
    pub fn with_redirect_policy(mut self, policy: RedirectPolicy) -> Self {
        self.redirect = pooled(
            &self.tls,
            GuardedConnector::new(tcp_connector(self.connect_timeout), policy),
        );
        self
    }

    /// Why a request to `url` got no answer, naming the upstream, its host and the cause.
    fn unreachable(&self, url: &Url, e: &hyper_util::client::legacy::Error) -> UpstreamError {
        let cause = super::cause::classify(e);
        UpstreamError::Unreachable(super::cause::describe(&self.label, url, &cause))
    }

    /// Sends one bodiless request and waits for the response headers, retrying connection
    /// errors with exponential backoff (GET and HEAD are idempotent).
    pub async fn send(
        &self,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.send_with(&self.inner, method, url, headers).await
    }

    async fn send_with(
        &self,
        client: &Pooled,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let uri: Uri = url
            .as_str()
            .parse()
            .map_err(|_| UpstreamError::Invalid("unusable URL".into()))?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .body(body::empty())
                .map_err(|e| UpstreamError::Invalid(e.to_string()))?;
            *req.headers_mut() = headers.clone();
            req.headers_mut().insert(
                header::USER_AGENT,
                header::HeaderValue::from_static(USER_AGENT),
            );
            let result = tokio::time::timeout(self.response_timeout, client.request(req)).await;
            match result {
                Err(_) => {
                    return Err(UpstreamError::Timeout(super::cause::named(
                        &self.label,
                        format_args!(
                            "no answer within {} (timeouts.response)",
                            crate::units::HumanDuration(self.response_timeout)
                        ),
                    )));
                }
                Ok(Ok(resp)) => return Ok(resp),
                Ok(Err(e)) => {
                    if let Some(refused) = refusal(&e) {
                        return Err(UpstreamError::Invalid(super::cause::named(
                            &self.label,
                            refused,
                        )));
                    }
                    let retryable = e.is_connect();
                    if !retryable || attempt >= self.retry.attempts {
                        let error = self.unreachable(url, &e);
                        let host = url.host_str().unwrap_or_default();
                        tracing::debug!(%error, host, attempt, "upstream request failed");
                        return Err(error);
                    }
                    let base = self
                        .retry
                        .backoff
                        .0
                        .saturating_mul(1 << (attempt - 1).min(16));
                    let jitter = base.mul_f64(rand::random::<f64>() / 2.0);
                    tracing::debug!(error = %self.unreachable(url, &e), attempt, "upstream connection failed; retrying");
                    tokio::time::sleep(base + jitter).await;
                }
            }
        }
    }

    /// Sends one request with a streamed body, once: a body cannot be replayed, so there is
    /// no retry and no redirect. No overall timeout applies, since an upload may take long;
    /// the connect timeout does.
    pub async fn send_body(
        &self,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let uri: Uri = url
            .as_str()
            .parse()
            .map_err(|_| UpstreamError::Invalid("unusable URL".into()))?;
        let mut req = Request::builder()
            .method(method.clone())
            .uri(uri)
            .body(body)
            .map_err(|e| UpstreamError::Invalid(e.to_string()))?;
        *req.headers_mut() = headers.clone();
        req.headers_mut().insert(
            header::USER_AGENT,
            header::HeaderValue::from_static(USER_AGENT),
        );
        self.inner
            .request(req)
            .await
            .map_err(|e| self.unreachable(url, &e))
    }

    /// Sends a GET or HEAD and follows redirects. `Authorization` goes only to `url`'s own
    /// origin: once a redirect leaves it (a CDN or S3), the header is dropped for good.
    pub async fn send_following(
        &self,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let origin = url.origin();
        let mut current = url.clone();
        let mut headers = headers.clone();
        for _ in 0..=MAX_REDIRECTS {
            // Hops off the registry's origin connect only where the redirect rule permits.
            let via = if current.origin() == origin {
                &self.inner
            } else {
                &self.redirect
            };
            let resp = self.send_with(via, method, &current, &headers).await?;
            if !is_redirect(resp.status()) {
                let mut resp = resp;
                if current.origin() != origin {
                    // A challenge or refusal from a redirect target (a CDN, S3) is not the
                    // registry's: it must not steer where regcache sends credentials, nor
                    // make it refresh them.
                    resp.headers_mut().remove(header::WWW_AUTHENTICATE);
                    resp.extensions_mut().insert(FromRedirectTarget);
                }
                return Ok(resp);
            }
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| UpstreamError::Invalid("redirect without Location".into()))?;
            let next = current
                .join(location)
                .map_err(|_| UpstreamError::Invalid("redirect to an invalid URL".into()))?;
            if !matches!(next.scheme(), "http" | "https") {
                return Err(UpstreamError::Invalid("redirect to a non-HTTP URL".into()));
            }
            if next.origin() != origin {
                headers.remove(header::AUTHORIZATION);
            }
            tracing::debug!(
                to = next.host_str().unwrap_or(""),
                "following upstream redirect"
            );
            current = next;
        }
        Err(UpstreamError::Invalid("too many redirects".into()))
    }
}

/// The redirect rule's refusal inside a client error, if that is what it is.
fn refusal<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a super::redirect::Refused> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<super::redirect::Refused>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

fn tcp_connector(connect_timeout: Duration) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http
}

fn pooled(tls: &rustls::ClientConfig, tcp: GuardedConnector) -> Pooled {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https)
}

fn is_redirect(s: StatusCode) -> bool {
    matches!(s.as_u16(), 301 | 302 | 303 | 307 | 308)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::HumanDuration;

    fn client(attempts: u32) -> HttpClient {
        HttpClient::new(
            None,
            Duration::from_secs(5),
            Duration::from_secs(5),
            RetryConfig {
                attempts,
                backoff: HumanDuration(Duration::from_secs(1)),
                ..RetryConfig::default()
            },
        )
        .unwrap()
    }

    /// Answers one HTTP request on `listener` with 200.
    async fn answer_once(listener: tokio::net::TcpListener) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn connection_errors_are_retried_with_backoff() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        // The server comes up half a (virtual) second after the first, refused, attempt.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap();
            answer_once(l).await;
        });
        let url = Url::parse(&format!("http://127.0.0.1:{port}/v2/")).unwrap();
        let started = tokio::time::Instant::now();
        let resp = client(3)
            .send(&Method::GET, &url, &HeaderMap::new())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "retried only after the backoff"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_after_the_configured_attempts() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = Url::parse(&format!("http://127.0.0.1:{port}/v2/")).unwrap();
        let started = tokio::time::Instant::now();
        let e = client(3)
            .send(&Method::GET, &url, &HeaderMap::new())
            .await
            .unwrap_err();
        assert!(matches!(e, UpstreamError::Unreachable(_)));
        // Two waits: 1 s and 2 s, each plus up to half again of jitter.
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited <= Duration::from_millis(4500),
            "{waited:?}"
        );
    }
}

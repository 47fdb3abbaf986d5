//! Replica to replica: the peer token check (constant time) and the byte source that streams
//! a blob from another replica's `/_regcache/fleet/blobs/<digest>` endpoint, from any offset,
//! while that replica downloads it. Only digests travel: no names, URLs or credentials.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

use super::stats::FleetStats;
use crate::cache::source::{ByteSource, SourceError, SourceStream, Timeouts};
use crate::reference::Digest;

/// The path prefix of the peer endpoint.
pub const PATH: &str = "/_regcache/fleet/blobs/";
/// The offset of the first byte of a peer answer's body.
pub const OFFSET: header::HeaderName = header::HeaderName::from_static("x-regcache-offset");
/// The blob's whole length, when the answering replica knows it.
pub const LENGTH: header::HeaderName = header::HeaderName::from_static("x-regcache-length");

/// Whether `headers` carry `Authorization: Bearer <token>`. The comparison takes the same
/// time wherever the first difference is.
pub fn authorized(token: &str, headers: &HeaderMap) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    constant_time_eq(given, token.as_bytes())
}

/// Equality of two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Where other replicas' byte sources come from: HTTP in production, fakes in tests.
pub trait Peers: Send + Sync {
    /// A byte source reading blobs from the replica at `advertise`.
    fn source(&self, advertise: &str) -> Arc<dyn ByteSource>;
}

/// Peers reached over HTTP with the shared token.
pub struct HttpPeers {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    token: Arc<str>,
    stats: Arc<FleetStats>,
    timeouts: Timeouts,
}

impl HttpPeers {
    /// A pooled client sending `token`, counting received bytes into `stats`.
    pub fn new(token: &str, stats: Arc<FleetStats>, timeouts: Timeouts) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(3)));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(HttpPeers {
            client: Client::builder(TokioExecutor::new()).build(https),
            token: Arc::from(token),
            stats,
            timeouts,
        })
    }
}

impl Peers for HttpPeers {
    fn source(&self, advertise: &str) -> Arc<dyn ByteSource> {
        Arc::new(PeerSource {
            client: self.client.clone(),
            base: advertise.trim_end_matches('/').to_owned(),
            token: self.token.clone(),
            stats: self.stats.clone(),
            timeouts: self.timeouts,
        })
    }
}

/// One replica's blobs, read over its peer endpoint.
pub struct PeerSource {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    base: String,
    token: Arc<str>,
    stats: Arc<FleetStats>,
    timeouts: Timeouts,
}

fn number(headers: &HeaderMap, name: &header::HeaderName) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

#[async_trait::async_trait]
impl ByteSource for PeerSource {
    fn name(&self) -> &str {
        "peer"
    }

    fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    async fn open(&self, digest: &Digest, from: u64) -> Result<SourceStream, SourceError> {
        let uri = format!("{}{PATH}{digest}", self.base);
        let mut req = Request::get(uri.as_str());
        let auth = HeaderValue::from_str(&format!("Bearer {}", self.token))
            .map_err(|_| SourceError::Invalid("unusable peer token".into()))?;
        req = req.header(header::AUTHORIZATION, auth);
        if from > 0 {
            req = req.header(header::RANGE, format!("bytes={from}-"));
        }
        let req = req
            .body(Empty::new())
            .map_err(|_| SourceError::Invalid(format!("unusable peer URL {}", self.base)))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| SourceError::Unreachable(format!("peer {}: {e}", self.base)))?;
        let offset = match resp.status() {
            StatusCode::OK => 0,
            StatusCode::PARTIAL_CONTENT => number(resp.headers(), &OFFSET).ok_or_else(|| {
                SourceError::Invalid("peer answered 206 without an offset".into())
            })?,
            StatusCode::NOT_FOUND => return Err(SourceError::NotFound),
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                return Err(SourceError::Refused {
                    status: s.as_u16(),
                    why: "the peer refused the peer token".into(),
                });
            }
            s => return Err(SourceError::Status(s.as_u16())),
        };
        let total = number(resp.headers(), &LENGTH);
        let stats = self.stats.clone();
        let bytes = resp.into_body().into_data_stream().map(move |r| match r {
            Ok(b) => {
                stats.peer_received(b.len() as u64);
                Ok(b)
            }
            Err(e) => Err(SourceError::Unreachable(format!("peer stream broke: {e}"))),
        });
        Ok(SourceStream {
            total_len: total,
            offset,
            bytes: Box::pin(bytes),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_authorized() {
        let mut h = HeaderMap::new();
        assert!(!authorized("s3cret", &h));
        for wrong in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Basic s3cret",
            "s3cret",
            "Bearer ",
        ] {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(wrong));
            assert!(!authorized("s3cret", &h), "{wrong}");
        }
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret"),
        );
        assert!(authorized("s3cret", &h));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"a", b"b"));
    }
}

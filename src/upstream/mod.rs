//! One configured upstream registry: builds registry API requests, authenticates them, and
//! hands back manifests (read whole, size-capped) or blob responses (streamed).

pub mod auth;
pub mod cause;
pub mod client;
#[cfg(feature = "ecr")]
pub mod ecr;
#[cfg(not(feature = "ecr"))]
#[path = "ecr_off.rs"]
pub mod ecr;
pub mod encoding;
pub mod probe;
pub mod push;
pub mod redirect;
pub mod referrers;
pub mod stats;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use url::Url;

use crate::body::{self, Body};
use crate::config::{Config, UpstreamConfig};
use crate::error::UpstreamError;
use crate::reference::{Digest, Reference, Repository};
use auth::{Authenticator, CredentialProvider, Credentials, StaticCredentials};
use client::HttpClient;

/// A manifest as the upstream sent it.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// `Content-Type`.
    pub media_type: String,
    /// `Docker-Content-Digest`, when sent and well-formed.
    pub digest: Option<Digest>,
    /// The body; empty for HEAD.
    pub body: Bytes,
}

/// One upstream registry and its client, authenticator and settings.
pub struct Upstream {
    /// Configured name.
    pub name: String,
    base: Url,
    client: HttpClient,
    auth: Authenticator,
    /// How long a tag answer is fresh.
    pub tag_ttl: Duration,
    max_manifest_size: u64,
    /// Longest pause between two body chunks.
    pub read_idle: Duration,
    /// Longest time to obtain a response's headers, token fetch and redirects included.
    pub exchange_deadline: Duration,
    /// Creates repositories a push finds missing, when the upstream is configured to.
    pub(crate) repository_creator: Option<Arc<dyn push::RepositoryCreator>>,
    /// The Amazon ECR side (credentials, repository creation) of an ECR upstream.
    ecr: Option<Arc<ecr::Ecr>>,
    /// Served from the cache only; never contacted.
    pub offline: bool,
    immutable_tags: Vec<String>,
    /// Latency, traffic and health figures.
    stats: Arc<stats::UpstreamStats>,
    /// Set once the bodiless `GET /v2/` that learns the authentication scheme before the
    /// first blob request has been made (see [`Upstream::learn_scheme`]); concurrent first
    /// blob requests wait for that one probe.
    scheme_probe: tokio::sync::OnceCell<()>,
}

/// Failure building an upstream at start-up.
#[derive(Debug, thiserror::Error)]
#[error("upstream {name}: {source}")]
pub struct BuildError {
    name: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl Upstream {
    /// Builds the upstream from its validated configuration.
    pub fn new(cfg: &UpstreamConfig, global: &Config) -> Result<Self, BuildError> {
        let wrap = |e: Box<dyn std::error::Error + Send + Sync>| BuildError {
            name: cfg.name.clone(),
            source: e,
        };
        let client = HttpClient::new(
            cfg.ca_file.as_deref(),
            global.timeouts.connect.0,
            global.timeouts.response.0,
            global.retry.clone(),
        )
        .map_err(|e| wrap(Box::new(e)))?
        .named(&cfg.name);
        let client = match &cfg.url {
            Some(base) => client
                .with_redirect_policy(redirect::RedirectPolicy::new(base, &cfg.redirect_hosts)),
            None => client,
        };
        let password = cfg
            .resolve_password(&cfg.name)
            .map_err(|e| wrap(Box::new(e)))?;
        let url = cfg
            .url
            .clone()
            .ok_or_else(|| wrap("no URL (configuration not validated)".into()))?;
        // An ECR upstream's credentials come from GetAuthorizationToken, never the file.
        let ecr = match &cfg.ecr {
            Some(e) => Some(Arc::new(ecr::Ecr::new(e).map_err(|e| wrap(e.into()))?)),
            None => None,
        };
        let credentials: Option<Arc<dyn CredentialProvider>> = match (&ecr, &cfg.username, password)
        {
            (Some(e), _, _) => Some(e.clone()),
            (None, Some(u), Some(p)) => Some(Arc::new(StaticCredentials(Credentials {
                username: u.clone(),
                password: p,
            }))),
            _ => None,
        };
        let repository_creator: Option<Arc<dyn push::RepositoryCreator>> = match &ecr {
            Some(e) if e.creates_repositories() => Some(e.clone()),
            _ => None,
        };
        Ok(Upstream {
            name: cfg.name.clone(),
            base: url.clone(),
            auth: Authenticator::new(
                url,
                cfg.all_token_hosts(),
                credentials,
                client.clone(),
                global.timeouts.read_idle.0,
            ),
            client,
            tag_ttl: cfg.tag_ttl.unwrap_or(global.cache.tag_ttl).0,
            max_manifest_size: global.cache.max_manifest_size.0,
            read_idle: global.timeouts.read_idle.0,
            // A token fetch, the request and its redirects each get the response timeout.
            exchange_deadline: global.timeouts.response.0.saturating_mul(3)
                + global.timeouts.connect.0.saturating_mul(2),
            repository_creator,
            ecr,
            offline: global.offline || cfg.offline,
            immutable_tags: cfg.immutable_tags.clone(),
            stats: Arc::new(stats::UpstreamStats::detached(&cfg.name)),
            scheme_probe: tokio::sync::OnceCell::new(),
        })
    }

    /// This upstream, reporting to `stats` (registered with the app's metrics).
    pub fn with_stats(mut self, stats: Arc<stats::UpstreamStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Latency, traffic and health figures.
    pub fn stats(&self) -> &Arc<stats::UpstreamStats> {
        &self.stats
    }

    /// The registry's base URL.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// Whether a cached answer for `tag` is never revalidated.
    pub fn is_immutable_tag(&self, tag: &str) -> bool {
        self.immutable_tags
            .iter()
            .any(|p| crate::config::glob_match(p, tag))
    }

    /// The Amazon ECR side of an ECR upstream (token counters, repository creation).
    pub fn ecr(&self) -> Option<&Arc<ecr::Ecr>> {
        self.ecr.as_ref()
    }

    /// Token requests this upstream has made.
    pub fn token_fetches(&self) -> u64 {
        self.auth.token_fetches()
    }

    fn url(&self, path_and_query: &str) -> Result<Url, UpstreamError> {
        self.base
            .join(path_and_query)
            .map_err(|_| UpstreamError::Invalid("cannot build upstream URL".into()))
    }

    /// Sends an authenticated, bodiless request for `repo` with pull scope.
    async fn request(
        &self,
        method: &Method,
        repo: &Repository,
        path_and_query: &str,
        headers: HeaderMap,
    ) -> Result<Response<Body>, UpstreamError> {
        let scope = format!("repository:{repo}:pull");
        self.exchange(method, &scope, path_and_query, headers).await
    }

    /// Sends an authenticated, bodiless request (redirects followed). Answers one refusal:
    /// a 401 challenge (token dance, basic), or a 403 / 400-expired-token from an upstream
    /// whose credentials can be refreshed (ECR), with exactly one retry.
    pub(crate) async fn exchange(
        &self,
        method: &Method,
        scope: &str,
        path_and_query: &str,
        headers: HeaderMap,
    ) -> Result<Response<Body>, UpstreamError> {
        let url = self.url(path_and_query)?;
        self.exchange_url(method, scope, &url, headers).await
    }

    /// [`Upstream::exchange`] for a URL on the registry's own origin. GET and HEAD follow
    /// redirects; other methods are sent bodiless, without following.
    pub(crate) async fn exchange_url(
        &self,
        method: &Method,
        scope: &str,
        url: &Url,
        mut headers: HeaderMap,
    ) -> Result<Response<Body>, UpstreamError> {
        let url = url.clone();
        let mut auth = self.auth.header_for(scope).await?;
        // At most one answer to a challenge met without credentials (learning the scheme) and
        // one refresh of refused credentials: three sends in all.
        let mut learned = false;
        let mut refreshed = false;
        loop {
            match &auth {
                Some(v) => headers.insert(header::AUTHORIZATION, v.clone()),
                None => headers.remove(header::AUTHORIZATION),
            };
            let started = std::time::Instant::now();
            let sent = if *method == Method::GET || *method == Method::HEAD {
                self.client.send_following(method, &url, &headers).await
            } else {
                self.client.send(method, &url, &headers).await
            };
            self.stats.exchange(
                started.elapsed(),
                sent.as_ref().map(|r| r.status().as_u16()),
            );
            let resp = sent?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED {
                let may_answer = if auth.is_some() { !refreshed } else { !learned };
                if let (true, Some(ch)) = (may_answer, resp.headers().get(header::WWW_AUTHENTICATE))
                {
                    if auth.is_some() {
                        refreshed = true;
                    } else {
                        learned = true;
                    }
                    auth = Some(self.auth.on_challenge(ch, scope, auth.as_ref()).await?);
                    continue;
                }
            }
            let from_registry = resp
                .extensions()
                .get::<client::FromRedirectTarget>()
                .is_none();
            // Only credentials that can be refreshed make a refusal worth a second look;
            // anything else passes through untouched.
            if let (
                false,
                true,
                true,
                Some(sent),
                StatusCode::FORBIDDEN | StatusCode::BAD_REQUEST,
            ) = (
                refreshed,
                from_registry,
                self.auth.may_refresh(),
                &auth,
                status,
            ) {
                let (parts, body) = resp.into_parts();
                let text = read_capped(body, MAX_ERROR_BODY, self.read_idle)
                    .await
                    .unwrap_or_default();
                let expired = String::from_utf8_lossy(&text)
                    .to_ascii_lowercase()
                    .contains("expired");
                if status == StatusCode::FORBIDDEN || expired {
                    if let Some(fresh) = self.auth.after_refusal(sent).await? {
                        refreshed = true;
                        auth = Some(fresh);
                        continue;
                    }
                }
                return Ok(Response::from_parts(parts, body::full(text)));
            }
            return Ok(resp.map(box_incoming));
        }
    }

    /// Fetches a manifest (GET reads the body, capped at `max_manifest_size`; HEAD does not).
    pub async fn manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
        accept: &str,
        head: bool,
    ) -> Result<FetchedManifest, UpstreamError> {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(accept) {
            headers.insert(header::ACCEPT, v);
        }
        let method = if head { Method::HEAD } else { Method::GET };
        let resp = self
            .request(
                &method,
                repo,
                &format!("/v2/{repo}/manifests/{reference}"),
                headers,
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(UpstreamError::Status(resp.status().as_u16()));
        }
        let h = resp.headers();
        let media_type = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_owned())
            .unwrap_or_default();
        let digest = h
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok());
        let declared = content_length(h);
        let headers = h.clone();
        if declared.is_some_and(|n| n > self.max_manifest_size) {
            return Err(UpstreamError::Invalid(format!(
                "manifest larger than {} bytes",
                self.max_manifest_size
            )));
        }
        let body = if head {
            Bytes::new()
        } else {
            let body = read_capped(resp.into_body(), self.max_manifest_size, self.read_idle)
                .await
                .map_err(|e| e.at(&self.name))?;
            if declared.is_some_and(|n| n != body.len() as u64) {
                return Err(UpstreamError::Invalid(
                    "manifest body does not match Content-Length".into(),
                ));
            }
            self.stats.fetched_manifest(body.len() as u64);
            encoding::decode(&headers, body, self.max_manifest_size)?
        };
        Ok(FetchedManifest {
            media_type,
            digest,
            body,
        })
    }

    /// A blob's bytes from byte `start` on (GET, redirects followed; `Range: bytes=start-`
    /// when `start > 0`). The answer may start at 0 when the upstream ignored the range:
    /// `offset` says where its body starts. Any other status than 200 (or 206 to a range) is
    /// an error.
    pub async fn blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        start: u64,
    ) -> Result<BlobAnswer, UpstreamError> {
        self.blob_exchange(&Method::GET, repo, digest, start).await
    }

    /// Asks whether a blob exists and how large it is (HEAD): the same exchange as
    /// [`Upstream::blob`], without a body.
    pub async fn blob_size(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<Option<u64>, UpstreamError> {
        Ok(self
            .blob_exchange(&Method::HEAD, repo, digest, 0)
            .await?
            .total)
    }

    async fn blob_exchange(
        &self,
        method: &Method,
        repo: &Repository,
        digest: &Digest,
        start: u64,
    ) -> Result<BlobAnswer, UpstreamError> {
        let mut headers = HeaderMap::new();
        if start > 0 {
            headers.insert(
                header::RANGE,
                HeaderValue::from_str(&format!("bytes={start}-"))
                    .map_err(|e| UpstreamError::Invalid(e.to_string()))?,
            );
        }
        self.learn_scheme(repo).await;
        let resp = self
            .request(method, repo, &format!("/v2/{repo}/blobs/{digest}"), headers)
            .await?;
        let (parts, body) = resp.into_parts();
        match parts.status {
            StatusCode::OK => Ok(BlobAnswer {
                total: content_length(&parts.headers),
                offset: 0,
                body,
            }),
            StatusCode::PARTIAL_CONTENT if start > 0 => {
                let Some((from, total)) = content_range(&parts.headers) else {
                    return Err(UpstreamError::Invalid(
                        "range answer without a valid Content-Range".into(),
                    ));
                };
                if from != start {
                    return Err(UpstreamError::Invalid(
                        "range answer does not start where asked".into(),
                    ));
                }
                Ok(BlobAnswer {
                    total,
                    offset: from,
                    body,
                })
            }
            s => Err(UpstreamError::Status(s.as_u16())),
        }
    }

    /// Before the first blob request (a cold blob right after start, with its manifest
    /// served from the cache): learns the authentication scheme from one bodiless
    /// `GET /v2/` and fetches the token for `repo`, so the blob is never sent without
    /// credentials only to be refused. Once per upstream; a failed probe leaves the old way
    /// (the blob request's own 401) in place.
    async fn learn_scheme(&self, repo: &Repository) {
        if self.auth.scheme_known() {
            return;
        }
        self.scheme_probe
            .get_or_init(|| async {
                let Ok(url) = self.url("/v2/") else {
                    return;
                };
                let Ok(resp) = self
                    .client
                    .send(&Method::GET, &url, &HeaderMap::new())
                    .await
                else {
                    return;
                };
                if resp.status() != StatusCode::UNAUTHORIZED {
                    return;
                }
                if let Some(ch) = resp.headers().get(header::WWW_AUTHENTICATE) {
                    let scope = format!("repository:{repo}:pull");
                    if let Err(error) = self.auth.on_challenge(ch, &scope, None).await {
                        tracing::debug!(%error, upstream = %self.name, "scheme probe: no token");
                    }
                }
            })
            .await;
    }

    /// Lists tags, passing `query` (`n`, `last`) through. Returns the body and `Link` header.
    pub async fn tags(
        &self,
        repo: &Repository,
        query: &str,
    ) -> Result<(Bytes, Option<String>), UpstreamError> {
        let path = if query.is_empty() {
            format!("/v2/{repo}/tags/list")
        } else {
            format!("/v2/{repo}/tags/list?{query}")
        };
        let resp = self
            .request(&Method::GET, repo, &path, HeaderMap::new())
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(UpstreamError::Status(resp.status().as_u16()));
        }
        let link = resp
            .headers()
            .get(header::LINK)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_capped(resp.into_body(), self.max_manifest_size, self.read_idle)
            .await
            .map_err(|e| e.at(&self.name))?;
        Ok((body, link))
    }
}

/// A blob answer from the upstream: where its body starts and how long the whole blob is.
pub struct BlobAnswer {
    /// Size of the whole blob, when the upstream said.
    pub total: Option<u64>,
    /// Offset in the blob of the body's first byte: 0, or the start asked for when the
    /// upstream honoured the range.
    pub offset: u64,
    /// The body; empty for HEAD.
    pub body: Body,
}

/// First byte and total size (`None` for `*`) of a `Content-Range: bytes a-b/total` header.
fn content_range(h: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let v = h.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let (range, total) = v.strip_prefix("bytes ")?.split_once('/')?;
    let from = range.split_once('-')?.0.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((from, total))
}

/// `Content-Length` as a number, when present and well-formed.
pub fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok())
}

/// Largest error body read from an upstream (expired-token messages, push refusals).
pub(crate) const MAX_ERROR_BODY: u64 = 64 * 1024;

/// An upstream body as the crate's body type.
pub fn box_incoming(b: Incoming) -> Body {
    b.map_err(std::io::Error::other).boxed_unsync()
}

/// Reads a whole body of at most `cap` bytes, each chunk within `idle`.
pub(crate) async fn read_capped<B>(
    mut body: B,
    cap: u64,
    idle: Duration,
) -> Result<Bytes, UpstreamError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut buf = BytesMut::new();
    loop {
        let frame = tokio::time::timeout(idle, body.frame())
            .await
            .map_err(|_| {
                UpstreamError::Timeout(format!(
                    "the body stalled for {} (timeouts.read_idle)",
                    crate::units::HumanDuration(idle)
                ))
            })?;
        match frame {
            None => return Ok(buf.freeze()),
            Some(Err(e)) => {
                return Err(UpstreamError::Unreachable(format!(
                    "the connection broke mid-body: {e}"
                )));
            }
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    if buf.len() as u64 + data.len() as u64 > cap {
                        return Err(UpstreamError::Invalid(format!(
                            "body larger than {cap} bytes"
                        )));
                    }
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_gives_the_first_byte_and_the_total() {
        let mut h = HeaderMap::new();
        let cases = [
            ("bytes 100-199/1000", Some((100, Some(1000)))),
            ("bytes 5-9/*", Some((5, None))),
            ("bytes */1000", None),
            ("items 1-2/3", None),
            ("bytes 1-2/x", None),
        ];
        for (value, want) in cases {
            h.insert(header::CONTENT_RANGE, HeaderValue::from_static(value));
            assert_eq!(content_range(&h), want, "{value}");
        }
    }
}

//! Application state built once at start-up, and `App::handle`: the request pipeline
//! (route → resolve upstream → handler → error mapping → access log).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http::{HeaderValue, Request, Response, header};
use moka::sync::Cache;

use crate::access::{Access, ClientAddr, Denied, Need, SERVICE, TOKEN_PATH};
use crate::body::{self, Body};
use crate::cache::inflight::InFlight;
use crate::cache::store::{BlobStore, FsStore, TagKey};
use crate::cache::tags::TagEntry;
use crate::config::Config;
use crate::error::{Error, UpstreamError};
use crate::flight::Flight;
use crate::handlers::{self, ManifestKey};
use crate::media::Accept;
use crate::push::{self, Uploads};
use crate::rewrite::RoutingTable;
use crate::router::{self, Route};
use crate::upstream::Upstream;

/// Everything a request needs; immutable after start-up except for the caches inside.
pub struct App {
    /// The validated configuration.
    pub config: Config,
    pub(crate) routing: RoutingTable,
    pub(crate) upstreams: Vec<Arc<Upstream>>,
    pub(crate) store: Arc<dyn BlobStore>,
    pub(crate) inflight: Arc<InFlight>,
    /// Tag → digest answers with the time they were last confirmed; also kept on disk.
    pub(crate) tags: Cache<TagKey, TagEntry>,
    /// Coalesces concurrent fetches of one manifest (small, held in memory briefly).
    pub(crate) manifest_flight: Flight<ManifestKey, handlers::Fetched, UpstreamError>,
    next_request_id: AtomicU64,
    /// Client authentication and permissions.
    pub(crate) access: Arc<Access>,
    /// Uploads under way through the proxy.
    pub(crate) uploads: Uploads,
    /// Uncached blob downloads under way per client address (`limits.downloads_per_client`).
    pub(crate) downloads: Arc<crate::limits::PerClient>,
}

/// Start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The cache folder cannot be used.
    #[error("cache_dir {path}: {source}")]
    Cache {
        /// Folder.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// An upstream cannot be built.
    #[error(transparent)]
    Upstream(#[from] crate::upstream::BuildError),
    /// The htpasswd file or a static token cannot be used.
    #[error("{0}")]
    Access(String),
}

impl App {
    /// Opens the cache and builds the upstreams from a validated configuration.
    pub async fn new(config: Config) -> Result<Arc<Self>, StartError> {
        let store = FsStore::open_limited(&config.cache_dir, config.cache.limits())
            .await
            .map_err(|source| StartError::Cache {
                path: config.cache_dir.display().to_string(),
                source,
            })?;
        Self::with_store(config, Arc::new(store))
    }

    /// Builds the app on a given store backend.
    pub fn with_store(config: Config, store: Arc<dyn BlobStore>) -> Result<Arc<Self>, StartError> {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| Upstream::new(u, &config).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let access = Arc::new(Access::new(&config).map_err(StartError::Access)?);
        Ok(Arc::new(App {
            access,
            uploads: Uploads::default(),
            routing: RoutingTable::new(&config),
            tags: Cache::new(config.cache.tag_cache_entries),
            upstreams,
            store,
            inflight: Arc::new(InFlight::default()),
            manifest_flight: Flight::default(),
            next_request_id: AtomicU64::new(1),
            downloads: crate::limits::PerClient::new(config.limits.downloads_per_client),
            config,
        }))
    }

    /// Runs garbage collection every `cache.gc_interval` when `cache.gc_max_age` is set.
    pub fn start_periodic_gc(self: &Arc<Self>) {
        let Some(max_age) = self.config.cache.gc_max_age else {
            return;
        };
        let interval = self.config.cache.gc_interval.0;
        let store = self.store.clone();
        // Detached on purpose: it lives as long as the process and holds no request state.
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match store.collect_garbage(max_age.0).await {
                    Ok(r) => tracing::info!(
                        files = r.files,
                        bytes = r.bytes,
                        kept = r.kept,
                        "garbage collection"
                    ),
                    Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
                }
            }
        });
    }

    /// The upstream called `name`.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// Blob downloads under way.
    pub fn downloads_in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Uncached blob downloads `client` has under way.
    pub fn client_downloads(&self, client: std::net::IpAddr) -> usize {
        self.downloads.held(client)
    }

    /// Cache size and eviction figures, when the store keeps them.
    pub fn cache_usage(&self) -> Option<crate::cache::budget::Usage> {
        self.store.usage()
    }

    /// Answers one request. Never fails: every error becomes an OCI JSON response.
    pub async fn handle<B>(self: &Arc<Self>, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        let id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let head = method == http::Method::HEAD;
        // Only the Host is kept: the challenge realm is built for the rare 401 alone.
        let host = req.headers().get(header::HOST).cloned();
        let span = tracing::info_span!("request", id, %method, path = %path);
        let result = {
            use tracing::Instrument;
            self.route(req).instrument(span.clone()).await
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                if e.status().is_server_error() {
                    tracing::warn!(parent: &span, error = %e, "request failed");
                }
                let challenge = matches!(e, Error::Access(Denied::Unauthenticated));
                let mut r = e.into_response(head);
                if challenge {
                    // Point clients at regcache's own token endpoint (never the upstream's).
                    let realm = self.token_realm(host.as_ref());
                    let value = format!("Bearer realm=\"{realm}\",service=\"{SERVICE}\"");
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                    }
                }
                r
            }
        };
        resp.headers_mut().insert(
            "Docker-Distribution-API-Version",
            HeaderValue::from_static("registry/2.0"),
        );
        tracing::info!(
            parent: &span,
            status = resp.status().as_u16(),
            duration_ms = started.elapsed().as_millis() as u64,
            "access"
        );
        resp
    }

    /// The absolute URL of regcache's token endpoint as this client reaches regcache.
    fn token_realm(&self, host: Option<&HeaderValue>) -> String {
        let scheme = if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let host = host
            .and_then(|v| v.to_str().ok())
            .filter(|h| {
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            })
            .map(str::to_owned)
            .unwrap_or_else(|| self.config.listen.to_string());
        format!("{scheme}://{host}{TOKEN_PATH}")
    }

    /// `GET /auth/token`: tokens for Docker-style clients, limited to the scope granted (see
    /// [`Access::issue`]).
    async fn token(
        self: &Arc<Self>,
        headers: &http::HeaderMap,
        query: Option<&str>,
        client: Option<ClientAddr>,
    ) -> Result<Response<Body>, Error> {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        let token = self.access.issue(headers, client, query, host).await?;
        let payload = serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": crate::access::TOKEN_LIFETIME.as_secs(),
        })
        .to_string();
        Ok(body::json(payload, false))
    }

    async fn route<B>(self: &Arc<Self>, req: Request<B>) -> Result<Response<Body>, Error>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let client = req.extensions().get::<ClientAddr>().copied();
        if req.uri().path() == TOKEN_PATH && req.method() == http::Method::GET {
            return self.token(req.headers(), req.uri().query(), client).await;
        }
        let parsed = router::parse(req.method(), req.uri().path(), req.uri().query())?;
        let (parts, body) = req.into_parts();
        let body: Body =
            http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(body, |e| {
                std::io::Error::other(e.into())
            }));
        let req = Request::from_parts(parts, ());
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        // The client's `Authorization` is read only by the access checks and never
        // forwarded: upstream requests are built from scratch with regcache's own credentials.
        // Each route is checked against the upstream and repository it is routed to.
        let caller = self.access.caller(req.headers(), client);
        let head = parsed.head;
        match parsed.route {
            Route::Base => {
                if self.access.challenges() {
                    // So that `docker login` checks the password and `docker push` sends a
                    // token; clients without credentials get an anonymous token from the
                    // realm and pull with it where that is allowed.
                    caller.identify().await?;
                }
                Ok(body::json("{}", head))
            }
            Route::Manifest { name, reference } => {
                let t = self.routing.resolve(&name, host, parsed.ns.as_deref())?;
                caller.require(Need::Pull, &name, &t).await?;
                let accept = Accept::from_headers(req.headers());
                handlers::manifest(self, t.upstream, &t.repository, &reference, &accept, head).await
            }
            Route::Blob { name, digest } => {
                let t = self.routing.resolve(&name, host, parsed.ns.as_deref())?;
                if head && caller.permits(Need::Push, &name, &t).await {
                    // A pushing client asks whether the upstream repository has the blob;
                    // the cache cannot answer that.
                    return push::blob_exists(self, t.upstream, &t.repository, &digest).await;
                }
                caller.require(Need::Pull, &name, &t).await?;
                let range = req
                    .headers()
                    .get(header::RANGE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                // Set by the server for every connection; absent when `handle` is called
                // directly, and then no per-client limit applies.
                let client = req.extensions().get::<ClientAddr>().map(|p| p.0.ip());
                handlers::blob(
                    self,
                    t.upstream,
                    &t.repository,
                    &digest,
                    range.as_deref(),
                    head,
                    client,
                )
                .await
            }
            Route::UploadStart {
                name,
                mount,
                from,
                digest,
            } => {
                let t = self.routing.resolve(&name, host, parsed.ns.as_deref())?;
                caller.require(Need::Push, &name, &t).await?;
                // A mount source is only passed on when it lives on the same upstream and the
                // client may pull it; otherwise the client uploads the blob.
                let source = match (mount, from) {
                    (Some(d), Some(from)) => self
                        .routing
                        .resolve(&from, host, parsed.ns.as_deref())
                        .ok()
                        .filter(|f| f.upstream == t.upstream)
                        .map(|f| (d, from, f)),
                    _ => None,
                };
                let mount = match source {
                    Some((d, from, f)) if caller.permits(Need::Pull, &from, &f).await => {
                        Some((d, f.repository))
                    }
                    _ => None,
                };
                push::start(
                    self,
                    t.upstream,
                    &t.repository,
                    &name,
                    mount,
                    digest,
                    req.headers(),
                    body,
                )
                .await
            }
            Route::Upload { name, id, digest } => {
                let t = self.routing.resolve(&name, host, parsed.ns.as_deref())?;
                caller.require(Need::Push, &name, &t).await?;
                push::continue_upload(self, req.method(), &name, &id, digest, req.headers(), body)
                    .await
            }
            Route::ManifestPut { name, reference } => {
                let t = self.routing.resolve(&name, host, parsed.ns.as_deref())?;
                caller.require(Need::Push, &name, &t).await?;
                push::put_manifest(
                    self,
                    t.upstream,
                    &t.repository,
                    &name,
                    &reference,
                    req.headers(),
                    body,
                )
                .await
            }
            Route::TagsList { name, n, last } => {
                let t = self.routing.resolve(&name, host, parsed.ns.as_deref())?;
                caller.require(Need::Pull, &name, &t).await?;
                handlers::tags(
                    self,
                    t.upstream,
                    &t.repository,
                    &name,
                    parsed.ns.as_deref(),
                    n,
                    last,
                )
                .await
            }
        }
    }
}

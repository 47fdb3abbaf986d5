//! Application state built once at start-up, and `App::handle`: the request pipeline
//! (route → resolve upstream → handler → error mapping → access log).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderValue, Request, Response, header};
use moka::sync::Cache;

use crate::access::{Access, ClientAddr, Denied, Need, SERVICE, TOKEN_PATH};
use crate::access_log::RequestRecord;
use crate::body::{self, Body};
use crate::cache::budget::Limits;
use crate::cache::inflight::InFlight;
use crate::cache::store::{BlobStore, FsStore, TagKey};
use crate::cache::tags::TagEntry;
use crate::config::Config;
use crate::error::{Error, UpstreamError};
use crate::flight::Flight;
use crate::media::Accept;
use crate::metrics::{CacheKind, Metrics};
use crate::reference::Reference;
use crate::rewrite::RoutingTable;
use crate::router::{self, Route};
use crate::routes::admin;
use crate::routes::manifests::{Fetched, ManifestKey};
use crate::routes::push::{self, Uploads};
use crate::routes::{blobs, manifests, tags};
use crate::upstream::Upstream;

/// The request id header, taken from the client when sane and always sent back.
const X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

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
    pub(crate) manifest_flight: Flight<ManifestKey, Fetched, UpstreamError>,
    next_request_id: AtomicU64,
    // Tells this process's request ids from those of earlier runs.
    request_id_prefix: String,
    /// Prometheus metrics, upstream health and the most pulled repositories.
    pub(crate) metrics: Metrics,
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
        let store = FsStore::open_limited(&config.cache_dir, Limits::from_config(&config.cache))
            .await
            .map_err(|source| StartError::Cache {
                path: config.cache_dir.display().to_string(),
                source,
            })?;
        Self::with_store(config, Arc::new(store))
    }

    /// Builds the app on a given store backend.
    pub fn with_store(config: Config, store: Arc<dyn BlobStore>) -> Result<Arc<Self>, StartError> {
        let mut metrics = Metrics::new();
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                Upstream::new(u, &config)
                    .map(|up| Arc::new(up.with_stats(metrics.upstream(&u.name))))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let access = Arc::new(Access::new(&config).map_err(StartError::Access)?);
        let inflight = Arc::new(InFlight::default());
        metrics.observe(store.clone(), inflight.clone(), upstreams.clone());
        Ok(Arc::new(App {
            access,
            uploads: Uploads::default(),
            routing: RoutingTable::new(&config),
            tags: Cache::new(config.cache.tag_cache_entries),
            upstreams,
            store,
            inflight,
            manifest_flight: Flight::default(),
            next_request_id: AtomicU64::new(1),
            request_id_prefix: format!("{:08x}", rand::random::<u32>()),
            metrics,
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

    /// Waits until no blob download is under way: each has been committed or has failed.
    /// A client has all of a blob once it is verified, a moment before it is committed.
    pub async fn downloads_settled(&self) {
        self.inflight.drained().await;
    }

    /// Uncached blob downloads `client` has under way.
    pub fn client_downloads(&self, client: std::net::IpAddr) -> usize {
        self.downloads.held(client)
    }

    /// Cache size and eviction figures, when the store keeps them.
    pub fn cache_usage(&self) -> Option<crate::cache::budget::Usage> {
        self.store.usage()
    }

    /// Prometheus metrics, upstream health and the most pulled repositories.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The client's `X-Request-Id` when it is a sane token (a load balancer's), else a new
    /// one.
    fn request_id(&self, headers: &http::HeaderMap) -> String {
        let given = headers
            .get(X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                (1..=64).contains(&v.len())
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
            });
        match given {
            Some(v) => v.to_owned(),
            None => format!(
                "{}-{}",
                self.request_id_prefix,
                self.next_request_id.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }

    /// Answers one request. Never fails: every error becomes an OCI JSON response.
    pub async fn handle<B>(self: &Arc<Self>, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let id = self.request_id(req.headers());
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let head = method == http::Method::HEAD;
        // Only the Host is kept: the challenge realm is built for the rare 401 alone.
        let host = req.headers().get(header::HOST).cloned();
        let span = tracing::info_span!("request", request_id = %id, %method, path = %path);
        let mut record = RequestRecord::new(id.clone(), method, path);
        let mut pulled = None;
        let result = {
            use tracing::Instrument;
            self.route(req, &mut record, &mut pulled)
                .instrument(span.clone())
                .await
        };
        let cache_result = match &result {
            Ok(r) => r.extensions().get::<crate::metrics::CacheResult>().copied(),
            Err(e) => crate::metrics::result_of_error(e),
        };
        if let (Ok(r), Some(name)) = (&result, pulled) {
            if r.status().is_success() {
                crate::flight::lock(&self.metrics.pulls).record(&name);
            }
        }
        let mut error_reason = None;
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                error_reason = Some(crate::metrics::error_reason(&e));
                if e.status().is_server_error() {
                    tracing::warn!(parent: &span, error = %e, "request failed");
                }
                let challenge = matches!(e, Error::Access(Denied::Unauthenticated));
                let mut r = e.into_response(head);
                if challenge {
                    // Point clients at regcache's own token endpoint (never the upstream's).
                    let realm = self.token_realm(host.as_ref());
                    let value = format!("Bearer realm=\"{realm}\",service=\"{SERVICE}\"");
                    body::set_header(&mut r, header::WWW_AUTHENTICATE, &value);
                }
                r
            }
        };
        resp.headers_mut().insert(
            "Docker-Distribution-API-Version",
            HeaderValue::from_static("registry/2.0"),
        );
        body::set_header(&mut resp, X_REQUEST_ID, &id);
        // Counts the request and writes its access-log line once the body has been sent.
        self.metrics
            .finish(record, cache_result, error_reason, resp)
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

    /// Routes one request, noting in `record` what it was for (route, cache kind, upstream)
    /// and in `pulled` the repository of a manifest asked for by tag.
    async fn route<B>(
        self: &Arc<Self>,
        req: Request<B>,
        record: &mut RequestRecord,
        pulled: &mut Option<String>,
    ) -> Result<Response<Body>, Error>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let client = req.extensions().get::<ClientAddr>().copied();
        if self.config.admin_listen.is_none()
            && let Some(e) = admin::Endpoint::parse(req.method(), req.uri().path())
        {
            record.route = e.label();
            if e == admin::Endpoint::Status && self.access.challenges() {
                // The page names repositories: it needs an identified client.
                match self.access.caller(req.headers(), client).identify().await {
                    Err(Denied::Unauthenticated) => return Ok(admin::basic_challenge()),
                    Err(d) => return Err(d.into()),
                    Ok(_) => {}
                }
            }
            return Ok(admin::answer(self, e, req.method() == http::Method::HEAD).await);
        }
        if req.uri().path() == TOKEN_PATH && req.method() == http::Method::GET {
            record.route = "token";
            return self.token(req.headers(), req.uri().query(), client).await;
        }
        let parsed = router::parse(req.method(), req.uri().path(), req.uri().query())?;
        (record.route, record.kind) = match &parsed.route {
            Route::Base => ("base", None),
            Route::Manifest {
                reference: Reference::Tag(_),
                ..
            } => ("manifest", Some(CacheKind::Tag)),
            Route::Manifest { .. } => ("manifest", Some(CacheKind::Manifest)),
            Route::Blob { .. } => ("blob", Some(CacheKind::Blob)),
            Route::UploadStart { .. } | Route::Upload { .. } => ("upload", None),
            Route::ManifestPut { .. } => ("manifest_put", None),
            Route::TagsList { .. } => ("tags_list", None),
        };
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
                record.upstream = Some(self.upstreams[t.upstream].name.clone());
                caller.require(Need::Pull, &name, &t).await?;
                if matches!(reference, Reference::Tag(_)) {
                    *pulled = Some(format!(
                        "{}/{}",
                        self.upstreams[t.upstream].name, t.repository
                    ));
                }
                let accept = Accept::from_headers(req.headers());
                manifests::manifest(self, t.upstream, &t.repository, &reference, &accept, head)
                    .await
            }
            Route::Blob { name, digest } => {
                let t = self.routing.resolve(&name, host, parsed.ns.as_deref())?;
                record.upstream = Some(self.upstreams[t.upstream].name.clone());
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
                let client = client.map(|c| c.0.ip());
                blobs::blob(
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
                record.upstream = Some(self.upstreams[t.upstream].name.clone());
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
                record.upstream = Some(self.upstreams[t.upstream].name.clone());
                caller.require(Need::Push, &name, &t).await?;
                push::continue_upload(self, req.method(), &name, &id, digest, req.headers(), body)
                    .await
            }
            Route::ManifestPut { name, reference } => {
                let t = self.routing.resolve(&name, host, parsed.ns.as_deref())?;
                record.upstream = Some(self.upstreams[t.upstream].name.clone());
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
                record.upstream = Some(self.upstreams[t.upstream].name.clone());
                caller.require(Need::Pull, &name, &t).await?;
                tags::tags(
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

//! Application state, built once at start-up: the configuration, routing table, upstreams,
//! cache, coalescing tables, metrics and access rules every request reads.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use quick_cache::sync::Cache;

use crate::access::Access;
use crate::cache::budget::Limits;
use crate::cache::inflight::InFlight;
use crate::cache::store::StoredManifest;
use crate::cache::store::{BlobStore, FsStore, TagKey};
use crate::cache::tags::TagEntry;
use crate::config::Config;
use crate::error::UpstreamError;
use crate::fleet::Fleet;
use crate::flight::Flight;
use crate::metrics::Metrics;
use crate::reference::{Digest, Repository};
use crate::rewrite::RoutingTable;
use crate::upstream::Upstream;

pub mod uploads;

pub use uploads::Uploads;

/// Key for coalescing manifest fetches: upstream, repository, reference, accepted types.
pub type ManifestKey = (usize, Repository, String, u8);

/// A manifest fetched and verified, shared by coalesced callers.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Its digest.
    pub digest: Digest,
    /// The manifest.
    pub manifest: StoredManifest,
}

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
    /// Coalesces the revalidating `HEAD`s of a stale tag, keyed like the manifest flight: one
    /// upstream `HEAD` per tag and accepted types at a time, whatever the number of clients
    /// (Docker Hub counts each `HEAD` against the pull limit's request budget). The value is
    /// the digest the upstream named, if any.
    pub(crate) tag_checks: Flight<ManifestKey, crate::fleet::tags::TagCheck, UpstreamError>,
    /// The number in the next request id this process makes up.
    pub(crate) next_request_id: AtomicU64,
    /// Tells this process's request ids from those of earlier runs.
    pub(crate) request_id_prefix: String,
    /// Prometheus metrics, upstream health and the most pulled repositories.
    pub(crate) metrics: Metrics,
    /// Client authentication and permissions.
    pub(crate) access: Arc<Access>,
    /// Uploads under way through the proxy.
    pub(crate) uploads: Uploads,
    /// Referrers answers per subject.
    pub(crate) referrers: crate::cache::referrers::ReferrersCache,
    /// Uncached blob downloads under way per client address (`limits.downloads_per_client`).
    pub(crate) downloads: Arc<crate::limits::PerClient>,
    /// Fleet mode (`[fleet]`): the shared store, leases and peers; `None` alone.
    pub(crate) fleet: Option<Arc<Fleet>>,
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
    /// Fleet mode cannot start (an unfit object store, or a store client that cannot be
    /// built): a configuration error.
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
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
        let fleet = match &config.fleet {
            Some(f) => {
                let open = config.timeouts.connect.0 + config.timeouts.response.0;
                Some(Fleet::start(f, open).await?)
            }
            None => None,
        };
        Self::with_fleet(config, Arc::new(store), fleet)
    }

    /// Builds the app on a given store backend, alone (no fleet).
    pub fn with_store(config: Config, store: Arc<dyn BlobStore>) -> Result<Arc<Self>, StartError> {
        Self::with_fleet(config, store, None)
    }

    /// Builds the app on a given store backend, in `fleet` when given.
    pub fn with_fleet(
        config: Config,
        store: Arc<dyn BlobStore>,
        fleet: Option<Arc<Fleet>>,
    ) -> Result<Arc<Self>, StartError> {
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
        if let Some(f) = &fleet {
            metrics.observe_fleet(f.stats().clone());
        }
        Ok(Arc::new(App {
            access,
            uploads: Uploads::default(),
            referrers: Default::default(),
            routing: RoutingTable::new(&config),
            tags: Cache::new(usize::try_from(config.cache.tag_cache_entries).unwrap_or(usize::MAX)),
            upstreams,
            store,
            inflight,
            manifest_flight: Flight::default(),
            tag_checks: Flight::default(),
            next_request_id: AtomicU64::new(1),
            request_id_prefix: format!("{:08x}", rand::random::<u32>()),
            metrics,
            downloads: crate::limits::PerClient::new(config.limits.downloads_per_client),
            fleet,
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
                        dangling_tags = r.tags,
                        "garbage collection"
                    ),
                    Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
                }
            }
        });
    }

    /// Probes each upstream that requests leave down or failing until it answers again
    /// (`retry.probe_backoff`), so its health recovers without client traffic. Offline
    /// upstreams are never contacted.
    pub fn start_health_probes(self: &Arc<Self>) {
        let (first, max) = (
            self.config.retry.probe_backoff.0,
            self.config.retry.probe_backoff_max.0,
        );
        for u in self.upstreams.iter().filter(|u| !u.offline) {
            crate::upstream::probe::spawn(u.clone(), first, max);
        }
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

    /// Requests waiting on the revalidation of a stale tag under way (one upstream `HEAD`
    /// each tag, however many requests wait on it).
    pub fn tag_checks_waiting(&self) -> usize {
        self.tag_checks.waiting()
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

    /// Fleet mode, when `[fleet]` is set.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.as_ref()
    }
}

//! Fleet mode (`[fleet]`): replicas behind one balancer share an object store, the only
//! shared system. Tier 1 stays each replica's disk; tier 2 is the store's verified blobs; a
//! create-only lease per digest makes one replica the download's leader, which fetches from
//! the upstream once for the whole fleet while the others stream from it
//! ([`source::FleetSource`]). The store unreachable, each replica serves its own tier with its
//! own single flight (degraded, never down).
//!
//! - [`store`]: the counted object-store client and its keys.
//! - [`lease`]: create, renew (compare-and-swap), watch and take over download leases.
//! - [`source`]: the byte sources: tier 2, and one download's choice between the store, the
//!   upstream (leading) and a peer (following).
//! - [`peer`]: the peer token check and the byte source reading another replica.
//! - [`upload`]: verified multipart writes of committed blobs to tier 2.
//! - [`uploads`]: push upload state in the store, so any replica continues an upload.
//! - [`tags`]: tag answers shared so the fleet revalidates each tag once per TTL.
//! - [`probe`]: the start-up check that the store's conditional writes are atomic.
//! - [`stats`]: the counters behind the `regcache_fleet_*` metrics and the status page.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use object_store::ObjectStore;

use crate::cache::source::{ByteSource, Timeouts};
use crate::cache::store::BlobStore;
use crate::config::FleetConfig;
use crate::reference::Digest;

pub mod lease;
pub mod peer;
pub mod probe;
pub mod source;
pub mod stats;
pub mod store;
pub mod tags;
pub mod upload;
pub mod uploads;

use lease::Me;
use peer::Peers;
use stats::FleetStats;
use store::Store;

/// Why fleet mode cannot start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The store answered but its conditional writes cannot be trusted.
    #[error("fleet.store {store}: {why}; fleet mode needs atomic conditional writes")]
    Unfit {
        /// The configured URL.
        store: String,
        /// What the check found.
        why: String,
    },
    /// The store or the peer client cannot be built from the configuration.
    #[error("fleet.store {store}: {why}")]
    Setup {
        /// The configured URL.
        store: String,
        /// Why.
        why: String,
    },
}

/// A replica's membership in the fleet: its store, identity, peer token and lease timing.
pub struct Fleet {
    /// The shared store.
    pub store: Store,
    /// This replica, as its leases name it.
    pub me: Me,
    token: String,
    /// How long an unrenewed lease stands.
    pub lease_ttl: Duration,
    peers: Arc<dyn Peers>,
    // Set once the store proved unfit after a degraded start: the fleet stays off.
    unfit: AtomicBool,
    // Whether the conditional-write check has passed (at start, or once the store came back).
    checked: AtomicBool,
}

impl Fleet {
    /// Joins the fleet of `config`: builds the store client from the environment and checks
    /// its conditional writes. An unfit store is refused; an unreachable one starts the
    /// replica degraded, checked again in the background until it answers.
    pub async fn start(
        config: &FleetConfig,
        upstream_open: Duration,
    ) -> Result<Arc<Self>, FleetError> {
        let setup = |why: String| FleetError::Setup {
            store: config.store.to_string(),
            why,
        };
        let inner = store::connect(&config.store).map_err(|e| setup(e.to_string()))?;
        let token = config.read_token().map_err(|e| setup(e.to_string()))?;
        let fleet = Self::with_store(inner, config, &token, None, upstream_open).map_err(setup)?;
        fleet.check().await?;
        Ok(fleet)
    }

    /// The fleet on the store `inner` (any `object_store`), with `peers` (HTTP when `None`).
    /// Nothing is checked or contacted.
    pub fn with_store(
        inner: Arc<dyn ObjectStore>,
        config: &FleetConfig,
        token: &str,
        peers: Option<Arc<dyn Peers>>,
        upstream_open: Duration,
    ) -> Result<Arc<Self>, String> {
        let stats = Arc::new(FleetStats::default());
        let ttl = config.lease_ttl.0;
        // Small requests (leases, HEADs) and a GET's headers. Generous: SeaweedFS 4.48 answers
        // the losers of a create race with their 412 only after 1 to 6 seconds, and a loser
        // timed out would count as the store being down.
        let op_timeout = ttl.max(Duration::from_secs(10));
        let store = Store::new(
            inner,
            config.prefix(),
            config.store.as_str(),
            stats.clone(),
            op_timeout,
        );
        let peers = match peers {
            Some(p) => p,
            None => Arc::new(peer::HttpPeers::new(
                token,
                stats,
                Timeouts {
                    open: upstream_open,
                    idle: upstream_open + ttl,
                },
            )?),
        };
        Ok(Arc::new(Fleet {
            store,
            me: Me {
                replica: format!("{:016x}", rand::random::<u64>()),
                advertise: config.advertise.as_str().trim_end_matches('/').to_owned(),
            },
            token: token.to_owned(),
            lease_ttl: ttl,
            peers,
            unfit: AtomicBool::new(false),
            checked: AtomicBool::new(false),
        }))
    }

    /// The start-up check: an unfit store is an error; an unreachable one starts the fleet
    /// degraded and is watched until it answers.
    pub async fn check(self: &Arc<Self>) -> Result<(), FleetError> {
        match probe::conditional_writes(&self.store, probe::RACERS).await {
            Ok(()) => self.checked.store(true, Ordering::Relaxed),
            Err(e) if e.is_unfit() => {
                return Err(FleetError::Unfit {
                    store: self.store.url().to_owned(),
                    why: e.to_string(),
                });
            }
            // Logged as the transition into degraded mode by the store client.
            Err(_) => {}
        }
        self.watch_store();
        Ok(())
    }

    /// While the store is down (at start, or after any request found it so), asks it again
    /// every lease period until it answers; an answering store not yet checked is checked
    /// first. Nothing is sent while it is up, so hits cost no store request.
    fn watch_store(self: &Arc<Self>) {
        let fleet = Arc::downgrade(self);
        let every = self.lease_ttl.max(Duration::from_millis(500));
        // Detached: it holds only a weak reference and ends with the fleet.
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(f) = fleet.upgrade() else { return };
                if f.unfit.load(Ordering::Relaxed) {
                    return;
                }
                if f.store.stats().store_up() && f.checked.load(Ordering::Relaxed) {
                    continue;
                }
                if !f.checked.load(Ordering::Relaxed) {
                    match probe::conditional_writes(&f.store, probe::RACERS).await {
                        Ok(()) => f.checked.store(true, Ordering::Relaxed),
                        Err(e) if e.is_unfit() => {
                            tracing::error!(store = %f.store.url(), error = %e,
                                "the object store's conditional writes are not atomic: fleet mode stays off");
                            f.unfit.store(true, Ordering::Relaxed);
                            return;
                        }
                        Err(_) => {}
                    }
                } else {
                    // Any answer, a missing key included, means the store is back.
                    let _ = f.store.head(&f.store.key("probe/health")).await;
                }
            }
        });
    }

    /// Whether fleet mode is on: the store answers and passed its check. Off, the replica
    /// works alone (degraded).
    pub fn active(&self) -> bool {
        self.store.stats().store_up()
            && self.checked.load(Ordering::Relaxed)
            && !self.unfit.load(Ordering::Relaxed)
    }

    /// The fleet's figures.
    pub fn stats(&self) -> &Arc<FleetStats> {
        self.store.stats()
    }

    /// How often a leader renews its lease.
    pub fn renew_every(&self) -> Duration {
        self.lease_ttl / 3
    }

    /// Whether a peer request carries the shared token.
    pub fn authorized(&self, headers: &http::HeaderMap) -> bool {
        peer::authorized(&self.token, headers)
    }

    /// The byte source of a download of `digest` led by this replica's single flight:
    /// tier 2, or the upstream under a lease, or the lease's leader.
    pub fn blob_source(
        self: &Arc<Self>,
        digest: &Digest,
        upstream: Arc<dyn ByteSource>,
        local: Arc<dyn BlobStore>,
    ) -> source::FleetSource {
        source::FleetSource::new(self.clone(), digest.clone(), upstream, local)
    }

    /// The size of blob `digest` in tier 2, when the fleet is on and the store has it.
    pub async fn blob_len(&self, digest: &Digest) -> Option<u64> {
        if !self.active() {
            return None;
        }
        let meta = self.store.head(&self.store.blob_key(digest)).await.ok()?;
        Some(meta.size)
    }

    /// The verified manifest `digest` from tier 2, with its media type: `None` when the
    /// store does not have it (or holds bytes of another digest), is unreachable, or the
    /// fleet is degraded.
    pub async fn manifest(&self, digest: &Digest) -> Option<(String, bytes::Bytes)> {
        if !self.active() {
            return None;
        }
        let (body, _, attributes) = self
            .store
            .get_small_with(&self.store.manifest_key(digest))
            .await
            .ok()?;
        if Digest::of(digest.algorithm(), &body) != *digest {
            tracing::warn!(%digest, "the store's manifest does not match its digest; ignored");
            return None;
        }
        let media_type = attributes
            .get(&object_store::Attribute::ContentType)
            .map(|v| v.as_ref().to_owned())
            .unwrap_or_default();
        Some((media_type, body))
    }

    /// Puts a verified manifest in tier 2, in the background (one unconditional PUT: the key
    /// is its digest, so every writer writes the same bytes).
    pub fn put_manifest(self: &Arc<Self>, digest: &Digest, media_type: &str, body: bytes::Bytes) {
        if !self.active() {
            return;
        }
        let (fleet, digest) = (self.clone(), digest.clone());
        let mut attributes = object_store::Attributes::new();
        attributes.insert(
            object_store::Attribute::ContentType,
            media_type.to_owned().into(),
        );
        // Detached: the client has its answer; the store gets a copy when it can.
        tokio::spawn(async move {
            let key = fleet.store.manifest_key(&digest);
            let put = fleet
                .store
                .put(&key, body, object_store::PutMode::Overwrite, attributes)
                .await;
            if let Err(error) = put {
                tracing::warn!(%error, %digest, "manifest not stored in the shared tier");
            }
        });
    }

    /// A report for `/readyz` and the status page.
    pub fn summary(&self) -> &'static str {
        if self.unfit.load(Ordering::Relaxed) {
            "degraded: object store conditional writes are not atomic"
        } else if self.active() {
            "fleet: ok"
        } else if !self.store.stats().store_up() {
            "degraded: object store unreachable"
        } else {
            "degraded: checking the object store"
        }
    }
}

#[cfg(test)]
mod tests;

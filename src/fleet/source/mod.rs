//! The fleet's byte source for one download: tier 2 (the store's verified blob) when it is
//! there, else the download's lease decides. The winner leads and reads the upstream; the
//! others stream from the leader's peer endpoint. When the leader's stream breaks, a
//! follower looks again: the store (maybe it finished), the lease (maybe a new leader), and
//! a lease unchanged for `lease_ttl` on its own clock is taken over by compare-and-swap, the
//! upstream then read from the bytes already staged. The store unreachable: the upstream
//! alone, with the replica's own single flight.

mod recover;
mod streams;
mod tier2;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;

use super::Fleet;
use super::lease::{self, Acquired, Keeper, Seen};
use super::store::StoreError;
use super::upload;
use crate::cache::source::{ByteSource, SourceError, SourceStream, Timeouts};
use crate::cache::store::BlobStore;
use crate::flight::lock;
use crate::reference::Digest;
use streams::{fenced, watched};
pub use tier2::StoreSource;

/// What this replica does for the download.
enum Role {
    /// Nothing decided yet: look in the store, then take or follow the lease.
    Undecided,
    /// Reading tier 2.
    Store,
    /// The store is unreachable: the upstream, without a lease.
    Alone,
    /// Holding the lease: the upstream.
    Leader(Keeper),
    /// Another replica leads: its peer endpoint. `retried` once the stream was opened again
    /// after a failure while the leader kept renewing.
    Follower { seen: Seen, retried: bool },
}

/// One download's state on this replica, shared by the sources handed to the download.
struct Download {
    fleet: Arc<Fleet>,
    digest: Digest,
    upstream: Arc<dyn ByteSource>,
    local: Arc<dyn BlobStore>,
    // Locked only to read or replace the role, never across an await.
    role: std::sync::Mutex<Role>,
    // Bytes received from the upstream by this replica as leader (the lease's offset hint).
    received: Arc<AtomicU64>,
    // The lease version the peer stream's watch saw last (locked only to swap it).
    watched: Arc<std::sync::Mutex<Option<Seen>>>,
}

/// The byte source of one download in fleet mode (see the module doc).
#[derive(Clone)]
pub struct FleetSource(Arc<Download>);

/// The role without its state, to act on after the lock is released.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Undecided,
    Store,
    Alone,
    Leader,
    Follower,
}

impl FleetSource {
    /// The source of `digest`'s download on this replica: `upstream` reads the registry,
    /// `local` is the disk the download commits to.
    pub fn new(
        fleet: Arc<Fleet>,
        digest: Digest,
        upstream: Arc<dyn ByteSource>,
        local: Arc<dyn BlobStore>,
    ) -> Self {
        FleetSource(Arc::new(Download {
            fleet,
            digest,
            upstream,
            local,
            role: std::sync::Mutex::new(Role::Undecided),
            received: Arc::new(AtomicU64::new(0)),
            watched: Arc::default(),
        }))
    }

    fn kind(&self) -> Kind {
        match &*lock(&self.0.role) {
            Role::Undecided => Kind::Undecided,
            Role::Store => Kind::Store,
            Role::Alone => Kind::Alone,
            Role::Leader(_) => Kind::Leader,
            Role::Follower { .. } => Kind::Follower,
        }
    }

    fn set(&self, role: Role) {
        *lock(&self.0.role) = role;
    }

    /// Whether tier 2 holds the verified blob.
    async fn in_tier2(&self) -> Result<(), StoreError> {
        let f = &self.0.fleet;
        f.store
            .head(&f.store.blob_key(&self.0.digest))
            .await
            .map(|_| ())
    }

    /// Leads with a lease just won or taken over, unless the blob reached tier 2 since the
    /// last look: a leader uploads before it deletes its lease, so a lease won right after
    /// that is let go again and the store read, rather than the upstream fetched again.
    async fn lead(&self, held: lease::Held) {
        let f = &self.0.fleet;
        let keeper = Keeper::start(
            f.store.clone(),
            self.0.digest.clone(),
            held,
            f.renew_every(),
            self.0.received.clone(),
        );
        self.set(Role::Leader(keeper));
        if self.in_tier2().await.is_ok() {
            let role = std::mem::replace(&mut *lock(&self.0.role), Role::Store);
            if let Role::Leader(keeper) = role {
                keeper.release().await;
            }
        }
    }

    /// Looks in tier 2, then takes or follows the lease.
    async fn decide(&self) {
        let d = &self.0;
        let f = &d.fleet;
        if !f.active() {
            self.set(Role::Alone);
            return;
        }
        match self.in_tier2().await {
            Ok(()) => return self.set(Role::Store),
            Err(StoreError::NotFound) => {}
            Err(_) => return self.set(Role::Alone),
        }
        match lease::acquire(&f.store, &d.digest, &f.me).await {
            Ok(Acquired::Won(held)) => self.lead(held).await,
            Ok(Acquired::Taken(seen)) => self.follow(seen, 0).await,
            Err(_) => self.set(Role::Alone),
        }
    }

    /// Follows the lease `seen` (this replica holds `at` bytes), unless it names this
    /// replica's own address: a lease of an earlier run, of an earlier download here, or a
    /// takeover of this replica's whose answer was lost. Nothing renews it but this replica,
    /// and following it would wait on itself: it is taken over at once.
    async fn follow(&self, seen: Seen, at: u64) {
        let d = &self.0;
        let f = &d.fleet;
        if seen.lease.advertise != f.me.advertise {
            return self.set(Role::Follower {
                seen,
                retried: false,
            });
        }
        match lease::take_over(&f.store, &d.digest, &seen, &f.me, at).await {
            Ok(Some(held)) => self.lead(held).await,
            // Another replica swapped it first: follow that one.
            Ok(None) => match lease::read(&f.store, &d.digest).await {
                Ok(Some(now)) if now.lease.advertise != f.me.advertise => {
                    self.set(Role::Follower {
                        seen: now,
                        retried: false,
                    })
                }
                _ => self.set(Role::Alone),
            },
            Err(_) => self.set(Role::Alone),
        }
    }

    fn open_upstream(
        &self,
        from: u64,
    ) -> impl std::future::Future<Output = Result<SourceStream, SourceError>> + '_ {
        let d = &self.0;
        async move {
            let fence = match &*lock(&d.role) {
                Role::Leader(keeper) => Some(keeper.fence()),
                _ => None,
            };
            let mut opened = d.upstream.open(&d.digest, from).await?;
            let received = d.received.clone();
            received.store(opened.offset, Ordering::Relaxed);
            let bytes =
                std::mem::replace(&mut opened.bytes, Box::pin(futures_util::stream::empty()));
            let bytes = Box::pin(bytes.inspect(move |r| {
                if let Ok(b) = r {
                    received.fetch_add(b.len() as u64, Ordering::Relaxed);
                }
            }));
            opened.bytes = match fence {
                Some(fence) => fenced(bytes, fence, d.fleet.lease_ttl),
                None => bytes,
            };
            Ok(opened)
        }
    }

    async fn open_peer(&self, from: u64) -> Result<SourceStream, SourceError> {
        let d = &self.0;
        let seen = match &*lock(&d.role) {
            Role::Follower { seen, .. } => seen.clone(),
            _ => return Err(SourceError::NotFound),
        };
        let peer = d.fleet.peers.source(&seen.lease.advertise);
        // A leader that answers nothing (paused) is judged by its lease after this.
        let wait = d.fleet.lease_ttl + d.fleet.renew_every();
        let mut opened = tokio::time::timeout(wait, peer.open(&d.digest, from))
            .await
            .map_err(|_| {
                SourceError::Timeout(format!(
                    "the download's leader {} did not answer",
                    seen.lease.advertise
                ))
            })??;
        let bytes = std::mem::replace(&mut opened.bytes, Box::pin(futures_util::stream::empty()));
        opened.bytes = watched(
            bytes,
            d.fleet.store.clone(),
            d.digest.clone(),
            seen,
            d.fleet.lease_ttl,
            d.watched.clone(),
        );
        Ok(opened)
    }

    fn lost_lease(&self) -> bool {
        matches!(&*lock(&self.0.role), Role::Leader(keeper) if keeper.lost())
    }

    /// Tells the download's end: a leader puts the committed blob in the store, then
    /// releases the lease (in the background; clients have their bytes already).
    pub fn ended(&self, outcome: Result<u64, &crate::cache::inflight::FillError>) {
        let role = std::mem::replace(&mut *lock(&self.0.role), Role::Undecided);
        let Role::Leader(keeper) = role else {
            return;
        };
        let d = self.0.clone();
        let ok = outcome.is_ok();
        // Detached: the upload must outlive the request that started the download.
        tokio::spawn(async move {
            if ok {
                match upload::put_blob(&d.fleet.store, d.local.as_ref(), &d.digest).await {
                    Ok(upload::Uploaded::Written(n)) => {
                        tracing::info!(digest = %d.digest, bytes = n, "blob stored in the shared tier")
                    }
                    Ok(upload::Uploaded::Present) => {}
                    Err(error) => {
                        tracing::warn!(%error, digest = %d.digest, "blob not stored in the shared tier")
                    }
                }
            }
            keeper.release().await;
        });
    }
}

#[async_trait::async_trait]
impl ByteSource for FleetSource {
    fn name(&self) -> &str {
        "fleet"
    }

    fn timeouts(&self) -> Timeouts {
        let up = self.0.upstream.timeouts();
        let ttl = self.0.fleet.lease_ttl;
        Timeouts {
            // Looking in the store and taking the lease come first.
            open: up.open + ttl * 2,
            // A leader stalled on its upstream fails after the upstream's idle timeout; its
            // followers wait that long, and a lease's life more.
            idle: up.idle + ttl,
        }
    }

    async fn open(&self, digest: &Digest, from: u64) -> Result<SourceStream, SourceError> {
        debug_assert_eq!(digest, &self.0.digest);
        if self.kind() == Kind::Undecided {
            self.decide().await;
        }
        match self.kind() {
            Kind::Store => {
                StoreSource::new(self.0.fleet.store.clone(), self.timeouts())
                    .open(digest, from)
                    .await
            }
            Kind::Follower => self.open_peer(from).await,
            Kind::Leader | Kind::Alone | Kind::Undecided => self.open_upstream(from).await,
        }
    }

    async fn successor(&self, reached: u64, error: &SourceError) -> Option<Arc<dyn ByteSource>> {
        match self.kind() {
            Kind::Follower => {
                tracing::info!(digest = %self.0.digest, %error, at = reached, "the download's leader stream failed");
                self.recover(reached)
                    .await
                    .then(|| Arc::new(self.clone()) as _)
            }
            // Replaced as leader (paused past the lease's life), or the store's stream
            // broke: decide again from the bytes already written (the store when the blob
            // is there, else the lease's holder). A leader that just lost its upstream keeps
            // its lease and fails as today.
            Kind::Leader if self.lost_lease() => {
                tracing::info!(digest = %self.0.digest, at = reached, "lost the download's lease; following its new leader");
                self.set(Role::Undecided);
                Some(Arc::new(self.clone()))
            }
            Kind::Store if error.is_retryable() || *error == SourceError::NotFound => {
                self.set(Role::Undecided);
                Some(Arc::new(self.clone()))
            }
            _ => None,
        }
    }
}

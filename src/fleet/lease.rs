//! Download leases: one small object per digest saying which replica fetches it from the
//! upstream. Created only if absent (the winner leads), renewed by compare-and-swap on its
//! version every third of `lease_ttl`, judged expired by a follower's own monotonic clock
//! (unchanged for `lease_ttl` since it first saw that version, never by comparing wall
//! clocks), taken over by compare-and-swap, and deleted once the blob is in the store.
//!
//! A follower waiting on a lease reads it every sixth of `lease_ttl`: it sees each renewal
//! at most a sixth late, so a dead leader's lease expires on its clock at most `lease_ttl`
//! and a sixth after the leader's last renewal, inside the promised `lease_ttl` plus one
//! renew period, with room left for the takeover's own requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use object_store::UpdateVersion;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::stats::LeaseResult;
use super::store::{Store, StoreError};
use crate::flight::lock;
use crate::reference::Digest;

/// The lease object's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Lease {
    /// The leading replica's id (new at each start).
    pub replica: String,
    /// Where the other replicas stream the blob from while it downloads.
    pub advertise: String,
    /// 1 for the first leader, one more at each takeover.
    pub generation: u64,
    /// Bytes the leader had received at its last renewal (informational).
    pub offset_hint: u64,
    /// Renewals so far: every renewal changes the body, so its ETag changes on every store.
    pub renewals: u64,
}

impl Lease {
    /// Whether `other` was written by the same holder: the same replica id and generation.
    /// A takeover always writes another replica id or a new generation.
    fn same_holder(&self, other: &Lease) -> bool {
        self.replica == other.replica && self.generation == other.generation
    }
}

/// Who this replica is, as written into the leases it holds.
#[derive(Debug, Clone)]
pub struct Me {
    /// A random id, new at each start.
    pub replica: String,
    /// The configured `advertise` URL.
    pub advertise: String,
}

/// A lease as this replica last read it, and since when (its own clock) that version stands.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The body (default when it could not be read: a lease nobody can be followed on).
    pub lease: Lease,
    /// Its version, for a compare-and-swap takeover.
    pub version: UpdateVersion,
    /// When this replica first saw this version.
    pub since: Instant,
}

impl Seen {
    /// Whether `other` is the same version of the lease.
    pub fn same_version(&self, other: &Seen) -> bool {
        self.version == other.version
    }
}

/// A lease this replica holds.
#[derive(Debug, Clone)]
pub struct Held {
    /// The body written last.
    pub lease: Lease,
    /// The version written last.
    pub version: UpdateVersion,
}

/// What creating a lease gave.
#[derive(Debug)]
pub enum Acquired {
    /// Created: this replica leads the download.
    Won(Held),
    /// Another replica's lease stands.
    Taken(Seen),
}

fn body(lease: &Lease) -> Bytes {
    // A struct of strings and numbers always serializes.
    Bytes::from(serde_json::to_vec(lease).unwrap_or_default())
}

/// The lease of `digest` as it stands, when it is still `written`'s holder's: a conditional
/// write answered `Conflict` may have landed all the same (its answer was lost and a retry
/// was refused by the write itself), and a renewal that timed out may have landed before
/// the next one.
async fn landed(
    store: &Store,
    digest: &Digest,
    written: &Lease,
) -> Result<Option<Held>, StoreError> {
    Ok(read(store, digest)
        .await?
        .filter(|now| now.lease.same_holder(written))
        .map(|now| Held {
            lease: now.lease,
            version: now.version,
        }))
}

/// Creates the lease of `digest` for `me`, or reads the one that stands.
pub async fn acquire(store: &Store, digest: &Digest, me: &Me) -> Result<Acquired, StoreError> {
    let key = store.lease_key(digest);
    let lease = Lease {
        replica: me.replica.clone(),
        advertise: me.advertise.clone(),
        generation: 1,
        offset_hint: 0,
        renewals: 0,
    };
    // A lease deleted between the failed create and the read is tried again, a few times.
    for _ in 0..3 {
        match store.create(&key, body(&lease)).await {
            Ok(put) => {
                store.stats().lease(LeaseResult::Won);
                return Ok(Acquired::Won(Held {
                    lease,
                    version: put.into(),
                }));
            }
            Err(StoreError::Conflict) => {}
            Err(e) => return Err(e),
        }
        if let Some(seen) = read(store, digest).await? {
            if seen.lease.same_holder(&lease) {
                // This create landed; its answer was lost.
                store.stats().lease(LeaseResult::Won);
                return Ok(Acquired::Won(Held {
                    lease,
                    version: seen.version,
                }));
            }
            store.stats().lease(LeaseResult::Followed);
            return Ok(Acquired::Taken(seen));
        }
    }
    Err(StoreError::Unreachable(
        "the lease kept appearing and vanishing".into(),
    ))
}

/// How often a follower re-reads a lease it waits on (see the module's note).
pub fn poll_every(ttl: Duration) -> Duration {
    ttl / 6
}

/// The lease of `digest` as it stands, if any. Its `since` is when the answer came: the
/// version may have been written just before, so counting from there never judges a live
/// leader's lease expired early.
pub async fn read(store: &Store, digest: &Digest) -> Result<Option<Seen>, StoreError> {
    match store.get_small(&store.lease_key(digest)).await {
        Ok((bytes, meta)) => Ok(Some(Seen {
            lease: serde_json::from_slice(&bytes).unwrap_or_default(),
            version: UpdateVersion {
                e_tag: meta.e_tag,
                version: meta.version,
            },
            since: Instant::now(),
        })),
        Err(StoreError::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Swaps the stale lease `seen` for one led by `me`: `None` when another replica changed it
/// first (or it is gone).
pub async fn take_over(
    store: &Store,
    digest: &Digest,
    seen: &Seen,
    me: &Me,
    offset: u64,
) -> Result<Option<Held>, StoreError> {
    let lease = Lease {
        replica: me.replica.clone(),
        advertise: me.advertise.clone(),
        generation: seen.lease.generation + 1,
        offset_hint: offset,
        renewals: 0,
    };
    match store
        .swap(&store.lease_key(digest), body(&lease), seen.version.clone())
        .await
    {
        Ok(put) => {
            store.stats().lease(LeaseResult::TakenOver);
            Ok(Some(Held {
                lease,
                version: put.into(),
            }))
        }
        Err(StoreError::Conflict | StoreError::NotFound) => {
            let held = landed(store, digest, &lease).await?;
            if held.is_some() {
                store.stats().lease(LeaseResult::TakenOver);
            }
            Ok(held)
        }
        Err(e) => Err(e),
    }
}

/// How a watched lease moved.
#[derive(Debug)]
pub enum Watched {
    /// Unchanged for `lease_ttl` on this replica's clock: its leader is presumed dead.
    Expired(Seen),
    /// Renewed or replaced: its leader (maybe a new one) lives.
    Changed(Seen),
    /// Deleted: the download ended (committed to the store, or failed).
    Gone,
}

/// Re-reads the lease `seen` every [`poll_every`] until it changes, goes, or stays the same
/// for `ttl` since it was first seen.
pub async fn watch(
    store: &Store,
    digest: &Digest,
    seen: Seen,
    ttl: Duration,
) -> Result<Watched, StoreError> {
    loop {
        let deadline = seen.since + ttl;
        let next = (Instant::now() + poll_every(ttl)).min(deadline);
        tokio::time::sleep_until(next).await;
        match read(store, digest).await? {
            None => return Ok(Watched::Gone),
            Some(now) if !now.same_version(&seen) => return Ok(Watched::Changed(now)),
            Some(_) if Instant::now() >= deadline => return Ok(Watched::Expired(seen)),
            Some(_) => {}
        }
    }
}

/// A held lease kept alive by a renewal task until released.
pub struct Keeper {
    shared: Arc<KeeperShared>,
    task: tokio::task::JoinHandle<()>,
}

struct KeeperShared {
    store: Store,
    digest: Digest,
    // The lease as last written; locked only to copy it out or replace it, never across an
    // await.
    held: std::sync::Mutex<Held>,
    // Set once a renewal is refused: another replica took the download over.
    lost: AtomicBool,
    // Bytes received so far, written into the lease as its offset hint.
    progress: Arc<AtomicU64>,
    // When the last renewal (or the lease's creation) was answered, on this replica's clock.
    renewed: std::sync::Mutex<Instant>,
}

/// What a leader's upstream stream asks before passing bytes on: whether this replica still
/// leads. A leader that was paused (or cut off from the store) for `lease_ttl` may have been
/// replaced; it then stops reading the upstream and follows the new leader instead.
#[derive(Clone)]
pub struct Fence(Arc<KeeperShared>);

impl Fence {
    /// False once another replica holds the lease. Costs nothing while renewals succeed;
    /// past `ttl` without one, the lease is read to see who holds it.
    pub async fn holds(&self, ttl: Duration) -> bool {
        let s = &self.0;
        if s.lost.load(Ordering::Relaxed) {
            return false;
        }
        if *lock(&s.renewed) + ttl > Instant::now() {
            return true;
        }
        match read(&s.store, &s.digest).await {
            Ok(Some(now)) if s.is_mine(&now) => true,
            // Taken over, or gone (the new leader finished).
            Ok(_) => {
                s.refused();
                false
            }
            // The store is unreachable: nobody can take over through it either.
            Err(_) => true,
        }
    }
}

impl Keeper {
    /// Renews `held` every `every` until released or refused.
    /// `progress` counts the bytes received, written into each renewal as its offset hint.
    pub fn start(
        store: Store,
        digest: Digest,
        held: Held,
        every: Duration,
        progress: Arc<AtomicU64>,
    ) -> Self {
        let shared = Arc::new(KeeperShared {
            store,
            digest,
            held: std::sync::Mutex::new(held),
            lost: AtomicBool::new(false),
            progress,
            renewed: std::sync::Mutex::new(Instant::now()),
        });
        let s = shared.clone();
        // Aborted by `release` or on drop: it holds nothing but the lease's state.
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !s.renew().await {
                    return;
                }
            }
        });
        Keeper { shared, task }
    }

    /// Whether another replica took the download over (a renewal was refused).
    pub fn lost(&self) -> bool {
        self.shared.lost.load(Ordering::Relaxed)
    }

    /// The lease as last written.
    pub fn held(&self) -> Held {
        lock(&self.shared.held).clone()
    }

    /// A handle the download's upstream stream checks before passing bytes on.
    pub fn fence(&self) -> Fence {
        Fence(self.shared.clone())
    }

    /// Stops renewing and deletes the lease, unless another replica holds it now. Deletes
    /// cannot be conditional on every store, so the lease is read first: a takeover needs
    /// the lease unchanged for `lease_ttl`, and this replica renewed it within a third of
    /// that (else its fence stopped the download), so nobody swaps it between the two.
    pub async fn release(self) {
        self.task.abort();
        if self.lost() {
            return;
        }
        let s = &self.shared;
        match read(&s.store, &s.digest).await {
            Ok(Some(now)) if !s.is_mine(&now) => {
                s.refused();
                return;
            }
            Ok(None) => return,
            _ => {}
        }
        if let Err(error) = s.store.delete(&s.store.lease_key(&s.digest)).await {
            // It expires: another replica takes over a download that has ended, at worst
            // fetching once more.
            tracing::warn!(%error, digest = %s.digest, "cannot delete a download lease");
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KeeperShared {
    // Whether the lease as read names this replica.
    fn is_mine(&self, now: &Seen) -> bool {
        lock(&self.held).lease.replica == now.lease.replica
    }

    // Another replica holds the lease now: counted and logged once.
    fn refused(&self) {
        if !self.lost.swap(true, Ordering::Relaxed) {
            self.store.stats().lease(LeaseResult::RenewalRefused);
            tracing::warn!(
                digest = %self.digest,
                "lease renewal refused: another replica took the download over; \
                 this replica stops reading the upstream and follows it"
            );
        }
    }

    // One renewal; false once refused (the task then ends).
    async fn renew(&self) -> bool {
        let Held { mut lease, version } = lock(&self.held).clone();
        lease.renewals += 1;
        lease.offset_hint = self.progress.load(Ordering::Relaxed);
        let key = self.store.lease_key(&self.digest);
        let held = match self.store.swap(&key, body(&lease), version).await {
            Ok(put) => Held {
                lease,
                version: put.into(),
            },
            Err(StoreError::Conflict | StoreError::NotFound) => {
                match landed(&self.store, &self.digest, &lease).await {
                    Ok(Some(held)) => held,
                    Ok(None) => {
                        self.refused();
                        return false;
                    }
                    // Unknown until the next tick reads it again.
                    Err(_) => return true,
                }
            }
            // The store is down (logged once by the store): try again at the next tick.
            Err(_) => return true,
        };
        *lock(&self.held) = held;
        *lock(&self.renewed) = Instant::now();
        true
    }
}

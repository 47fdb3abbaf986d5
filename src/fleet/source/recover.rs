//! A follower's next step after its leader's stream failed: tier 2, a new leader, or
//! taking the lease over from a leader that stopped renewing.

use tokio::time::Instant;

use super::{FleetSource, Role};
use crate::fleet::lease::{self, Acquired, Seen, Watched};
use crate::fleet::store::StoreError;
use crate::flight::lock;

impl FleetSource {
    /// After the leader's stream failed with `reached` bytes staged: tier 2, a new leader, or
    /// this replica taking over. False when nothing is left to try.
    pub(super) async fn recover(&self, reached: u64) -> bool {
        let d = &self.0;
        let f = &d.fleet;
        let (mut seen, retried) = match &*lock(&d.role) {
            Role::Follower { seen, retried } => (seen.clone(), *retried),
            _ => return false,
        };
        // The peer stream's watch may have seen a newer version since.
        let newer = lock(&d.watched).take();
        if let Some(newer) = newer {
            if newer.lease.replica != seen.lease.replica {
                // It saw a new leader: attach to it at once.
                self.follow(newer, reached).await;
                return true;
            }
            if newer.since >= seen.since {
                seen = newer;
            }
        }
        // Past this, the upstream is read directly: safe (content is verified), it only
        // costs a fetch more.
        let give_up = Instant::now() + f.lease_ttl * 20;
        while Instant::now() < give_up {
            match self.in_tier2().await {
                Ok(()) => {
                    self.set(Role::Store);
                    return true;
                }
                Err(StoreError::NotFound) => {}
                Err(_) => {
                    self.set(Role::Alone);
                    return true;
                }
            }
            let now = match lease::read(&f.store, &d.digest).await {
                Ok(n) => n,
                Err(_) => {
                    self.set(Role::Alone);
                    return true;
                }
            };
            match now {
                None => {
                    // The download ended without the blob reaching the store: lead it.
                    match lease::acquire(&f.store, &d.digest, &f.me).await {
                        Ok(Acquired::Won(held)) => self.lead(held).await,
                        Ok(Acquired::Taken(s)) => self.follow(s, reached).await,
                        Err(_) => self.set(Role::Alone),
                    }
                    return true;
                }
                Some(now) if !now.same_version(&seen) => {
                    match self.changed(&seen, now, retried, reached).await {
                        // Alive but unreachable: wait for the store, a new leader or expiry.
                        Some(now) => seen = now,
                        None => return true,
                    }
                }
                // Unchanged since first seen: judged below by this replica's clock.
                Some(_) => {}
            }
            match lease::watch(&f.store, &d.digest, seen.clone(), f.lease_ttl).await {
                Ok(Watched::Expired(stale)) => {
                    match lease::take_over(&f.store, &d.digest, &stale, &f.me, reached).await {
                        Ok(Some(held)) => {
                            tracing::info!(digest = %d.digest, at = reached,
                                dead = %stale.lease.advertise, "took over a download whose leader stopped renewing");
                            self.lead(held).await;
                            return true;
                        }
                        // Another replica swapped first: follow it (read at the next turn).
                        Ok(None) => {}
                        // No answer: the swap may have happened or not; the next turn reads
                        // the lease and sees. Alone only once the store counts as down.
                        Err(_) if f.active() => {}
                        Err(_) => {
                            self.set(Role::Alone);
                            return true;
                        }
                    }
                }
                Ok(Watched::Changed(now)) => match self.changed(&seen, now, retried, reached).await
                {
                    Some(now) => seen = now,
                    None => return true,
                },
                Ok(Watched::Gone) => {}
                Err(_) => {
                    self.set(Role::Alone);
                    return true;
                }
            }
        }
        tracing::warn!(digest = %d.digest, "the download's leader cannot be reached and keeps its lease; fetching from the upstream");
        self.set(Role::Alone);
        true
    }

    /// The lease moved from `seen` to `now`: a new leader is attached to (or led, when it
    /// names this replica: its takeover's answer was lost), the same leader, alive, is
    /// re-attached to once, its stream may have broken by accident. `Some(now)` when the
    /// same leader was retried already: the caller waits on.
    async fn changed(&self, seen: &Seen, now: Seen, retried: bool, reached: u64) -> Option<Seen> {
        if now.lease.replica != seen.lease.replica {
            self.follow(now, reached).await;
            return None;
        }
        if retried {
            return Some(now);
        }
        self.set(Role::Follower {
            seen: now,
            retried: true,
        });
        None
    }
}

//! Tag answers shared by the fleet: `tags/<upstream>/<repository>/<tag>/<accept key>` holds
//! the digest and media type a replica last confirmed with the upstream. Another replica
//! whose own answer is past its TTL takes this one while it is younger than the TTL, so the
//! fleet sends one revalidation per tag per TTL rather than one per replica. Replicas past
//! the TTL at the same moment agree on who asks by a compare-and-swap on that object: the
//! winner marks it `checking`, asks, and writes the answer over its own claim only (a claim
//! taken over meanwhile belongs to a newer check); the others wait for it, judging a claim
//! dead once it stays unchanged for `lease_ttl` on their own clock (as for leases), and
//! serve their cached answer as stale when the check they waited on got no answer.
//! The answer's age is the store's `Last-Modified` against this replica's clock: a clock
//! skew shifts only when a tag is next revalidated (leases never compare clocks).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use object_store::{PutMode, UpdateVersion};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::Fleet;
use super::store::StoreError;
use crate::cache::store::{TagKey, TagRecord};
use crate::reference::Digest;

/// How many lost races for a tag's object a replica takes (another replica wrote it between
/// this one's read and write) before it asks the upstream on its own.
const MAX_RACES: usize = 16;
/// The first pause between reads of a tag another replica is checking; it doubles up to
/// [`LAST_PAUSE`] (or a sixth of `lease_ttl`, if shorter). Each read is one small `GET`, by
/// the one request per replica that waits; the others wait on it.
const FIRST_PAUSE: Duration = Duration::from_millis(20);
/// The longest pause between two reads: a client waits at most this long past the answer.
const LAST_PAUSE: Duration = Duration::from_millis(200);

/// The tag's object. A confirmed answer has `digest` and `media_type`; a claim (`checking`)
/// and an unconfirmed mark have neither, so a replica of a version before claims existed
/// cannot read either as an answer (it asks the upstream itself).
#[derive(Serialize, Deserialize, Default)]
struct Shared {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    /// When it was written, by the writer's clock (for people reading the bucket).
    checked_unix: u64,
    /// The replica asking the upstream now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checking: Option<String>,
    /// Nanoseconds of the claim by the writer's clock: two claims never have the same bytes
    /// (and so the same ETag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    claimed_ns: Option<u64>,
    /// The last check got no answer from the upstream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    unconfirmed: bool,
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

impl Shared {
    /// A confirmed answer.
    fn answered(digest: &Digest, media_type: &str) -> Shared {
        Shared {
            digest: Some(digest.to_string()),
            media_type: Some(media_type.to_owned()),
            checked_unix: since_epoch().as_secs(),
            ..Shared::default()
        }
    }

    /// A claim of the check by `replica`.
    fn claim(replica: &str) -> Shared {
        let now = since_epoch();
        Shared {
            checked_unix: now.as_secs(),
            checking: Some(replica.to_owned()),
            claimed_ns: Some(u64::try_from(now.as_nanos()).unwrap_or(u64::MAX)),
            ..Shared::default()
        }
    }

    /// The mark of a check that got no answer.
    fn unconfirmed() -> Shared {
        Shared {
            checked_unix: since_epoch().as_secs(),
            unconfirmed: true,
            ..Shared::default()
        }
    }

    fn bytes(&self) -> Bytes {
        // A struct of strings, numbers and a flag always serializes.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// The confirmed answer this object holds, with `age`.
    fn answer(&self, age: Duration) -> Option<SharedTag> {
        if self.checking.is_some() || self.unconfirmed {
            return None;
        }
        Some(SharedTag {
            record: TagRecord {
                digest: self.digest.as_deref()?.parse().ok()?,
                media_type: self.media_type.clone()?,
            },
            age,
        })
    }
}

/// A tag answer from the store and how old it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedTag {
    /// What the tag resolved to (the media type may be empty when the confirming replica
    /// did not hold the manifest yet: the manifest's own says it).
    pub record: TagRecord,
    /// Time since a replica confirmed it.
    pub age: Duration,
}

/// What a fleet-wide check of a tag gave.
#[derive(Debug, Clone)]
pub enum TagCheck {
    /// A replica confirmed the tag within the TTL: nothing was asked upstream.
    Shared(SharedTag),
    /// This replica asked the upstream: the digest it named, if it named one.
    Asked(Option<Digest>),
    /// The check this replica waited on got no answer from the upstream (nothing asked
    /// again: the cached answer is served as stale, as after a failed check of its own).
    Unconfirmed,
}

/// Who asks the upstream about a tag.
enum Claim {
    /// This replica: it marked the tag's object `checking` (at this version) and writes the
    /// answer.
    Mine(UpdateVersion),
    /// Another replica confirmed it while this one waited.
    Answered(SharedTag),
    /// The check this replica waited on failed.
    Unconfirmed,
    /// This replica, without telling the fleet (store down, or contention without end).
    Alone,
}

/// How long ago the store says the object of `meta` was written (by this replica's clock).
fn age_of(meta: &object_store::ObjectMeta) -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::from(meta.last_modified))
        .unwrap_or_default()
}

impl Fleet {
    fn tag_key(&self, key: &TagKey) -> object_store::path::Path {
        self.store.key(&format!(
            "tags/{}/{}/{}/{}",
            key.upstream, key.repository, key.tag, key.accept
        ))
    }

    /// The fleet's confirmed answer for `key`, if a replica confirmed one and the store
    /// answers.
    pub async fn tag(&self, key: &TagKey) -> Option<SharedTag> {
        if !self.active() {
            return None;
        }
        let (body, meta) = self.store.get_small(&self.tag_key(key)).await.ok()?;
        let shared: Shared = serde_json::from_slice(&body).ok()?;
        shared.answer(age_of(&meta))
    }

    /// Shares the answer `record` for `key`, just confirmed with the upstream (in the
    /// background: one PUT).
    pub fn put_tag(self: &Arc<Self>, key: &TagKey, record: &TagRecord) {
        if !self.active() {
            return;
        }
        let body = Shared::answered(&record.digest, &record.media_type).bytes();
        let (fleet, path) = (self.clone(), self.tag_key(key));
        // Detached: the client has its answer; the others get it when the PUT lands.
        tokio::spawn(async move {
            let put = fleet
                .store
                .put(&path, body, PutMode::Overwrite, Default::default())
                .await;
            if let Err(error) = put {
                tracing::debug!(%error, "tag answer not shared");
            }
        });
    }

    /// Checks the tag `key`, answered `cached` on this replica, once per `ttl` fleet-wide:
    /// the fleet's answer when a replica confirmed it within `ttl`, else `ask` (the
    /// upstream) run by the one replica that claims the check, the others waiting for its
    /// answer. Store down: `ask` alone.
    pub async fn check_tag<F, Fut, E>(
        &self,
        key: &TagKey,
        ttl: Duration,
        cached: &TagRecord,
        ask: F,
    ) -> Result<TagCheck, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Digest>, E>>,
    {
        let path = self.tag_key(key);
        let claim = if self.active() {
            self.claim_check(&path, ttl).await
        } else {
            Claim::Alone
        };
        let mine = match claim {
            Claim::Answered(shared) => return Ok(TagCheck::Shared(shared)),
            Claim::Unconfirmed => return Ok(TagCheck::Unconfirmed),
            Claim::Mine(version) => Some(version),
            Claim::Alone => None,
        };
        let asked = ask().await;
        if let Some(version) = mine {
            // The waiting replicas poll for this: written before the answer is returned,
            // and only over this replica's own claim. A claim taken over meanwhile (this
            // check outlived `lease_ttl`) belongs to a newer check: its answer stands.
            let answer = match &asked {
                Ok(Some(d)) if *d == cached.digest => Shared::answered(d, &cached.media_type),
                // The manifest's media type is learnt when it is fetched; readers take it
                // from the manifest.
                Ok(Some(d)) => Shared::answered(d, ""),
                Ok(None) | Err(_) => Shared::unconfirmed(),
            };
            match self.store.swap(&path, answer.bytes(), version).await {
                Ok(_) => {}
                Err(StoreError::Conflict | StoreError::NotFound) => {
                    tracing::debug!("tag check taken over by another replica; its answer stands");
                }
                Err(error) => tracing::debug!(%error, "tag answer not shared"),
            }
        }
        asked.map(TagCheck::Asked)
    }

    /// Reads the tag's object until it holds an answer younger than `ttl` or this replica
    /// has claimed the check. Waits at most two lease lives in all.
    async fn claim_check(&self, path: &object_store::path::Path, ttl: Duration) -> Claim {
        let claim = Shared::claim(&self.me.replica).bytes();
        let give_up = Instant::now() + self.lease_ttl * 2;
        let mut pause = FIRST_PAUSE;
        // Another replica's claim as last read, and since when (this replica's clock).
        let mut waiting: Option<(UpdateVersion, Instant)> = None;
        let mut races = 0;
        // Each turn either ends, sleeps on a claim that has stood less than `lease_ttl`, or
        // lost a race; all of it within `give_up`.
        while races < MAX_RACES && Instant::now() < give_up {
            let (body, meta) = match self.store.get_small(path).await {
                Ok(got) => got,
                Err(StoreError::NotFound) => match self.store.create(path, claim.clone()).await {
                    Ok(put) => return Claim::Mine(put.into()),
                    Err(StoreError::Conflict) => {
                        races += 1;
                        continue;
                    }
                    Err(_) => return Claim::Alone,
                },
                Err(_) => return Claim::Alone,
            };
            let shared: Option<Shared> = serde_json::from_slice(&body).ok();
            let age = age_of(&meta);
            let version = UpdateVersion {
                e_tag: meta.e_tag,
                version: meta.version,
            };
            if let Some(s) = &shared {
                if let Some(answer) = s.answer(age) {
                    if answer.age < ttl {
                        return Claim::Answered(answer);
                    }
                } else if s.unconfirmed && waiting.is_some() {
                    // The check this replica waited on got no answer: asking again now
                    // would only queue the replicas' checks one after another.
                    return Claim::Unconfirmed;
                } else if s.checking.is_some() {
                    let since = match &waiting {
                        Some((v, since)) if *v == version => *since,
                        _ => Instant::now(),
                    };
                    waiting = Some((version.clone(), since));
                    if since.elapsed() < self.lease_ttl {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2)
                            .min(LAST_PAUSE)
                            .min(self.lease_ttl / 6)
                            .max(FIRST_PAUSE);
                        continue;
                    }
                    // Unchanged for `lease_ttl`: its replica died or stalled mid-check.
                }
            }
            // Stale, unconfirmed, unreadable or abandoned: claim it.
            match self.store.swap(path, claim.clone(), version).await {
                Ok(put) => return Claim::Mine(put.into()),
                Err(StoreError::Conflict | StoreError::NotFound) => races += 1,
                Err(_) => return Claim::Alone,
            }
        }
        Claim::Alone
    }
}

//! Tag answers shared by the fleet: `tags/<upstream>/<repository>/<tag>/<accept key>` holds
//! the digest and media type a replica last confirmed with the upstream. Another replica
//! whose own answer is past its TTL takes this one while it is younger than the TTL, so the
//! fleet sends one revalidation per tag per TTL rather than one per replica. The answer's
//! age is the store's `Last-Modified` against this replica's clock: a clock skew shifts only
//! when a tag is next revalidated (leases never compare clocks).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use object_store::PutMode;
use serde::{Deserialize, Serialize};

use super::Fleet;
use crate::cache::store::{TagKey, TagRecord};
use crate::reference::Digest;

#[derive(Serialize, Deserialize)]
struct Shared {
    digest: String,
    media_type: String,
    /// When it was confirmed, by the writer's clock (for people reading the bucket).
    checked_unix: u64,
}

/// A tag answer from the store and how old it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedTag {
    /// What the tag resolved to.
    pub record: TagRecord,
    /// Time since a replica confirmed it.
    pub age: Duration,
}

impl Fleet {
    fn tag_key(&self, key: &TagKey) -> object_store::path::Path {
        self.store.key(&format!(
            "tags/{}/{}/{}/{}",
            key.upstream, key.repository, key.tag, key.accept
        ))
    }

    /// The fleet's answer for `key`, if a replica confirmed one and the store answers.
    pub async fn tag(&self, key: &TagKey) -> Option<SharedTag> {
        if !self.active() {
            return None;
        }
        let (body, meta) = self.store.get_small(&self.tag_key(key)).await.ok()?;
        let shared: Shared = serde_json::from_slice(&body).ok()?;
        let digest: Digest = shared.digest.parse().ok()?;
        let age = SystemTime::now()
            .duration_since(SystemTime::from(meta.last_modified))
            .unwrap_or_default();
        Some(SharedTag {
            record: TagRecord {
                digest,
                media_type: shared.media_type,
            },
            age,
        })
    }

    /// Shares the answer `record` for `key`, just confirmed with the upstream (in the
    /// background: one PUT).
    pub fn put_tag(self: &Arc<Self>, key: &TagKey, record: &TagRecord) {
        if !self.active() {
            return;
        }
        let shared = Shared {
            digest: record.digest.to_string(),
            media_type: record.media_type.clone(),
            checked_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let Ok(body) = serde_json::to_vec(&shared) else {
            return;
        };
        let (fleet, path) = (self.clone(), self.tag_key(key));
        // Detached: the client has its answer; the others get it when the PUT lands.
        tokio::spawn(async move {
            let put = fleet
                .store
                .put(
                    &path,
                    Bytes::from(body),
                    PutMode::Overwrite,
                    Default::default(),
                )
                .await;
            if let Err(error) = put {
                tracing::debug!(%error, "tag answer not shared");
            }
        });
    }
}

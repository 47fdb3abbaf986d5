//! Referrers answers (OCI 1.1) held in memory per `(upstream, repository, subject)`: the
//! descriptors last read from the upstream and when, so they are served for the tag TTL and
//! served stale while the upstream cannot be reached.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::reference::{Digest, Repository};

/// Which subject: upstream name, repository at the upstream, subject digest.
pub type ReferrersKey = (String, Repository, Digest);

/// The referrers of one subject as last read from the upstream, unfiltered.
#[derive(Debug, Clone)]
pub struct ReferrersEntry {
    /// The index's `manifests` descriptors.
    pub manifests: Arc<Vec<serde_json::Value>>,
    /// When the upstream answered them.
    pub checked: Instant,
}

impl ReferrersEntry {
    /// An answer the upstream gave just now.
    pub fn fresh(manifests: Vec<serde_json::Value>) -> Self {
        ReferrersEntry {
            manifests: Arc::new(manifests),
            checked: Instant::now(),
        }
    }

    /// Whether it is younger than `ttl`.
    pub fn is_fresh(&self, ttl: Duration) -> bool {
        self.checked.elapsed() < ttl
    }
}

/// Referrers answers, bounded in number.
pub struct ReferrersCache {
    /// By subject.
    pub entries: moka::sync::Cache<ReferrersKey, ReferrersEntry>,
}

impl Default for ReferrersCache {
    fn default() -> Self {
        ReferrersCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(10_000)
                // Kept well past the TTL so a stale answer can stand in while the upstream
                // is down; idle ones go.
                .time_to_idle(Duration::from_secs(7 * 24 * 3600))
                .build(),
        }
    }
}

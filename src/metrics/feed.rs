//! The running totals the status page's history samples, read from shared handles to the
//! counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::families::{CacheLabels, Families, ServedLabels};
use super::{CacheKind, CacheResult};
use crate::history;
use crate::upstream::stats::UpstreamStats;

/// Reads the running totals the history samples, from shared handles to the counters.
#[derive(Clone)]
pub(super) struct HistoryFeed {
    pub(super) families: Families,
    pub(super) requests: Arc<AtomicU64>,
    pub(super) upstreams: Vec<Arc<UpstreamStats>>,
}

impl HistoryFeed {
    pub(super) fn read(&self) -> history::Counters {
        let f = &self.families;
        let (mut cached, mut lookups, mut served_cache) = (0, 0, 0);
        for kind in CacheKind::ALL {
            for result in CacheResult::ALL {
                let n = f
                    .cache
                    .get_or_create(&CacheLabels {
                        kind: kind.label(),
                        result: result.label(),
                    })
                    .get();
                lookups += n;
                if result != CacheResult::Miss {
                    cached += n;
                }
            }
            served_cache += f
                .served
                .get_or_create(&ServedLabels {
                    kind: kind.label(),
                    source: "cache",
                })
                .get();
        }
        history::Counters {
            served_cache,
            fetched: self.upstreams.iter().map(|u| u.fetched()).sum(),
            lookups_cached: cached,
            lookups,
            requests: self.requests.load(Ordering::Relaxed),
        }
    }
}

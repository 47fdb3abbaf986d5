//! Figures read from the live state at each scrape: downloads under way, cache size and
//! evictions, token fetches and reachability per upstream.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use super::families::UpstreamLabels;
use crate::cache::inflight::{FillState, InFlight};
use crate::cache::store::BlobStore;
use crate::upstream::Upstream;

/// Figures read from the live state at each scrape.
pub(super) struct Live {
    pub(super) store: Arc<dyn BlobStore>,
    pub(super) inflight: Arc<InFlight>,
    pub(super) upstreams: Vec<Arc<Upstream>>,
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

pub(super) fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: i64,
) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, unit, g.metric_type())?)
}

pub(super) fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: u64,
) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, unit, c.metric_type())?)
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for Live {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let downloads = self.inflight.snapshot();
        gauge(
            &mut enc,
            "downloads_in_flight",
            "Blob downloads under way",
            None,
            downloads.len() as i64,
        )?;
        let written: u64 = downloads
            .iter()
            .map(|(_, s)| match s {
                FillState::Streaming { written, .. } => *written,
                FillState::Verified { len } => *len,
                _ => 0,
            })
            .sum();
        gauge(
            &mut enc,
            "downloads_in_flight_written",
            "Bytes written so far by the blob downloads under way",
            Some(&Unit::Bytes),
            as_i64(written),
        )?;
        if let Some(u) = self.store.usage() {
            gauge(
                &mut enc,
                "cache_size",
                "Bytes of committed blobs and manifests (counted in the background at start-up)",
                Some(&Unit::Bytes),
                as_i64(u.bytes),
            )?;
            gauge(
                &mut enc,
                "cache_entries",
                "Committed blobs and manifests",
                None,
                as_i64(u.entries),
            )?;
            if let Some(limit) = u.limit {
                gauge(
                    &mut enc,
                    "cache_limit",
                    "cache.max_size",
                    Some(&Unit::Bytes),
                    as_i64(limit),
                )?;
            }
            counter(
                &mut enc,
                "cache_evictions",
                "Entries evicted to stay within cache.max_size",
                None,
                u.evictions,
            )?;
            counter(
                &mut enc,
                "cache_evicted",
                "Bytes evicted to stay within cache.max_size",
                Some(&Unit::Bytes),
                u.evicted_bytes,
            )?;
        }
        {
            let c = ConstCounter::new(0u64);
            let mut m = enc.encode_descriptor(
                "upstream_token_fetches",
                "Token (and ECR authorization token) requests made, by upstream",
                None,
                c.metric_type(),
            )?;
            for u in &self.upstreams {
                let ecr = u.ecr().map_or(0, |e| e.token_fetches());
                let labels = UpstreamLabels {
                    upstream: u.name.clone(),
                };
                ConstCounter::new(u.token_fetches() + ecr).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let g = ConstGauge::new(0i64);
            let mut m = enc.encode_descriptor(
                "upstream_reachable",
                "1 when the last request sent to the upstream got an answer, 0 when it could not connect or timed out (absent before the first request)",
                None,
                g.metric_type(),
            )?;
            for u in &self.upstreams {
                if let Some(r) = u.stats().health().reachable {
                    let labels = UpstreamLabels {
                        upstream: u.name.clone(),
                    };
                    ConstGauge::new(i64::from(r)).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

//! Each upstream's figures: its latency histogram and outcome counters, the bytes received
//! from it, its blob downloads, and its health record (last success, last error, reachable),
//! written after every exchange and read by `/readyz` and the status page.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use crate::error::UpstreamError;
use crate::flight::lock;

/// One upstream's health as seen from the requests regcache sent it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// When it last answered (any status but 5xx and 429).
    pub last_success: Option<SystemTime>,
    /// When it last failed (no connection, timeout, 5xx or 429) and how.
    pub last_error: Option<(SystemTime, String)>,
    /// Whether the last exchange reached it; `None` before the first.
    pub reachable: Option<bool>,
    /// Status of the last answer.
    pub last_status: Option<u16>,
    /// When it was last asked anything: a client's request or a health probe.
    pub last_checked: Option<SystemTime>,
}

impl Health {
    /// `up`, `failing` (answers 5xx/429), `down` (unreachable) or `unknown` (never asked).
    pub fn state(&self) -> &'static str {
        match (self.reachable, self.last_status) {
            (None, _) => "unknown",
            (Some(false), _) => "down",
            (Some(true), Some(s)) if crate::error::failing_status(s) => "failing",
            (Some(true), _) => "up",
        }
    }

    /// Down or failing: worth probing until it answers again.
    pub fn is_unwell(&self) -> bool {
        matches!(self.state(), "down" | "failing")
    }
}

/// Outcomes of a request sent upstream, as labels: its status class, or why it got none.
pub const REQUEST_OUTCOMES: [&str; 8] = [
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "unreachable",
    "timeout",
    "invalid",
];

/// Outcomes of a blob download, as labels.
pub const DOWNLOAD_OUTCOMES: [&str; 5] = [
    "complete",
    "upstream_error",
    "digest_mismatch",
    "not_cached",
    "aborted",
];

/// `1xx` … `5xx`.
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

/// Why a blob download ended without committing anything, as the downloads counter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownloadFailure {
    /// The upstream failed, refused or sent a wrong answer.
    Upstream,
    /// The bytes did not hash to the digest.
    DigestMismatch,
    /// The disk could not take the blob; its clients were served straight from the upstream.
    NotCached,
    /// The download task ended without finishing (panic or shutdown).
    Aborted,
}

impl DownloadFailure {
    /// The outcome label, one of [`DOWNLOAD_OUTCOMES`].
    pub fn label(self) -> &'static str {
        match self {
            DownloadFailure::Upstream => "upstream_error",
            DownloadFailure::DigestMismatch => "digest_mismatch",
            DownloadFailure::NotCached => "not_cached",
            DownloadFailure::Aborted => "aborted",
        }
    }
}

/// Counters and health of one upstream. Cheap to update: every metric is pre-labelled.
pub struct UpstreamStats {
    name: String,
    latency: Histogram,
    requests: [Counter; REQUEST_OUTCOMES.len()],
    downloads: [Counter; DOWNLOAD_OUTCOMES.len()],
    blob_bytes: Counter,
    manifest_bytes: Counter,
    // Written after each upstream exchange; read by /readyz and the status page. Held only
    // to copy or replace the record, never across an `.await`.
    health: Mutex<Health>,
    // Woken when an exchange leaves the upstream unwell, for its health probe. `notify_one`
    // keeps one permit when nobody waits yet, so a mark made before the probe task started
    // waiting is not lost.
    unwell: tokio::sync::Notify,
}

impl fmt::Debug for UpstreamStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamStats")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn index_of(labels: &[&str], label: &str) -> usize {
    labels.iter().position(|l| *l == label).unwrap_or(0)
}

impl UpstreamStats {
    /// Stats of upstream `name` writing to these metrics: `requests` and `downloads` are
    /// labelled with [`REQUEST_OUTCOMES`] and [`DOWNLOAD_OUTCOMES`], in that order.
    pub fn new(
        name: &str,
        latency: Histogram,
        requests: [Counter; REQUEST_OUTCOMES.len()],
        downloads: [Counter; DOWNLOAD_OUTCOMES.len()],
        blob_bytes: Counter,
        manifest_bytes: Counter,
    ) -> Self {
        UpstreamStats {
            name: name.to_owned(),
            latency,
            requests,
            downloads,
            blob_bytes,
            manifest_bytes,
            health: Mutex::new(Health::default()),
            unwell: tokio::sync::Notify::new(),
        }
    }

    /// Stats registered nowhere, for an upstream built outside an `App`.
    pub fn detached(name: &str) -> Self {
        Self::new(
            name,
            Histogram::new([1.0]),
            Default::default(),
            Default::default(),
            Counter::default(),
            Counter::default(),
        )
    }

    /// Records one exchange: how long it took and what came back (a status, or the error
    /// that stopped it).
    pub fn exchange(&self, took: Duration, outcome: Result<u16, &UpstreamError>) {
        self.latency.observe(took.as_secs_f64());
        let label = match outcome {
            Ok(s) => status_class(s),
            Err(UpstreamError::Timeout(_)) => "timeout",
            Err(UpstreamError::Unreachable(_)) => "unreachable",
            Err(_) => "invalid",
        };
        self.requests[index_of(&REQUEST_OUTCOMES, label)].inc();
        let now = SystemTime::now();
        let mut h = lock(&self.health);
        h.last_checked = Some(now);
        match outcome {
            Ok(s) => {
                h.reachable = Some(true);
                h.last_status = Some(s);
                if crate::error::failing_status(s) {
                    h.last_error = Some((now, format!("answered {s}")));
                } else {
                    h.last_success = Some(now);
                }
            }
            Err(e) => {
                // An invalid answer (bad redirect) still came from a reachable upstream.
                let reachable =
                    !matches!(e, UpstreamError::Timeout(_) | UpstreamError::Unreachable(_));
                h.reachable = Some(reachable);
                h.last_error = Some((now, e.to_string()));
            }
        }
        if h.is_unwell() {
            self.unwell.notify_one();
        }
    }

    /// Waits until an exchange has left this upstream down or failing (at once when one
    /// has since the last wait).
    pub async fn marked_unwell(&self) {
        self.unwell.notified().await;
    }

    /// Counts body bytes of a blob received from this upstream.
    pub fn fetched_blob(&self, n: u64) {
        self.blob_bytes.inc_by(n);
    }

    /// Counts body bytes of a manifest received from this upstream.
    pub fn fetched_manifest(&self, n: u64) {
        self.manifest_bytes.inc_by(n);
    }

    /// Body bytes received from this upstream, blobs and manifests.
    pub fn fetched(&self) -> u64 {
        self.blob_bytes.get() + self.manifest_bytes.get()
    }

    /// Counts a blob download that ended: `None` committed, or why it did not.
    pub fn download_ended(&self, failure: Option<DownloadFailure>) {
        let outcome = failure.map_or("complete", DownloadFailure::label);
        self.downloads[index_of(&DOWNLOAD_OUTCOMES, outcome)].inc();
    }

    /// A copy of the health record.
    pub fn health(&self) -> Health {
        lock(&self.health).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_last_exchange() {
        let s = UpstreamStats::detached("hub");
        assert_eq!(s.health().state(), "unknown");
        s.exchange(Duration::from_millis(5), Ok(200));
        assert_eq!(s.health().state(), "up");
        s.exchange(
            Duration::from_millis(5),
            Err(&UpstreamError::Timeout("hub: slow".into())),
        );
        let h = s.health();
        assert_eq!((h.state(), h.reachable), ("down", Some(false)));
        assert!(h.last_success.is_some());
        assert_eq!(
            h.last_error.map(|(_, e)| e).as_deref(),
            Some("upstream timed out: hub: slow")
        );
        s.exchange(Duration::from_millis(5), Ok(503));
        assert_eq!(s.health().state(), "failing");
        s.exchange(Duration::from_millis(5), Ok(404));
        assert_eq!(s.health().state(), "up", "a 404 is an answer");
        assert_eq!(s.requests[index_of(&REQUEST_OUTCOMES, "4xx")].get(), 1);
    }
}

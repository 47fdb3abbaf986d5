//! Health probes: once an exchange leaves an upstream down or failing, its `/v2/` is asked,
//! with backoff, until it answers again, so its health recovers without client traffic.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method};

use super::Upstream;

impl Upstream {
    /// Asks the upstream's `/v2/` once, without credentials, and records the outcome in its
    /// health like any exchange: a `200` or `401` marks it up, no answer or a 5xx keeps it
    /// unwell. Returns whether it is well afterwards.
    pub async fn probe(&self) -> bool {
        let Ok(url) = self.base.join("/v2/") else {
            return false;
        };
        let started = std::time::Instant::now();
        let sent = self
            .client
            .send(&Method::GET, &url, &HeaderMap::new())
            .await;
        self.stats.exchange(
            started.elapsed(),
            sent.as_ref().map(|r| r.status().as_u16()),
        );
        // The body (a `{}` or an error) is not needed; dropping it closes the stream.
        drop(sent);
        !self.stats.health().is_unwell()
    }
}

/// Watches one upstream for as long as the process runs: each time it is marked unwell,
/// probes it after `first`, then after twice as long each time it is still unwell (at most
/// `max`), until it is well again, by a probe or by a client's request.
pub fn spawn(upstream: Arc<Upstream>, first: Duration, max: Duration) {
    // Detached on purpose: it lives as long as the process and holds no request state. It
    // only waits while the upstream is well, and a probe is one bounded request.
    tokio::spawn(async move {
        loop {
            upstream.stats().marked_unwell().await;
            let mut wait = first;
            while upstream.stats().health().is_unwell() {
                tokio::time::sleep(wait).await;
                if !upstream.stats().health().is_unwell() {
                    break;
                }
                if upstream.probe().await {
                    tracing::info!(upstream = %upstream.name, "upstream answers again");
                    break;
                }
                let health = upstream.stats().health();
                tracing::debug!(
                    upstream = %upstream.name,
                    error = health.last_error.as_ref().map(|(_, e)| e.as_str()),
                    next_probe_in = %crate::units::HumanDuration(wait.saturating_mul(2).min(max)),
                    "upstream still unwell"
                );
                wait = wait.saturating_mul(2).min(max);
            }
        }
    });
}

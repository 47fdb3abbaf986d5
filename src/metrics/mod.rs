//! Prometheus metrics: one fixed set of families with bounded labels (route, status class,
//! kind, result, configured upstream name; never a repository, tag or digest), the
//! OpenMetrics exposition, and the counting of each answered request.

mod families;
mod feed;
mod fleet;
mod live;
mod reason;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Response;
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

use crate::access_log::{Metered, RequestRecord};
// The lookup kinds and results belong to the request record; routes name them from here too.
pub use crate::access_log::{CacheKind, CacheResult};
use crate::body::Body;
use crate::cache::inflight::InFlight;
use crate::cache::store::BlobStore;
use crate::fleet::stats::FleetStats;
use crate::history::{self, History};
use crate::status::TopPulls;
use crate::upstream::Upstream;
use crate::upstream::stats::{DOWNLOAD_OUTCOMES, REQUEST_OUTCOMES, UpstreamStats};
use families::{
    CacheLabels, Families, ReasonLabels, RequestLabels, RouteLabels, ServedLabels,
    UpstreamKindLabels, UpstreamLabels, UpstreamOutcomeLabels,
};
use feed::HistoryFeed;
use fleet::FleetLive;
use live::Live;
pub use reason::{error_reason, mark, result_of_error};

/// `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub use crate::upstream::stats::status_class;

/// The metrics of a regcache process, the health of its upstreams and its most pulled
/// repositories.
pub struct Metrics {
    registry: Registry,
    families: Families,
    /// Most pulled repositories, for the status page (never a metric label).
    pub(crate) pulls: Mutex<TopPulls>,
    started: Instant,
    /// Requests answered, all routes and statuses together (the history's request rate).
    requests_total: Arc<AtomicU64>,
    /// The last hour of traffic for the status page's charts. Locked only to push a sample
    /// or to copy the rates out, never across an await.
    history: Arc<Mutex<History>>,
    /// What the history samples; set by [`Metrics::observe`].
    history_feed: Option<HistoryFeed>,
    // The fixed `errors{reason="body_aborted"}` series, looked up once rather than per request.
    aborted: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The registry with every fixed family registered.
    pub fn new() -> Self {
        let f = Families::default();
        let mut r = Registry::with_prefix("regcache");
        r.register(
            "http_requests",
            "Requests answered, by route and status class",
            f.requests.clone(),
        );
        r.register_with_unit(
            "http_request_duration",
            "Time from a request's arrival to its response headers, by route",
            Unit::Seconds,
            f.request_duration.clone(),
        );
        r.register(
            "cache_requests",
            "Cache lookups by kind (tag: manifest by tag, manifest: by digest, blob) and result (hit, miss, stale)",
            f.cache.clone(),
        );
        r.register_with_unit(
            "served",
            "Body bytes of manifests and blobs sent to clients, by kind and source (cache: hits and stale answers, upstream: misses)",
            Unit::Bytes,
            f.served.clone(),
        );
        r.register(
            "request_errors",
            "Requests that ended in an error, by reason (body_aborted: a response body that failed mid-way)",
            f.errors.clone(),
        );
        r.register_with_unit(
            "upstream_fetched",
            "Body bytes received from upstreams, by upstream and kind (blob, manifest)",
            Unit::Bytes,
            f.upstream_bytes.clone(),
        );
        r.register_with_unit(
            "upstream_request_duration",
            "Time from sending a request upstream to its response headers (or failure), by upstream",
            Unit::Seconds,
            f.upstream_duration.clone(),
        );
        r.register(
            "upstream_requests",
            "Requests sent upstream, by upstream and outcome (status class, unreachable, timeout, invalid)",
            f.upstream_requests.clone(),
        );
        r.register(
            "blob_downloads",
            "Blob downloads that ended, by upstream and outcome (complete, upstream_error, digest_mismatch, not_cached, aborted)",
            f.downloads.clone(),
        );
        // Every kind and result from the start, so that ratios have a series to divide.
        for kind in CacheKind::ALL {
            for result in CacheResult::ALL {
                drop(f.cache.get_or_create(&CacheLabels {
                    kind: kind.label(),
                    result: result.label(),
                }));
            }
            for source in ["cache", "upstream"] {
                drop(f.served.get_or_create(&ServedLabels {
                    kind: kind.label(),
                    source,
                }));
            }
        }
        let aborted = f.errors.get_or_create_owned(&ReasonLabels {
            reason: "body_aborted",
        });
        Metrics {
            aborted,
            registry: r,
            families: f,
            pulls: Mutex::new(TopPulls::default()),
            started: Instant::now(),
            requests_total: Arc::new(AtomicU64::new(0)),
            history: Arc::new(Mutex::new(History::new(
                Duration::ZERO,
                history::Counters::default(),
            ))),
            history_feed: None,
        }
    }

    /// The counters and health record of upstream `name`, registered here.
    pub fn upstream(&self, name: &str) -> Arc<UpstreamStats> {
        let f = &self.families;
        let upstream = || name.to_owned();
        let outcome = |family: &Family<UpstreamOutcomeLabels, Counter>, outcome| {
            family.get_or_create_owned(&UpstreamOutcomeLabels {
                upstream: upstream(),
                outcome,
            })
        };
        let fetched = |kind| {
            f.upstream_bytes.get_or_create_owned(&UpstreamKindLabels {
                upstream: upstream(),
                kind,
            })
        };
        Arc::new(UpstreamStats::new(
            name,
            f.upstream_duration.get_or_create_owned(&UpstreamLabels {
                upstream: upstream(),
            }),
            REQUEST_OUTCOMES.map(|o| outcome(&f.upstream_requests, o)),
            DOWNLOAD_OUTCOMES.map(|o| outcome(&f.downloads, o)),
            fetched("blob"),
            fetched("manifest"),
        ))
    }

    /// Adds the figures read at each scrape: cache size, downloads under way, token fetches
    /// and reachability per upstream.
    pub fn observe(
        &mut self,
        store: Arc<dyn BlobStore>,
        inflight: Arc<InFlight>,
        upstreams: Vec<Arc<Upstream>>,
    ) {
        let feed = HistoryFeed {
            families: self.families.clone(),
            requests: self.requests_total.clone(),
            upstreams: upstreams.iter().map(|u| u.stats().clone()).collect(),
        };
        self.registry.register_collector(Box::new(Live {
            store,
            inflight,
            upstreams,
        }));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let read = feed.clone();
            // Detached: it ends at its first tick after these metrics (the app) are dropped.
            runtime.spawn(history::sample_every(
                Arc::downgrade(&self.history),
                tokio::time::Instant::from_std(self.started),
                move || read.read(),
            ));
        }
        self.history_feed = Some(feed);
    }

    /// Adds the fleet's figures (`regcache_fleet_*`), read at each scrape.
    pub fn observe_fleet(&mut self, stats: Arc<FleetStats>) {
        self.registry.register_collector(Box::new(FleetLive(stats)));
    }

    /// Rates over the last hour, interval by interval, for the status page's charts (the
    /// newest interval ends now).
    pub fn history(&self) -> Vec<history::Interval> {
        let live = self
            .history_feed
            .as_ref()
            .map_or_else(history::Counters::default, HistoryFeed::read);
        let now = self.started.elapsed();
        crate::flight::lock(&self.history).intervals(now, live)
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug in a collector.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }

    /// How long this process has been running.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Lookups of `kind` that ended in `result` so far.
    pub fn cache_count(&self, kind: CacheKind, result: CacheResult) -> u64 {
        self.families
            .cache
            .get_or_create(&CacheLabels {
                kind: kind.label(),
                result: result.label(),
            })
            .get()
    }

    /// Body bytes sent to clients from the cache (`true`) or as fetched upstream (`false`).
    pub fn served_bytes(&self, from_cache: bool) -> u64 {
        CacheKind::ALL
            .iter()
            .map(|k| {
                self.families
                    .served
                    .get_or_create(&ServedLabels {
                        kind: k.label(),
                        source: if from_cache { "cache" } else { "upstream" },
                    })
                    .get()
            })
            .sum()
    }

    /// Body bytes received from every upstream.
    pub fn fetched_bytes(&self, upstreams: &[Arc<Upstream>]) -> u64 {
        upstreams.iter().map(|u| u.stats().fetched()).sum()
    }

    /// Counts one request (with the [`error_reason`] it ended in, if any) and wraps its response body so that the bytes sent are counted as
    /// they go and the access-log line is written when the body ends (or is dropped).
    pub fn finish(
        &self,
        record: RequestRecord,
        result: Option<CacheResult>,
        error_reason: Option<&'static str>,
        resp: Response<Body>,
    ) -> Response<Body> {
        let f = &self.families;
        let status = resp.status();
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        f.requests
            .get_or_create(&RequestLabels {
                route: record.route,
                status: status_class(status.as_u16()),
            })
            .inc();
        f.request_duration
            .get_or_create(&RouteLabels {
                route: record.route,
            })
            .observe(record.started.elapsed().as_secs_f64());
        if let Some(reason) = error_reason {
            f.errors.get_or_create(&ReasonLabels { reason }).inc();
        }
        let cached = record.kind.zip(result);
        if let Some((kind, result)) = cached {
            f.cache
                .get_or_create(&CacheLabels {
                    kind: kind.label(),
                    result: result.label(),
                })
                .inc();
        }
        let served = cached.map(|(kind, result)| {
            f.served.get_or_create_owned(&ServedLabels {
                kind: kind.label(),
                source: if result == CacheResult::Miss {
                    "upstream"
                } else {
                    "cache"
                },
            })
        });
        let aborted = self.aborted.clone();
        let cache = cached.map_or("none", |(_, r)| r.label());
        let ext = resp.extensions();
        let beside = ext
            .get::<crate::cache::reader::FileRange>()
            .map(crate::cache::reader::FileRange::beside)
            .or_else(|| {
                ext.get::<crate::cache::reader::TailBody>()
                    .map(crate::cache::reader::TailBody::beside)
            });
        resp.map(|inner| {
            Metered::new(inner, record, status, cache, served, aborted)
                .with_beside(beside)
                .boxed_unsync()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::UpstreamError;

    #[test]
    fn families_follow_the_naming_conventions() {
        let m = Metrics::new();
        let up = m.upstream("hub");
        up.exchange(Duration::from_millis(20), Ok(200));
        up.exchange(
            Duration::from_millis(5),
            Err(&UpstreamError::Timeout("t".into())),
        );
        up.fetched_blob(10);
        up.download_ended(None);
        let text = m.encode();
        for name in [
            "regcache_upstream_fetched_bytes_total{upstream=\"hub\",kind=\"blob\"} 10",
            "regcache_upstream_requests_total{upstream=\"hub\",outcome=\"2xx\"} 1",
            "regcache_upstream_requests_total{upstream=\"hub\",outcome=\"timeout\"} 1",
            "regcache_upstream_request_duration_seconds_count{upstream=\"hub\"} 2",
            "regcache_blob_downloads_total{upstream=\"hub\",outcome=\"complete\"} 1",
            "# EOF",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        // Every outcome has a series from the start.
        assert!(
            text.contains(
                "regcache_upstream_requests_total{upstream=\"hub\",outcome=\"unreachable\"} 0"
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_metered_body_counts_bytes_and_cache_results() {
        let m = Metrics::new();
        let mut rec = RequestRecord::new("r1".into(), http::Method::GET, "/v2/x/blobs/y".into());
        rec.route = "blob";
        rec.kind = Some(CacheKind::Blob);
        let resp = mark(
            Response::new(crate::body::full(vec![7u8; 1000])),
            CacheResult::Hit,
        );
        let result = resp.extensions().get::<CacheResult>().copied();
        let resp = m.finish(rec, result, None, resp);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 1000);
        assert_eq!(m.served_bytes(true), 1000);
        assert_eq!(m.served_bytes(false), 0);
        assert_eq!(m.cache_count(CacheKind::Blob, CacheResult::Hit), 1);
        let text = m.encode();
        assert!(
            text.contains("regcache_http_requests_total{route=\"blob\",status=\"2xx\"} 1"),
            "{text}"
        );
    }
}

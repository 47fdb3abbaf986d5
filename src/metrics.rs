//! Prometheus metrics: one fixed set of families with bounded labels (route, status class,
//! kind, result, configured upstream name; never a repository, tag or digest), the
//! OpenMetrics exposition, and the counting of each answered request.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Response;
use http_body_util::BodyExt;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::access_log::{Metered, RequestRecord};
// The lookup kinds and results belong to the request record; routes name them from here too.
pub use crate::access_log::{CacheKind, CacheResult};
use crate::body::Body;
use crate::cache::inflight::{FillState, InFlight};
use crate::cache::store::BlobStore;
use crate::error::{Error, UpstreamError};
use crate::fleet::stats::{FleetStats, LeaseResult, Op};
use crate::history::{self, History};
use crate::status::TopPulls;
use crate::upstream::Upstream;
use crate::upstream::stats::{DOWNLOAD_OUTCOMES, REQUEST_OUTCOMES, UpstreamStats};

/// `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Marks a handler's answer with how its cache lookup ended.
pub fn mark(mut resp: Response<Body>, result: CacheResult) -> Response<Body> {
    resp.extensions_mut().insert(result);
    resp
}

/// The cache result an error stands for: a lookup that had to go upstream (or could not,
/// offline) and failed there was a miss. Other errors (bad requests, access) looked nothing up.
pub fn result_of_error(e: &Error) -> Option<CacheResult> {
    if let Error::Hinted(inner, _) = e {
        return result_of_error(inner);
    }
    matches!(e, Error::Upstream(..) | Error::Offline(_)).then_some(CacheResult::Miss)
}

pub use crate::upstream::stats::status_class;

/// A bounded label for an error a request ended in.
pub fn error_reason(e: &Error) -> &'static str {
    match e {
        Error::Hinted(inner, _) => error_reason(inner),
        Error::Route(_)
        | Error::Rewrite(crate::rewrite::RewriteError::Name(_))
        | Error::ManifestInvalid(_)
        | Error::ManifestNotAccepted(_)
        | Error::RangeNotSatisfiable(_)
        | Error::UploadOffset(..)
        | Error::HeadTooLarge(_)
        | Error::VersionNotSupported
        | Error::Malformed(_) => "bad_request",
        Error::TooManyDownloads => "too_many_downloads",
        Error::Rewrite(_) | Error::ManifestUnknown | Error::BlobUnknown | Error::UploadUnknown => {
            "not_found"
        }
        Error::Access(_) => "access",
        Error::Upstream(_, u) => upstream_reason(u),
        Error::Passthrough(..) => "upstream_status",
        Error::Offline(_) => "offline",
        Error::Internal(_) => "internal",
    }
}

fn upstream_reason(u: &UpstreamError) -> &'static str {
    match u {
        UpstreamError::Status(404) => "not_found",
        UpstreamError::Status(_) => "upstream_status",
        UpstreamError::Unreachable(_) => "upstream_unreachable",
        UpstreamError::Timeout(_) => "upstream_timeout",
        UpstreamError::Auth(_) | UpstreamError::Denied(_) => "upstream_auth",
        UpstreamError::Invalid(_) => "upstream_invalid",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    kind: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServedLabels {
    kind: &'static str,
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamKindLabels {
    upstream: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamOutcomeLabels {
    upstream: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn request_histogram() -> Histogram {
    // 1 ms … ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn upstream_histogram() -> Histogram {
    // 5 ms … ~40 s: upstream answers include TLS handshakes and token round trips.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// The families every instrumented place writes to. Cloning a family or a metric shares it.
#[derive(Clone)]
struct Families {
    requests: Family<RequestLabels, Counter>,
    request_duration: Histograms<RouteLabels>,
    cache: Family<CacheLabels, Counter>,
    served: Family<ServedLabels, Counter>,
    errors: Family<ReasonLabels, Counter>,
    upstream_bytes: Family<UpstreamKindLabels, Counter>,
    upstream_duration: Histograms<UpstreamLabels>,
    upstream_requests: Family<UpstreamOutcomeLabels, Counter>,
    downloads: Family<UpstreamOutcomeLabels, Counter>,
}

impl Default for Families {
    fn default() -> Self {
        Families {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(request_histogram),
            cache: Family::default(),
            served: Family::default(),
            errors: Family::default(),
            upstream_bytes: Family::default(),
            upstream_duration: Family::new_with_constructor(upstream_histogram),
            upstream_requests: Family::default(),
            downloads: Family::default(),
        }
    }
}

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

/// Figures read from the live state at each scrape.
/// Reads the running totals the history samples, from shared handles to the counters.
#[derive(Clone)]
struct HistoryFeed {
    families: Families,
    requests: Arc<AtomicU64>,
    upstreams: Vec<Arc<UpstreamStats>>,
}

impl HistoryFeed {
    fn read(&self) -> history::Counters {
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

struct Live {
    store: Arc<dyn BlobStore>,
    inflight: Arc<InFlight>,
    upstreams: Vec<Arc<Upstream>>,
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: i64,
) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, unit, g.metric_type())?)
}

fn counter(
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The fleet's counters, read at each scrape.
#[derive(Debug)]
struct FleetLive(Arc<FleetStats>);

// One counter family with the given `(labels, value)` series.
fn counters<L: EncodeLabelSet + fmt::Debug>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let c = ConstCounter::new(0u64);
    let mut m = enc.encode_descriptor(name, help, unit, c.metric_type())?;
    for (labels, v) in series {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for FleetLive {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        counters(
            &mut enc,
            "fleet_store_requests",
            "Requests sent to the fleet's object store, by operation (multipart: each request of an upload)",
            None,
            Op::ALL.map(|op| (OpLabels { op: op.label() }, s.requests(op))),
        )?;
        let (read, written) = s.store_bytes();
        counters(
            &mut enc,
            "fleet_store",
            "Bytes read from and written to the fleet's object store",
            Some(&Unit::Bytes),
            [
                (DirectionLabels { direction: "read" }, read),
                (DirectionLabels { direction: "write" }, written),
            ],
        )?;
        let (served, received) = s.peer_bytes();
        counters(
            &mut enc,
            "fleet_peer",
            "Blob bytes sent to and received from other replicas",
            Some(&Unit::Bytes),
            [
                (
                    DirectionLabels {
                        direction: "served",
                    },
                    served,
                ),
                (
                    DirectionLabels {
                        direction: "received",
                    },
                    received,
                ),
            ],
        )?;
        counters(
            &mut enc,
            "fleet_leases",
            "Download leases by outcome (won: led, followed: streamed from another replica, taken_over: swapped a stale lease, renewal_refused: lost one)",
            None,
            LeaseResult::ALL.map(|r| (ResultLabels { result: r.label() }, s.leases(r))),
        )?;
        gauge(
            &mut enc,
            "fleet_store_up",
            "1 when the fleet's object store answered its last request, 0 when not (degraded mode)",
            None,
            i64::from(s.store_up()),
        )?;
        counter(
            &mut enc,
            "fleet_degraded_transitions",
            "Times this replica went into degraded mode (object store unreachable)",
            None,
            s.degraded_transitions(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn errors_have_bounded_reasons() {
        assert_eq!(
            error_reason(&Error::Upstream(
                crate::error::Kind::Blob,
                UpstreamError::Unreachable("10.0.0.1 refused".into())
            )),
            "upstream_unreachable"
        );
        assert_eq!(
            error_reason(&Error::Internal("/secret/path".into())),
            "internal"
        );
        assert_eq!(
            result_of_error(&Error::Offline(crate::error::Kind::Blob)),
            Some(CacheResult::Miss)
        );
        assert_eq!(result_of_error(&Error::BlobUnknown), None);
    }
}

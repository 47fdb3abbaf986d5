//! The metric families every instrumented place writes to, their label sets and the
//! histogram buckets.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RequestLabels {
    pub(super) route: &'static str,
    pub(super) status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RouteLabels {
    pub(super) route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CacheLabels {
    pub(super) kind: &'static str,
    pub(super) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ServedLabels {
    pub(super) kind: &'static str,
    pub(super) source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct UpstreamLabels {
    pub(super) upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct UpstreamKindLabels {
    pub(super) upstream: String,
    pub(super) kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct UpstreamOutcomeLabels {
    pub(super) upstream: String,
    pub(super) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ReasonLabels {
    pub(super) reason: &'static str,
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
pub(super) struct Families {
    pub(super) requests: Family<RequestLabels, Counter>,
    pub(super) request_duration: Histograms<RouteLabels>,
    pub(super) cache: Family<CacheLabels, Counter>,
    pub(super) served: Family<ServedLabels, Counter>,
    pub(super) errors: Family<ReasonLabels, Counter>,
    pub(super) upstream_bytes: Family<UpstreamKindLabels, Counter>,
    pub(super) upstream_duration: Histograms<UpstreamLabels>,
    pub(super) upstream_requests: Family<UpstreamOutcomeLabels, Counter>,
    pub(super) downloads: Family<UpstreamOutcomeLabels, Counter>,
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

//! The operator endpoints: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (cache
//! writable, upstream health reported) and the status page at `/`. They are served on the
//! registry listener, or on a plain-HTTP listener of their own when `admin_listen` is set.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method, Response, StatusCode, header};
use serde_json::json;

use crate::app::App;
use crate::body::{self, Body};
use crate::cache::inflight::FillState;
use crate::error::Error;
use crate::metrics::{CacheKind, CacheResult};
use crate::status::{self, DownloadView, StatusView, UpstreamView};

/// Longest a readiness write to the cache may take before the cache counts as unusable.
const WRITE_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// One operator endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/metrics`
    Metrics,
    /// `/healthz`
    Healthz,
    /// `/readyz`
    Readyz,
    /// `/` (also `/status`)
    Status,
}

impl Endpoint {
    /// The endpoint a `GET` or `HEAD` of `path` asks for.
    pub fn parse(method: &Method, path: &str) -> Option<Endpoint> {
        if method != Method::GET && method != Method::HEAD {
            return None;
        }
        match path {
            "/metrics" => Some(Endpoint::Metrics),
            "/healthz" => Some(Endpoint::Healthz),
            "/readyz" => Some(Endpoint::Readyz),
            "/" | "/status" => Some(Endpoint::Status),
            _ => None,
        }
    }

    /// Route label for the request metrics.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Metrics => "metrics",
            Endpoint::Healthz => "healthz",
            Endpoint::Readyz => "readyz",
            Endpoint::Status => "status",
        }
    }
}

fn text(content_type: &'static str, payload: String, head: bool) -> Response<Body> {
    let len = payload.len();
    let mut r = Response::new(if head {
        body::empty()
    } else {
        body::full(payload)
    });
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Answers an operator endpoint.
pub async fn answer(app: &Arc<App>, endpoint: Endpoint, head: bool) -> Response<Body> {
    match endpoint {
        Endpoint::Metrics => text(crate::metrics::CONTENT_TYPE, app.metrics.encode(), head),
        Endpoint::Healthz => body::json(r#"{"status":"ok"}"#, head),
        Endpoint::Readyz => {
            let (ready, report) = readiness(app).await;
            let mut r = body::json(report.to_string(), head);
            if !ready {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            r
        }
        Endpoint::Status => {
            let page = status::render(&status_view(app), SystemTime::now());
            let mut r = text("text/html; charset=utf-8", page, head);
            // The page has no script and loads nothing: forbid both.
            r.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
            );
            r.headers_mut().insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            r
        }
    }
}

/// A `401` asking a browser for the pull credentials the status page needs.
pub fn basic_challenge() -> Response<Body> {
    let mut r = Error::Access(crate::access::Denied::Unauthenticated).into_response(false);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"regcache\""),
    );
    r
}

fn unix(t: SystemTime) -> Option<f64> {
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs_f64())
}

fn age(t: SystemTime) -> f64 {
    SystemTime::now()
        .duration_since(t)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Writes and removes a small file where downloads are staged: the cache can take data.
async fn check_cache_writable(app: &App) -> Result<(), String> {
    let path = app.store.staging_path("readyz");
    let attempt = async {
        tokio::fs::write(&path, b"regcache readiness check").await?;
        tokio::fs::remove_file(&path).await
    };
    match tokio::time::timeout(WRITE_CHECK_TIMEOUT, attempt).await {
        Ok(Ok(())) => Ok(()),
        // The OS error only (the io::Error of a write names no path).
        Ok(Err(e)) => {
            let _ = tokio::fs::remove_file(&path).await;
            Err(e.to_string())
        }
        Err(_) => Err(format!(
            "a test write did not finish within {}s",
            WRITE_CHECK_TIMEOUT.as_secs()
        )),
    }
}

/// Whether regcache is ready (configuration loaded, which it is once there is an `App`, and
/// the cache writable), with a report that also gives each upstream's health. A failing
/// upstream does not make regcache unready: cached content can still be served.
pub async fn readiness(app: &Arc<App>) -> (bool, serde_json::Value) {
    let cache = check_cache_writable(app).await;
    if let Err(error) = &cache {
        tracing::warn!(%error, "readiness: the cache is not writable");
    }
    let usage = app.cache_usage();
    let upstreams: Vec<serde_json::Value> = app
        .upstreams
        .iter()
        .map(|u| {
            let h = u.stats().health();
            json!({
                "name": u.name,
                "state": if u.offline { "offline" } else { h.state() },
                "reachable": h.reachable,
                "last_status": h.last_status,
                "last_success_unix": h.last_success.and_then(unix),
                "last_success_age_seconds": h.last_success.map(age),
                "last_error": h.last_error.as_ref().map(|(_, e)| e),
                "last_error_unix": h.last_error.as_ref().and_then(|(t, _)| unix(*t)),
                "last_error_age_seconds": h.last_error.as_ref().map(|(t, _)| age(*t)),
                "last_checked_unix": h.last_checked.and_then(unix),
                "last_checked_age_seconds": h.last_checked.map(age),
            })
        })
        .collect();
    let ready = cache.is_ok();
    let report = json!({
        "status": if ready { "ready" } else { "unready" },
        "config": "loaded",
        "cache": {
            "writable": cache.is_ok(),
            "error": cache.err(),
            "counted": usage.map(|u| u.ready),
            "bytes": usage.map(|u| u.bytes),
            "entries": usage.map(|u| u.entries),
            "limit": usage.and_then(|u| u.limit),
        },
        "downloads_in_flight": app.downloads_in_flight(),
        "upstreams": upstreams,
    });
    let mut report = report;
    if let Some(f) = &app.fleet {
        // Degraded is still ready: the local tier serves, with per-replica single flight.
        report["fleet"] = json!({
            "summary": f.summary(),
            "store_up": f.stats().store_up(),
            "active": f.active(),
            "replica": f.me.replica,
            "advertise": f.me.advertise,
        });
    }
    (ready, report)
}

/// Gathers what the status page shows.
pub fn status_view(app: &Arc<App>) -> StatusView {
    let m = &app.metrics;
    let usage = app.cache_usage();
    let counted = usage.filter(|u| u.ready);
    let downloads = app
        .inflight
        .snapshot()
        .into_iter()
        .filter_map(|(fill, state)| {
            let (written, total) = match state {
                FillState::Connecting => (0, None),
                FillState::Streaming { len, written } => (written, len),
                // Being synced and committed.
                FillState::Verified { len } => (len, Some(len)),
                // Ended between the copy and now: no longer under way.
                FillState::Complete { .. } | FillState::Failed(_) => return None,
            };
            Some(DownloadView {
                digest: fill.digest.to_string(),
                written,
                total,
                elapsed: fill.started.elapsed(),
            })
        })
        .collect();
    StatusView {
        version: env!("CARGO_PKG_VERSION"),
        uptime: m.uptime(),
        cache_bytes: counted.map(|u| u.bytes),
        cache_entries: counted.map(|u| u.entries),
        cache_limit: usage.and_then(|u| u.limit),
        evictions: usage.map_or((0, 0), |u| (u.evictions, u.evicted_bytes)),
        lookups: CacheKind::ALL
            .iter()
            .map(|k| {
                let [hit, miss, stale] = CacheResult::ALL.map(|r| m.cache_count(*k, r));
                (k.label(), hit, miss, stale)
            })
            .collect(),
        served_from_cache: m.served_bytes(true),
        served_from_upstream: m.served_bytes(false),
        fetched: m.fetched_bytes(&app.upstreams),
        upstreams: app
            .upstreams
            .iter()
            .map(|u| {
                let h = u.stats().health();
                UpstreamView {
                    name: u.name.clone(),
                    url: u.base_url().to_string(),
                    state: if u.offline { "offline" } else { h.state() },
                    last_success: h.last_success,
                    last_error: h.last_error,
                    last_checked: h.last_checked,
                }
            })
            .collect(),
        downloads,
        top: crate::flight::lock(&m.pulls).top(status::SHOWN),
        history: m.history(),
        fleet: app.fleet.as_ref().map(|f| {
            let s = f.stats();
            status::FleetView {
                summary: f.summary(),
                store: f.store.url().to_owned(),
                advertise: f.me.advertise.clone(),
                replica: f.me.replica.clone(),
                leases: crate::fleet::stats::LeaseResult::ALL.map(|r| s.leases(r)),
                store_requests: s.requests_total(),
                store_bytes: s.store_bytes(),
                peer_bytes: s.peer_bytes(),
                degraded_transitions: s.degraded_transitions(),
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_get_or_head_only() {
        assert_eq!(
            Endpoint::parse(&Method::GET, "/metrics"),
            Some(Endpoint::Metrics)
        );
        assert_eq!(
            Endpoint::parse(&Method::HEAD, "/readyz"),
            Some(Endpoint::Readyz)
        );
        assert_eq!(Endpoint::parse(&Method::GET, "/"), Some(Endpoint::Status));
        assert_eq!(Endpoint::parse(&Method::POST, "/metrics"), None);
        assert_eq!(Endpoint::parse(&Method::GET, "/metrics/x"), None);
        assert_eq!(Endpoint::parse(&Method::GET, "/v2/"), None);
    }
}

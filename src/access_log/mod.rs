//! The access log: one `regcache::access_log` event per request, written when its response
//! body ends or is dropped, by a body wrapper that also counts the bytes it lets through;
//! and the record of a request (route, cache lookup, upstream) that metrics count from.
//! [`line`] writes that event, [`batch`] the lines to standard output.

pub mod batch;
pub mod line;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;

use crate::body::Body;

/// What a cache lookup was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheKind {
    /// A manifest by digest.
    Manifest,
    /// A blob.
    Blob,
    /// A manifest by tag (the tag's answer).
    Tag,
}

impl CacheKind {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            CacheKind::Manifest => "manifest",
            CacheKind::Blob => "blob",
            CacheKind::Tag => "tag",
        }
    }

    /// Every kind, in display order.
    pub const ALL: [CacheKind; 3] = [CacheKind::Tag, CacheKind::Manifest, CacheKind::Blob];
}

/// How a cache lookup ended. Handlers put it in the extensions of the response they answer
/// with (the metrics module's `mark`); `App::handle` counts it and writes it to the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheResult {
    /// Served from the cache.
    Hit,
    /// Fetched from the upstream (also when joining a download under way).
    Miss,
    /// Served from the cache because the upstream could not confirm it.
    Stale,
}

impl CacheResult {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Stale => "stale",
        }
    }

    /// Every result, in display order.
    pub const ALL: [CacheResult; 3] = [CacheResult::Hit, CacheResult::Miss, CacheResult::Stale];
}

/// What `App::handle` learnt about one request, for its metrics and access-log line.
#[derive(Debug)]
pub struct RequestRecord {
    /// The request id (also sent back as `X-Request-Id`).
    pub id: String,
    /// Method.
    pub method: http::Method,
    /// Path, without the query.
    pub path: String,
    /// Arrival.
    pub started: Instant,
    /// Route label (`manifest`, `blob`, …).
    pub route: &'static str,
    /// What the route looks up in the cache, if anything.
    pub kind: Option<CacheKind>,
    /// Name of the upstream the request was routed to.
    pub upstream: Option<String>,
}

impl RequestRecord {
    /// A request that arrived now; the route is learnt while it is handled.
    pub fn new(id: String, method: http::Method, path: String) -> Self {
        RequestRecord {
            id,
            method,
            path,
            started: Instant::now(),
            route: "unknown",
            kind: None,
            upstream: None,
        }
    }
}

pub(crate) struct AccessLog {
    record: RequestRecord,
    status: StatusCode,
    cache: &'static str,
    bytes: u64,
    logged: bool,
}

impl AccessLog {
    fn write(&mut self, complete: bool) {
        if std::mem::replace(&mut self.logged, true) {
            return;
        }
        let r = &self.record;
        // Not `regcache::access`: that is the client authentication module's target.
        // Only these fields: never a header value, query string or credential.
        // The target is `line::TARGET`; the macro needs it spelled out.
        tracing::info!(
            target: "regcache::access_log",
            request_id = %r.id,
            method = %r.method,
            path = %r.path,
            status = self.status.as_u16(),
            bytes = self.bytes,
            duration_ms = duration_ms(r.started.elapsed()),
            cache = self.cache,
            upstream = r.upstream.as_deref().unwrap_or(""),
            complete,
            "access"
        );
    }
}

/// Milliseconds to the microsecond: `0.032`, not the `0.032369999999999996` a float
/// product of seconds prints. A whole number of microseconds over 1000 is the closest
/// double to the three-decimal value, which is what the shortest float formatting prints.
fn duration_ms(d: std::time::Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// A response body that counts what passes and writes the access log at its end.
pub(crate) struct Metered {
    inner: Body,
    log: AccessLog,
    served: Option<Counter>,
    aborted: Counter,
    // Bytes the server sent beside the body (sendfile), and how many make it complete.
    beside: Option<(Arc<AtomicU64>, u64)>,
}

impl Metered {
    /// Wraps `inner`, the body of an answer with `status` to the request `record`. `cache`
    /// is the access log's `cache` field; `served` counts the body bytes and `aborted` a
    /// body that fails mid-way.
    pub(crate) fn new(
        inner: Body,
        record: RequestRecord,
        status: StatusCode,
        cache: &'static str,
        served: Option<Counter>,
        aborted: Counter,
    ) -> Self {
        Metered {
            inner,
            log: AccessLog {
                record,
                status,
                cache,
                bytes: 0,
                logged: false,
            },
            served,
            aborted,
            beside: None,
        }
    }

    /// Counts the bytes a server sends beside this body (from a file, or from the body's
    /// reader itself) instead of polling it: (bytes sent so far, the body's length).
    pub(crate) fn with_beside(mut self, beside: Option<(Arc<AtomicU64>, u64)>) -> Self {
        self.beside = beside;
        self
    }
}

impl HttpBody for Metered {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    this.log.bytes += n;
                    if let Some(c) = &this.served {
                        c.inc_by(n);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.aborted.inc();
                this.log.write(false);
            }
            Poll::Ready(None) => this.log.write(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // A body never polled to its end: empty (HEAD, 204), sent from its file, or the
        // client went away.
        let mut complete = self.inner.is_end_stream();
        if let Some((sent, len)) = &self.beside {
            let n = sent.swap(0, Ordering::Relaxed);
            if n > 0 {
                self.log.bytes += n;
                if let Some(c) = &self.served {
                    c.inc_by(n);
                }
                complete = n == *len;
            }
        }
        self.log.write(complete);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_print_at_most_three_decimals() {
        for (nanos, printed) in [
            (32_369_999, "32.369"),
            (32_370, "0.032"),
            (999, "0"),
            (1_000_000, "1"),
            (12_700_000, "12.7"),
            (86_400_000_000_000, "86400000"),
        ] {
            let ms = duration_ms(Duration::from_nanos(nanos));
            assert_eq!(ms.to_string(), printed);
            assert_eq!(
                serde_json::json!(ms).to_string().trim_end_matches(".0"),
                printed
            );
        }
    }
}

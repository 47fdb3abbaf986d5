//! `GET|HEAD /v2/<name>/blobs/<digest>`: cache hits, joined downloads and the straight-from-
//! upstream fallback.

use std::sync::Arc;

use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt;

use crate::app::App;
use crate::body::{self, Body, set_header as set};
use crate::cache::fill;
use crate::cache::inflight::{FillError, FillState, Join};
use crate::cache::reader::{FileRange, TailBody};
use crate::cache::source::{ByteSource, SourceError, SourceStream, Timeouts};
use crate::cache::tail::{SharedTail, Tail, file_stream};
use crate::error::{Error, Kind, UpstreamError};
use crate::metrics::{CacheResult, mark};
use crate::range::{self, RangeSpec};
use crate::reference::{Digest, Repository};
use crate::upstream::Upstream;
use crate::upstream::stats::DownloadFailure;

fn blob_headers(r: &mut Response<Body>, digest: &Digest, len: u64) {
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    super::set_digest_headers(r, digest);
    r.headers_mut()
        .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
}

/// The status, start and length to serve for `range` on a blob of `total` bytes.
fn plan(range: Option<&str>, total: u64) -> Result<(StatusCode, u64, u64), Error> {
    match range::parse(range, total) {
        RangeSpec::Full => Ok((StatusCode::OK, 0, total)),
        RangeSpec::Partial { start, end } => {
            Ok((StatusCode::PARTIAL_CONTENT, start, end - start + 1))
        }
        RangeSpec::Unsatisfiable => Err(Error::RangeNotSatisfiable(total)),
    }
}

fn blob_response(
    digest: &Digest,
    total: u64,
    status: StatusCode,
    start: u64,
    len: u64,
    body: Body,
) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    blob_headers(&mut r, digest, len);
    if status == StatusCode::PARTIAL_CONTENT {
        set(
            &mut r,
            header::CONTENT_RANGE,
            &format!("bytes {}-{}/{}", start, start + len - 1, total),
        );
    }
    r
}

fn fill_error(e: FillError) -> Error {
    match e {
        FillError::Source(e) => Error::Upstream(Kind::Blob, upstream_error(e)),
        FillError::DigestMismatch(got) => Error::Upstream(
            Kind::Blob,
            UpstreamError::Invalid(format!("blob content hashed to {got}")),
        ),
        FillError::Io(why) => Error::Internal(why),
        FillError::TooLarge(len) => Error::Internal(format!("{len} bytes not cached")),
        FillError::Aborted => Error::Internal("download aborted".into()),
    }
}

/// The upstream's error as the cache's byte sources name it.
fn source_error(e: UpstreamError) -> SourceError {
    match e {
        UpstreamError::Status(404) => SourceError::NotFound,
        UpstreamError::Status(s) => SourceError::Status(s),
        UpstreamError::Auth(why) => SourceError::Refused { status: 401, why },
        UpstreamError::Denied(why) => SourceError::Refused { status: 403, why },
        UpstreamError::Unreachable(why) => SourceError::Unreachable(why),
        UpstreamError::Timeout(why) => SourceError::Timeout(why),
        UpstreamError::Invalid(why) => SourceError::Invalid(why),
    }
}

/// Back to the upstream's error, answered to clients as before the download (the inverse of
/// [`source_error`]).
fn upstream_error(e: SourceError) -> UpstreamError {
    match e {
        SourceError::NotFound => UpstreamError::Status(404),
        SourceError::Status(s) => UpstreamError::Status(s),
        SourceError::Refused { status: 403, why } => UpstreamError::Denied(why),
        SourceError::Refused { why, .. } => UpstreamError::Auth(why),
        SourceError::Unreachable(why) => UpstreamError::Unreachable(why),
        SourceError::Timeout(why) => UpstreamError::Timeout(why),
        SourceError::Invalid(why) => UpstreamError::Invalid(why),
    }
}

/// How the downloads counter names a download's end.
fn download_failure(e: &FillError) -> DownloadFailure {
    match e {
        FillError::Source(_) => DownloadFailure::Upstream,
        FillError::DigestMismatch(_) => DownloadFailure::DigestMismatch,
        FillError::Io(_) | FillError::TooLarge(_) => DownloadFailure::NotCached,
        FillError::Aborted => DownloadFailure::Aborted,
    }
}

/// One repository's blobs at an upstream registry, as the cache's byte source: read by the
/// download that fills the cache, and by clients served straight from the upstream when the
/// disk cannot take a blob. Counts the blob bytes received.
struct UpstreamSource {
    upstream: Arc<Upstream>,
    repository: Repository,
}

#[async_trait::async_trait]
impl ByteSource for UpstreamSource {
    fn name(&self) -> &str {
        &self.upstream.name
    }

    fn timeouts(&self) -> Timeouts {
        Timeouts {
            open: self.upstream.exchange_deadline,
            idle: self.upstream.read_idle,
        }
    }

    async fn open(&self, digest: &Digest, from: u64) -> Result<SourceStream, SourceError> {
        use futures_util::StreamExt;
        let answer = self
            .upstream
            .blob(&self.repository, digest, from)
            .await
            .map_err(source_error)?;
        let stats = self.upstream.stats().clone();
        let bytes = answer.body.into_data_stream().map(move |r| match r {
            Ok(b) => {
                stats.fetched_blob(b.len() as u64);
                Ok(b)
            }
            Err(e) => Err(SourceError::Unreachable(e.to_string())),
        });
        Ok(SourceStream {
            total_len: answer.total,
            offset: answer.offset,
            bytes: Box::pin(bytes),
        })
    }
}

fn source(upstream: &Arc<Upstream>, repository: &Repository) -> Arc<dyn ByteSource> {
    Arc::new(UpstreamSource {
        upstream: upstream.clone(),
        repository: repository.clone(),
    })
}

/// `GET|HEAD /v2/<name>/blobs/<digest>`, with single `Range` support on cached blobs and on
/// blobs still downloading. A `client` may have `limits.downloads_per_client` GETs not served
/// from the cache under way; cache hits and HEADs are not counted.
pub async fn blob(
    app: &Arc<App>,
    upstream: usize,
    repo: &Repository,
    digest: &Digest,
    range: Option<&str>,
    head: bool,
    client: Option<std::net::IpAddr>,
) -> Result<Response<Body>, Error> {
    if head {
        if let Some(total) = app.store.blob_len(digest).await? {
            let (status, start, len) = plan(range, total)?;
            app.store.note_use(digest).await;
            return Ok(mark(
                blob_response(digest, total, status, start, len, body::empty()),
                CacheResult::Hit,
            ));
        }
    } else if let Some((file, total)) = app.store.open_blob_file(digest).await? {
        // One blocking trip: the file opened once and its length read from the open file,
        // so the range is planned on exactly what is sent.
        let (status, start, len) = plan(range, total)?;
        app.store.note_use(digest).await;
        // The plain-HTTP loop sends the range with sendfile; other connections read it chunk
        // by chunk from the same open file.
        let range = FileRange::new(file, start, len);
        let stream = file_stream(range.file.clone(), start, len);
        let mut r = blob_response(digest, total, status, start, len, body::stream(stream));
        r.extensions_mut().insert(range);
        return Ok(mark(r, CacheResult::Hit));
    }
    let up = &app.upstreams[upstream];
    if up.offline {
        return Err(Error::Offline(Kind::Blob));
    }
    let mut result = CacheResult::Miss;
    let (fill, slot) = if head {
        // A HEAD alone never starts a download: it follows one under way, or asks upstream.
        match app.inflight.get(digest) {
            Some(f) => (f, None),
            None => {
                // The fleet's shared tier answers before the upstream is asked.
                let shared = match &app.fleet {
                    Some(f) => f.blob_len(digest).await,
                    None => None,
                };
                let size = match shared {
                    Some(len) => Some(len),
                    None => up
                        .blob_size(repo, digest)
                        .await
                        .map_err(|e| Error::Upstream(Kind::Blob, e))?,
                };
                let mut r = Response::new(body::empty());
                blob_headers(&mut r, digest, size.unwrap_or(0));
                if size.is_none() {
                    r.headers_mut().remove(header::CONTENT_LENGTH);
                }
                return Ok(mark(r, CacheResult::Miss));
            }
        }
    } else {
        // Held by the response body until it is sent or dropped.
        let slot = match client {
            Some(ip) => Some(app.downloads.try_take(ip).ok_or(Error::TooManyDownloads)?),
            None => None,
        };
        let fill = match app
            .inflight
            .join(digest, || app.store.staging_path(&digest.to_string()))
        {
            Join::Follower(f) => {
                // Every byte already here and verified, only not committed yet: a hit.
                if matches!(*f.subscribe().borrow(), FillState::Verified { .. }) {
                    result = CacheResult::Hit;
                }
                f
            }
            Join::Leader(guard) => {
                let f = guard.fill().clone();
                let stats = up.stats().clone();
                let upstream = source(up, repo);
                match &app.fleet {
                    None => fill::spawn(guard, app.store.clone(), upstream, move |outcome| {
                        stats.download_ended(outcome.err().map(download_failure));
                    }),
                    // The store, the lease's leader or the upstream, chosen by the fleet.
                    Some(fleet) => {
                        let fleet = fleet.blob_source(digest, upstream, app.store.clone());
                        let end = fleet.clone();
                        fill::spawn(guard, app.store.clone(), Arc::new(fleet), move |outcome| {
                            stats.download_ended(outcome.err().map(download_failure));
                            end.ended(outcome);
                        });
                    }
                }
                f
            }
        };
        (fill, slot)
    };
    let mut rx = fill.subscribe();
    let direct = source(up, repo);
    // Headers go out as soon as the upstream has answered (or, for a range on a download of
    // unknown length, once the length is known).
    let total = {
        let wanted_len = range.is_some();
        let state = rx
            .wait_for(|s| match s {
                FillState::Connecting => false,
                FillState::Streaming { len, .. } => len.is_some() || !wanted_len,
                FillState::Verified { .. } | FillState::Complete { .. } | FillState::Failed(_) => {
                    true
                }
            })
            .await
            .map_err(|_| Error::Internal("download state lost".into()))?
            .clone();
        match state {
            // The disk cannot take it: serve this client straight from the upstream.
            FillState::Failed(FillError::TooLarge(len)) => Some(len),
            FillState::Failed(e) if e.is_local() => up
                .blob_size(repo, digest)
                .await
                .map_err(|e| Error::Upstream(Kind::Blob, e))?,
            FillState::Failed(e) => return Err(fill_error(e)),
            FillState::Streaming { len, .. } => len,
            FillState::Verified { len } | FillState::Complete { len } => Some(len),
            FillState::Connecting => None,
        }
    };
    let Some(total) = total else {
        // Unknown length, whole blob: stream it chunked.
        let mut r = Response::new(if head {
            body::empty()
        } else {
            body::hold(
                body::stream(
                    Tail::new(fill, app.store.clone(), 0, None)
                        .with_fallback(direct, true)
                        .into_stream(),
                ),
                slot,
            )
        });
        blob_headers(&mut r, digest, 0);
        r.headers_mut().remove(header::CONTENT_LENGTH);
        return Ok(mark(r, result));
    };
    let (status, start, len) = plan(range, total)?;
    if head {
        return Ok(mark(
            blob_response(digest, total, status, start, len, body::empty()),
            result,
        ));
    }
    // The plain-HTTP loop sends what is on disk with sendfile; other connections read it.
    let tail = SharedTail::new(
        Tail::new(fill, app.store.clone(), start, Some(start + len))
            .with_fallback(direct, status == StatusCode::OK),
    );
    let body = body::hold(body::stream(tail.clone().into_stream()), slot);
    let mut r = blob_response(digest, total, status, start, len, body);
    r.extensions_mut().insert(TailBody::new(tail, len));
    Ok(mark(r, result))
}

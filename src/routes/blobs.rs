//! `GET|HEAD /v2/<name>/blobs/<digest>`: cache hits, joined downloads and the straight-from-
//! upstream fallback.

use std::sync::Arc;

use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt;

use super::DOCKER_CONTENT_DIGEST;
use crate::app::App;
use crate::body::{self, Body, set_header as set};
use crate::cache::fill;
use crate::cache::inflight::{FillError, FillState, Join};
use crate::cache::tail::{ByteStream, Refetch, SharedTail, Tail, file_stream, read_stream};
use crate::error::{Error, Kind, UpstreamError};
use crate::metrics::{CacheResult, mark};
use crate::range::{self, RangeSpec};
use crate::reference::{Digest, Repository};
use crate::upstream::Upstream;

fn blob_headers(r: &mut Response<Body>, digest: &Digest, len: u64) {
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    set(r, DOCKER_CONTENT_DIGEST, &digest.to_string());
    set(r, header::ETAG, &format!("\"{digest}\""));
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
        FillError::Upstream(u) => Error::Upstream(Kind::Blob, u),
        FillError::DigestMismatch(got) => Error::Upstream(
            Kind::Blob,
            UpstreamError::Invalid(format!("blob content hashed to {got}")),
        ),
        FillError::Io(why) => Error::Internal(why),
        FillError::TooLarge(len) => Error::Internal(format!("{len} bytes not cached")),
        FillError::Aborted => Error::Internal("download aborted".into()),
    }
}

/// A blob straight from its upstream, for clients of a download the disk could not take.
struct Straight {
    upstream: Arc<Upstream>,
    repository: Repository,
    digest: Digest,
}

#[async_trait::async_trait]
impl Refetch for Straight {
    async fn from(&self, start: u64) -> std::io::Result<ByteStream> {
        use futures_util::StreamExt;
        let (resp, mut skip) = self
            .upstream
            .blob_from(&self.repository, &self.digest, start)
            .await
            .map_err(std::io::Error::other)?;
        let stats = self.upstream.stats().clone();
        let bytes = resp.into_body().into_data_stream().filter_map(move |r| {
            if let Ok(b) = &r {
                stats.fetched_blob(b.len() as u64);
            }
            let out = match r {
                Ok(mut b) if skip > 0 => {
                    let n = skip.min(b.len() as u64);
                    skip -= n;
                    let rest = b.split_off(n as usize);
                    (!rest.is_empty()).then_some(Ok(rest))
                }
                other => Some(other),
            };
            std::future::ready(out)
        });
        Ok(Box::pin(bytes))
    }
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
    if let Some(total) = app.store.blob_len(digest).await? {
        let (status, start, len) = plan(range, total)?;
        app.store.note_use(digest).await;
        if head {
            return Ok(mark(
                blob_response(digest, total, status, start, len, body::empty()),
                CacheResult::Hit,
            ));
        }
        // Gone between the two calls (garbage collection): fetched again below.
        if let Some(b) = app.store.open_blob(digest, start).await? {
            let Some(file) = b.file else {
                let stream = read_stream(b.reader, len);
                let r = blob_response(digest, total, status, start, len, body::stream(stream));
                return Ok(mark(r, CacheResult::Hit));
            };
            // A local file: the plain-HTTP loop sends it with sendfile; other connections
            // read it chunk by chunk.
            let range = crate::cache::reader::FileRange::new(file, start, len);
            let stream = file_stream(range.file.clone(), start, len);
            let mut r = blob_response(digest, total, status, start, len, body::stream(stream));
            r.extensions_mut().insert(range);
            return Ok(mark(r, CacheResult::Hit));
        }
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
                let size = up
                    .blob_size(repo, digest)
                    .await
                    .map_err(|e| Error::Upstream(Kind::Blob, e))?;
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
                fill::spawn(guard, app.store.clone(), up.clone(), repo.clone());
                f
            }
        };
        (fill, slot)
    };
    let mut rx = fill.subscribe();
    let direct: Arc<dyn Refetch> = Arc::new(Straight {
        upstream: up.clone(),
        repository: repo.clone(),
        digest: digest.clone(),
    });
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
    r.extensions_mut()
        .insert(crate::cache::reader::TailBody::new(tail, len));
    Ok(mark(r, result))
}

//! The detached download task: one upstream GET per digest, hashed and written to the staged
//! file as bytes arrive, progress published to every reader, verified, fsynced and committed.

use std::io::Write;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http_body_util::BodyExt;

use super::hasher::Hasher;
use super::inflight::{FillError, FillState, LeaderGuard};
use super::store::BlobStore;
use crate::error::UpstreamError;
use crate::reference::Repository;
use crate::upstream::{Upstream, content_length};

/// Largest batch hashed and written in one blocking call.
const MAX_BATCH: usize = 1 << 20;

/// Starts the download led by `guard` on its own task, so no client going away cancels it
/// (the task ends only by finishing, failing, or the read-idle timeout).
pub fn spawn(
    guard: LeaderGuard,
    store: Arc<dyn BlobStore>,
    upstream: Arc<Upstream>,
    repository: Repository,
) {
    tokio::spawn(async move {
        let digest = guard.fill().digest.clone();
        // The guard deletes the staged file of any download that does not complete, also on
        // a panic or runtime shutdown.
        match run(&guard, store.as_ref(), &upstream, &repository).await {
            Ok(len) => {
                tracing::info!(%digest, upstream = %upstream.name, bytes = len, "blob cached");
                upstream.stats().download_ended(None);
                guard.complete(len);
            }
            Err(error) if error.is_local() => {
                tracing::warn!(
                    %error,
                    %digest,
                    upstream = %upstream.name,
                    "blob not cached; its clients are served straight from the upstream"
                );
                upstream.stats().download_ended(Some(&error));
                guard.fail(error);
            }
            Err(error) => {
                tracing::warn!(%error, %digest, upstream = %upstream.name, "blob download failed");
                upstream.stats().download_ended(Some(&error));
                guard.fail(error);
            }
        }
    });
}

fn io_err(e: std::io::Error) -> FillError {
    FillError::Io(e.to_string())
}

async fn run(
    guard: &LeaderGuard,
    store: &dyn BlobStore,
    upstream: &Upstream,
    repository: &Repository,
) -> Result<u64, FillError> {
    let digest = guard.fill().digest.clone();
    // The blob may have been committed between the caller's lookup and its join.
    if let Some(len) = store.blob_len(&digest).await.map_err(io_err)? {
        return Ok(len);
    }
    let staged = guard.fill().staged.clone();
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&staged)
        .await
        .map_err(io_err)?
        .into_std()
        .await;
    // Bounded as a whole, so a token realm or redirect that stalls cannot hold every waiter.
    let resp = tokio::time::timeout(
        upstream.exchange_deadline,
        upstream.blob(repository, &digest),
    )
    .await
    .map_err(|_| FillError::Upstream(UpstreamError::Timeout))??;
    let len = content_length(resp.headers());
    if let Some(len) = len.filter(|l| !store.admits(*l)) {
        return Err(FillError::TooLarge(len));
    }
    guard.publish(FillState::Streaming { len, written: 0 });
    let mut body = resp.into_body();
    let mut state = Some((Hasher::new(digest.algorithm()), file));
    let mut written = 0u64;
    loop {
        let first = tokio::time::timeout(upstream.read_idle, body.frame())
            .await
            .map_err(|_| FillError::Upstream(UpstreamError::Timeout))?;
        let mut batch = BytesMut::new();
        let mut ended = false;
        let mut next = first;
        // Take whatever else has already arrived, so a fast upstream costs one blocking
        // write per batch rather than one per network read.
        loop {
            match next {
                None => {
                    ended = true;
                    break;
                }
                Some(Err(e)) => {
                    return Err(FillError::Upstream(UpstreamError::Unreachable(
                        e.to_string(),
                    )));
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        batch.extend_from_slice(&data);
                    }
                }
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
            match body.frame().now_or_never() {
                Some(f) => next = f,
                None => break,
            }
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            upstream.stats().fetched_blob(n);
            if len.is_some_and(|l| written + n > l) {
                return Err(
                    UpstreamError::Invalid("blob longer than its Content-Length".into()).into(),
                );
            }
            let batch: Bytes = batch.freeze();
            let (mut hasher, mut file) = state.take().ok_or(FillError::Aborted)?;
            let (hasher, file) = tokio::task::spawn_blocking(move || {
                hasher.update(&batch);
                file.write_all(&batch).map(|_| (hasher, file))
            })
            .await
            .map_err(|_| FillError::Aborted)?
            .map_err(io_err)?;
            state = Some((hasher, file));
            written += n;
            guard.publish(FillState::Streaming { len, written });
        }
        if ended {
            break;
        }
    }
    if len.is_some_and(|l| l != written) {
        return Err(UpstreamError::Invalid("blob shorter than its Content-Length".into()).into());
    }
    let (hasher, file) = state.take().ok_or(FillError::Aborted)?;
    let actual = hasher.finish();
    if actual != digest {
        return Err(FillError::DigestMismatch(actual.to_string()));
    }
    tokio::task::spawn_blocking(move || file.sync_all())
        .await
        .map_err(|_| FillError::Aborted)?
        .map_err(io_err)?;
    store.commit_blob(&digest, &staged).await.map_err(io_err)?;
    Ok(written)
}

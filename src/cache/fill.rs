//! The detached download task: one upstream GET per digest, written to the staged file and
//! hashed as bytes arrive (on threads of their own, while the next bytes are received),
//! progress published to every reader, verified, then fsynced and committed.

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, oneshot};

use super::hasher::Hasher;
use super::inflight::{FillError, LeaderGuard, Progress};
use super::store::BlobStore;
use crate::error::UpstreamError;
use crate::reference::{Algorithm, Digest, Repository};
use crate::upstream::{Upstream, content_length};

/// Most bytes handed to the writer at once.
const MAX_BATCH: usize = 1 << 20;

/// Received chunks handed to the writer together, as they came from the upstream (no copy).
pub type Batch = Arc<Vec<Bytes>>;

/// What the writer made of a download's bytes.
pub struct Written {
    /// The digest of every byte written.
    pub digest: Digest,
    /// The staged file, not yet synced.
    pub file: std::fs::File,
    /// Bytes written.
    pub len: u64,
}

/// Batches waiting for the writer or the hasher before the receiver waits: bounds the
/// memory of a download whose disk is slower than its upstream.
const QUEUE: usize = 2;

/// Writes a download's bytes to its staged file and hashes them, each on a thread of its
/// own, so receiving the next bytes, writing and hashing all overlap. Each batch is published
/// to readers as soon as it is in the file.
///
/// Plain threads rather than tokio's blocking pool: they live as long as the download, and a
/// blocking task that long would keep tokio's paused test clock from advancing. There is one
/// pair per download under way; a thread that cannot start ends the download as a local
/// failure, whose clients are then served straight from the upstream.
pub struct Writer {
    to_file: mpsc::Sender<Batch>,
    to_hash: mpsc::Sender<Batch>,
    written: oneshot::Receiver<std::io::Result<(std::fs::File, u64)>>,
    hashed: oneshot::Receiver<Digest>,
}

// Runs `work` on a named thread and hands its result over.
fn on_thread<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<oneshot::Receiver<T>, FillError> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _ = tx.send(work());
        })
        .map_err(|e| FillError::Io(format!("cannot start a download thread: {e}")))?;
    Ok(rx)
}

impl Writer {
    /// Starts writing to `file` (positioned at its start), reporting through `progress`.
    pub fn start(
        file: std::fs::File,
        algorithm: Algorithm,
        mut progress: Progress,
    ) -> Result<Self, FillError> {
        let (to_file, mut batches) = mpsc::channel::<Batch>(QUEUE);
        let written = on_thread("regcache-write", move || {
            let mut file = file;
            while let Some(batch) = batches.blocking_recv() {
                for chunk in batch.iter() {
                    file.write_all(chunk)?;
                }
                progress.written(&batch);
            }
            Ok((file, progress.total()))
        })?;
        let (to_hash, mut batches) = mpsc::channel::<Batch>(QUEUE);
        let hashed = on_thread("regcache-hash", move || {
            let mut hasher = Hasher::new(algorithm);
            while let Some(batch) = batches.blocking_recv() {
                batch.iter().for_each(|chunk| hasher.update(chunk));
            }
            hasher.finish()
        })?;
        Ok(Writer {
            to_file,
            to_hash,
            written,
            hashed,
        })
    }

    /// Queues `batch`, waiting while the writer or the hasher is behind. An error ends the
    /// download.
    pub async fn write(&mut self, batch: Batch) -> Result<(), FillError> {
        if self.to_hash.send(batch.clone()).await.is_err() {
            return Err(FillError::Aborted);
        }
        if self.to_file.send(batch).await.is_ok() {
            return Ok(());
        }
        // The writer stops early only on a write error.
        match (&mut self.written).await {
            Ok(Err(e)) => Err(io_err(e)),
            _ => Err(FillError::Aborted),
        }
    }

    /// Waits until everything queued is written and hashed.
    pub async fn finish(self) -> Result<Written, FillError> {
        let Writer {
            to_file,
            to_hash,
            written,
            hashed,
        } = self;
        drop((to_file, to_hash));
        let (file, len) = written
            .await
            .map_err(|_| FillError::Aborted)?
            .map_err(io_err)?;
        let digest = hashed.await.map_err(|_| FillError::Aborted)?;
        Ok(Written { digest, file, len })
    }
}

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
                upstream.stats().download_ended(Some(failure_of(&error)));
                guard.fail(error);
            }
            Err(error) => {
                tracing::warn!(%error, %digest, upstream = %upstream.name, "blob download failed");
                upstream.stats().download_ended(Some(failure_of(&error)));
                guard.fail(error);
            }
        }
    });
}

fn failure_of(e: &FillError) -> crate::upstream::stats::DownloadFailure {
    use crate::upstream::stats::DownloadFailure as F;
    match e {
        FillError::Upstream(_) => F::Upstream,
        FillError::DigestMismatch(_) => F::DigestMismatch,
        FillError::Io(_) | FillError::TooLarge(_) => F::NotCached,
        FillError::Aborted => F::Aborted,
    }
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
    let mut writer = Writer::start(file, digest.algorithm(), guard.streaming(len))?;
    let mut body = resp.into_body();
    let mut received = 0u64;
    loop {
        let first = tokio::time::timeout(upstream.read_idle, body.frame())
            .await
            .map_err(|_| FillError::Upstream(UpstreamError::Timeout))?;
        let mut batch = Vec::new();
        let mut size = 0;
        let mut ended = false;
        let mut next = first;
        // Take whatever else has already arrived, so a fast upstream costs one hand-over to
        // the writer per batch rather than one per network read.
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
                        size += data.len();
                        if !data.is_empty() {
                            batch.push(data);
                        }
                    }
                }
            }
            if size >= MAX_BATCH {
                break;
            }
            match body.frame().now_or_never() {
                Some(f) => next = f,
                None => break,
            }
        }
        if !batch.is_empty() {
            let n = size as u64;
            upstream.stats().fetched_blob(n);
            if len.is_some_and(|l| received + n > l) {
                return Err(
                    UpstreamError::Invalid("blob longer than its Content-Length".into()).into(),
                );
            }
            received += n;
            writer.write(Arc::new(batch)).await?;
        }
        if ended {
            break;
        }
    }
    if len.is_some_and(|l| l != received) {
        return Err(UpstreamError::Invalid("blob shorter than its Content-Length".into()).into());
    }
    let Written {
        digest: actual,
        file,
        len: written,
    } = writer.finish().await?;
    if actual != digest {
        return Err(FillError::DigestMismatch(actual.to_string()));
    }
    // Clients may have their last byte now; the cache keeps the blob only once it is durable.
    guard.verified(written);
    tokio::task::spawn_blocking(move || file.sync_all())
        .await
        .map_err(|_| FillError::Aborted)?
        .map_err(io_err)?;
    store.commit_blob(&digest, &staged).await.map_err(io_err)?;
    Ok(written)
}

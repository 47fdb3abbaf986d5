//! The detached download task: one read of a byte source per digest, written to the staged
//! file and hashed as bytes arrive (on threads of their own, while the next bytes are
//! received), progress published to every reader, verified, then fsynced and committed.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::hasher::Hasher;
use super::inflight::{FillError, LeaderGuard, Progress};
use super::source::{ByteSource, SourceBytes, SourceError, SourceStream};
use super::store::BlobStore;
use crate::reference::{Algorithm, Digest};

/// Most bytes handed to the writer at once.
const MAX_BATCH: usize = 1 << 20;

/// Received chunks handed to the writer together, as they came from the source (no copy).
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
/// memory of a download whose disk is slower than its source.
const QUEUE: usize = 2;

/// Writes a download's bytes to its staged file and hashes them, each on a thread of its
/// own, so receiving the next bytes, writing and hashing all overlap. Each batch is published
/// to readers as soon as it is in the file.
///
/// Plain threads rather than tokio's blocking pool: they live as long as the download, and a
/// blocking task that long would keep tokio's paused test clock from advancing. There is one
/// pair per download under way; a thread that cannot start ends the download as a local
/// failure, whose clients are then served straight from the source.
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

/// How a download ended: the length committed, or why nothing was.
pub type Outcome<'a> = Result<u64, &'a FillError>;

/// Starts the download led by `guard` from `source` on its own task, so no client going away
/// cancels it (the task ends only by finishing, failing, or the source's idle timeout).
/// `ended` is told once how it ended, before readers see the final state.
pub fn spawn(
    guard: LeaderGuard,
    store: Arc<dyn BlobStore>,
    source: Arc<dyn ByteSource>,
    ended: impl FnOnce(Outcome<'_>) + Send + 'static,
) {
    tokio::spawn(async move {
        let digest = guard.fill().digest.clone();
        let name = source.name().to_owned();
        // The guard deletes the staged file of any download that does not complete, also on
        // a panic or runtime shutdown.
        let result = run(&guard, store.as_ref(), source).await;
        match &result {
            Ok(len) => tracing::info!(%digest, source = %name, bytes = len, "blob cached"),
            Err(error) if error.is_local() => tracing::warn!(
                %error,
                %digest,
                source = %name,
                "blob not cached; its clients are served straight from the source"
            ),
            Err(error) => {
                tracing::warn!(%error, %digest, source = %name, "blob download failed")
            }
        }
        ended(result.as_ref().copied());
        match result {
            Ok(len) => guard.complete(len),
            Err(error) => guard.fail(error),
        }
    });
}

fn io_err(e: std::io::Error) -> FillError {
    FillError::Io(e.to_string())
}

/// Most sources one download tries in a row without a byte from any of them (the first and
/// its successors). A source that brought bytes before it failed starts the count again: the
/// cap ends a chain of sources that fail at once, not a long download handed on several
/// times (a fleet follower's leader dying, a new leader's stream breaking in turn).
const MAX_SOURCES: usize = 4;

// Opens `source` at `from` within its answer timeout.
async fn open(
    source: &dyn ByteSource,
    digest: &Digest,
    from: u64,
) -> Result<SourceStream, SourceError> {
    // Bounded as a whole, so a token realm or redirect that stalls cannot hold every waiter.
    tokio::time::timeout(source.timeouts().open, source.open(digest, from))
        .await
        .map_err(|_| {
            SourceError::Timeout(format!(
                "{}: no answer to the blob request within {}",
                source.name(),
                crate::units::HumanDuration(source.timeouts().open)
            ))
        })?
}

async fn run(
    guard: &LeaderGuard,
    store: &dyn BlobStore,
    mut source: Arc<dyn ByteSource>,
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
    let mut sources = 1;
    let opened = loop {
        match open(source.as_ref(), &digest, 0).await {
            Ok(opened) => break opened,
            Err(e) => match source.successor(0, &e).await {
                Some(next) if sources < MAX_SOURCES => {
                    sources += 1;
                    source = next;
                }
                _ => return Err(e.into()),
            },
        }
    };
    let len = opened.total_len;
    if let Some(len) = len.filter(|l| !store.admits(*l)) {
        return Err(FillError::TooLarge(len));
    }
    let mut bytes = opened.skip_to(0)?;
    let mut writer = Writer::start(file, digest.algorithm(), guard.streaming(len))?;
    let mut received = 0u64;
    // Where the current source was opened.
    let mut opened_at = 0u64;
    // A source that fails mid-stream may hand the download to a successor, which goes on
    // from the bytes written so far (the hasher has seen them all already).
    while let Err(error) = pump(
        &mut bytes,
        &mut writer,
        &mut received,
        len,
        source.timeouts().idle,
    )
    .await
    {
        let FillError::Source(error) = error else {
            return Err(error);
        };
        let mut error = error;
        if received > opened_at {
            sources = 1;
        }
        loop {
            let next = match source.successor(received, &error).await {
                Some(next) if sources < MAX_SOURCES => next,
                _ => return Err(error.into()),
            };
            sources += 1;
            tracing::info!(%digest, %error, from = %source.name(), to = %next.name(),
                at = received, "download goes on from another source");
            source = next;
            match open(source.as_ref(), &digest, received).await {
                Ok(opened) => {
                    if let (Some(a), Some(b)) = (len, opened.total_len) {
                        if a != b {
                            return Err(SourceError::Invalid(format!(
                                "sources disagree on the blob's length ({a}, {b})"
                            ))
                            .into());
                        }
                    }
                    bytes = opened.skip_to(received)?;
                    opened_at = received;
                    break;
                }
                Err(e) => error = e,
            }
        }
    }
    if len.is_some_and(|l| l != received) {
        return Err(SourceError::Invalid("blob shorter than its length".into()).into());
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

// Receives `bytes` to their end, handing them to `writer` in batches; `received` counts the
// bytes written. On a source error, everything received before it is written first.
async fn pump(
    bytes: &mut SourceBytes,
    writer: &mut Writer,
    received: &mut u64,
    len: Option<u64>,
    idle: Duration,
) -> Result<(), FillError> {
    loop {
        let first = tokio::time::timeout(idle, bytes.next())
            .await
            .map_err(|_| {
                SourceError::Timeout(format!(
                    "the blob body stalled for {} (timeouts.read_idle)",
                    crate::units::HumanDuration(idle)
                ))
            })?;
        let mut batch = Vec::new();
        let mut size = 0;
        let mut ended = false;
        let mut failed = None;
        let mut next = first;
        // Take whatever else has already arrived, so a fast source costs one hand-over to
        // the writer per batch rather than one per network read.
        loop {
            match next {
                None => {
                    ended = true;
                    break;
                }
                Some(Err(e)) => {
                    failed = Some(e);
                    break;
                }
                Some(Ok(data)) => {
                    size += data.len();
                    if !data.is_empty() {
                        batch.push(data);
                    }
                }
            }
            if size >= MAX_BATCH {
                break;
            }
            match bytes.next().now_or_never() {
                Some(item) => next = item,
                None => break,
            }
        }
        if !batch.is_empty() {
            let n = size as u64;
            if len.is_some_and(|l| *received + n > l) {
                return Err(SourceError::Invalid("blob longer than its length".into()).into());
            }
            *received += n;
            writer.write(Arc::new(batch)).await?;
        }
        if let Some(e) = failed {
            return Err(e.into());
        }
        if ended {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::inflight::{FillState, InFlight, Join};
    use crate::cache::source::fake::{Fake, Fault};
    use crate::cache::store::FsStore;
    use crate::cache::tail::Tail;
    use std::sync::Mutex;

    struct Run {
        _dir: tempfile::TempDir,
        store: Arc<dyn BlobStore>,
        digest: Digest,
        /// What every reader of the download got.
        read: Vec<std::io::Result<Vec<u8>>>,
        /// The final state.
        state: FillState,
        /// What `ended` was told.
        ended: Option<Result<u64, FillError>>,
    }

    async fn read_all(t: Tail) -> std::io::Result<Vec<u8>> {
        let mut s = std::pin::pin!(t.into_stream());
        let mut out = Vec::new();
        while let Some(b) = s.next().await {
            out.extend_from_slice(&b?);
        }
        Ok(out)
    }

    /// Downloads the blob of digest `want` from `source` with two readers following it.
    async fn fill_from(want: &[u8], source: Arc<dyn ByteSource>) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(FsStore::open(dir.path()).await.unwrap());
        let digest = Digest::sha256(want);
        let inflight = Arc::new(InFlight::default());
        let Join::Leader(guard) = inflight.join(&digest, || store.staging_path("t")) else {
            panic!("first caller leads")
        };
        let fill = guard.fill().clone();
        let readers: Vec<_> = (0..2)
            .map(|_| tokio::spawn(read_all(Tail::new(fill.clone(), store.clone(), 0, None))))
            .collect();
        let ended = Arc::new(Mutex::new(None));
        let told = ended.clone();
        let mut rx = fill.subscribe();
        spawn(guard, store.clone(), source, move |outcome| {
            *told.lock().unwrap() = Some(outcome.map_err(Clone::clone));
        });
        let state = rx
            .wait_for(|s| matches!(s, FillState::Complete { .. } | FillState::Failed(_)))
            .await
            .unwrap()
            .clone();
        let mut read = Vec::new();
        for r in readers {
            read.push(r.await.unwrap());
        }
        let ended = ended.lock().unwrap().take();
        Run {
            _dir: dir,
            store,
            digest,
            read,
            state,
            ended,
        }
    }

    fn blob(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 253) as u8).collect()
    }

    /// No reader got a clean end: each got an error, never the whole body or a short one.
    fn every_reader_failed(run: &Run) {
        for r in &run.read {
            assert!(
                r.is_err(),
                "a reader ended cleanly: {:?}",
                r.as_ref().map(Vec::len)
            );
        }
    }

    #[tokio::test]
    async fn a_verified_download_is_committed_and_read_whole() {
        let data = blob(10_000);
        let source = Arc::new(Fake::new(data.clone()));
        let run = fill_from(&data, source.clone()).await;
        assert_eq!(run.state, FillState::Complete { len: 10_000 });
        assert_eq!(run.ended, Some(Ok(10_000)));
        for r in &run.read {
            assert_eq!(r.as_ref().unwrap(), &data);
        }
        assert_eq!(run.store.blob_len(&run.digest).await.unwrap(), Some(10_000));
        assert_eq!(source.opened(), vec![0]);
    }

    #[tokio::test]
    async fn bytes_of_another_digest_fail_and_nothing_is_committed() {
        let data = blob(10_000);
        let mut other = data.clone();
        other[5000] ^= 1;
        let run = fill_from(&data, Arc::new(Fake::new(other))).await;
        assert!(
            matches!(run.state, FillState::Failed(FillError::DigestMismatch(_))),
            "{:?}",
            run.state
        );
        assert!(matches!(run.ended, Some(Err(FillError::DigestMismatch(_)))));
        every_reader_failed(&run);
        assert_eq!(run.store.blob_len(&run.digest).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_stream_shorter_than_its_length_fails() {
        let data = blob(10_000);
        let mut source = Fake::new(data.clone());
        source.fault = Fault::EndAt(6000);
        let run = fill_from(&data, Arc::new(source)).await;
        assert!(
            matches!(
                run.state,
                FillState::Failed(FillError::Source(SourceError::Invalid(_)))
            ),
            "{:?}",
            run.state
        );
        every_reader_failed(&run);
        // Without a length to compare with, the digest check catches it.
        let mut source = Fake::new(data.clone());
        source.fault = Fault::EndAt(6000);
        source.claims = Some(None);
        let run = fill_from(&data, Arc::new(source)).await;
        assert!(matches!(
            run.state,
            FillState::Failed(FillError::DigestMismatch(_))
        ));
        every_reader_failed(&run);
        assert_eq!(run.store.blob_len(&run.digest).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_stream_longer_than_its_length_fails() {
        let data = blob(10_000);
        let mut source = Fake::new(data.clone());
        source.claims = Some(Some(9_000));
        let run = fill_from(&data, Arc::new(source)).await;
        assert!(matches!(
            run.state,
            FillState::Failed(FillError::Source(SourceError::Invalid(_)))
        ));
        every_reader_failed(&run);
    }

    #[tokio::test]
    async fn a_source_error_mid_stream_fails_every_reader() {
        let data = blob(10_000);
        let mut source = Fake::new(data.clone());
        source.fault = Fault::FailAt(4000);
        let run = fill_from(&data, Arc::new(source)).await;
        assert_eq!(
            run.state,
            FillState::Failed(FillError::Source(SourceError::Unreachable(
                "connection reset".into()
            )))
        );
        assert!(matches!(run.ended, Some(Err(FillError::Source(_)))));
        every_reader_failed(&run);
        assert_eq!(run.store.blob_len(&run.digest).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_refusing_source_fails_with_its_error() {
        let data = blob(100);
        let mut source = Fake::new(data.clone());
        source.fault = Fault::Refuse(SourceError::NotFound);
        let run = fill_from(&data, Arc::new(source)).await;
        assert_eq!(
            run.state,
            FillState::Failed(FillError::Source(SourceError::NotFound))
        );
        every_reader_failed(&run);
    }

    #[tokio::test]
    async fn a_successor_goes_on_from_the_bytes_written() {
        let data = blob(10_000);
        // The second source ignores the offset asked and answers from 0: the download skips
        // what it has.
        let mut rest = Fake::new(data.clone());
        rest.from_zero = true;
        let rest = Arc::new(rest);
        let mut first = Fake::new(data.clone());
        first.fault = Fault::FailAt(4000);
        first.next = Some(rest.clone());
        let first = Arc::new(first);
        let run = fill_from(&data, first.clone()).await;
        assert_eq!(run.state, FillState::Complete { len: 10_000 });
        for r in &run.read {
            assert_eq!(r.as_ref().unwrap(), &data);
        }
        assert_eq!(first.opened(), vec![0]);
        assert_eq!(
            rest.opened(),
            vec![4000],
            "asked from where the first stopped"
        );
        assert_eq!(run.store.blob_len(&run.digest).await.unwrap(), Some(10_000));
    }

    // A chain of `n` sources: each but the last fails after `step` more bytes (or at once,
    // with `refuse`), handing on to the next.
    fn chain(data: &[u8], n: usize, step: usize, refuse: bool) -> Vec<Arc<Fake>> {
        let mut next: Option<Arc<dyn ByteSource>> = None;
        let mut all = Vec::new();
        for i in (0..n).rev() {
            let mut s = Fake::new(data.to_vec());
            if i + 1 < n {
                s.fault = if refuse && i > 0 {
                    Fault::Refuse(SourceError::Unreachable("connection refused".into()))
                } else {
                    Fault::FailAt(step * (i + 1))
                };
            }
            s.next = next.take();
            let s = Arc::new(s);
            next = Some(s.clone());
            all.push(s);
        }
        all.reverse();
        all
    }

    #[tokio::test]
    async fn sources_that_each_bring_bytes_hand_on_past_the_cap() {
        let data = blob(10_000);
        let n = MAX_SOURCES + 3;
        let sources = chain(&data, n, 1000, false);
        let run = fill_from(&data, sources[0].clone()).await;
        assert_eq!(run.state, FillState::Complete { len: 10_000 });
        for r in &run.read {
            assert_eq!(r.as_ref().unwrap(), &data);
        }
        let asked: Vec<_> = sources.iter().map(|s| s.opened()).collect();
        let want: Vec<_> = (0..n).map(|i| vec![(i * 1000) as u64]).collect();
        assert_eq!(asked, want, "each source asked from where the last stopped");
    }

    #[tokio::test]
    async fn sources_failing_without_a_byte_stop_at_the_cap() {
        let data = blob(10_000);
        // The first brings 1000 bytes; every one after it refuses to open.
        let sources = chain(&data, MAX_SOURCES + 3, 1000, true);
        let run = fill_from(&data, sources[0].clone()).await;
        assert!(
            matches!(run.state, FillState::Failed(FillError::Source(_))),
            "{:?}",
            run.state
        );
        every_reader_failed(&run);
        let tried = sources.iter().filter(|s| !s.opened().is_empty()).count();
        assert_eq!(
            tried, MAX_SOURCES,
            "the first and its successors up to the cap"
        );
    }

    #[tokio::test]
    async fn a_successor_with_wrong_bytes_still_fails_verification() {
        let data = blob(10_000);
        let mut wrong = data.clone();
        wrong[9000] ^= 1;
        let mut rest = Fake::new(wrong);
        rest.from_zero = true;
        let mut first = Fake::new(data.clone());
        first.fault = Fault::FailAt(4000);
        first.next = Some(Arc::new(rest));
        let run = fill_from(&data, Arc::new(first)).await;
        assert!(matches!(
            run.state,
            FillState::Failed(FillError::DigestMismatch(_))
        ));
        every_reader_failed(&run);
    }
}

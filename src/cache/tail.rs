//! Readers of blob bytes: a tail reader that follows a download's growing staged file (and
//! switches to the store once it is committed), and a plain reader of committed blobs.
//!
//! Every requester of an uncached blob, the first one too, reads through the tail reader, so a
//! late joiner catches up from disk and a slow client only slows itself.
//!
//! When the download fails for a local reason (disk full, write error, a blob larger than the
//! cache), a tail reader given a fallback [`ByteSource`] carries on straight from it from where
//! it was, so its client still gets the whole body; a reader of a whole blob hashes what it
//! sent and holds back its last chunk until the digest matches.

use std::io;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::watch;

use super::hasher::Hasher;
use super::inflight::{Fill, FillState};
use super::source::{ByteSource, SourceBytes};
use super::store::BlobStore;

/// Bytes read per chunk.
const CHUNK: u64 = 256 * 1024;
/// Bytes read per chunk of a committed blob: fewer trips to the blocking pool for what is
/// usually sent over TLS.
const FILE_CHUNK: u64 = 1024 * 1024;

/// A stream of body bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// Part of a body: bytes, or a range of a local file the caller can send as it is (with
/// `sendfile(2)`), read from the page cache by the kernel.
pub enum Part {
    /// Bytes to send.
    Bytes(Bytes),
    /// `len` bytes of `file` from `offset`.
    File {
        /// The open file (stays readable when its name goes).
        file: Arc<std::fs::File>,
        /// First byte.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

// A reader that has left the cache for its fallback source.
struct Direct {
    stream: SourceBytes,
    // Set when the reader serves the whole blob: everything sent so far is in it.
    hasher: Option<Hasher>,
    held: Option<Bytes>,
    finished: bool,
}

/// Streams `len` bytes of `file` from `offset` with positional reads on the blocking pool,
/// straight into each chunk's buffer.
pub fn file_stream(
    file: Arc<std::fs::File>,
    offset: u64,
    len: u64,
) -> impl Stream<Item = io::Result<Bytes>> + Send {
    let end = offset + len;
    futures_util::stream::unfold(Some(offset), move |at| {
        let file = file.clone();
        async move {
            let at = at.filter(|at| *at < end)?;
            match read_at(file, at, (end - at).min(FILE_CHUNK)).await {
                Ok(b) => {
                    let next = at + b.len() as u64;
                    Some((Ok(b), Some(next)))
                }
                Err(e) => Some((Err(e), None)),
            }
        }
    })
}

/// Follows one download from `start` up to `end` (exclusive; `None`: to the end).
pub struct Tail {
    fill: Arc<Fill>,
    rx: watch::Receiver<FillState>,
    store: Arc<dyn BlobStore>,
    pos: u64,
    end: Option<u64>,
    // The staged file, or the committed blob's file, read at absolute offsets.
    file: Option<Arc<std::fs::File>>,
    done: bool,
    fallback: Option<(Arc<dyn ByteSource>, bool)>,
    direct: Option<Direct>,
    // The blob's length once the download was seen verified.
    verified: Option<u64>,
}

impl Tail {
    /// A reader of `fill` from byte `start` to `end`.
    pub fn new(fill: Arc<Fill>, store: Arc<dyn BlobStore>, start: u64, end: Option<u64>) -> Self {
        let rx = fill.subscribe();
        Tail {
            fill,
            rx,
            store,
            pos: start,
            end,
            file: None,
            done: false,
            fallback: None,
            direct: None,
            verified: None,
        }
    }

    /// Lets the reader go on from `source` when the download fails locally. `whole`: this
    /// reader serves the entire blob, so it verifies the digest of what it sends.
    pub fn with_fallback(mut self, source: Arc<dyn ByteSource>, whole: bool) -> Self {
        // Called before any read, so `pos` is still the start.
        self.fallback = Some((source, whole && self.pos == 0));
        self
    }

    /// The bytes as a stream; a failed download ends it with an error.
    pub fn into_stream(self) -> impl Stream<Item = io::Result<Bytes>> + Send {
        futures_util::stream::unfold(self, |mut t| async move {
            if t.done {
                return None;
            }
            match t.next_chunk().await {
                Ok(Some(b)) => Some((Ok(b), t)),
                Ok(None) => None,
                Err(e) => {
                    t.done = true;
                    Some((Err(e), t))
                }
            }
        })
    }

    // Opens the staged file, or the committed blob if it has been committed already. Done
    // before the first byte is sent, also one taken from memory: a reader that falls back
    // to its source hashes what it sent from this file, which stays readable even if the
    // failed download's name for it is gone.
    async fn open(&mut self) -> io::Result<()> {
        if self.file.is_none() {
            let staged = self.fill.staged.clone();
            let opened = tokio::task::spawn_blocking(move || std::fs::File::open(staged))
                .await
                .map_err(io::Error::other)?;
            let file = match opened {
                Ok(f) => f,
                // Committed (renamed away) before we opened it: read the stored blob.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    match self.store.open_blob_file(&self.fill.digest).await? {
                        Some((f, _)) => f,
                        None => {
                            return Err(io::Error::other(
                                "download vanished before it could be read",
                            ));
                        }
                    }
                }
                Err(e) => return Err(e),
            };
            self.file = Some(Arc::new(file));
        }
        Ok(())
    }

    // Up to `want` bytes from `self.pos` of the open file, from memory while the download
    // still holds them (`fresh`), else from the file.
    async fn read(&mut self, want: u64, fresh: bool) -> io::Result<Bytes> {
        let Some(f) = &self.file else {
            return Err(io::Error::other("reader missing"));
        };
        if fresh {
            if let Some(b) = self.fill.recent(self.pos, self.pos + want) {
                return Ok(b);
            }
        }
        read_at(f.clone(), self.pos, want).await
    }

    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        Ok(self.next_part(false).await?.map(|p| match p {
            Part::Bytes(b) => b,
            // Never asked for.
            Part::File { .. } => Bytes::new(),
        }))
    }

    /// The next part of the body; `files`: the caller sends file ranges itself, so bytes
    /// already in a local file come as [`Part::File`] (as far as they are readable) rather
    /// than being read. A failed download ends it with an error.
    pub async fn next_part(&mut self, files: bool) -> io::Result<Option<Part>> {
        if self.direct.is_some() {
            return Ok(self.next_direct().await?.map(Part::Bytes));
        }
        loop {
            if self.end.is_some_and(|e| self.pos >= e) {
                return Ok(None);
            }
            // `None`: the disk could not take the blob, so this reader goes on from its
            // fallback source (once the state is no longer borrowed).
            let readable = match &*self.rx.borrow_and_update() {
                _ if self.verified.is_some() => self.verified.map(|len| (len, true)),
                FillState::Connecting => Some((0, false)),
                // The last byte of a blob is held back until the download is verified, so a
                // body that fails verification never reaches a client complete.
                FillState::Streaming { written, .. } => Some((written.saturating_sub(1), false)),
                // Once verified, every byte may go, whatever happens to the cache's copy: this
                // reader's open file keeps them.
                FillState::Verified { len } | FillState::Complete { len } => {
                    self.verified = Some(*len);
                    Some((*len, true))
                }
                FillState::Failed(e) if e.is_local() && self.fallback.is_some() => {
                    tracing::debug!(error = %e, digest = %self.fill.digest, pos = self.pos,
                        "continuing straight from the source");
                    None
                }
                FillState::Failed(e) => return Err(io::Error::other(e.to_string())),
            };
            let Some((available, complete)) = readable else {
                self.go_direct().await?;
                return Ok(self.next_direct().await?.map(Part::Bytes));
            };
            if self.pos < available {
                let limit = self.end.unwrap_or(u64::MAX).min(available);
                match self.open().await {
                    Ok(()) => {}
                    // Nothing sent yet and the file is gone: the download's fsync or commit
                    // failed, or its blob went again (evicted) right after the commit. Once
                    // the download has ended, go on from the fallback source.
                    Err(e) if self.file.is_none() && self.fallback.is_some() => {
                        if matches!(*self.rx.borrow(), FillState::Verified { .. }) {
                            self.rx
                                .changed()
                                .await
                                .map_err(|_| io::Error::other("download state lost"))?;
                            self.verified = None;
                            continue;
                        }
                        tracing::debug!(error = %e, digest = %self.fill.digest,
                            "cached copy gone before it was read; continuing from the source");
                        self.go_direct().await?;
                        return Ok(self.next_direct().await?.map(Part::Bytes));
                    }
                    Err(e) => return Err(e),
                }
                if let (true, Some(file)) = (files, &self.file) {
                    let part = Part::File {
                        file: file.clone(),
                        offset: self.pos,
                        len: limit - self.pos,
                    };
                    self.pos = limit;
                    return Ok(Some(part));
                }
                let chunk = self.read((limit - self.pos).min(CHUNK), !complete).await?;
                self.pos += chunk.len() as u64;
                return Ok(Some(Part::Bytes(chunk)));
            }
            if complete {
                return if self.end.is_some_and(|e| self.pos < e) {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob shorter than the range asked",
                    ))
                } else {
                    Ok(None)
                };
            }
            // The sender lives in `self.fill`, which we hold, so this only errs if dropped.
            self.rx
                .changed()
                .await
                .map_err(|_| io::Error::other("download state lost"))?;
        }
    }

    async fn go_direct(&mut self) -> io::Result<()> {
        let Some((source, whole)) = self.fallback.clone() else {
            return Err(io::Error::other("no source to continue from"));
        };
        let hasher = if whole {
            let mut h = Hasher::new(self.fill.digest.algorithm());
            // What was already sent came from the file this reader still holds open (even if
            // the failed download's name for it is gone).
            // A failed download was never committed, so that is always the staged file.
            if self.pos > 0 {
                let Some(f) = &self.file else {
                    return Err(io::Error::other("sent bytes without their file"));
                };
                hash_prefix(f, self.pos, &mut h).await?;
            }
            Some(h)
        } else {
            None
        };
        self.file = None;
        let stream = source
            .open(&self.fill.digest, self.pos)
            .await
            .and_then(|opened| opened.skip_to(self.pos))
            .map_err(io::Error::other)?;
        self.direct = Some(Direct {
            stream,
            hasher,
            held: None,
            finished: false,
        });
        Ok(())
    }

    async fn next_direct(&mut self) -> io::Result<Option<Bytes>> {
        use futures_util::StreamExt;
        let Some(d) = self.direct.as_mut() else {
            return Ok(None);
        };
        loop {
            if d.finished {
                return Ok(None);
            }
            let remaining = self.end.map(|e| e.saturating_sub(self.pos));
            let next = if remaining == Some(0) {
                None
            } else {
                d.stream
                    .next()
                    .await
                    .transpose()
                    .map_err(io::Error::other)?
            };
            let Some(mut b) = next else {
                d.finished = true;
                if remaining.is_some_and(|r| r > 0) {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "source body shorter than the blob",
                    ));
                }
                if let Some(h) = d.hasher.take() {
                    let actual = h.finish();
                    if actual != self.fill.digest {
                        tracing::warn!(digest = %self.fill.digest, %actual,
                            source = self.fallback.as_ref().map_or("", |(s, _)| s.name()),
                            "source sent a blob that does not match its digest");
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "blob does not match its digest",
                        ));
                    }
                }
                return Ok(d.held.take());
            };
            if let Some(r) = remaining {
                b.truncate(r.min(b.len() as u64) as usize);
            }
            if b.is_empty() {
                continue;
            }
            self.pos += b.len() as u64;
            let Some(h) = d.hasher.as_mut() else {
                return Ok(Some(b));
            };
            h.update(&b);
            if let Some(prev) = d.held.replace(b) {
                return Ok(Some(prev));
            }
        }
    }
}

/// A tail reader shared by a response body and a server that can send the body itself in
/// parts (see [`Tail::next_part`]): whichever starts first takes it.
#[derive(Clone)]
pub struct SharedTail(Arc<std::sync::Mutex<Option<Tail>>>);

impl SharedTail {
    /// Shares `tail`.
    pub fn new(tail: Tail) -> Self {
        SharedTail(Arc::new(std::sync::Mutex::new(Some(tail))))
    }

    /// The reader, unless taken already.
    pub fn take(&self) -> Option<Tail> {
        crate::flight::lock(&self.0).take()
    }

    /// The bytes as a stream, taking the reader when first polled (nothing if the server
    /// took it).
    pub fn into_stream(self) -> impl Stream<Item = io::Result<Bytes>> + Send {
        use futures_util::StreamExt;
        futures_util::stream::once(async move { self.take() })
            .flat_map(|t| futures_util::stream::iter(t).flat_map(Tail::into_stream))
    }
}

async fn hash_prefix(f: &Arc<std::fs::File>, len: u64, h: &mut Hasher) -> io::Result<()> {
    use futures_util::StreamExt;
    let mut prefix = std::pin::pin!(file_stream(f.clone(), 0, len));
    while let Some(chunk) = prefix.next().await {
        h.update(&chunk?);
    }
    Ok(())
}

/// Up to `want` bytes of `file` from `offset` (a positional read on the blocking pool).
async fn read_at(file: Arc<std::fs::File>, offset: u64, want: u64) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        // Read into the spare capacity: no zeroing of a buffer about to be overwritten.
        let mut buf = Vec::with_capacity(want as usize);
        let n = if want == 0 {
            0
        } else {
            rustix::io::pread(&*file, rustix::buffer::spare_capacity(&mut buf), offset)?
        };
        if n == 0 && want > 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob file shorter than expected",
            ));
        }
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::inflight::{InFlight, Join, LeaderGuard, RECENT_BYTES};
    use crate::cache::source::fake::Fake;
    use crate::cache::store::FsStore;
    use crate::reference::Digest;
    use futures_util::StreamExt;
    use std::io::Write;

    struct Setup {
        _dir: tempfile::TempDir,
        store: Arc<dyn BlobStore>,
        guard: LeaderGuard,
        data: Vec<u8>,
    }

    async fn setup(len: usize) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(FsStore::open(dir.path()).await.unwrap());
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let digest = Digest::sha256(&data);
        let inflight = Arc::new(InFlight::default());
        let Join::Leader(guard) = inflight.join(&digest, || store.staging_path("t")) else {
            panic!("first caller leads")
        };
        std::fs::File::create(&guard.fill().staged).unwrap();
        Setup {
            _dir: dir,
            store,
            guard,
            data,
        }
    }

    fn append(path: &std::path::Path, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(bytes).unwrap();
    }

    async fn read_all(t: Tail) -> io::Result<Vec<u8>> {
        let mut s = std::pin::pin!(t.into_stream());
        let mut out = Vec::new();
        while let Some(b) = s.next().await {
            out.extend_from_slice(&b?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn the_last_byte_goes_once_verified_before_the_commit() {
        let s = setup(1000).await;
        let fill = s.guard.fill().clone();
        let mut progress = s.guard.streaming(Some(1000));
        append(&fill.staged, &s.data);
        progress.written(&[Bytes::from(s.data.clone())]);
        let reader = tokio::spawn(read_all(Tail::new(fill.clone(), s.store.clone(), 0, None)));
        // Everything but the last byte is readable while the digest is unchecked.
        let mut t = Tail::new(fill.clone(), s.store.clone(), 0, None);
        let first = t.next_chunk().await.unwrap().unwrap();
        assert_eq!(first.len(), 999);
        s.guard.verified(1000);
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), reader).await;
        let read = read.expect("the reader waits for the commit");
        assert_eq!(read.unwrap().unwrap(), s.data);
        assert_eq!(t.next_chunk().await.unwrap().unwrap(), &s.data[999..]);
        assert!(t.next_chunk().await.unwrap().is_none());
        // Not committed: nothing in the store yet.
        assert_eq!(s.store.blob_len(&fill.digest).await.unwrap(), None);
    }

    #[tokio::test]
    async fn readers_keeping_up_take_the_bytes_from_memory() {
        let s = setup(3000).await;
        let fill = s.guard.fill().clone();
        let mut progress = s.guard.streaming(Some(3000));
        // The file gets other bytes than those published: what a reader sends shows where
        // it read them.
        append(&fill.staged, &[0u8; 2000]);
        progress.written(&[
            Bytes::from(s.data[..1000].to_vec()),
            Bytes::from(s.data[1000..2000].to_vec()),
        ]);
        let mut t = Tail::new(fill.clone(), s.store.clone(), 500, None);
        assert_eq!(t.next_chunk().await.unwrap().unwrap(), &s.data[500..1000]);
        assert_eq!(t.next_chunk().await.unwrap().unwrap(), &s.data[1000..1999]);
        // Sent to the file only when the caller asks for file parts.
        let mut parts = Tail::new(fill.clone(), s.store.clone(), 10, None);
        match parts.next_part(true).await.unwrap().unwrap() {
            Part::File { offset, len, .. } => assert_eq!((offset, len), (10, 1989)),
            Part::Bytes(_) => panic!("bytes on disk should come as a file range"),
        }
    }

    #[tokio::test]
    async fn memory_keeps_only_the_newest_bytes() {
        let s = setup(0).await;
        let fill = s.guard.fill().clone();
        let mut progress = s.guard.streaming(None);
        let chunk = Bytes::from(vec![7u8; RECENT_BYTES / 4]);
        for _ in 0..8 {
            progress.written(std::slice::from_ref(&chunk));
        }
        let total = 2 * RECENT_BYTES as u64;
        assert!(fill.recent(0, 10).is_none(), "the oldest bytes are let go");
        let newest = fill.recent(total - 10, total).unwrap();
        assert_eq!(newest.len(), 10);
        assert!(fill.recent(total - RECENT_BYTES as u64, total).is_some());
        assert!(
            fill.recent(total, total + 1).is_none(),
            "nothing past what was written"
        );
        s.guard.verified(total);
        assert!(
            fill.recent(total - 10, total).is_none(),
            "let go once verified"
        );
    }

    #[tokio::test]
    async fn a_copy_gone_right_after_its_commit_is_fetched_again() {
        let s = setup(1000).await;
        let fill = s.guard.fill().clone();
        let mut progress = s.guard.streaming(Some(1000));
        append(&fill.staged, &s.data);
        progress.written(&[Bytes::from(s.data.clone())]);
        s.guard.verified(1000);
        // Committed, then evicted before this reader opened anything.
        std::fs::remove_file(&fill.staged).unwrap();
        s.guard.complete(1000);
        let data = Bytes::from(s.data.clone());
        let t = Tail::new(fill.clone(), s.store.clone(), 0, None);
        assert!(read_all(t).await.is_err(), "without a fallback: an error");
        let t = Tail::new(fill, s.store.clone(), 0, None)
            .with_fallback(Arc::new(Fake::new(data.clone())), true);
        assert_eq!(read_all(t).await.unwrap(), data);
    }

    /// A reader that sent part of a download the disk then failed, continued from `fallback`.
    async fn continued_from(fallback: Fake) -> (io::Result<Vec<u8>>, Vec<u8>, Vec<u64>) {
        let s = setup(3000).await;
        let fill = s.guard.fill().clone();
        let mut progress = s.guard.streaming(Some(3000));
        append(&fill.staged, &s.data[..1200]);
        progress.written(&[Bytes::from(s.data[..1200].to_vec())]);
        let fallback = Arc::new(fallback);
        let mut t =
            Tail::new(fill.clone(), s.store.clone(), 0, None).with_fallback(fallback.clone(), true);
        let mut got = t.next_chunk().await.unwrap().unwrap().to_vec();
        assert_eq!(got.len(), 1199, "the last byte written waits for more");
        s.guard
            .fail(crate::cache::inflight::FillError::Io("disk full".into()));
        let rest = read_all(t).await.map(|rest| {
            got.extend_from_slice(&rest);
            got
        });
        (rest, s.data, fallback.opened())
    }

    #[tokio::test]
    async fn a_fallback_answering_from_zero_is_skipped_to_where_the_reader_was() {
        let data = setup(3000).await.data;
        let mut source = Fake::new(data.clone());
        source.from_zero = true;
        let (read, data, opened) = continued_from(source).await;
        assert_eq!(read.unwrap(), data);
        assert_eq!(opened, vec![1199]);
    }

    #[tokio::test]
    async fn a_fallback_with_wrong_or_missing_bytes_ends_in_an_error() {
        let data = setup(3000).await.data;
        let mut wrong = data.clone();
        wrong[2500] ^= 1;
        let (read, ..) = continued_from(Fake::new(wrong)).await;
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let mut broken = Fake::new(data.clone());
        broken.fault = crate::cache::source::fake::Fault::FailAt(2000);
        let (read, ..) = continued_from(broken).await;
        assert!(
            read.is_err(),
            "a source error mid-stream reaches the client"
        );
        let mut short = Fake::new(data);
        short.fault = crate::cache::source::fake::Fault::EndAt(2000);
        let (read, ..) = continued_from(short).await;
        assert!(read.is_err(), "a short body never ends cleanly");
    }
}

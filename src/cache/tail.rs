//! Readers of blob bytes: a tail reader that follows a download's growing staged file (and
//! switches to the store once it is committed), and a plain reader of committed blobs.
//!
//! Every requester of an uncached blob, the first one too, reads through the tail reader, so a
//! late joiner catches up from disk and a slow client only slows itself.
//!
//! When the download fails for a local reason (disk full, write error, a blob larger than the
//! cache), a tail reader given a [`Refetch`] carries on straight from the upstream from where
//! it was, so its client still gets the whole body; a reader of a whole blob hashes what it
//! sent and holds back its last chunk until the digest matches.

use std::io;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;

use super::hasher::Hasher;
use super::inflight::{Fill, FillState};
use super::store::BlobStore;

/// Bytes read per chunk.
const CHUNK: u64 = 256 * 1024;

type Reader = Pin<Box<dyn AsyncRead + Send>>;

/// A stream of body bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// Fetches a blob's bytes from `start` on straight from its source, bypassing the cache.
#[async_trait::async_trait]
pub trait Refetch: Send + Sync {
    /// The bytes from `start` to the end of the blob.
    async fn from(&self, start: u64) -> io::Result<ByteStream>;
}

// Where a tail reader reads: the staged file of the download, or the committed blob.
enum Source {
    Staged(tokio::fs::File),
    Stored(Reader),
}

// A reader that has left the cache for the upstream.
struct Direct {
    stream: ByteStream,
    // Set when the reader serves the whole blob: everything sent so far is in it.
    hasher: Option<Hasher>,
    held: Option<Bytes>,
    finished: bool,
}

/// Streams `remaining` bytes from `reader`; ends with an error if the file is shorter.
pub fn read_stream(reader: Reader, remaining: u64) -> impl Stream<Item = io::Result<Bytes>> + Send {
    futures_util::stream::unfold((reader, remaining), |(mut reader, remaining)| async move {
        if remaining == 0 {
            return None;
        }
        match read_chunk(&mut reader, remaining.min(CHUNK)).await {
            Ok(b) => {
                let left = remaining - b.len() as u64;
                Some((Ok(b), (reader, left)))
            }
            Err(e) => Some((Err(e), (reader, 0))),
        }
    })
}

async fn read_chunk<R: AsyncRead + Unpin>(reader: &mut R, want: u64) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(want as usize);
    let n = (&mut *reader).take(want).read_buf(&mut buf).await?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "blob file shorter than expected",
        ));
    }
    Ok(buf.freeze())
}

/// Follows one download from `start` up to `end` (exclusive; `None`: to the end).
pub struct Tail {
    fill: Arc<Fill>,
    rx: watch::Receiver<FillState>,
    store: Arc<dyn BlobStore>,
    pos: u64,
    end: Option<u64>,
    reader: Option<Source>,
    done: bool,
    fallback: Option<(std::sync::Arc<dyn Refetch>, bool)>,
    direct: Option<Direct>,
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
            reader: None,
            done: false,
            fallback: None,
            direct: None,
        }
    }

    /// Lets the reader go on from `source` when the download fails locally. `whole`: this
    /// reader serves the entire blob, so it verifies the digest of what it sends.
    pub fn with_fallback(mut self, source: Arc<dyn Refetch>, whole: bool) -> Self {
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

    async fn read(&mut self, want: u64) -> io::Result<Bytes> {
        if self.reader.is_none() {
            let reader = match tokio::fs::File::open(&self.fill.staged).await {
                Ok(mut f) => {
                    f.seek(io::SeekFrom::Start(self.pos)).await?;
                    Source::Staged(f)
                }
                // Committed (renamed away) before we opened it: read the stored blob.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    match self.store.open_blob(&self.fill.digest, self.pos).await? {
                        Some(b) => Source::Stored(b.reader),
                        None => {
                            return Err(io::Error::other(
                                "download vanished before it could be read",
                            ));
                        }
                    }
                }
                Err(e) => return Err(e),
            };
            self.reader = Some(reader);
        }
        match self.reader.as_mut() {
            Some(Source::Staged(f)) => read_chunk(f, want).await,
            Some(Source::Stored(r)) => read_chunk(r, want).await,
            None => Err(io::Error::other("reader missing")),
        }
    }

    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if self.direct.is_some() {
            return self.next_direct().await;
        }
        loop {
            if self.end.is_some_and(|e| self.pos >= e) {
                return Ok(None);
            }
            // `None`: the disk could not take the blob, so this reader goes on from the
            // upstream (once the state is no longer borrowed).
            let readable = match &*self.rx.borrow_and_update() {
                FillState::Connecting => Some((0, false)),
                // The last byte of a blob is held back until the download is verified, so a
                // body that fails verification never reaches a client complete.
                FillState::Streaming { written, .. } => Some((written.saturating_sub(1), false)),
                FillState::Complete { len } => Some((*len, true)),
                FillState::Failed(e) if e.is_local() && self.fallback.is_some() => {
                    tracing::debug!(error = %e, digest = %self.fill.digest, pos = self.pos,
                        "continuing straight from the upstream");
                    None
                }
                FillState::Failed(e) => return Err(io::Error::other(e.to_string())),
            };
            let Some((available, complete)) = readable else {
                self.go_direct().await?;
                return self.next_direct().await;
            };
            if self.pos < available {
                let limit = self.end.unwrap_or(u64::MAX).min(available);
                let want = (limit - self.pos).min(CHUNK);
                let chunk = self.read(want).await?;
                self.pos += chunk.len() as u64;
                return Ok(Some(chunk));
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
                let Some(Source::Staged(f)) = self.reader.as_mut() else {
                    return Err(io::Error::other("sent bytes without their file"));
                };
                hash_prefix(f, self.pos, &mut h).await?;
            }
            Some(h)
        } else {
            None
        };
        self.reader = None;
        self.direct = Some(Direct {
            stream: source.from(self.pos).await?,
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
                d.stream.next().await.transpose()?
            };
            let Some(mut b) = next else {
                d.finished = true;
                if remaining.is_some_and(|r| r > 0) {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream body shorter than the blob",
                    ));
                }
                if let Some(h) = d.hasher.take() {
                    let actual = h.finish();
                    if actual != self.fill.digest {
                        tracing::warn!(digest = %self.fill.digest, %actual,
                            "upstream sent a blob that does not match its digest");
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

async fn hash_prefix(f: &mut tokio::fs::File, len: u64, h: &mut Hasher) -> io::Result<()> {
    f.seek(io::SeekFrom::Start(0)).await?;
    let mut left = len;
    while left > 0 {
        let chunk = read_chunk(f, left.min(CHUNK)).await?;
        h.update(&chunk);
        left -= chunk.len() as u64;
    }
    Ok(())
}

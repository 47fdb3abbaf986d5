//! Readers of blob bytes: a tail reader that follows a download's growing staged file (and
//! switches to the store once it is committed), and a plain reader of committed blobs.
//!
//! Every requester of an uncached blob, the first one too, reads through the tail reader, so a
//! late joiner catches up from disk and a slow client only slows itself.

use std::io;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;

use super::inflight::{Fill, FillState};
use super::store::BlobStore;

/// Bytes read per chunk.
const CHUNK: u64 = 256 * 1024;

type Reader = Pin<Box<dyn AsyncRead + Send>>;

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

async fn read_chunk(reader: &mut Reader, want: u64) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(want as usize);
    let n = reader.as_mut().take(want).read_buf(&mut buf).await?;
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
    reader: Option<Reader>,
    done: bool,
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
        }
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

    async fn open(&mut self) -> io::Result<&mut Reader> {
        if self.reader.is_none() {
            let reader: Reader = match tokio::fs::File::open(&self.fill.staged).await {
                Ok(mut f) => {
                    f.seek(io::SeekFrom::Start(self.pos)).await?;
                    Box::pin(f)
                }
                // Committed (renamed away) before we opened it: read the stored blob.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    match self.store.open_blob(&self.fill.digest, self.pos).await? {
                        Some(b) => b.reader,
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
        self.reader
            .as_mut()
            .ok_or_else(|| io::Error::other("reader missing"))
    }

    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            if self.end.is_some_and(|e| self.pos >= e) {
                return Ok(None);
            }
            let (available, complete) = match &*self.rx.borrow_and_update() {
                FillState::Connecting => (0, false),
                // The last byte of a blob is held back until the download is verified, so a
                // body that fails verification never reaches a client complete.
                FillState::Streaming { written, .. } => (written.saturating_sub(1), false),
                FillState::Complete { len } => (*len, true),
                FillState::Failed(e) => return Err(io::Error::other(e.to_string())),
            };
            if self.pos < available {
                let limit = self.end.unwrap_or(u64::MAX).min(available);
                let want = (limit - self.pos).min(CHUNK);
                let reader = self.open().await?;
                let chunk = read_chunk(reader, want).await?;
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
}

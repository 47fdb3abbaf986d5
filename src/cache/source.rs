//! The byte-source seam: where a download's bytes come from. The cache asks a source for the
//! bytes of a digest from an offset and never knows which kind it talks to: the upstream
//! registry (implemented by the blob route over the upstream client) and, next, a peer
//! replica streaming a download still under way, or an object store answering ranged GETs.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use crate::reference::Digest;

/// A source's body bytes, in order.
pub type SourceBytes = Pin<Box<dyn Stream<Item = Result<Bytes, SourceError>> + Send>>;

/// Why a source gave no bytes, or stopped giving them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The source does not have the blob.
    #[error("source has no such blob")]
    NotFound,
    /// The source answered with another error status (a refusal, a rate limit, a failure).
    #[error("source answered {0}")]
    Status(u16),
    /// The source would not let us in before answering (credentials refused: 401, access
    /// denied: 403), with its reason; never a secret.
    #[error("source refused access ({status}): {why}")]
    Refused {
        /// 401 or 403.
        status: u16,
        /// What the source (or its identity provider) said.
        why: String,
    },
    /// No connection could be made, or it broke.
    #[error("source unreachable: {0}")]
    Unreachable(String),
    /// No answer, or no next chunk, within the source's timeouts.
    #[error("{0}")]
    Timeout(String),
    /// The source sent something unacceptable (wrong range, more or fewer bytes than it said).
    #[error("source sent an invalid response: {0}")]
    Invalid(String),
}

impl SourceError {
    /// Worth trying again, or elsewhere: no connection, a timeout, a failing source (5xx, 429).
    /// A missing blob, a refusal or an invalid answer is not.
    pub fn is_retryable(&self) -> bool {
        match self {
            SourceError::Unreachable(_) | SourceError::Timeout(_) => true,
            SourceError::Status(s) => crate::error::failing_status(*s),
            SourceError::NotFound | SourceError::Refused { .. } | SourceError::Invalid(_) => false,
        }
    }
}

/// An opened source: the bytes of one blob from some offset on.
pub struct SourceStream {
    /// Size of the whole blob, when the source said.
    pub total_len: Option<u64>,
    /// Offset in the blob of the first byte of `bytes`: the offset asked for, or less when the
    /// source could not start there (an upstream ignoring `Range` answers from 0). Readers
    /// skip what they did not ask for with [`SourceStream::skip_to`].
    pub offset: u64,
    /// The bytes.
    pub bytes: SourceBytes,
}

impl SourceStream {
    /// The bytes from `from` on: those the source sent before it are dropped. A source that
    /// starts after `from` answered wrongly.
    pub fn skip_to(self, from: u64) -> Result<SourceBytes, SourceError> {
        if self.offset > from {
            return Err(SourceError::Invalid(format!(
                "asked for bytes from {from}, got them from {}",
                self.offset
            )));
        }
        let mut skip = from - self.offset;
        if skip == 0 {
            return Ok(self.bytes);
        }
        Ok(Box::pin(self.bytes.filter_map(move |r| {
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
        })))
    }
}

/// How long a download waits on a source: for its answer, and between two of its chunks.
/// The download enforces them, so a stalled source ends it rather than holding its readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From asking to the first byte's metadata (headers, token fetch and redirects included).
    pub open: Duration,
    /// Longest pause between two chunks.
    pub idle: Duration,
}

/// Somewhere the bytes of a blob can be read from, from any offset.
#[async_trait::async_trait]
pub trait ByteSource: Send + Sync {
    /// A short label for logs and metrics (an upstream's name, a peer, a store); bounded, never
    /// a repository or digest.
    fn name(&self) -> &str;

    /// How long a download waits on this source.
    fn timeouts(&self) -> Timeouts;

    /// The bytes of `digest` from byte `from` on, or from earlier (see
    /// [`SourceStream::offset`]).
    async fn open(&self, digest: &Digest, from: u64) -> Result<SourceStream, SourceError>;

    /// Where a download goes on when this source failed with `error` after `reached` bytes
    /// were written: the download then asks the returned source for the bytes from `reached`
    /// (it has hashed everything before them already). `None`, the default, ends the download
    /// with the error. A peer replica's source answers with the upstream once it has taken
    /// over a download whose leader died.
    async fn successor(&self, reached: u64, error: &SourceError) -> Option<Arc<dyn ByteSource>> {
        let _ = (reached, error);
        None
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! An in-memory byte source with fault switches, for the cache's tests.

    use super::*;
    use std::sync::Mutex;

    /// A fault of a [`Fake`] source.
    #[derive(Clone, Debug, Default)]
    pub enum Fault {
        /// Serves the blob as it is.
        #[default]
        None,
        /// The stream ends cleanly after this many bytes of the blob.
        EndAt(usize),
        /// The stream fails (connection lost) after this many bytes of the blob.
        FailAt(usize),
        /// Refuses to open with this error.
        Refuse(SourceError),
    }

    /// Serves `data` in `chunk`-sized pieces.
    pub struct Fake {
        pub data: Bytes,
        pub chunk: usize,
        /// Answers from 0 whatever it is asked (an upstream ignoring `Range`).
        pub from_zero: bool,
        /// The total length it claims (default: the true one).
        pub claims: Option<Option<u64>>,
        pub fault: Fault,
        pub next: Option<Arc<dyn ByteSource>>,
        /// Offsets it was asked for.
        pub opened: Mutex<Vec<u64>>,
    }

    impl Fake {
        pub fn new(data: impl Into<Bytes>) -> Self {
            Fake {
                data: data.into(),
                chunk: 1000,
                from_zero: false,
                claims: None,
                fault: Fault::None,
                next: None,
                opened: Mutex::default(),
            }
        }

        pub fn opened(&self) -> Vec<u64> {
            self.opened.lock().unwrap().clone()
        }
    }

    #[async_trait::async_trait]
    impl ByteSource for Fake {
        fn name(&self) -> &str {
            "fake"
        }

        fn timeouts(&self) -> Timeouts {
            Timeouts {
                open: Duration::from_secs(5),
                idle: Duration::from_secs(5),
            }
        }

        async fn open(&self, _digest: &Digest, from: u64) -> Result<SourceStream, SourceError> {
            self.opened.lock().unwrap().push(from);
            if let Fault::Refuse(e) = &self.fault {
                return Err(e.clone());
            }
            let offset = if self.from_zero { 0 } else { from as usize };
            let (end, fail) = match self.fault {
                Fault::EndAt(n) => (n, false),
                Fault::FailAt(n) => (n, true),
                _ => (self.data.len(), false),
            };
            let mut items: Vec<Result<Bytes, SourceError>> = Vec::new();
            let mut at = offset;
            while at < end {
                let to = (at + self.chunk).min(end);
                items.push(Ok(self.data.slice(at..to)));
                at = to;
            }
            if fail {
                items.push(Err(SourceError::Unreachable("connection reset".into())));
            }
            Ok(SourceStream {
                total_len: self.claims.unwrap_or(Some(self.data.len() as u64)),
                offset: offset as u64,
                bytes: Box::pin(futures_util::stream::iter(items)),
            })
        }

        async fn successor(&self, _: u64, _: &SourceError) -> Option<Arc<dyn ByteSource>> {
            self.next.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(s: SourceBytes) -> Result<Vec<u8>, SourceError> {
        let mut s = s;
        let mut out = Vec::new();
        while let Some(b) = s.next().await {
            out.extend_from_slice(&b?);
        }
        Ok(out)
    }

    fn stream(offset: u64, chunks: &[&'static [u8]]) -> SourceStream {
        let items: Vec<Result<Bytes, SourceError>> =
            chunks.iter().map(|c| Ok(Bytes::from_static(c))).collect();
        SourceStream {
            total_len: None,
            offset,
            bytes: Box::pin(futures_util::stream::iter(items)),
        }
    }

    #[tokio::test]
    async fn skip_to_drops_what_was_not_asked_for() {
        let s = stream(0, &[b"abc", b"defg", b"h"]);
        assert_eq!(collect(s.skip_to(5).unwrap()).await.unwrap(), b"fgh");
        let s = stream(2, &[b"cdef"]);
        assert_eq!(collect(s.skip_to(2).unwrap()).await.unwrap(), b"cdef");
        let s = stream(0, &[b"abc"]);
        assert_eq!(collect(s.skip_to(3).unwrap()).await.unwrap(), b"");
        let s = stream(4, &[b"efg"]);
        assert!(matches!(s.skip_to(2), Err(SourceError::Invalid(_))));
    }

    #[test]
    fn only_transient_failures_are_retryable() {
        assert!(SourceError::Timeout(String::new()).is_retryable());
        assert!(SourceError::Unreachable("x".into()).is_retryable());
        assert!(SourceError::Status(503).is_retryable());
        assert!(SourceError::Status(429).is_retryable());
        assert!(!SourceError::Status(400).is_retryable());
        assert!(!SourceError::NotFound.is_retryable());
        assert!(!SourceError::Invalid("x".into()).is_retryable());
        let refused = SourceError::Refused {
            status: 401,
            why: "no".into(),
        };
        assert!(!refused.is_retryable());
    }
}

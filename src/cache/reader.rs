//! Send hints a response carries beside its body stream: a range of an open cache file, or a
//! reader of a download under way. Connections that can send file bytes themselves (the plain
//! HTTP/1.1 loop with `sendfile(2)`) take the hint instead of the stream.

use std::sync::Arc;

use crate::cache::tail::SharedTail;

/// Part of a local file that is exactly a response's body. Set by the blob handler on cache
/// hits; used instead of the body stream where the connection allows it, and then `sent`
/// tells the body's accounting (access log, metrics) what went out beside it.
#[derive(Clone, Debug)]
pub struct FileRange {
    /// The open file (stays readable if its name is evicted).
    pub file: Arc<std::fs::File>,
    /// First byte.
    pub offset: u64,
    /// Bytes to send.
    pub len: u64,
    /// Bytes sent with `sendfile(2)` so far.
    pub sent: Arc<std::sync::atomic::AtomicU64>,
}

impl FileRange {
    /// `len` bytes of `file` from `offset`, none sent yet.
    pub fn new(file: std::fs::File, offset: u64, len: u64) -> Self {
        FileRange {
            file: Arc::new(file),
            offset,
            len,
            sent: Arc::default(),
        }
    }
}

impl FileRange {
    /// What the body's accounting needs: bytes sent beside it, and the body's length.
    pub fn beside(&self) -> (Arc<std::sync::atomic::AtomicU64>, u64) {
        (self.sent.clone(), self.len)
    }
}

/// A body of known length that the loop may send itself in parts: a blob download under
/// way, whose bytes already on disk go out with `sendfile(2)`. The response's body stream
/// reads the same reader when the connection cannot (hyper, TLS); `sent` tells the body's
/// accounting what went out beside it.
#[derive(Clone)]
pub struct TailBody {
    /// The reader, taken by whoever sends first.
    pub tail: SharedTail,
    /// Body length.
    pub len: u64,
    /// Bytes sent by the loop so far.
    pub sent: Arc<std::sync::atomic::AtomicU64>,
}

impl TailBody {
    /// `len` bytes from `tail`, none sent yet.
    pub fn new(tail: SharedTail, len: u64) -> Self {
        TailBody {
            tail,
            len,
            sent: Arc::default(),
        }
    }

    /// What the body's accounting needs: bytes sent beside it, and the body's length.
    pub fn beside(&self) -> (Arc<std::sync::atomic::AtomicU64>, u64) {
        (self.sent.clone(), self.len)
    }
}

//! Single flight for blob downloads: `join(digest)` makes the first caller the `Leader` of one
//! download and every later caller a `Follower` of it. The download's progress is published on
//! a `watch` channel; a drop guard marks an unfinished download failed so nobody waits forever.
//! The bytes written last stay in memory for a while, so readers keeping up with the download
//! take them from there instead of reading them back from the staged file.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

use super::source::SourceError;
use crate::flight::lock;
use crate::reference::Digest;

/// Why a download ended without committing anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FillError {
    /// The byte source failed, refused or answered wrongly.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The bytes did not hash to the digest.
    #[error("content does not match digest {0}")]
    DigestMismatch(String),
    /// The staging file could not be written.
    #[error("local write failed: {0}")]
    Io(String),
    /// The blob is larger than the cache may hold.
    #[error("blob of {0} bytes is larger than the cache")]
    TooLarge(u64),
    /// The download task ended without finishing (panic or shutdown).
    #[error("download aborted")]
    Aborted,
}

impl FillError {
    /// A local failure (disk full, write error, no room): the source is fine, so clients
    /// can still be served straight from it, without caching.
    pub fn is_local(&self) -> bool {
        matches!(self, FillError::Io(_) | FillError::TooLarge(_))
    }
}

/// Progress of one download, as every reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FillState {
    /// Waiting for the source's answer.
    Connecting,
    /// Bytes are arriving; the first `written` are in the staged file.
    Streaming {
        /// The blob's length, when the source said.
        len: Option<u64>,
        /// Bytes written to the staged file so far.
        written: u64,
    },
    /// Every byte is in the staged file and matches the digest; being made durable and
    /// committed. Readers may send all of it.
    Verified {
        /// Final size.
        len: u64,
    },
    /// Verified and committed to the store.
    Complete {
        /// Final size.
        len: u64,
    },
    /// Ended without committing.
    Failed(FillError),
}

/// One download, shared by its leader and all readers.
#[derive(Debug)]
pub struct Fill {
    /// The digest being downloaded.
    pub digest: Digest,
    /// Where the bytes are staged until commit; readers follow this growing file.
    pub staged: PathBuf,
    /// When the download started (for the status page).
    pub started: std::time::Instant,
    // `watch` keeps only the latest state, which is all a reader needs: it reads the file up to
    // `written`, then waits for the next change. Sending never blocks the download.
    state: watch::Sender<FillState>,
    // The last bytes written. Held only for copying a slice out; never across an `.await`.
    recent: Mutex<Recent>,
}

/// Bytes of a download kept in memory after they were written: readers within this distance
/// of the writer never touch the file.
pub const RECENT_BYTES: usize = 8 << 20;

/// The newest written chunks of a download, oldest first, contiguous up to `written`.
#[derive(Debug, Default)]
struct Recent {
    // Offset of the first byte of `chunks[0]`.
    start: u64,
    chunks: VecDeque<Bytes>,
    bytes: usize,
}

impl Fill {
    /// A receiver of this download's progress.
    pub fn subscribe(&self) -> watch::Receiver<FillState> {
        self.state.subscribe()
    }

    /// Bytes from `pos` up to `end` (exclusive) if they are still in memory: at most the rest
    /// of one chunk, shared with the writer (no copy).
    pub fn recent(&self, pos: u64, end: u64) -> Option<Bytes> {
        let recent = lock(&self.recent);
        let mut at = recent.start;
        if pos < at {
            return None;
        }
        for chunk in &recent.chunks {
            let next = at + chunk.len() as u64;
            if pos < next {
                let from = (pos - at) as usize;
                let to = (end.min(next) - at) as usize;
                return (from < to).then(|| chunk.slice(from..to));
            }
            at = next;
        }
        None
    }
}

/// The writer's side of a download's progress, handed to whatever writes the staged file.
pub struct Progress {
    fill: Arc<Fill>,
    len: Option<u64>,
    written: u64,
}

impl Progress {
    /// `chunks` have been written to the staged file right after everything before them:
    /// readers may now send them (all but the last byte of the blob, which waits for the
    /// digest check).
    pub fn written(&mut self, chunks: &[Bytes]) {
        self.written += chunks.iter().map(|c| c.len() as u64).sum::<u64>();
        let (len, written) = (self.len, self.written);
        // Into memory first, so a reader woken below finds them there.
        if matches!(*self.fill.state.borrow(), FillState::Streaming { .. }) {
            let mut recent = lock(&self.fill.recent);
            for chunk in chunks {
                recent.bytes += chunk.len();
                recent.chunks.push_back(chunk.clone());
            }
            while recent.bytes > RECENT_BYTES && recent.chunks.len() > 1 {
                if let Some(old) = recent.chunks.pop_front() {
                    recent.bytes -= old.len();
                    recent.start += old.len() as u64;
                }
            }
        }
        // A download that has ended (its guard dropped while this writer still ran) stays
        // ended: readers must not wait for bytes that will never be published.
        self.fill.state.send_if_modified(|s| {
            let open = matches!(s, FillState::Streaming { .. });
            if open {
                *s = FillState::Streaming { len, written };
            }
            open
        });
    }

    /// Bytes written so far.
    pub fn total(&self) -> u64 {
        self.written
    }
}

/// The role a caller got from [`InFlight::join`].
pub enum Join {
    /// Start the download and publish through the guard.
    Leader(LeaderGuard),
    /// A download is under way: read from it.
    Follower(Arc<Fill>),
}

/// The table of downloads under way.
#[derive(Default)]
pub struct InFlight {
    // Protects the table only; lookups and inserts are short and never span an `.await`.
    map: Mutex<HashMap<Digest, Arc<Fill>>>,
    // Told whenever a download leaves the table.
    ended: tokio::sync::Notify,
}

impl InFlight {
    /// Joins the download of `digest`, or becomes its leader. `staged` names the staging file
    /// and is called only for a leader.
    pub fn join(self: &Arc<Self>, digest: &Digest, staged: impl FnOnce() -> PathBuf) -> Join {
        let mut map = lock(&self.map);
        if let Some(f) = map.get(digest) {
            return Join::Follower(f.clone());
        }
        let (tx, _) = watch::channel(FillState::Connecting);
        let fill = Arc::new(Fill {
            digest: digest.clone(),
            staged: staged(),
            started: std::time::Instant::now(),
            state: tx,
            recent: Mutex::default(),
        });
        map.insert(digest.clone(), fill.clone());
        Join::Leader(LeaderGuard {
            fill,
            owner: self.clone(),
            outcome: None,
        })
    }

    /// The download of `digest` under way, if any, without starting one.
    pub fn get(&self, digest: &Digest) -> Option<Arc<Fill>> {
        lock(&self.map).get(digest).cloned()
    }

    /// Every download under way with its current progress, for the status page. The table
    /// lock is held only to copy the entries out; the states are read after it is released.
    pub fn snapshot(&self) -> Vec<(Arc<Fill>, FillState)> {
        let fills: Vec<Arc<Fill>> = lock(&self.map).values().cloned().collect();
        fills
            .into_iter()
            .map(|f| {
                let state = f.state.borrow().clone();
                (f, state)
            })
            .collect()
    }

    /// Waits until the download of `digest` under way, if any, has ended (its clients may
    /// have all their bytes before it is committed); its final state.
    pub async fn settled(&self, digest: &Digest) -> Option<FillState> {
        let mut rx = self.get(digest)?.subscribe();
        let state = rx
            .wait_for(|s| matches!(s, FillState::Complete { .. } | FillState::Failed(_)))
            .await
            .ok()?
            .clone();
        Some(state)
    }

    /// Waits until no download is under way.
    pub async fn drained(&self) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            // Registered before the check, so an end between the two is not missed.
            ended.as_mut().enable();
            if self.is_empty() {
                return;
            }
            ended.await;
        }
    }

    /// Downloads under way.
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    /// True when nothing is downloading.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Held by the task that runs a download. Dropping it without `complete` marks the download
/// `Failed(Aborted)` and deletes its staged file. Either way the digest leaves the table
/// before the final state is published, so no request can join a download that has ended;
/// the next one starts afresh (or finds the committed blob).
pub struct LeaderGuard {
    fill: Arc<Fill>,
    owner: Arc<InFlight>,
    outcome: Option<FillState>,
}

impl LeaderGuard {
    /// The shared download.
    pub fn fill(&self) -> &Arc<Fill> {
        &self.fill
    }

    /// Publishes progress.
    pub fn publish(&self, state: FillState) {
        self.fill.state.send_replace(state);
    }

    /// The source answered with `len` bytes (if it said): bytes start arriving, written
    /// through the returned handle.
    pub fn streaming(&self, len: Option<u64>) -> Progress {
        self.publish(FillState::Streaming { len, written: 0 });
        Progress {
            fill: self.fill.clone(),
            len,
            written: 0,
        }
    }

    /// All `len` bytes are written and match the digest: readers may send the last byte
    /// while the file is made durable and committed. The bytes kept in memory are let go.
    pub fn verified(&self, len: u64) {
        *lock(&self.fill.recent) = Recent::default();
        self.publish(FillState::Verified { len });
    }

    /// The blob is committed: readers switch to the store.
    pub fn complete(mut self, len: u64) {
        self.outcome = Some(FillState::Complete { len });
    }

    /// The download failed; every reader ends with this error.
    pub fn fail(mut self, error: FillError) {
        self.outcome = Some(FillState::Failed(error));
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        {
            let mut map = lock(&self.owner.map);
            if map
                .get(&self.fill.digest)
                .is_some_and(|f| Arc::ptr_eq(f, &self.fill))
            {
                map.remove(&self.fill.digest);
            }
        }
        let outcome = self
            .outcome
            .take()
            .unwrap_or(FillState::Failed(FillError::Aborted));
        if !matches!(outcome, FillState::Complete { .. }) {
            // Nothing unverified stays behind; readers holding it open keep their handle.
            // A small synchronous unlink: Drop cannot await.
            let _ = std::fs::remove_file(&self.fill.staged);
        }
        *lock(&self.fill.recent) = Recent::default();
        self.publish(outcome);
        self.owner.ended.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> Digest {
        Digest::sha256(b"x")
    }

    #[test]
    fn leader_then_followers_then_fresh_leader() {
        let f = Arc::new(InFlight::default());
        let Join::Leader(g) = f.join(&d(), || "/tmp/a".into()) else {
            panic!("first caller must lead")
        };
        let Join::Follower(other) = f.join(&d(), || unreachable!()) else {
            panic!("second caller must follow")
        };
        assert!(Arc::ptr_eq(g.fill(), &other));
        assert_eq!(f.len(), 1);
        g.publish(FillState::Streaming {
            len: Some(3),
            written: 2,
        });
        let snap = f.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].0.digest, d());
        assert_eq!(
            snap[0].1,
            FillState::Streaming {
                len: Some(3),
                written: 2
            }
        );
        g.complete(3);
        assert!(f.snapshot().is_empty());
        assert_eq!(*other.subscribe().borrow(), FillState::Complete { len: 3 });
        assert!(f.is_empty());
        assert!(matches!(f.join(&d(), || "/tmp/b".into()), Join::Leader(_)));
    }

    #[tokio::test]
    async fn dropped_leader_fails_waiters() {
        let f = Arc::new(InFlight::default());
        let Join::Leader(g) = f.join(&d(), || "/tmp/a".into()) else {
            panic!()
        };
        let mut rx = g.fill().subscribe();
        let waiter = tokio::spawn(async move {
            rx.wait_for(|s| matches!(s, FillState::Failed(_)))
                .await
                .map(|s| s.clone())
        });
        drop(g);
        assert_eq!(
            waiter.await.unwrap().unwrap(),
            FillState::Failed(FillError::Aborted)
        );
        assert!(f.is_empty());
    }
}

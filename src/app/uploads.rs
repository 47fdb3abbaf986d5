//! The uploads under way through the proxy: each one's place upstream and its local copy
//! (spool), taken out by one request at a time.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use url::Url;

use crate::cache::hasher::Hasher;
use crate::flight::lock;
use crate::reference::Repository;

/// An upload nobody touches for this long is forgotten (its local copy deleted).
const UPLOAD_IDLE: Duration = Duration::from_secs(3600);

/// The local copy of an upload, hashed as the bytes pass through.
pub(crate) struct Spool {
    /// The staging file.
    pub(crate) path: PathBuf,
    /// It, open for writing.
    pub(crate) file: std::fs::File,
    /// Hash of the bytes written so far.
    pub(crate) hasher: Hasher,
    /// A write failed or the body broke off: the copy is not to be cached.
    pub(crate) broken: bool,
}

impl Drop for Spool {
    fn drop(&mut self) {
        // Committed spools have been renamed away; this removes every other one.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A spool shared by the request body that fills it and the code that commits it.
pub(crate) type SharedSpool = Arc<Mutex<Option<Spool>>>;

/// Where an upload stands upstream, and its local copy.
pub(crate) struct UploadState {
    /// The upstream's URL for the next step of the upload.
    pub(crate) location: Url,
    /// The local copy.
    pub(crate) spool: SharedSpool,
    /// Bytes the upload holds: where the next chunk must start (`None`: not known).
    pub(crate) offset: Option<u64>,
    /// Steps taken (in a fleet, compared with the shared state: another replica may have
    /// taken some, and the local copy then misses their bytes).
    pub(crate) step: u64,
}

/// One upload regcache handed out an id for.
pub struct Upload {
    /// Index of the upstream it goes to.
    pub(crate) upstream: usize,
    /// The repository's name at that upstream.
    pub(crate) repo: Repository,
    /// The repository as the client wrote it.
    pub(crate) client_name: Repository,
    // Taken out while a request works on the upload and put back after, so two requests can
    // never interleave on it; the lock itself is held only for the take and the put.
    pub(crate) state: Mutex<Option<UploadState>>,
}

/// An upload's state taken out for one request, so two requests never interleave on it.
/// Dropped without `finish` or `put_back` (an error, or the client going away mid-request),
/// it puts the state back as it was.
pub(crate) struct Taken {
    upload: Arc<Upload>,
    original: Option<UploadState>,
}

impl Taken {
    /// Takes the upload's state; also returns where it stood upstream, its local copy and
    /// its step.
    pub(crate) fn new(upload: Arc<Upload>) -> Option<(Self, Url, SharedSpool, u64)> {
        let state = lock(&upload.state).take()?;
        let (location, spool, step) = (state.location.clone(), state.spool.clone(), state.step);
        Some((
            Taken {
                original: Some(state),
                upload,
            },
            location,
            spool,
            step,
        ))
    }

    /// Where the upload stood when it was taken (`None`: not known).
    pub(crate) fn offset(&self) -> Option<u64> {
        self.original.as_ref().and_then(|s| s.offset)
    }

    /// The upload is complete or cancelled: nothing to put back.
    pub(crate) fn finish(&mut self) {
        self.original = None;
    }

    /// Puts back an updated state.
    pub(crate) fn put_back(&mut self, state: UploadState) {
        self.original = None;
        *lock(&self.upload.state) = Some(state);
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(state) = self.original.take() {
            *lock(&self.upload.state) = Some(state);
        }
    }
}

/// The uploads under way, forgotten after an hour without use.
pub struct Uploads {
    /// By the id regcache handed out.
    pub(crate) sessions: moka::sync::Cache<String, Arc<Upload>>,
}

impl Default for Uploads {
    fn default() -> Self {
        Uploads {
            sessions: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(UPLOAD_IDLE)
                .build(),
        }
    }
}

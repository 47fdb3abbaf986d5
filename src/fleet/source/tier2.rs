//! Tier 2 as a byte source: the store's verified blobs, read from any offset.

use futures_util::StreamExt;

use crate::cache::source::{ByteSource, SourceError, SourceStream, Timeouts};
use crate::fleet::store::{Store, StoreError};
use crate::reference::Digest;

fn store_error(e: StoreError) -> SourceError {
    match e {
        StoreError::NotFound => SourceError::NotFound,
        other => SourceError::Unreachable(other.to_string()),
    }
}

/// Tier 2: the store's verified blobs, from any offset.
pub struct StoreSource {
    store: Store,
    timeouts: Timeouts,
}

impl StoreSource {
    /// Reads `blobs/…` of `store`.
    pub fn new(store: Store, timeouts: Timeouts) -> Self {
        StoreSource { store, timeouts }
    }
}

#[async_trait::async_trait]
impl ByteSource for StoreSource {
    fn name(&self) -> &str {
        "store"
    }

    fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    async fn open(&self, digest: &Digest, from: u64) -> Result<SourceStream, SourceError> {
        let got = self
            .store
            .get(&self.store.blob_key(digest), from)
            .await
            .map_err(store_error)?;
        Ok(SourceStream {
            total_len: Some(got.size),
            offset: from,
            bytes: Box::pin(got.bytes.map(|r| r.map_err(store_error))),
        })
    }
}

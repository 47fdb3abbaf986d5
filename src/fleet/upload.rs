//! Tier-2 writes: a blob committed on this replica's disk goes to the store by multipart
//! upload, hashed again as it is read; the upload is completed only when the bytes hash to
//! the digest and aborted otherwise, so the final key never holds partial or wrong bytes.

use std::sync::Arc;

use bytes::BytesMut;
use futures_util::StreamExt;

use super::store::{Store, StoreError};
use crate::cache::hasher::Hasher;
use crate::cache::store::BlobStore;
use crate::cache::tail::file_stream;
use crate::reference::Digest;

/// Size of each uploaded part (S3 wants at least 5 MiB for all parts but the last).
pub const PART: usize = 8 << 20;

/// Why a blob did not reach the store.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The local blob could not be read (gone: evicted meanwhile).
    #[error("local blob unreadable: {0}")]
    Local(String),
    /// The bytes read did not hash to the digest; the upload was aborted.
    #[error("bytes read hashed to {0}; upload aborted")]
    Mismatch(Digest),
}

/// What [`put_blob`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Uploaded {
    /// The store had the blob already.
    Present,
    /// Uploaded, this many bytes.
    Written(u64),
}

/// Uploads the locally committed blob `digest` to `blobs/…` unless the store has it.
pub async fn put_blob(
    store: &Store,
    local: &dyn BlobStore,
    digest: &Digest,
) -> Result<Uploaded, UploadError> {
    let key = store.blob_key(digest);
    match store.head(&key).await {
        Ok(_) => return Ok(Uploaded::Present),
        Err(StoreError::NotFound) => {}
        Err(e) => return Err(e.into()),
    }
    let (file, len) = local
        .open_blob_file(digest)
        .await
        .map_err(|e| UploadError::Local(e.to_string()))?
        .ok_or_else(|| UploadError::Local("not in the local cache".into()))?;
    put_stream(
        store,
        &key,
        digest,
        file_stream(Arc::new(file), 0, len).map(|r| r.map_err(|e| e.to_string())),
    )
    .await
    .map(Uploaded::Written)
}

/// Uploads `bytes` to `key` by multipart, completing only if they hash to `digest`.
pub async fn put_stream<S>(
    store: &Store,
    key: &object_store::path::Path,
    digest: &Digest,
    bytes: S,
) -> Result<u64, UploadError>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, String>> + Send,
{
    let mut upload = store.multipart(key, Default::default()).await?;
    let mut hasher = Hasher::new(digest.algorithm());
    let mut part = BytesMut::with_capacity(PART);
    let mut total = 0u64;
    let mut bytes = std::pin::pin!(bytes);
    let failed = loop {
        match bytes.next().await {
            Some(Ok(chunk)) => {
                hasher.update(&chunk);
                total += chunk.len() as u64;
                part.extend_from_slice(&chunk);
                if part.len() >= PART {
                    if let Err(e) = upload.part(part.split().freeze()).await {
                        break Some(UploadError::Store(e));
                    }
                }
            }
            Some(Err(e)) => break Some(UploadError::Local(e)),
            None => break None,
        }
    };
    let failed = match failed {
        Some(e) => Some(e),
        None if !part.is_empty() => upload
            .part(part.split().freeze())
            .await
            .err()
            .map(Into::into),
        None => None,
    };
    let failed = failed.or_else(|| {
        let got = hasher.clone().finish();
        (got != *digest).then_some(UploadError::Mismatch(got))
    });
    match failed {
        None => {
            upload.complete().await?;
            Ok(total)
        }
        Some(e) => {
            if let Err(abort) = upload.abort().await {
                tracing::warn!(error = %abort, "cannot abort a multipart upload (the bucket's lifecycle rule reclaims it)");
            }
            Err(e)
        }
    }
}

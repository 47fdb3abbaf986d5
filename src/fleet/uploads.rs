//! Push uploads any replica can continue: `uploads/<id>` holds where the upload stands
//! upstream (the upstream's name, the repository, the client's name for it, the upstream's
//! `Location` for the next step, a step count and the byte offset), written after every step, so a `PATCH`
//! or `PUT` the balancer sends to another replica goes on from there. Deleted when the
//! upload is closed or cancelled.

use bytes::Bytes;
use object_store::PutMode;
use serde::{Deserialize, Serialize};

use super::Fleet;
use super::store::StoreError;

/// An upload's state as the fleet shares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedUpload {
    /// The configured name of the upstream it goes to.
    pub upstream: String,
    /// The repository's name at that upstream.
    pub repository: String,
    /// The repository as the client wrote it.
    pub client_name: String,
    /// The upstream's URL for the next step.
    pub location: String,
    /// Steps taken (each accepted `PATCH` adds one): a replica whose own copy of the
    /// upload's bytes is from another step knows it missed some.
    pub step: u64,
    /// Bytes the upload holds upstream: where the next chunk must start (absent: not known).
    #[serde(default)]
    pub offset: Option<u64>,
}

impl Fleet {
    fn upload_key(&self, id: &str) -> object_store::path::Path {
        self.store.key(&format!("uploads/{id}"))
    }

    /// The shared state of upload `id` (an id regcache issued: 32 hex digits).
    pub async fn upload(&self, id: &str) -> Option<SharedUpload> {
        if !self.active() || !is_upload_id(id) {
            return None;
        }
        let (body, _) = self.store.get_small(&self.upload_key(id)).await.ok()?;
        serde_json::from_slice(&body).ok()
    }

    /// Writes the state of upload `id` after a step; waited for, so the client's next
    /// request finds it on any replica.
    pub async fn put_upload(&self, id: &str, state: &SharedUpload) -> Result<(), StoreError> {
        if !self.active() || !is_upload_id(id) {
            return Ok(());
        }
        let body = serde_json::to_vec(state).map_err(|e| StoreError::Unsupported(e.to_string()))?;
        self.store
            .put(
                &self.upload_key(id),
                Bytes::from(body),
                PutMode::Overwrite,
                Default::default(),
            )
            .await
            .map(|_| ())
    }

    /// Forgets upload `id` (closed or cancelled).
    pub async fn forget_upload(&self, id: &str) {
        if !self.active() || !is_upload_id(id) {
            return;
        }
        if let Err(error) = self.store.delete(&self.upload_key(id)).await {
            tracing::debug!(%error, "cannot delete a shared upload state");
        }
    }
}

fn is_upload_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

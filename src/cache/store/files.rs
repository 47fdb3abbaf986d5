//! The filesystem backend's small file operations: atomic replacement, referrer markers,
//! directory fsync, and "not found" read as absence.

use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;

use tokio::io::AsyncWriteExt;

use super::fs::FsStore;
use crate::reference::Digest;

impl FsStore {
    // Notes on disk that `referrer` refers to `subject`. An empty file, not synced: a lost one
    // only hides the referrer from offline lookups until its manifest is stored again. The
    // manifest is committed either way, so a failure is logged, not returned.
    pub(super) async fn mark_referrer(&self, subject: &Digest, referrer: &Digest) {
        let marker = self.layout.referrer_marker(subject, referrer);
        let written = async {
            if let Some(parent) = marker.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            tokio::fs::write(&marker, b"").await
        }
        .await;
        if let Err(error) = written {
            tracing::warn!(%error, %subject, %referrer, "could not index a referrer on disk");
        }
    }

    /// Writes `data` to a temp file, optionally fsyncs, and renames it to `dest`.
    pub(super) async fn write_atomic(
        &self,
        dest: &Path,
        parts: &[&[u8]],
        sync: bool,
    ) -> io::Result<()> {
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .tmp
            .join(format!("write.{}.{n}.part", std::process::id()));
        let result = async {
            let mut f = tokio::fs::File::create(&tmp).await?;
            for p in parts {
                f.write_all(p).await?;
            }
            if sync {
                f.sync_all().await?;
            }
            drop(f);
            tokio::fs::rename(&tmp, dest).await
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }
}

pub(super) async fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all())
        .await
        .map_err(io::Error::other)?
}

pub(super) fn absent<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

//! Keeping the filesystem backend within its budget: the start-up count, admission and
//! eviction, last-use stamps, and the garbage collection walk.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use super::GcReport;
use super::fs::FsStore;
use crate::cache::budget::{EntryKind, Key};
use crate::cache::layout::{Area, Item, Layout};

impl FsStore {
    pub(super) fn forget(&self, key: Key) {
        if let Some(b) = &self.budget {
            b.forget(&key);
        }
    }

    // Sets the modification time of each entry's file to now (its last use), off the async
    // threads; an entry whose file is gone is skipped.
    pub(super) async fn stamp(&self, entries: Vec<Key>) {
        if entries.is_empty() {
            return;
        }
        let paths: Vec<PathBuf> = entries
            .iter()
            .map(|(kind, d)| self.layout.content(*kind, d))
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for p in paths {
                if let Ok(f) = std::fs::File::options().write(true).open(&p) {
                    let _ = f.set_modified(std::time::SystemTime::now());
                }
            }
        })
        .await;
    }

    // Admits an entry about to be committed, removing what it displaces first so the cache
    // never holds more than the high watermark.
    pub(super) async fn admit(
        &self,
        key: Key,
        size: u64,
        refs: Option<Arc<[Key]>>,
    ) -> io::Result<()> {
        let Some(b) = &self.budget else {
            return Ok(());
        };
        if !b.admits(size) {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("{size} bytes do not fit under the cache's size limit"),
            ));
        }
        let victims = b.admit(key, size, refs);
        for ((kind, d), _) in &victims {
            if *kind == EntryKind::Manifest {
                self.hot_manifests.remove(d);
            }
        }
        remove_victims(&self.layout, victims).await;
        Ok(())
    }
}

/// Every committed entry with its size, oldest use first. Reads directories and inode
/// metadata only, never file contents; anything else in the content folders is counted and
/// left alone.
pub(super) fn scan(layout: &Layout) -> io::Result<Vec<(Key, u64)>> {
    let mut found = Vec::new();
    let mut stray = 0u64;
    layout.walk(&[Area::Content], &mut |e| match e.item {
        Item::Content(key) => found.push((e.modified, key, e.len)),
        _ => stray += 1,
    })?;
    if stray > 0 {
        tracing::warn!(
            stray,
            "files in the cache folder that are not cache entries; ignored"
        );
    }
    found.sort_by_key(|(used, _, _)| *used);
    Ok(found.into_iter().map(|(_, k, size)| (k, size)).collect())
}

/// Deletes evicted files. Clients already reading one keep their open handle to the end;
/// a crash part-way leaves only whole files, which the next start-up counts again.
pub(super) async fn remove_victims(layout: &Layout, victims: Vec<(Key, u64)>) {
    if victims.is_empty() {
        return;
    }
    let layout = layout.clone();
    let done = tokio::task::spawn_blocking(move || {
        let (mut files, mut bytes) = (0u64, 0u64);
        for ((kind, digest), size) in victims {
            match std::fs::remove_file(layout.content(kind, &digest)) {
                Ok(()) => {
                    files += 1;
                    bytes += size;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(error) => tracing::warn!(%error, %digest, "could not evict"),
            }
        }
        (files, bytes)
    })
    .await;
    if let Ok((files, bytes)) = done {
        tracing::info!(files, bytes, "evicted least recently used entries");
    }
}

/// Removes every file of the content folders last used before `cutoff` (stray files too:
/// nothing reads them), calling `removed` for each entry removed.
pub(super) fn collect(
    layout: &Layout,
    cutoff: std::time::SystemTime,
    removed: &dyn Fn(&Key),
) -> io::Result<GcReport> {
    let mut report = GcReport::default();
    let mut old = Vec::new();
    layout.walk(&[Area::Content], &mut |e| match e.item {
        Item::Stray { dir: true } => {}
        _ if e.modified < cutoff => old.push(e),
        _ => report.kept += 1,
    })?;
    for e in old {
        match std::fs::remove_file(&e.path) {
            Ok(()) => {
                report.files += 1;
                report.bytes += e.len;
                if let Item::Content(key) = &e.item {
                    removed(key);
                }
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    Ok(report)
}

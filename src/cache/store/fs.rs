//! The filesystem backend: a store's opening (clearing `tmp/`, counting what it holds in the
//! background) and its answers to the [`BlobStore`] interface.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use super::files::{absent, sync_dir};
use super::upkeep::{collect, remove_victims, scan};
use super::{BlobRead, BlobStore, GcReport, StoredManifest, TagKey, TagRecord, parse_tag_record};
use crate::cache::budget::{self, Budget, Drainer, EntryKind, Key, Limits, Usage};
use crate::cache::layout::{Area, Item, Layout, parse_marker_name, parse_tag_file_name};
use crate::reference::{Digest, Repository, Tag};

/// How often a digest's last-use time is written at most.
const USE_RESOLUTION: std::time::Duration = std::time::Duration::from_secs(3600);

/// The filesystem backend. A file's modification time is its last use.
pub struct FsStore {
    pub(super) layout: Layout,
    pub(super) tmp: PathBuf,
    pub(super) seq: AtomicU64,
    // Without a budget (maintenance opens): digests whose use was recorded within the last
    // hour, skipped so a hot blob costs no syscall per read. With one, the budget knows.
    recently_used: moka::sync::Cache<Digest, ()>,
    // Use order and sizes; absent for maintenance opens (`regcache gc`).
    pub(super) budget: Option<Arc<Budget>>,
    // Applies the budget's batches of uses off the request path; ends with the store.
    _drainer: Option<Drainer>,
    // Verified manifests recently read or stored, so a hot manifest costs no file read and
    // no re-hash per request. Bounded by bytes.
    pub(super) hot_manifests: Arc<HotManifests>,
}

/// Verified manifests kept in memory, weighed by their bytes.
pub(super) type HotManifests = quick_cache::sync::Cache<Digest, StoredManifest, ManifestBytes>;

/// Bytes of manifests kept in memory.
const HOT_MANIFEST_BYTES: u64 = 32 << 20;

/// Shards of the hot manifests. Each shard holds an equal part of [`HOT_MANIFEST_BYTES`], and a
/// manifest heavier than 97% of its shard's part (`quick_cache`'s hot share) is not kept:
/// four shards keep manifests up to about 7.7 MiB (the default `cache.max_manifest_size` is
/// 4 MiB) whatever the number of cores; a larger one is read from disk on each request.
const HOT_MANIFEST_SHARDS: usize = 4;

/// A hot manifest's weight: its body and media type.
#[derive(Debug, Clone, Copy)]
pub(super) struct ManifestBytes;

impl quick_cache::Weighter<Digest, StoredManifest> for ManifestBytes {
    fn weight(&self, _: &Digest, m: &StoredManifest) -> u64 {
        (m.body.len() + m.media_type.len()) as u64
    }
}

fn hot_manifests() -> HotManifests {
    let options = quick_cache::OptionsBuilder::new()
        // A typical image manifest is a few KiB.
        .estimated_items_capacity((HOT_MANIFEST_BYTES / 4096) as usize)
        .weight_capacity(HOT_MANIFEST_BYTES)
        .shards(HOT_MANIFEST_SHARDS)
        .build()
        .expect("constant cache options are valid");
    HotManifests::with_options(
        options,
        ManifestBytes,
        Default::default(),
        Default::default(),
    )
}

impl FsStore {
    fn at(root: &Path) -> Self {
        let layout = Layout::new(root);
        FsStore {
            tmp: layout.staging_dir(),
            layout,
            seq: AtomicU64::new(0),
            recently_used: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(USE_RESOLUTION)
                .build(),
            budget: None,
            _drainer: None,
            hot_manifests: Arc::new(hot_manifests()),
        }
    }

    /// Opens a store another process may be serving from, for maintenance (`regcache gc`):
    /// nothing is created and the other process's downloads in `tmp/` are left alone.
    pub fn open_shared(root: &Path) -> io::Result<Self> {
        if !Layout::new(root).exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a regcache cache folder", root.display()),
            ));
        }
        Ok(FsStore::at(root))
    }

    /// Opens (creating if needed) a store under `root` without a size limit.
    pub async fn open(root: &Path) -> io::Result<Self> {
        Self::open_limited(root, None).await
    }

    /// Opens (creating if needed) a store under `root`, clears stale temp files and starts
    /// counting what it holds in the background; with `limits`, evicts to stay within them.
    pub async fn open_limited(root: &Path, limits: Option<Limits>) -> io::Result<Self> {
        let layout = Layout::new(root);
        for d in layout.folders() {
            tokio::fs::create_dir_all(d).await?;
        }
        let tmp = layout.staging_dir();
        let mut cleared = 0u64;
        let mut entries = tokio::fs::read_dir(&tmp).await?;
        while let Some(e) = entries.next_entry().await? {
            if e.file_type().await?.is_dir() {
                tokio::fs::remove_dir_all(e.path()).await?;
            } else {
                tokio::fs::remove_file(e.path()).await?;
            }
            cleared += 1;
        }
        if cleared > 0 {
            tracing::info!(cleared, "removed unfinished downloads from an earlier run");
        }
        let budget = Arc::new(Budget::new(limits));
        let mut store = FsStore::at(root);
        store.budget = Some(budget.clone());
        store._drainer = Some(budget.drain_in_background()?);
        // Start-up does not wait for this: requests are served while it counts.
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let scan_layout = layout.clone();
            let scanned = match tokio::task::spawn_blocking(move || scan(&scan_layout)).await {
                Ok(Ok(s)) => s,
                Ok(Err(error)) => {
                    tracing::error!(%error, "could not count the cache; no eviction until restart");
                    return;
                }
                Err(_) => return,
            };
            let victims = budget.load(scanned);
            let usage = budget.usage();
            tracing::info!(
                entries = usage.entries,
                bytes = usage.bytes,
                limit = usage.limit,
                millis = started.elapsed().as_millis() as u64,
                "cache counted"
            );
            remove_victims(&layout, victims).await;
        });
        Ok(store)
    }

    /// Waits until the start-up count has finished (for tests and benchmarks).
    pub async fn counted(&self) {
        while self.budget.as_ref().is_some_and(|b| !b.usage().ready) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Path of a committed blob (whether or not it exists).
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.layout.blob(d)
    }
}

#[async_trait]
impl BlobStore for FsStore {
    fn staging_path(&self, label: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let safe: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        // The process id keeps names apart when another process (import) writes here too.
        self.tmp
            .join(format!("{safe}.{}.{n}.part", std::process::id()))
    }

    async fn blob_len(&self, digest: &Digest) -> io::Result<Option<u64>> {
        Ok(absent(tokio::fs::metadata(self.blob_path(digest)).await)?.map(|m| m.len()))
    }

    async fn open_blob(&self, digest: &Digest, offset: u64) -> io::Result<Option<BlobRead>> {
        let path = self.blob_path(digest);
        // One trip to the blocking pool for the whole open, not one per step.
        let opened = tokio::task::spawn_blocking(move || {
            let Some(mut f) = absent(std::fs::File::open(path))? else {
                return Ok(None);
            };
            let len = f.metadata()?.len();
            // A second descriptor of the same open file: it stays readable if the name is
            // evicted, and is only ever read at explicit offsets.
            let file = f.try_clone()?;
            if offset > 0 {
                io::Seek::seek(&mut f, io::SeekFrom::Start(offset))?;
            }
            Ok::<_, io::Error>(Some((f, len, file)))
        })
        .await
        .map_err(io::Error::other)??;
        Ok(opened.map(|(f, len, file)| BlobRead {
            len,
            reader: Box::pin(tokio::fs::File::from_std(f)),
            file: Some(file),
        }))
    }

    async fn open_blob_file(&self, digest: &Digest) -> io::Result<Option<(std::fs::File, u64)>> {
        let path = self.blob_path(digest);
        tokio::task::spawn_blocking(move || {
            let Some(f) = absent(std::fs::File::open(path))? else {
                return Ok(None);
            };
            let len = f.metadata()?.len();
            Ok(Some((f, len)))
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn commit_blob(&self, digest: &Digest, staged: &Path) -> io::Result<()> {
        let dest = self.blob_path(digest);
        let parent = dest.parent().unwrap_or(self.layout.root()).to_owned();
        let size = tokio::fs::metadata(staged).await?.len();
        self.admit((EntryKind::Blob, digest.clone()), size, None)
            .await?;
        let result = async {
            tokio::fs::create_dir_all(&parent).await?;
            tokio::fs::rename(staged, &dest).await?;
            sync_dir(&parent).await
        }
        .await;
        if result.is_err() {
            self.forget((EntryKind::Blob, digest.clone()));
        }
        result
    }

    async fn manifest(&self, digest: &Digest) -> io::Result<Option<StoredManifest>> {
        if let Some(m) = self.hot_manifests.get(digest) {
            return Ok(Some(m));
        }
        let Some(raw) = absent(tokio::fs::read(self.layout.manifest(digest)).await)? else {
            return Ok(None);
        };
        let raw = Bytes::from(raw);
        let Some(nl) = raw.iter().position(|b| *b == b'\n') else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "manifest file without a media type line",
            ));
        };
        let media_type = String::from_utf8_lossy(&raw[..nl]).into_owned();
        let body = raw.slice(nl + 1..);
        // Never serve a file that does not hash to its name.
        if crate::reference::Digest::of(digest.algorithm(), &body) != *digest {
            tracing::error!(%digest, "stored manifest does not match its digest; ignoring it");
            return Ok(None);
        }
        if let Some(b) = self.budget.as_ref().filter(|b| b.wants_refs(digest)) {
            b.set_refs(digest, budget::reference_keys(&body));
        }
        let m = StoredManifest { media_type, body };
        self.hot_manifests.insert(digest.clone(), m.clone());
        Ok(Some(m))
    }

    async fn put_manifest(&self, digest: &Digest, m: &StoredManifest) -> io::Result<()> {
        let head = format!("{}\n", m.media_type.replace('\n', ""));
        let refs = budget::reference_keys(&m.body);
        self.admit(
            (EntryKind::Manifest, digest.clone()),
            (head.len() + m.body.len()) as u64,
            Some(refs),
        )
        .await?;
        let result = self
            .write_atomic(
                &self.layout.manifest(digest),
                &[head.as_bytes(), &m.body],
                true,
            )
            .await;
        match &result {
            Ok(()) => self.hot_manifests.insert(digest.clone(), m.clone()),
            Err(_) => self.forget((EntryKind::Manifest, digest.clone())),
        }
        if result.is_ok() {
            if let Some(subject) = crate::cache::referrers::subject_of(&m.body) {
                self.mark_referrer(&subject, digest).await;
            }
        }
        result
    }

    async fn referrers_of(&self, subject: &Digest) -> io::Result<Vec<Digest>> {
        let dir = self.layout.referrers_dir(subject);
        let Some(mut entries) = absent(tokio::fs::read_dir(&dir).await)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        while let Some(e) = entries.next_entry().await? {
            if let Some(d) = e.file_name().to_str().and_then(parse_marker_name) {
                out.push(d);
            }
            if out.len() >= crate::cache::referrers::MAX_ON_DISK {
                break;
            }
        }
        out.sort();
        Ok(out)
    }

    async fn tag(&self, key: &TagKey) -> io::Result<Option<TagRecord>> {
        let Some(text) = absent(tokio::fs::read_to_string(self.layout.tag(key)).await)? else {
            return Ok(None);
        };
        Ok(parse_tag_record(&text))
    }

    async fn put_tag(&self, key: &TagKey, r: &TagRecord) -> io::Result<()> {
        let line = format!("{} {}\n", r.digest, r.media_type.replace('\n', ""));
        // A lost tag record only costs a revalidation, so no fsync here.
        self.write_atomic(&self.layout.tag(key), &[line.as_bytes()], false)
            .await
    }

    async fn remove_tag(&self, key: &TagKey) -> io::Result<()> {
        absent(tokio::fs::remove_file(self.layout.tag(key)).await).map(|_| ())
    }

    async fn remove_content(&self, digest: &Digest) -> io::Result<()> {
        self.hot_manifests.remove(digest);
        for kind in [EntryKind::Blob, EntryKind::Manifest] {
            absent(tokio::fs::remove_file(self.layout.content(kind, digest)).await)?;
            self.forget((kind, digest.clone()));
        }
        Ok(())
    }

    async fn repositories(&self) -> io::Result<Vec<(String, Repository)>> {
        let layout = self.layout.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            layout.walk(&[Area::Tags], &mut |e| {
                if let Item::Tag(k) = e.item {
                    out.push((k.upstream, k.repository));
                }
            })?;
            out.sort_by(|a, b| (a.0.as_str(), a.1.as_str()).cmp(&(b.0.as_str(), b.1.as_str())));
            out.dedup();
            Ok(out)
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn note_use(&self, digest: &Digest) {
        let stamps = match &self.budget {
            // The budget batches uses (see `budget`) and hands back the entries whose first
            // use in an hour it applied, what a manifest references included, so the order
            // survives a restart.
            Some(b) => b.touch(digest),
            None if self.recently_used.contains_key(digest) => return,
            None => {
                self.recently_used.insert(digest.clone(), ());
                vec![
                    (EntryKind::Blob, digest.clone()),
                    (EntryKind::Manifest, digest.clone()),
                ]
            }
        };
        self.stamp(stamps).await;
    }

    async fn collect_garbage(&self, max_age: std::time::Duration) -> io::Result<GcReport> {
        // It goes by the times on disk: uses still pending in the budget are written first.
        if let Some(b) = &self.budget {
            self.stamp(b.flush()).await;
        }
        let layout = self.layout.clone();
        let budget = self.budget.clone();
        let hot = self.hot_manifests.clone();
        tokio::task::spawn_blocking(move || {
            let cutoff = std::time::SystemTime::now()
                .checked_sub(max_age)
                .unwrap_or(std::time::UNIX_EPOCH);
            let removed = |k: &Key| {
                if k.0 == EntryKind::Manifest {
                    hot.remove(&k.1);
                }
                if let Some(b) = &budget {
                    b.forget(k);
                }
            };
            let mut report = collect(&layout, cutoff, &removed)?;
            report.tags = crate::cache::dangling::remove_dangling_tags(&layout)?;
            crate::cache::dangling::remove_dangling_referrers(&layout)?;
            Ok(report)
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn tags_of(
        &self,
        upstream: &str,
        repository: &Repository,
    ) -> io::Result<Vec<(Tag, u8, TagRecord)>> {
        let dir = self.layout.tag_dir(upstream, repository);
        let Some(mut entries) = absent(tokio::fs::read_dir(&dir).await)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        while let Some(e) = entries.next_entry().await? {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((tag, accept)) = parse_tag_file_name(&name) else {
                continue;
            };
            let key = TagKey {
                upstream: upstream.to_owned(),
                repository: repository.clone(),
                tag: tag.clone(),
                accept,
            };
            if let Some(record) = self.tag(&key).await? {
                out.push((tag, accept, record));
            }
        }
        Ok(out)
    }

    fn admits(&self, len: u64) -> bool {
        self.budget.as_ref().is_none_or(|b| b.admits(len))
    }

    fn usage(&self) -> Option<Usage> {
        self.budget.as_ref().map(|b| b.usage())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn round_trips_and_clears_tmp() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        std::fs::write(dir.path().join("tmp/stale.part"), b"junk").unwrap();
        let s = FsStore::open(dir.path()).await.unwrap();
        assert!(!dir.path().join("tmp/stale.part").exists());

        let data = b"hello blob";
        let d = Digest::sha256(data);
        assert_eq!(s.blob_len(&d).await.unwrap(), None);
        let staged = s.staging_path(&d.to_string());
        std::fs::write(&staged, data).unwrap();
        s.commit_blob(&d, &staged).await.unwrap();
        assert!(
            s.blob_path(&d)
                .to_string_lossy()
                .contains(&format!("blobs/sha256/{}/", &d.hex()[..2]))
        );
        assert_eq!(s.blob_len(&d).await.unwrap(), Some(10));
        let mut r = s.open_blob(&d, 6).await.unwrap().unwrap();
        let mut out = String::new();
        r.reader.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "blob");

        let m = StoredManifest {
            media_type: crate::media::OCI_MANIFEST.into(),
            body: Bytes::from_static(b"{\"schemaVersion\":2}"),
        };
        let md = Digest::sha256(&m.body);
        s.put_manifest(&md, &m).await.unwrap();
        assert_eq!(s.manifest(&md).await.unwrap(), Some(m));

        let k = TagKey {
            upstream: "docker.io".into(),
            repository: "library/alpine".parse().unwrap(),
            tag: "3.20".parse().unwrap(),
            accept: 0x1f,
        };
        let rec = TagRecord {
            digest: md.clone(),
            media_type: "x/y".into(),
        };
        s.put_tag(&k, &rec).await.unwrap();
        assert_eq!(s.tag(&k).await.unwrap(), Some(rec.clone()));
        let listed = s.tags_of("docker.io", &k.repository).await.unwrap();
        assert_eq!(listed, vec![(k.tag.clone(), 0x1f, rec.clone())]);
        s.remove_tag(&k).await.unwrap();
        assert_eq!(s.tag(&k).await.unwrap(), None);
        assert!(
            s.tags_of("docker.io", &k.repository)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn garbage_collection_removes_only_what_was_unused_for_long() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStore::open(dir.path()).await.unwrap();
        let mut digests = Vec::new();
        for data in [&b"old blob"[..], b"new blob", b"used blob"] {
            let d = Digest::sha256(data);
            let staged = s.staging_path(&d.to_string());
            std::fs::write(&staged, data).unwrap();
            s.commit_blob(&d, &staged).await.unwrap();
            digests.push(d);
        }
        let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(40 * 86400);
        for d in [&digests[0], &digests[2]] {
            std::fs::File::options()
                .write(true)
                .open(s.blob_path(d))
                .unwrap()
                .set_modified(long_ago)
                .unwrap();
        }
        // Reading `used blob` records its use; `old blob` stays unused.
        s.note_use(&digests[2]).await;
        let r = s
            .collect_garbage(std::time::Duration::from_secs(30 * 86400))
            .await
            .unwrap();
        assert_eq!((r.files, r.bytes, r.kept), (1, 8, 2));
        assert_eq!(s.blob_len(&digests[0]).await.unwrap(), None);
        assert!(s.blob_len(&digests[1]).await.unwrap().is_some());
        assert!(s.blob_len(&digests[2]).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn manifests_with_a_subject_are_indexed_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStore::open(dir.path()).await.unwrap();
        let subject = Digest::sha256(b"image");
        let body = serde_json::json!({
            "schemaVersion": 2, "config": {},
            "subject": {"digest": subject.to_string(), "size": 5},
        });
        let m = StoredManifest {
            media_type: crate::media::OCI_MANIFEST.into(),
            body: serde_json::to_vec(&body).unwrap().into(),
        };
        let d = Digest::sha256(&m.body);
        s.put_manifest(&d, &m).await.unwrap();
        let plain = StoredManifest {
            media_type: crate::media::OCI_MANIFEST.into(),
            body: Bytes::from_static(b"{\"schemaVersion\":2}"),
        };
        s.put_manifest(&Digest::sha256(&plain.body), &plain)
            .await
            .unwrap();
        // Read back by a fresh store: the index is on disk.
        let again = FsStore::open(dir.path()).await.unwrap();
        assert_eq!(again.referrers_of(&subject).await.unwrap(), vec![d.clone()]);
        assert!(again.referrers_of(&d).await.unwrap().is_empty());
        // Once the referrer is gone, garbage collection removes its marker.
        again.remove_content(&d).await.unwrap();
        again
            .collect_garbage(std::time::Duration::from_secs(86400))
            .await
            .unwrap();
        assert!(again.referrers_of(&subject).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_tampered_manifest_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStore::open(dir.path()).await.unwrap();
        let m = StoredManifest {
            media_type: "a/b".into(),
            body: Bytes::from_static(b"{}"),
        };
        let d = Digest::sha256(&m.body);
        s.put_manifest(&d, &m).await.unwrap();
        let p = s.layout.manifest(&d);
        std::fs::write(&p, b"a/b\n{\"x\":1}").unwrap();
        // A fresh start reads the file (the running store answers from the copy it verified).
        assert_eq!(s.manifest(&d).await.unwrap(), Some(m));
        let s = FsStore::open(dir.path()).await.unwrap();
        assert_eq!(s.manifest(&d).await.unwrap(), None);
    }
}

//! The narrow storage interface (`BlobStore`) and its filesystem backend: content-addressed
//! blobs and manifests, tag records, temp files fsynced and renamed into place.
//!
//! Where each file lives is [`super::layout`]'s; a manifest file's first line is its media
//! type, a tag record is `<digest> <media type>`. Everything in the staging folder (`tmp/`) is
//! removed at start-up: it was never verified.
//!
//! A manifest with a `subject` also gets a referrer marker (see [`super::layout`]), so its
//! subject's referrers can be listed from the disk alone.
//!
//! A serving store keeps a [`Budget`](super::budget::Budget): the use order and sizes of what it holds, built by a
//! background scan at start-up, which bounds the cache to `cache.max_size` by evicting the
//! least recently used entries as new ones are committed.

mod files;
mod fs;
mod upkeep;

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncRead;

use super::budget::Usage;
use crate::reference::{Digest, Repository, Tag};
pub use fs::FsStore;

/// A committed blob opened for reading at some offset.
pub struct BlobRead {
    /// Full size of the blob.
    pub len: u64,
    /// Reader positioned at the requested offset.
    pub reader: Pin<Box<dyn AsyncRead + Send>>,
    /// The same content as a local file, when the backend has one: lets a plain-HTTP
    /// connection send it with `sendfile(2)` instead of copying it through user space.
    pub file: Option<std::fs::File>,
}

/// A manifest with its media type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredManifest {
    /// `Content-Type` to serve it with.
    pub media_type: String,
    /// The exact bytes (their digest is the manifest's digest).
    pub body: Bytes,
}

pub use super::layout::TagKey;

/// What a tag resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRecord {
    /// Manifest digest.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
}

/// Where verified content lives. The request path only ever talks to this trait, so another
/// backend (object storage shared by a fleet) can replace the filesystem one. Downloads are
/// staged in a local file first; `commit_blob` takes the verified file in.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// A fresh local path where content is staged before `commit_blob`. `label` names what is
    /// staged (a digest, an upload id) and must consist of `[a-z0-9:-]`.
    fn staging_path(&self, label: &str) -> PathBuf;
    /// Size of a committed blob, or `None` when absent.
    async fn blob_len(&self, digest: &Digest) -> io::Result<Option<u64>>;
    /// Opens a committed blob at `offset`.
    async fn open_blob(&self, digest: &Digest, offset: u64) -> io::Result<Option<BlobRead>>;
    /// A committed blob as an open local file and its size, in one step (one open, one stat
    /// of the open file), or `None` when absent.
    async fn open_blob_file(&self, digest: &Digest) -> io::Result<Option<(std::fs::File, u64)>>;
    /// Takes a staged file whose content has been verified to hash to `digest` and synced.
    async fn commit_blob(&self, digest: &Digest, staged: &Path) -> io::Result<()>;
    /// A committed manifest.
    async fn manifest(&self, digest: &Digest) -> io::Result<Option<StoredManifest>>;
    /// Stores a manifest whose body has been verified to hash to `digest`.
    async fn put_manifest(&self, digest: &Digest, manifest: &StoredManifest) -> io::Result<()>;
    /// A tag record.
    async fn tag(&self, key: &TagKey) -> io::Result<Option<TagRecord>>;
    /// Records what a tag resolved to.
    async fn put_tag(&self, key: &TagKey, record: &TagRecord) -> io::Result<()>;
    /// Forgets a tag (the upstream said it is gone).
    async fn remove_tag(&self, key: &TagKey) -> io::Result<()>;
    /// Records that a blob or manifest was just used (for garbage collection). Cheap: at most
    /// one timestamp update per digest per hour, never an fsync.
    async fn note_use(&self, digest: &Digest);
    /// Removes blobs and manifests unused for longer than `max_age`; safe while serving
    /// (readers holding a file open keep reading it).
    async fn collect_garbage(&self, max_age: std::time::Duration) -> io::Result<GcReport>;
    /// Every tag record of a repository: `(tag, accept key, record)`.
    async fn tags_of(
        &self,
        upstream: &str,
        repository: &Repository,
    ) -> io::Result<Vec<(Tag, u8, TagRecord)>>;
    /// Manifests whose `subject` is `subject`, from the on-disk referrers index, at most
    /// [`super::referrers::MAX_ON_DISK`], sorted; some may have been removed since (reading
    /// them says). None when the backend keeps no such index.
    async fn referrers_of(&self, subject: &Digest) -> io::Result<Vec<Digest>> {
        let _ = subject;
        Ok(Vec::new())
    }
    /// Removes a blob or manifest the upstream deleted, so it is not served again.
    async fn remove_content(&self, digest: &Digest) -> io::Result<()>;
    /// Every `(upstream, repository)` the cache holds tag answers for, sorted.
    async fn repositories(&self) -> io::Result<Vec<(String, Repository)>>;
    /// Whether a blob of `len` bytes can be cached at all; a download of one that cannot is
    /// streamed to its clients without being stored.
    fn admits(&self, len: u64) -> bool {
        let _ = len;
        true
    }
    /// Size and eviction figures, when the backend keeps them.
    fn usage(&self) -> Option<Usage> {
        None
    }
}

/// What a garbage collection removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Files removed.
    pub files: u64,
    /// Bytes freed.
    pub bytes: u64,
    /// Files kept.
    pub kept: u64,
    /// Tag records removed because their manifest is gone.
    pub tags: u64,
}

/// A tag record file's content: `<digest> <media type>`; `None` when damaged.
pub(crate) fn parse_tag_record(text: &str) -> Option<TagRecord> {
    let (digest, media_type) = text.trim_end().split_once(' ')?;
    Some(TagRecord {
        digest: digest.parse().ok()?,
        media_type: media_type.to_owned(),
    })
}

//! Reading and checking a layout: the walk of its manifests from `index.json` and the
//! staging of the blobs they name.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use crate::airgap::oci::{self, Descriptor, Node};
use crate::airgap::progress::Progress;
use crate::airgap::verify::{self, StageError, Staged, remove_staged};
use crate::airgap::{AirgapError, io_error};
use crate::cache::store::{BlobStore, FsStore, StoredManifest};
use crate::reference::Digest;

/// Where the layout's content is read from.
pub(super) enum Source {
    /// A layout directory, read in place.
    Dir(PathBuf),
    /// A tar, every blob of which was staged (and checked against its name) in one pass.
    Tar(HashMap<Digest, Staged>),
}

/// Everything found while walking the layout from `index.json`.
#[derive(Default)]
pub(super) struct Walk {
    /// Manifests in discovery order (parents before children).
    pub(super) manifests: Vec<(Digest, StoredManifest)>,
    pub(super) seen: HashSet<Digest>,
    /// Blobs the manifests name, each once, with where they were named.
    pub(super) pending: Vec<(Descriptor, String)>,
    pub(super) pending_seen: HashSet<Digest>,
    /// Blobs ready to commit: staged, or `None` when the cache already has them.
    pub(super) blobs: BTreeMap<Digest, Option<Staged>>,
    pub(super) problems: Vec<String>,
    pub(super) missing: Vec<String>,
}

/// The store and the layout being read.
pub(super) struct Importer {
    pub(super) store: Arc<FsStore>,
    pub(super) source: Source,
    pub(super) max_manifest: u64,
    /// Tar content that did not match its name (already reported).
    pub(super) bad: HashSet<Digest>,
    /// Blobs read and checked so far, for the live line.
    pub(super) progress: Arc<Progress>,
}

impl Importer {
    /// A manifest's bytes from the layout (`None` when it is not there).
    fn layout_manifest(&self, d: &Descriptor) -> Result<Option<Vec<u8>>, String> {
        let path = match &self.source {
            Source::Dir(root) => root.join(oci::blob_path(&d.digest)),
            Source::Tar(staged) => match staged.get(&d.digest) {
                Some(s) => s.path.clone(),
                None => return Ok(None),
            },
        };
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        if d.size > self.max_manifest {
            return Err(format!(
                "manifest {} is {} bytes, more than cache.max_manifest_size",
                d.digest, d.size
            ));
        }
        let mut buf = Vec::new();
        f.take(self.max_manifest + 1)
            .read_to_end(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Some(buf))
    }

    /// Walks the manifests under one `index.json` entry, checking each.
    pub(super) async fn walk(&self, entry: &Descriptor, w: &mut Walk) -> Result<(), AirgapError> {
        let mut stack = vec![(entry.clone(), "listed in index.json".to_owned(), 0)];
        while let Some((d, context, depth)) = stack.pop() {
            if self.bad.contains(&d.digest) || !w.seen.insert(d.digest.clone()) {
                continue;
            }
            let body = match self.layout_manifest(&d) {
                Ok(Some(b)) => Bytes::from(b),
                Ok(None) => {
                    match self
                        .store
                        .manifest(&d.digest)
                        .await
                        .map_err(io_error("reading the cache"))?
                    {
                        // Already cached: what it refers to is checked all the same.
                        Some(m) => children(&d, &m, depth, &mut stack, w),
                        None => w.missing.push(format!("manifest {} ({context})", d.digest)),
                    }
                    continue;
                }
                Err(why) => {
                    w.problems.push(why);
                    continue;
                }
            };
            let actual = Digest::of(d.digest.algorithm(), &body);
            if actual != d.digest {
                w.problems
                    .push(format!("{}: content hashes to {actual}", d.digest));
                continue;
            }
            if body.len() as u64 != d.size {
                w.problems.push(format!(
                    "{}: {} bytes, listed as {}",
                    d.digest,
                    body.len(),
                    d.size
                ));
                continue;
            }
            let media_type = match oci::manifest_media_type(&d.media_type, &body) {
                Ok(mt) => mt,
                Err(e) => {
                    w.problems.push(format!("manifest {}: {e}", d.digest));
                    continue;
                }
            };
            let m = StoredManifest { media_type, body };
            children(&d, &m, depth, &mut stack, w);
            w.manifests.push((d.digest.clone(), m));
        }
        Ok(())
    }

    /// Stages every pending blob the cache does not have yet, checking each.
    pub(super) async fn stage_blobs(&mut self, w: &mut Walk) -> Result<(), AirgapError> {
        let pending = std::mem::take(&mut w.pending);
        self.progress
            .restart(pending.len(), pending.iter().map(|(b, _)| b.size).sum());
        for (b, context) in pending {
            self.progress.bytes(b.size);
            self.progress.blob_done();
            if self.bad.contains(&b.digest) {
                continue;
            }
            let cached = self
                .store
                .blob_len(&b.digest)
                .await
                .map_err(io_error("reading the cache"))?;
            if cached == Some(b.size) {
                w.blobs.insert(b.digest, None);
                continue;
            }
            let staged = match &mut self.source {
                Source::Tar(staged) => match staged.remove(&b.digest) {
                    Some(s) if s.len == b.size => Some(s),
                    Some(s) => {
                        w.problems.push(format!(
                            "{}: {} bytes, listed as {}",
                            b.digest, s.len, b.size
                        ));
                        remove_staged([s]);
                        continue;
                    }
                    None => None,
                },
                Source::Dir(root) => {
                    let src = root.join(oci::blob_path(&b.digest));
                    let dest = self.store.staging_path(&format!("import-{}", b.digest));
                    let (digest, size) = (b.digest.clone(), b.size);
                    // Copying and hashing a large file is blocking work; awaited at once.
                    let r = tokio::task::spawn_blocking(move || {
                        let f = match File::open(&src) {
                            Ok(f) => f,
                            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                            Err(e) => return Err(StageError::Io(e)),
                        };
                        verify::stage(f, &dest, &digest, Some(size))
                            .map(|len| Some(Staged { path: dest, len }))
                    })
                    .await
                    .map_err(|e| AirgapError::Other(e.to_string()))?;
                    match r {
                        Ok(s) => s,
                        Err(StageError::Mismatch(why)) => {
                            w.problems.push(why);
                            continue;
                        }
                        Err(StageError::Io(e)) => {
                            return Err(io_error(format!("staging {}", b.digest))(e));
                        }
                    }
                }
            };
            match staged {
                Some(s) => {
                    w.blobs.insert(b.digest, Some(s));
                }
                None => w.missing.push(format!("blob {} {context}", b.digest)),
            }
        }
        Ok(())
    }

    /// Removes every staged file: what the walk took and what the tar left.
    pub(super) fn discard(&mut self, w: &mut Walk) {
        remove_staged(std::mem::take(&mut w.blobs).into_values().flatten());
        if let Source::Tar(staged) = &mut self.source {
            remove_staged(staged.drain().map(|(_, s)| s));
        }
    }
}

/// Queues an index's manifests, or notes an image's blobs.
fn children(
    d: &Descriptor,
    m: &StoredManifest,
    depth: usize,
    stack: &mut Vec<(Descriptor, String, usize)>,
    w: &mut Walk,
) {
    match oci::parse_manifest(&m.media_type, &m.body) {
        Err(e) => w.problems.push(format!("manifest {}: {e}", d.digest)),
        Ok(Node::Index(_)) if depth >= oci::MAX_DEPTH => w.problems.push(format!(
            "{}: indexes nested deeper than {}",
            d.digest,
            oci::MAX_DEPTH
        )),
        Ok(Node::Index(list)) => {
            for c in list {
                let context = format!("{} manifest of index {}", c.platform_text(), d.digest);
                stack.push((c, context, depth + 1));
            }
        }
        Ok(node @ Node::Image { .. }) => {
            for b in node.blobs() {
                if w.pending_seen.insert(b.digest.clone()) {
                    w.pending
                        .push((b.clone(), format!("of manifest {}", d.digest)));
                }
            }
        }
    }
}

//! OCI image layouts as tar files: writing one from an export plan, and reading one in a
//! single pass with every blob staged in the cache's `tmp/` while it is hashed. Paths in a
//! tar are only ever parsed (`blobs/<alg>/<hex>`), never extracted to.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use super::export::Plan;
use super::oci::{self, INDEX_FILE, LAYOUT_FILE, LAYOUT_MARKER};
use super::progress::Progress;
use super::verify::{self, Hashing, StageError, Staged, read_small, remove_staged};
use super::{AirgapError, io_error, write_error};
use crate::cache::store::{BlobStore, FsStore};
use crate::reference::Digest;

fn tar_header(kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn append_bytes(b: &mut tar::Builder<impl io::Write>, path: &str, data: &[u8]) -> io::Result<()> {
    let mut h = tar_header(tar::EntryType::Regular, data.len() as u64);
    b.append_data(&mut h, path, data)
}

/// Writes the plan as a tar of a layout, through `FILE.part` renamed into place at the end.
pub fn write_tar(plan: &Plan, file: &Path) -> Result<(), AirgapError> {
    let part = {
        let mut s = file.as_os_str().to_owned();
        s.push(".part");
        PathBuf::from(s)
    };
    let result = (|| -> Result<(), AirgapError> {
        let f = File::create(&part).map_err(write_error(&part))?;
        let mut b = tar::Builder::new(BufWriter::with_capacity(1 << 20, f));
        let werr = write_error(&part);
        let write = |r: io::Result<()>| r.map_err(write_error(&part));
        write(append_bytes(&mut b, LAYOUT_FILE, LAYOUT_MARKER))?;
        let mut dirs: Vec<String> = vec!["blobs/".into()];
        for d in plan.manifests.keys().chain(plan.blobs.keys()) {
            let dir = format!("blobs/{}/", d.algorithm().as_str());
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        for dir in &dirs {
            let mut h = tar_header(tar::EntryType::Directory, 0);
            write(b.append_data(&mut h, dir, io::empty()))?;
        }
        for (d, body) in &plan.manifests {
            write(append_bytes(&mut b, &oci::blob_path(d), body))?;
        }
        for (d, (path, len)) in &plan.blobs {
            let src = File::open(path).map_err(write_error(path))?;
            // The size in the header comes from the cache; a file that changed size since
            // would make a broken tar, so the count is checked with the hash.
            let mut reader = Hashing::new(io::Read::take(src, *len), d);
            let mut h = tar_header(tar::EntryType::Regular, *len);
            write(b.append_data(&mut h, oci::blob_path(d), &mut reader))?;
            reader
                .check(d, Some(*len))
                .map_err(|why| AirgapError::Corrupt(vec![format!("cached blob damaged: {why}")]))?;
            if let Some(p) = &plan.progress {
                p.bytes(*len);
                p.blob_done();
            }
        }
        let doc = oci::index_json(b"", &plan.entries)?;
        write(append_bytes(&mut b, INDEX_FILE, &doc))?;
        let w = b.into_inner().map_err(write_error(&part))?;
        let f = w.into_inner().map_err(|e| werr(e.into_error()))?;
        f.sync_all().map_err(write_error(&part))?;
        fs::rename(&part, file).map_err(write_error(file))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&part);
    }
    result
}

/// What a tar holds, its blobs staged.
pub struct TarContent {
    /// `oci-layout`, if present.
    pub marker: Option<Vec<u8>>,
    /// `index.json`, if present.
    pub index: Option<Vec<u8>>,
    /// Blobs staged, each checked against its name.
    pub staged: HashMap<Digest, Staged>,
    /// Blobs that were not what their names say, in words.
    pub corrupt: Vec<String>,
    /// Their digests.
    pub bad: HashSet<Digest>,
}

/// Reads a layout tar in one pass: `oci-layout` and `index.json` into memory, each
/// `blobs/<alg>/<hex>` staged while hashed. Paths are only ever parsed, never extracted to.
pub fn stage_tar(
    path: &Path,
    store: &FsStore,
    progress: &Progress,
) -> Result<TarContent, AirgapError> {
    let f = File::open(path).map_err(io_error(path.display().to_string()))?;
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(1 << 20, f));
    let mut content = TarContent {
        marker: None,
        index: None,
        staged: HashMap::new(),
        corrupt: Vec::new(),
        bad: HashSet::new(),
    };
    let result = (|| -> Result<(), AirgapError> {
        let terr = || io_error(format!("reading {}", path.display()));
        for entry in archive.entries().map_err(terr())? {
            let entry = entry.map_err(terr())?;
            if !matches!(
                entry.header().entry_type(),
                tar::EntryType::Regular | tar::EntryType::Continuous
            ) {
                continue;
            }
            let name = entry.path().map_err(terr())?.to_string_lossy().into_owned();
            let name = name.trim_start_matches("./");
            if name == LAYOUT_FILE {
                content.marker = Some(read_small(entry, LAYOUT_FILE)?);
            } else if name == INDEX_FILE {
                content.index = Some(read_small(entry, INDEX_FILE)?);
            } else if let Some(d) = oci::digest_of_path(name) {
                if content.staged.contains_key(&d) || content.bad.contains(&d) {
                    continue;
                }
                let dest = store.staging_path(&format!("import-{d}"));
                let size = entry.header().size().map_err(terr())?;
                match verify::stage(entry, &dest, &d, Some(size)) {
                    Ok(len) => {
                        progress.bytes(len);
                        progress.blob_done();
                        content.staged.insert(d, Staged { path: dest, len });
                    }
                    Err(StageError::Mismatch(why)) => {
                        content.corrupt.push(why);
                        content.bad.insert(d);
                    }
                    Err(StageError::Io(e)) => return Err(io_error(dest.display().to_string())(e)),
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        remove_staged(content.staged.into_values());
        return Err(e);
    }
    Ok(content)
}

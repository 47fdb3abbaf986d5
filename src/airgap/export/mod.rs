//! `regcache export`: reads cached images straight from a cache folder (no server needed; it
//! only reads, so a regcache may be serving the folder meanwhile) and writes them as an OCI
//! image layout: a directory, or a tar when the output ends in `.tar`.
//!
//! All or nothing: when an image cannot be exported whole, nothing is written (unless
//! `--allow-partial`, which leaves out what is missing and says so). Every blob is hashed
//! again on its way out, so a damaged cache file never reaches a layout.
//!
//! Each image's referrers (signatures, SBOMs, attestations: cached manifests whose `subject`
//! is one of the image's manifests, and their own referrers in turn) go with it, unless
//! `--no-referrers`: listed in `index.json` without a ref name, with their blobs.

mod dir;
mod gather;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::archive::write_tar;
use super::name::ImageName;
use super::oci::{self, Descriptor};
use super::progress::human_bytes;
use super::{AirgapError, io_error};
use crate::cache::layout::Layout;
use crate::cache::store::{FsStore, TagRecord};
use crate::config::Config;
use crate::reference::Digest;
use crate::rewrite::RoutingTable;
pub use dir::write_dir;
pub use gather::cached_subjects;
use gather::{add_image, add_referrers};

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportArgs {
    /// Images as clients name them through regcache.
    pub images: Vec<ImageName>,
    /// A directory, or a tar file when it ends in `.tar`.
    pub output: PathBuf,
    /// Leave out what is not cached instead of failing.
    pub allow_partial: bool,
    /// Also write each image's cached referrers with their blobs.
    pub referrers: bool,
}

/// Cached referrers by subject digest.
pub type Subjects = HashMap<Digest, Vec<Digest>>;

/// Everything a layout will hold.
#[derive(Debug, Default, Clone)]
pub struct Plan {
    /// `index.json` entries, one per image, with ref names.
    pub entries: Vec<Descriptor>,
    /// Manifests by digest, exact bytes.
    pub manifests: BTreeMap<Digest, Bytes>,
    /// Blobs by digest: the file holding it and its size.
    pub blobs: BTreeMap<Digest, (PathBuf, u64)>,
    /// Told of each blob written, when set.
    pub progress: Option<std::sync::Arc<super::progress::Progress>>,
}

impl Plan {
    /// Bytes of blobs and manifests.
    pub fn bytes(&self) -> u64 {
        self.blobs.values().map(|(_, l)| l).sum::<u64>()
            + self.manifests.values().map(|m| m.len() as u64).sum::<u64>()
    }
}

/// The tag record to export when a tag has several (one per kind of client): an index
/// first, since it holds every platform, then the record for the widest `Accept`.
pub fn choose_record(records: &[(u8, TagRecord)]) -> Option<&TagRecord> {
    records
        .iter()
        .max_by_key(|(key, r)| (oci::is_index(&r.media_type), key.count_ones(), *key))
        .map(|(_, r)| r)
}

/// Runs the command. `Ok(false)` when an image could not be exported (nothing written).
pub async fn run(config: &Config, args: ExportArgs) -> Result<bool, AirgapError> {
    let store = FsStore::open_shared(&config.cache_dir)
        .map_err(io_error(config.cache_dir.display().to_string()))?;
    let table = RoutingTable::new(config);
    let subjects = if args.referrers {
        let layout = Layout::new(&config.cache_dir);
        // Reads every cached manifest once: blocking file work, awaited.
        tokio::task::spawn_blocking(move || cached_subjects(&layout))
            .await
            .map_err(|e| AirgapError::Other(e.to_string()))?
            .map_err(store_error)?
    } else {
        Subjects::new()
    };
    let mut plan = Plan::default();
    let mut lines = Vec::new();
    let mut failed = 0;
    for name in &args.images {
        let added = add_image(&store, &table, name, args.allow_partial, &mut plan).await;
        let added = match added {
            Ok((line, manifests)) => add_referrers(
                &store,
                &subjects,
                name,
                manifests,
                args.allow_partial,
                &mut plan,
            )
            .await
            .map(|n| match n {
                0 => line,
                n => format!("{line}, {}", crate::units::count(n as u64, "referrer")),
            }),
            Err(e) => Err(e),
        };
        match added {
            Ok(line) => lines.push(line),
            Err(e) => {
                failed += 1;
                eprintln!("{name}: {e}");
            }
        }
    }
    if failed > 0 {
        eprintln!(
            "export: nothing written: {failed} of {} images cannot be exported",
            args.images.len()
        );
        return Ok(false);
    }
    let out = args.output.clone();
    let mut plan = plan;
    let progress = std::sync::Arc::new(super::progress::Progress::new(
        "export",
        plan.blobs.len(),
        plan.blobs.values().map(|(_, l)| l).sum(),
    ));
    plan.progress = Some(progress.clone());
    let images = plan
        .entries
        .iter()
        .filter(|e| e.ref_name().is_some())
        .count();
    let referrers = plan.entries.len() - images;
    let summary = format!(
        "export: {}{}, {}, {}, {} written to {}",
        crate::units::count(images as u64, "image"),
        if referrers > 0 {
            format!(", {}", crate::units::count(referrers as u64, "referrer"))
        } else {
            String::new()
        },
        crate::units::count(plan.manifests.len() as u64, "manifest"),
        crate::units::count(plan.blobs.len() as u64, "blob"),
        human_bytes(plan.bytes()),
        out.display()
    );
    // Plain file copying with hashing: on a blocking thread, awaited to the end (an
    // interrupted write leaves only `.partial`/`.part` files, never an index.json).
    tokio::task::spawn_blocking(move || {
        if is_tar(&out) {
            write_tar(&plan, &out)
        } else {
            write_dir(&plan, &out)
        }
    })
    .await
    .map_err(|e| AirgapError::Other(e.to_string()))??;
    progress.clear();
    for l in lines {
        println!("{l}");
    }
    println!("{summary}");
    Ok(true)
}

/// Whether an output path names a tar file.
pub fn is_tar(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("tar"))
}

fn store_error(e: io::Error) -> AirgapError {
    AirgapError::Io {
        context: "reading the cache".into(),
        source: e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media;

    #[test]
    fn the_richest_tag_record_is_exported() {
        let rec = |mt: &str, b: &[u8]| TagRecord {
            digest: Digest::sha256(b),
            media_type: mt.into(),
        };
        let records = vec![
            (0b00_1000, rec(media::DOCKER_V2, b"amd64 only")),
            (0b01_1111, rec(media::OCI_INDEX, b"index")),
            (0b11_1111, rec(media::OCI_INDEX, b"index")),
        ];
        assert_eq!(
            choose_record(&records).unwrap().digest,
            Digest::sha256(b"index")
        );
        let single = vec![
            (0b00_1000, rec(media::DOCKER_V2, b"a")),
            (0b00_1010, rec(media::OCI_MANIFEST, b"b")),
        ];
        assert_eq!(choose_record(&single).unwrap().digest, Digest::sha256(b"b"));
        assert!(choose_record(&[]).is_none());
    }

    #[test]
    fn tar_outputs_are_recognised() {
        assert!(is_tar(Path::new("/x/images.tar")));
        assert!(is_tar(Path::new("images.TAR")));
        assert!(!is_tar(Path::new("/x/layout")));
        assert!(!is_tar(Path::new("/x/images.tar.gz")));
    }
}

//! `regcache export`: reads cached images straight from a cache folder (no server needed; it
//! only reads, so a regcache may be serving the folder meanwhile) and writes them as an OCI
//! image layout: a directory, or a tar when the output ends in `.tar`.
//!
//! All or nothing: when an image cannot be exported whole, nothing is written (unless
//! `--allow-partial`, which leaves out what is missing and says so). Every blob is hashed
//! again on its way out, so a damaged cache file never reaches a layout.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::archive::write_tar;
use super::name::{self, ImageName};
use super::oci::{self, Descriptor, INDEX_FILE, LAYOUT_FILE, LAYOUT_MARKER, Node};
use super::progress::human_bytes;
use super::verify::{self, StageError};
use super::{AirgapError, io_error, write_error};
use crate::cache::store::{BlobStore, FsStore, TagRecord};
use crate::config::Config;
use crate::reference::{Digest, Reference};
use crate::rewrite::RoutingTable;

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportArgs {
    /// Images as clients name them through regcache.
    pub images: Vec<ImageName>,
    /// A directory, or a tar file when it ends in `.tar`.
    pub output: PathBuf,
    /// Leave out what is not cached instead of failing.
    pub allow_partial: bool,
}

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
    let mut plan = Plan::default();
    let mut lines = Vec::new();
    let mut failed = 0;
    for name in &args.images {
        match add_image(&store, &table, name, args.allow_partial, &mut plan).await {
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
    let summary = format!(
        "export: {}, {}, {}, {} written to {}",
        crate::units::count(plan.entries.len() as u64, "image"),
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

/// Adds one image to the plan; returns its result line.
async fn add_image(
    store: &FsStore,
    table: &RoutingTable,
    name: &ImageName,
    allow_partial: bool,
    plan: &mut Plan,
) -> Result<String, AirgapError> {
    let r = name.resolve(table)?;
    let upstream = table.name(r.upstream);
    let digest = match &r.reference {
        Reference::Digest(d) => d.clone(),
        Reference::Tag(t) => {
            let records: Vec<(u8, TagRecord)> = store
                .tags_of(upstream, &r.repository)
                .await
                .map_err(store_error)?
                .into_iter()
                .filter(|(tag, _, _)| tag == t)
                .map(|(_, k, rec)| (k, rec))
                .collect();
            choose_record(&records)
                .ok_or_else(|| {
                    AirgapError::Missing(vec![format!(
                        "tag {t} of {upstream}/{} is not cached (prefetch it first)",
                        r.repository
                    )])
                })?
                .digest
                .clone()
        }
    };
    let top = store
        .manifest(&digest)
        .await
        .map_err(store_error)?
        .ok_or_else(|| AirgapError::Missing(vec![format!("manifest {digest} is not cached")]))?;
    let (mut missing, mut corrupt) = (Vec::new(), Vec::new());
    let mut stack = vec![(digest.clone(), top.clone(), 0)];
    while let Some((d, m, depth)) = stack.pop() {
        let node = oci::parse_manifest(&m.media_type, &m.body)?;
        plan.manifests.insert(d.clone(), m.body);
        match node {
            Node::Index(children) => {
                if depth >= oci::MAX_DEPTH {
                    return Err(AirgapError::Other(format!(
                        "{d}: indexes nested deeper than {}",
                        oci::MAX_DEPTH
                    )));
                }
                for c in children {
                    match store.manifest(&c.digest).await.map_err(store_error)? {
                        Some(cm) => stack.push((c.digest.clone(), cm, depth + 1)),
                        None => missing.push(format!(
                            "{} manifest {} of index {d}",
                            c.platform_text(),
                            c.digest
                        )),
                    }
                }
            }
            node @ Node::Image { .. } => {
                for b in node.blobs() {
                    match store.blob_len(&b.digest).await.map_err(store_error)? {
                        Some(len) if len == b.size => {
                            plan.blobs
                                .insert(b.digest.clone(), (store.blob_path(&b.digest), len));
                        }
                        Some(len) => corrupt.push(format!(
                            "blob {} of manifest {d}: {len} bytes cached, listed as {}",
                            b.digest, b.size
                        )),
                        None => missing.push(format!("blob {} of manifest {d}", b.digest)),
                    }
                }
            }
        }
    }
    if !corrupt.is_empty() {
        return Err(AirgapError::Corrupt(corrupt));
    }
    if !missing.is_empty() {
        if !allow_partial {
            return Err(AirgapError::Missing(missing));
        }
        for m in &missing {
            eprintln!("{name}: left out (not cached): {m}");
        }
    }
    let ref_name = name::ref_name(table, name, &r);
    plan.entries.push(Descriptor::named(
        &top.media_type,
        digest.clone(),
        top.body.len() as u64,
        &ref_name,
    ));
    Ok(format!("{name}: {digest} as {ref_name}"))
}

fn stage_error(e: StageError, path: &Path) -> AirgapError {
    match e {
        StageError::Io(source) => AirgapError::Io {
            context: format!("writing {}", path.display()),
            source,
        },
        StageError::Mismatch(why) => {
            AirgapError::Corrupt(vec![format!("cached blob damaged: {why}")])
        }
    }
}

/// Writes the plan as a layout directory. An existing layout there keeps its content and
/// entries, except entries with a ref name the plan has; `index.json` is written last, so
/// an interrupted export never looks complete.
pub fn write_dir(plan: &Plan, dir: &Path) -> Result<(), AirgapError> {
    fs::create_dir_all(dir).map_err(write_error(dir))?;
    let marker = dir.join(LAYOUT_FILE);
    let index = dir.join(INDEX_FILE);
    let existing = if marker.exists() {
        oci::check_marker(&fs::read(&marker).map_err(write_error(&marker))?)?;
        match fs::read(&index) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(write_error(&index)(e)),
        }
    } else {
        if fs::read_dir(dir)
            .map_err(write_error(dir))?
            .next()
            .is_some()
        {
            return Err(AirgapError::Other(format!(
                "{} is not empty and not an OCI layout",
                dir.display()
            )));
        }
        Vec::new()
    };
    let content = plan
        .manifests
        .iter()
        .map(|(d, body)| (d, None, Some(body)))
        .chain(
            plan.blobs
                .iter()
                .map(|(d, (path, len))| (d, Some((path, *len)), None)),
        );
    for (d, source, body) in content {
        let dest = dir.join(oci::blob_path(d));
        let want_len = source.map_or_else(|| body.map_or(0, |b| b.len() as u64), |(_, l)| l);
        // Content-addressed: a file of the right size is the same content.
        if fs::metadata(&dest).is_ok_and(|m| m.len() == want_len) {
            continue;
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(write_error(parent))?;
        }
        let tmp = dest.with_file_name(format!(".{}.partial", d.hex()));
        let staged = match (source, body) {
            (Some((path, len)), _) => {
                let src = File::open(path).map_err(write_error(path))?;
                verify::stage(src, &tmp, d, Some(len))
            }
            (None, Some(body)) => verify::stage(&body[..], &tmp, d, Some(want_len)),
            (None, None) => continue,
        };
        staged.map_err(|e| stage_error(e, &dest))?;
        fs::rename(&tmp, &dest).map_err(write_error(&dest))?;
        if let (Some(p), Some(_)) = (&plan.progress, source) {
            p.bytes(want_len);
            p.blob_done();
        }
    }
    if !marker.exists() {
        verify::write_file(&marker, LAYOUT_MARKER).map_err(write_error(&marker))?;
    }
    let doc = oci::index_json(&existing, &plan.entries)?;
    verify::write_file(&index, &doc).map_err(write_error(&index))?;
    Ok(())
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

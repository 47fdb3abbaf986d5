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

use std::collections::{BTreeMap, HashMap, HashSet};
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
use crate::cache::layout::{Area, Item, Layout};
use crate::cache::store::{BlobStore, FsStore, StoredManifest, TagRecord};
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

/// Every cached manifest that names a `subject`, by subject. Unreadable or unparsable
/// manifests are skipped (this only finds candidates: each is read and verified again
/// through the store when exported).
pub fn cached_subjects(layout: &Layout) -> io::Result<Subjects> {
    let mut manifests = Vec::new();
    layout.walk(&[Area::Content], &mut |e| {
        if let Item::Content((crate::cache::budget::EntryKind::Manifest, d)) = e.item {
            manifests.push((d, e.path));
        }
    })?;
    let mut subjects = Subjects::new();
    for (d, path) in manifests {
        let Ok(raw) = fs::read(&path) else {
            continue;
        };
        // The first line is the media type.
        let Some(nl) = raw.iter().position(|b| *b == b'\n') else {
            continue;
        };
        if let Some(subject) = crate::cache::referrers::subject_of(&raw[nl + 1..]) {
            subjects.entry(subject).or_default().push(d);
        }
    }
    for list in subjects.values_mut() {
        list.sort();
    }
    Ok(subjects)
}

/// Adds one image to the plan; returns its result line and the digests of its manifests.
async fn add_image(
    store: &FsStore,
    table: &RoutingTable,
    name: &ImageName,
    allow_partial: bool,
    plan: &mut Plan,
) -> Result<(String, Vec<Digest>), AirgapError> {
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
    let mut gaps = Gaps::default();
    let manifests = add_tree(store, &digest, top.clone(), plan, &mut gaps).await?;
    gaps.check(name, allow_partial)?;
    let ref_name = name::ref_name(table, name, &r);
    plan.entries.push(Descriptor::named(
        &top.media_type,
        digest.clone(),
        top.body.len() as u64,
        &ref_name,
    ));
    Ok((format!("{name}: {digest} as {ref_name}"), manifests))
}

/// What a manifest tree lacks in the cache.
#[derive(Default)]
struct Gaps {
    missing: Vec<String>,
    corrupt: Vec<String>,
}

impl Gaps {
    /// Fails on damaged content, and on missing content unless `allow_partial` (then each
    /// piece left out is named).
    fn check(self, name: &ImageName, allow_partial: bool) -> Result<(), AirgapError> {
        if !self.corrupt.is_empty() {
            return Err(AirgapError::Corrupt(self.corrupt));
        }
        if !self.missing.is_empty() {
            if !allow_partial {
                return Err(AirgapError::Missing(self.missing));
            }
            for m in &self.missing {
                eprintln!("{name}: left out (not cached): {m}");
            }
        }
        Ok(())
    }
}

/// Adds a manifest, and everything below it, to the plan: an index's manifests, an image's
/// blobs. Returns the digests of the manifests added.
async fn add_tree(
    store: &FsStore,
    digest: &Digest,
    top: StoredManifest,
    plan: &mut Plan,
    gaps: &mut Gaps,
) -> Result<Vec<Digest>, AirgapError> {
    let mut added = Vec::new();
    let mut stack = vec![(digest.clone(), top, 0)];
    while let Some((d, m, depth)) = stack.pop() {
        let node = oci::parse_manifest(&m.media_type, &m.body)?;
        plan.manifests.insert(d.clone(), m.body);
        added.push(d.clone());
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
                        None => gaps.missing.push(format!(
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
                        Some(len) => gaps.corrupt.push(format!(
                            "blob {} of manifest {d}: {len} bytes cached, listed as {}",
                            b.digest, b.size
                        )),
                        None => gaps
                            .missing
                            .push(format!("blob {} of manifest {d}", b.digest)),
                    }
                }
            }
        }
    }
    Ok(added)
}

/// Adds the cached referrers of `manifests` (and theirs, up to [`oci::MAX_DEPTH`] levels) to
/// the plan, each as an `index.json` entry without a ref name. Returns how many were added.
/// A referrer regcache cannot read as a manifest is left out and named; its missing or
/// damaged blobs fail the image like the image's own.
async fn add_referrers(
    store: &FsStore,
    subjects: &Subjects,
    name: &ImageName,
    manifests: Vec<Digest>,
    allow_partial: bool,
    plan: &mut Plan,
) -> Result<usize, AirgapError> {
    let mut seen: HashSet<Digest> = manifests.iter().cloned().collect();
    let mut queue: Vec<(Digest, usize)> = manifests.into_iter().map(|d| (d, 0)).collect();
    let mut gaps = Gaps::default();
    let mut added = 0;
    while let Some((subject, depth)) = queue.pop() {
        if depth >= oci::MAX_DEPTH {
            continue;
        }
        for r in subjects.get(&subject).into_iter().flatten() {
            if !seen.insert(r.clone()) {
                continue;
            }
            let Some(m) = store.manifest(r).await.map_err(store_error)? else {
                gaps.missing.push(format!("referrer {r} of {subject}"));
                continue;
            };
            if let Err(e) = oci::parse_manifest(&m.media_type, &m.body) {
                eprintln!("{name}: left out: referrer {r} of {subject}: {e}");
                continue;
            }
            let artifact_type =
                crate::cache::referrers::descriptor(r, &m.media_type, &m.body)["artifactType"]
                    .as_str()
                    .map(str::to_owned);
            let entry =
                Descriptor::unnamed(&m.media_type, r.clone(), m.body.len() as u64, artifact_type);
            for d in add_tree(store, r, m, plan, &mut gaps).await? {
                seen.insert(d.clone());
                queue.push((d, depth + 1));
            }
            if !plan
                .entries
                .iter()
                .any(|e| e.digest == *r && e.ref_name().is_none())
            {
                plan.entries.push(entry);
                added += 1;
            }
        }
    }
    gaps.check(name, allow_partial)?;
    Ok(added)
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

    /// Puts a manifest in the store; its digest.
    async fn put(store: &FsStore, v: serde_json::Value) -> Digest {
        let body = Bytes::from(serde_json::to_vec(&v).unwrap());
        let d = Digest::sha256(&body);
        let m = StoredManifest {
            media_type: media::OCI_MANIFEST.into(),
            body,
        };
        store.put_manifest(&d, &m).await.unwrap();
        d
    }

    async fn put_blob(store: &FsStore, data: &[u8]) -> serde_json::Value {
        let d = Digest::sha256(data);
        let staged = store.staging_path("blob");
        fs::write(&staged, data).unwrap();
        store.commit_blob(&d, &staged).await.unwrap();
        serde_json::json!({"mediaType": "x/y", "digest": d.to_string(), "size": data.len()})
    }

    /// An image, an SBOM of it and a signature of the SBOM are found through the cached
    /// manifests' subjects; a manifest file that is not JSON is skipped.
    #[tokio::test]
    async fn referrers_are_found_by_subject_recursively() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).await.unwrap();
        let config = put_blob(&store, b"{}").await;
        let image = put(
            &store,
            serde_json::json!({"schemaVersion": 2, "config": config, "layers": []}),
        )
        .await;
        let subject = |d: &Digest| serde_json::json!({"digest": d.to_string(), "size": 1});
        let sbom_blob = put_blob(&store, b"sbom").await;
        let sbom = put(
            &store,
            serde_json::json!({"schemaVersion": 2, "artifactType": "application/spdx+json",
                "config": config, "layers": [sbom_blob], "subject": subject(&image)}),
        )
        .await;
        let sig_blob = put_blob(&store, b"sig").await;
        let sig = put(
            &store,
            serde_json::json!({"schemaVersion": 2, "config": config,
                "layers": [sig_blob], "subject": subject(&sbom)}),
        )
        .await;
        let junk = Layout::new(dir.path()).manifest(&Digest::sha256(b"junk"));
        fs::create_dir_all(junk.parent().unwrap()).unwrap();
        fs::write(&junk, b"x/y\n{\"subject\": not json").unwrap();

        let subjects = cached_subjects(&Layout::new(dir.path())).unwrap();
        assert_eq!(subjects.len(), 2, "{subjects:?}");
        assert_eq!(subjects[&image], vec![sbom.clone()]);
        assert_eq!(subjects[&sbom], vec![sig.clone()]);

        let name: ImageName = "app:1".parse().unwrap();
        let mut plan = Plan::default();
        let n = add_referrers(
            &store,
            &subjects,
            &name,
            vec![image.clone()],
            false,
            &mut plan,
        )
        .await
        .unwrap();
        assert_eq!(n, 2);
        let listed: Vec<(&Digest, Option<&str>)> = plan
            .entries
            .iter()
            .map(|e| (&e.digest, e.artifact_type.as_deref()))
            .collect();
        assert_eq!(
            listed,
            vec![(&sbom, Some("application/spdx+json")), (&sig, Some("x/y"))]
        );
        assert!(plan.entries.iter().all(|e| e.ref_name().is_none()));
        assert!(plan.blobs.contains_key(&Digest::sha256(b"sig")));
        // Again for another image naming the same subject: no second entry.
        let again = add_referrers(
            &store,
            &subjects,
            &name,
            vec![image.clone()],
            false,
            &mut plan,
        );
        assert_eq!(again.await.unwrap(), 0);

        // A referrer's blob that is not cached fails the image unless partial is allowed.
        store.remove_content(&Digest::sha256(b"sig")).await.unwrap();
        let mut plan = Plan::default();
        let e = add_referrers(
            &store,
            &subjects,
            &name,
            vec![image.clone()],
            false,
            &mut plan,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, AirgapError::Missing(_)), "{e}");
        let mut plan = Plan::default();
        let n = add_referrers(&store, &subjects, &name, vec![image], true, &mut plan)
            .await
            .unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn tar_outputs_are_recognised() {
        assert!(is_tar(Path::new("/x/images.tar")));
        assert!(is_tar(Path::new("images.TAR")));
        assert!(!is_tar(Path::new("/x/layout")));
        assert!(!is_tar(Path::new("/x/images.tar.gz")));
    }
}

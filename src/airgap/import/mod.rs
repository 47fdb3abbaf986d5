//! `regcache import`: loads an OCI image layout (a directory or a tar) into a cache folder so
//! that an offline regcache serves its images by tag and by digest.
//!
//! Everything is checked before anything lands: each blob is staged in the cache's `tmp/`
//! while it is hashed, each manifest is hashed and parsed, and each ref name routed. Only when
//! all of it holds is the content committed through the store (blobs, then manifests
//! children first, then tag records); otherwise the staged files are removed and every
//! problem is reported.
//!
//! Ref names are image names as `prefetch` takes them (`docker.io/library/alpine:3.20`,
//! `alpine:3.20`). A ref name that is only a tag (`3.20`, as `skopeo copy … oci:DIR:3.20`
//! writes) needs `--repository NAME` to say which image it is; an entry without a ref name,
//! or with a digest one, brings content only.

mod commit;
mod target;
mod walk;

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use super::archive::stage_tar;
use super::name::ImageName;
use super::oci::{self, Descriptor, INDEX_FILE, LAYOUT_FILE};
use super::progress::{Progress, human_bytes};
use super::verify::read_small;
use super::{AirgapError, io_error};
use crate::cache::layout::Layout;
use crate::cache::store::FsStore;
use crate::config::Config;
use crate::reference::Digest;
use crate::rewrite::RoutingTable;
use commit::commit;
pub use target::{TagTarget, target_of};
use walk::{Importer, Source, Walk};

/// What to import.
#[derive(Debug, Clone)]
pub struct ImportArgs {
    /// A layout directory or a tar of one.
    pub path: PathBuf,
    /// The image that ref names which are only a tag belong to.
    pub repository: Option<ImageName>,
    /// Import even when content the layout refers to is missing from it.
    pub allow_partial: bool,
}

/// What an import did.
#[derive(Debug, Default)]
pub struct Report {
    /// Per `index.json` entry: its ref name (or digest), digest and the tag recorded.
    pub entries: Vec<(String, Digest, Option<TagTarget>)>,
    /// Manifests in the layout's images.
    pub manifests: usize,
    /// Blobs in the layout's images.
    pub blobs: usize,
    /// Blobs the cache did not have before.
    pub new_blobs: usize,
    /// Their bytes.
    pub new_bytes: u64,
    /// What was missing and left out (`--allow-partial`).
    pub left_out: Vec<String>,
}

/// Imports the layout at `args.path` into `store`: checks everything, then commits it all.
pub async fn import(
    store: Arc<FsStore>,
    table: &RoutingTable,
    args: &ImportArgs,
    max_manifest: u64,
) -> Result<Report, AirgapError> {
    let progress = Arc::new(Progress::of_bytes("import", 0));
    import_with(store, table, args, max_manifest, progress).await
}

/// [`import`], counting the blobs read and checked on `progress`: first the tar's one pass
/// (against the tar's size), then every blob the layout refers to.
pub async fn import_with(
    store: Arc<FsStore>,
    table: &RoutingTable,
    args: &ImportArgs,
    max_manifest: u64,
    progress: Arc<Progress>,
) -> Result<Report, AirgapError> {
    let path = args.path.clone();
    let (source, marker, index, corrupt, bad) = if path.is_dir() {
        let read = |name: &str| -> Result<Option<Vec<u8>>, AirgapError> {
            match File::open(path.join(name)) {
                Ok(f) => read_small(f, name).map(Some),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_error(path.join(name).display().to_string())(e)),
            }
        };
        let (marker, index) = (read(LAYOUT_FILE)?, read(INDEX_FILE)?);
        (
            Source::Dir(path.clone()),
            marker,
            index,
            Vec::new(),
            HashSet::new(),
        )
    } else {
        let st = store.clone();
        let p = path.clone();
        let pr = progress.clone();
        // One sequential pass over the tar (the `tar` crate is synchronous), awaited.
        let c = tokio::task::spawn_blocking(move || stage_tar(&p, &st, &pr))
            .await
            .map_err(|e| AirgapError::Other(e.to_string()))??;
        (Source::Tar(c.staged), c.marker, c.index, c.corrupt, c.bad)
    };
    let mut importer = Importer {
        store,
        source,
        max_manifest,
        bad,
        progress,
    };
    let mut w = Walk {
        problems: corrupt,
        ..Walk::default()
    };
    let result = check(&mut importer, &mut w, table, args, marker, index).await;
    let targets = match result {
        Ok(t) if w.problems.is_empty() && (w.missing.is_empty() || args.allow_partial) => t,
        Ok(_) => {
            importer.discard(&mut w);
            let mut problems = std::mem::take(&mut w.problems);
            problems.extend(w.missing.iter().map(|m| format!("missing {m}")));
            return Err(AirgapError::Rejected(problems));
        }
        Err(e) => {
            importer.discard(&mut w);
            return Err(e);
        }
    };
    let committed = commit(&importer, &mut w, targets).await;
    importer.discard(&mut w);
    let mut report = committed?;
    report.left_out = w.missing;
    Ok(report)
}

/// Reads the layout files, routes the ref names, walks and stages everything.
async fn check(
    importer: &mut Importer,
    w: &mut Walk,
    table: &RoutingTable,
    args: &ImportArgs,
    marker: Option<Vec<u8>>,
    index: Option<Vec<u8>>,
) -> Result<Vec<(Descriptor, Option<TagTarget>)>, AirgapError> {
    let shown = args.path.display();
    let marker =
        marker.ok_or_else(|| AirgapError::Other(format!("{shown}: no {LAYOUT_FILE} file")))?;
    oci::check_marker(&marker)?;
    let index = index.ok_or_else(|| AirgapError::Other(format!("{shown}: no {INDEX_FILE}")))?;
    let entries = oci::parse_index(&index)?;
    if entries.is_empty() {
        return Err(AirgapError::Other(format!(
            "{shown}: {INDEX_FILE} lists nothing"
        )));
    }
    let mut targets = Vec::new();
    for e in &entries {
        match target_of(e, table, args.repository.as_ref()) {
            Ok(t) => targets.push((e.clone(), t)),
            Err(err) => w.problems.push(err.to_string()),
        }
    }
    for e in &entries {
        importer.walk(e, w).await?;
    }
    importer.stage_blobs(w).await?;
    Ok(targets)
}

/// Runs the command: one line per `index.json` entry, then totals. `Ok(false)` when the
/// layout was refused.
pub async fn run(config: &Config, args: ImportArgs) -> Result<bool, AirgapError> {
    let context = format!("cache_dir {}", config.cache_dir.display());
    // An existing cache is opened as `regcache gc` opens it, leaving `tmp/` alone, so an
    // offline regcache serving the folder keeps running; a new one is created.
    let store = if Layout::new(&config.cache_dir).exists() {
        FsStore::open_shared(&config.cache_dir).map_err(io_error(context))?
    } else {
        FsStore::open(&config.cache_dir)
            .await
            .map_err(io_error(context))?
    };
    let table = RoutingTable::new(config);
    let max_manifest = config.cache.max_manifest_size.0;
    // Against the tar's size for its one pass; a directory's blobs are counted when known.
    let tar_len = match std::fs::metadata(&args.path) {
        Ok(m) if m.is_file() => m.len(),
        _ => 0,
    };
    let progress = Arc::new(Progress::of_bytes("import", tar_len));
    let result = import_with(
        Arc::new(store),
        &table,
        &args,
        max_manifest,
        progress.clone(),
    )
    .await;
    progress.clear();
    match result {
        Ok(r) => {
            for m in &r.left_out {
                eprintln!("import: left out (not in the layout): {m}");
            }
            for (label, digest, target) in &r.entries {
                match target {
                    Some(t) => println!(
                        "{label}: {digest}, tag {} of {}/{}",
                        t.tag, t.upstream, t.repository
                    ),
                    None => println!("{label}: {digest}, content only (no tag)"),
                }
            }
            println!(
                "import: {}, {} ({} new, {}) into {}",
                crate::units::count(r.manifests as u64, "manifest"),
                crate::units::count(r.blobs as u64, "blob"),
                r.new_blobs,
                human_bytes(r.new_bytes),
                config.cache_dir.display()
            );
            Ok(true)
        }
        Err(AirgapError::Rejected(problems)) => {
            for p in &problems {
                eprintln!("import: {p}");
            }
            eprintln!(
                "import: {} refused, nothing imported (problems: {})",
                args.path.display(),
                problems.len()
            );
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use bytes::Bytes;

    use super::*;
    use crate::airgap::archive::write_tar;
    use crate::airgap::export::{Plan, write_dir};
    use crate::cache::store::{BlobStore, TagKey};
    use crate::config::Config;
    use crate::media;
    use crate::reference::Repository;

    /// A two-platform image: index → two manifests → a config and a layer each (one layer
    /// shared), as a plan whose blobs are files in `src`.
    struct Fixture {
        _src: tempfile::TempDir,
        plan: Plan,
        index: Digest,
        layers: Vec<Digest>,
    }

    fn fixture(ref_name: &str) -> Fixture {
        let src = tempfile::tempdir().unwrap();
        let mut plan = Plan::default();
        let mut blob = |data: &[u8]| {
            let d = Digest::sha256(data);
            let p = src.path().join(d.hex());
            fs::write(&p, data).unwrap();
            plan.blobs.insert(d.clone(), (p, data.len() as u64));
            serde_json::json!({"mediaType": "application/octet-stream", "digest": d.to_string(), "size": data.len()})
        };
        let shared = blob(b"shared layer");
        let mut children = Vec::new();
        let mut manifests = Vec::new();
        for arch in ["amd64", "arm64"] {
            let config = blob(format!("config {arch}").as_bytes());
            let own = blob(format!("layer {arch}").as_bytes());
            let m = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2, "mediaType": media::OCI_MANIFEST,
                "config": config, "layers": [shared.clone(), own],
            }))
            .unwrap();
            let d = Digest::sha256(&m);
            children.push(serde_json::json!({
                "mediaType": media::OCI_MANIFEST, "digest": d.to_string(), "size": m.len(),
                "platform": {"os": "linux", "architecture": arch},
            }));
            manifests.push((d, Bytes::from(m)));
        }
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": children,
        }))
        .unwrap();
        let index_digest = Digest::sha256(&index);
        plan.entries.push(Descriptor::named(
            media::OCI_INDEX,
            index_digest.clone(),
            index.len() as u64,
            ref_name,
        ));
        plan.manifests
            .insert(index_digest.clone(), Bytes::from(index));
        plan.manifests.extend(manifests);
        let layers = ["shared layer", "layer amd64", "layer arm64"]
            .iter()
            .map(|l| Digest::sha256(l.as_bytes()))
            .collect();
        Fixture {
            _src: src,
            plan,
            index: index_digest,
            layers,
        }
    }

    fn table() -> RoutingTable {
        RoutingTable::new(&Config::default().validate().unwrap())
    }

    fn args(path: &Path) -> ImportArgs {
        ImportArgs {
            path: path.to_owned(),
            repository: None,
            allow_partial: false,
        }
    }

    async fn store() -> (tempfile::TempDir, Arc<FsStore>) {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStore::open(dir.path()).await.unwrap();
        (dir, Arc::new(s))
    }

    /// Every file under `dir` (relative paths), for "nothing landed" checks.
    fn files(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                    out.push(rel);
                }
            }
        }
        out.sort();
        out
    }

    async fn assert_imported(store: &FsStore, f: &Fixture) {
        assert!(store.manifest(&f.index).await.unwrap().is_some());
        for d in f.plan.manifests.keys() {
            assert!(store.manifest(d).await.unwrap().is_some(), "{d}");
        }
        for (d, (_, len)) in &f.plan.blobs {
            assert_eq!(store.blob_len(d).await.unwrap(), Some(*len), "{d}");
        }
        for key in [0b01_1111, 0b11_1111] {
            let k = TagKey {
                upstream: "docker.io".into(),
                repository: "library/app".parse().unwrap(),
                tag: "1".parse().unwrap(),
                accept: key,
            };
            let rec = store.tag(&k).await.unwrap().expect("tag recorded");
            assert_eq!(rec.digest, f.index);
            assert_eq!(rec.media_type, media::OCI_INDEX);
        }
    }

    #[tokio::test]
    async fn written_layouts_read_back_from_a_directory_and_a_tar() {
        let mut f = fixture("docker.io/library/app:1");
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("layout");
        let tar = out.path().join("images.tar");
        let blobs = f.plan.blobs.len();
        let bytes: u64 = f.plan.blobs.values().map(|(_, l)| l).sum();
        let progress = |_| {
            std::sync::Arc::new(crate::airgap::progress::Progress::new(
                "export", blobs, bytes,
            ))
        };
        let (in_dir, in_tar) = (progress(()), progress(()));
        f.plan.progress = Some(in_dir.clone());
        write_dir(&f.plan, &dir).unwrap();
        f.plan.progress = Some(in_tar.clone());
        write_tar(&f.plan, &tar).unwrap();
        // Each writer reports every blob it wrote.
        let done = format!(
            "export: blobs {blobs}/{blobs}, {} of {}",
            crate::units::human_bytes(bytes),
            crate::units::human_bytes(bytes)
        );
        assert_eq!((in_dir.line(), in_tar.line()), (done.clone(), done.clone()));
        assert!(!out.path().join("images.tar.part").exists());
        assert_eq!(fs::read(dir.join(LAYOUT_FILE)).unwrap(), oci::LAYOUT_MARKER);
        let entries = oci::parse_index(&fs::read(dir.join(INDEX_FILE)).unwrap()).unwrap();
        assert_eq!(entries, f.plan.entries);
        for source in [&dir, &tar] {
            let (cache, s) = store().await;
            // The live line counts every blob the layout refers to, read and checked.
            let progress = Arc::new(Progress::of_bytes("import", 0));
            let r = import_with(
                s.clone(),
                &table(),
                &args(source),
                1 << 20,
                progress.clone(),
            )
            .await
            .unwrap();
            assert_eq!((r.manifests, r.blobs, r.new_blobs), (3, 5, 5));
            assert_eq!(progress.line(), done.replace("export", "import"));
            assert_imported(&s, &f).await;
            assert!(
                files(&cache.path().join("tmp")).is_empty(),
                "staging cleared"
            );
            // Again: nothing new, nothing left behind.
            let r = import(s.clone(), &table(), &args(source), 1 << 20)
                .await
                .unwrap();
            assert_eq!(r.new_blobs, 0);
            assert!(files(&cache.path().join("tmp")).is_empty());
        }
    }

    #[tokio::test]
    async fn an_existing_layout_directory_is_added_to() {
        let a = fixture("docker.io/library/app:1");
        let b = fixture("docker.io/library/app:2");
        let out = tempfile::tempdir().unwrap();
        write_dir(&a.plan, out.path()).unwrap();
        write_dir(&b.plan, out.path()).unwrap();
        let entries = oci::parse_index(&fs::read(out.path().join(INDEX_FILE)).unwrap()).unwrap();
        let names: Vec<_> = entries.iter().filter_map(|e| e.ref_name()).collect();
        assert_eq!(
            names,
            ["docker.io/library/app:1", "docker.io/library/app:2"]
        );
        // A folder holding something else is not written into.
        let other = tempfile::tempdir().unwrap();
        fs::write(other.path().join("notes.txt"), b"x").unwrap();
        assert!(write_dir(&a.plan, other.path()).is_err());
    }

    #[tokio::test]
    async fn a_damaged_blob_refuses_the_whole_layout_and_nothing_lands() {
        let f = fixture("docker.io/library/app:1");
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("layout");
        write_dir(&f.plan, &dir).unwrap();
        let victim = &f.layers[2];
        let path = dir.join(oci::blob_path(victim));
        let mut bytes = fs::read(&path).unwrap();
        bytes[0] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        // The same damage inside a tar.
        let tar_path = out.path().join("damaged.tar");
        {
            let mut b = tar::Builder::new(File::create(&tar_path).unwrap());
            b.append_dir_all(".", &dir).unwrap();
            b.finish().unwrap();
        }
        for source in [&dir, &tar_path] {
            let (cache, s) = store().await;
            let e = import(s.clone(), &table(), &args(source), 1 << 20)
                .await
                .unwrap_err();
            let AirgapError::Rejected(problems) = &e else {
                panic!("{e}")
            };
            assert!(
                problems
                    .iter()
                    .any(|p| p.contains(&victim.to_string()) && p.contains("hashes to")),
                "{problems:?}"
            );
            let landed: Vec<String> = files(cache.path());
            assert!(landed.is_empty(), "nothing partial lands: {landed:?}");
        }
    }

    #[tokio::test]
    async fn missing_content_is_named_unless_allowed() {
        let f = fixture("docker.io/library/app:1");
        let out = tempfile::tempdir().unwrap();
        write_dir(&f.plan, out.path()).unwrap();
        let gone = &f.layers[2];
        fs::remove_file(out.path().join(oci::blob_path(gone))).unwrap();
        let (cache, s) = store().await;
        let e = import(s.clone(), &table(), &args(out.path()), 1 << 20)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains(&format!("missing blob {gone}")),
            "{e}"
        );
        assert!(files(cache.path()).is_empty());
        let mut a = args(out.path());
        a.allow_partial = true;
        let r = import(s.clone(), &table(), &a, 1 << 20).await.unwrap();
        assert_eq!(r.left_out.len(), 1);
        assert_eq!(s.blob_len(gone).await.unwrap(), None);
        assert!(s.manifest(&f.index).await.unwrap().is_some());
    }

    /// Adds to the fixture a referrer of its index (an SBOM with its own blob), listed in
    /// `index.json` without a ref name as `export` writes it; returns its digest and blob.
    fn add_referrer(f: &mut Fixture) -> (Digest, Digest) {
        let sbom = b"{\"spdxVersion\":\"SPDX-2.3\"}";
        let blob = Digest::sha256(sbom);
        let path = f._src.path().join(blob.hex());
        fs::write(&path, sbom).unwrap();
        f.plan.blobs.insert(blob.clone(), (path, sbom.len() as u64));
        let index_len = f.plan.manifests[&f.index].len();
        let m = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": media::OCI_MANIFEST,
            "artifactType": "application/spdx+json",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                       "digest": blob.to_string(), "size": sbom.len()},
            "layers": [],
            "subject": {"mediaType": media::OCI_INDEX, "digest": f.index.to_string(),
                        "size": index_len},
        }))
        .unwrap();
        let d = Digest::sha256(&m);
        f.plan.entries.push(Descriptor::unnamed(
            media::OCI_MANIFEST,
            d.clone(),
            m.len() as u64,
            Some("application/spdx+json".into()),
        ));
        f.plan.manifests.insert(d.clone(), Bytes::from(m));
        (d, blob)
    }

    #[tokio::test]
    async fn entries_without_a_ref_name_are_imported_by_digest_and_indexed_as_referrers() {
        let mut f = fixture("docker.io/library/app:1");
        let (referrer, blob) = add_referrer(&mut f);
        let out = tempfile::tempdir().unwrap();
        write_dir(&f.plan, out.path()).unwrap();
        let (_cache, s) = store().await;
        let r = import(s.clone(), &table(), &args(out.path()), 1 << 20)
            .await
            .unwrap();
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.entries[1], (referrer.to_string(), referrer.clone(), None));
        assert_imported(&s, &f).await;
        assert!(s.manifest(&referrer).await.unwrap().is_some());
        assert_eq!(s.blob_len(&blob).await.unwrap(), Some(26));
        // No tag was made of it; its subject's referrers list it from the disk.
        let repo: Repository = "library/app".parse().unwrap();
        let tags = s.tags_of("docker.io", &repo).await.unwrap();
        assert_eq!(tags.len(), 2);
        assert!(tags.iter().all(|(_, _, t)| t.digest == f.index));
        assert_eq!(s.referrers_of(&f.index).await.unwrap(), vec![referrer]);

        // A damaged referrer refuses the whole layout, as any damaged manifest does.
        let mut g = fixture("docker.io/library/app:2");
        let (bad, _) = add_referrer(&mut g);
        let out = tempfile::tempdir().unwrap();
        write_dir(&g.plan, out.path()).unwrap();
        let path = out.path().join(oci::blob_path(&bad));
        let mut bytes = fs::read(&path).unwrap();
        bytes[0] = b' ';
        fs::write(&path, &bytes).unwrap();
        let (cache, s) = store().await;
        let e = import(s.clone(), &table(), &args(out.path()), 1 << 20)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("hashes to"), "{e}");
        assert!(files(cache.path()).is_empty(), "nothing lands");
    }

    #[tokio::test]
    async fn ref_names_that_are_only_a_tag_need_a_repository() {
        let f = fixture("1");
        let out = tempfile::tempdir().unwrap();
        write_dir(&f.plan, out.path()).unwrap();
        let (cache, s) = store().await;
        let e = import(s.clone(), &table(), &args(out.path()), 1 << 20)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("--repository"), "{e}");
        assert!(files(cache.path()).is_empty());
        let mut a = args(out.path());
        a.repository = Some("app".parse().unwrap());
        let r = import(s.clone(), &table(), &a, 1 << 20).await.unwrap();
        assert_eq!(
            r.entries[0].2,
            Some(TagTarget {
                upstream: "docker.io".into(),
                repository: "library/app".parse().unwrap(),
                tag: "1".parse().unwrap(),
            })
        );
        assert_imported(&s, &f).await;
    }
}

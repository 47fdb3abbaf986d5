//! Gathering what a layout will hold from the cache: an image's manifest tree and blobs, and
//! its cached referrers, found by subject.

use std::collections::HashSet;
use std::fs;
use std::io;

use super::{Plan, Subjects, choose_record, store_error};
use crate::airgap::AirgapError;
use crate::airgap::name::{self, ImageName};
use crate::airgap::oci::{self, Descriptor, Node};
use crate::cache::layout::{Area, Item, Layout};
use crate::cache::store::{BlobStore, FsStore, StoredManifest, TagRecord};
use crate::reference::{Digest, Reference};
use crate::rewrite::RoutingTable;

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
pub(super) async fn add_image(
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
pub(super) async fn add_referrers(
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::media;

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
}

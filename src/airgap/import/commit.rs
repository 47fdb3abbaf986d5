//! Committing a checked import: blobs, then manifests children first, then tag records.

use super::walk::{Importer, Walk};
use super::{Report, TagTarget};
use crate::airgap::oci::Descriptor;
use crate::airgap::verify::remove_staged;
use crate::airgap::{AirgapError, io_error, record_tag};
use crate::cache::store::BlobStore;

/// Commits blobs, then manifests children first, then tag records, so that a tag never
/// points at content that is not in the cache yet.
pub(super) async fn commit(
    importer: &Importer,
    w: &mut Walk,
    targets: Vec<(Descriptor, Option<TagTarget>)>,
) -> Result<Report, AirgapError> {
    let store = &importer.store;
    let cache_err = || io_error("writing the cache");
    let mut report = Report {
        manifests: w.manifests.len(),
        blobs: w.blobs.len(),
        ..Report::default()
    };
    // Taken one at a time, so that on an error the rest stay in `w` to be discarded.
    while let Some((d, staged)) = w.blobs.pop_first() {
        let Some(s) = staged else {
            store.note_use(&d).await;
            continue;
        };
        let committed = match store.blob_len(&d).await {
            Ok(None) => store.commit_blob(&d, &s.path).await.map(|()| true),
            Ok(Some(_)) => Ok(false),
            Err(e) => Err(e),
        };
        match committed {
            Ok(true) => {
                report.new_blobs += 1;
                report.new_bytes += s.len;
            }
            Ok(false) => remove_staged([s]),
            Err(e) => {
                remove_staged([s]);
                return Err(cache_err()(e));
            }
        }
    }
    for (d, m) in w.manifests.iter().rev() {
        store.put_manifest(d, m).await.map_err(cache_err())?;
    }
    for (entry, target) in targets {
        let label = entry
            .ref_name()
            .map_or_else(|| entry.digest.to_string(), str::to_owned);
        if let Some(t) = &target {
            let media_type = w
                .manifests
                .iter()
                .find(|(d, _)| *d == entry.digest)
                .map(|(_, m)| m.media_type.clone());
            let media_type = match media_type {
                Some(mt) => mt,
                None => store
                    .manifest(&entry.digest)
                    .await
                    .map_err(cache_err())?
                    .map(|m| m.media_type)
                    .unwrap_or_else(|| entry.media_type.clone()),
            };
            record_tag(
                store.as_ref(),
                &t.upstream,
                &t.repository,
                &t.tag,
                &entry.digest,
                &media_type,
            )
            .await
            .map_err(cache_err())?;
        }
        report.entries.push((label, entry.digest, target));
    }
    Ok(report)
}

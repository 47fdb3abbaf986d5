//! Prefetching one image: its manifests (the platforms chosen), then its blobs a few at a
//! time, and its referrers when asked.

use std::collections::HashSet;

use futures_util::StreamExt;

use super::client::{Client, Via};
use super::{PrefetchArgs, Summary};
use crate::airgap::AirgapError;
use crate::airgap::name::{ImageName, PlatformFilter};
use crate::airgap::oci::{self, Descriptor, Node};
use crate::airgap::progress::Progress;
use crate::reference::{Digest, Reference};

/// Fetches one blob unless the cache has it. `Ok(true)` when it was downloaded.
async fn blob(client: &Client<'_>, d: &Descriptor, progress: &Progress) -> Result<bool, String> {
    // Only a local cache can be asked what it holds; a server is asked for every blob.
    let cached = match client.via {
        Via::App(app) => {
            let len = app
                .store
                .blob_len(&d.digest)
                .await
                .map_err(|e| format!("blob {}: {e}", d.digest))?;
            if len.is_some() {
                app.store.note_use(&d.digest).await;
            }
            len
        }
        Via::Server(_) => None,
    };
    let fetched = match cached {
        Some(len) => {
            progress.bytes(len);
            false
        }
        None => {
            let n = client
                .blob(&d.digest, progress)
                .await
                .map_err(|e| e.to_string())?;
            if n != d.size {
                return Err(format!(
                    "blob {}: {n} bytes, its manifest says {}",
                    d.digest, d.size
                ));
            }
            true
        }
    };
    progress.blob_done();
    Ok(fetched)
}

fn wanted(platforms: &[PlatformFilter], d: &Descriptor) -> bool {
    platforms.is_empty()
        || d.platform
            .as_ref()
            .is_none_or(|p| platforms.iter().any(|f| f.matches(p)))
}

/// Prefetches one image and, when `args.referrers`, its referrers.
pub(super) async fn image_with_referrers(
    client: &Client<'_>,
    name: &ImageName,
    reference: Reference,
    args: &PrefetchArgs,
    jobs: usize,
) -> Result<Summary, AirgapError> {
    let mut s = image_via(client, name, reference, &args.platforms, jobs).await?;
    if let (true, Some(subject)) = (args.referrers, s.digest.clone()) {
        let found = referrers_via(client, name, &subject, &args.platforms, jobs).await?;
        s.add(&found);
    }
    Ok(s)
}

/// Prefetches the referrers of `subject` (signatures, SBOMs, attestations: what the
/// referrers API lists, from the upstream's API or its tag schema), each with its blobs.
async fn referrers_via(
    client: &Client<'_>,
    name: &ImageName,
    subject: &Digest,
    platforms: &[PlatformFilter],
    jobs: usize,
) -> Result<Summary, AirgapError> {
    let what = format!("referrers of {subject}");
    let (_, body) = client
        .fetch("referrers", &subject.to_string(), false, &what)
        .await?;
    let index: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| AirgapError::Fetch(format!("{what}: not an index: {e}")))?;
    let listed: Vec<Digest> = index["manifests"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|d| d["digest"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let mut total = Summary::default();
    for d in listed {
        let s = image_via(client, name, Reference::Digest(d), platforms, jobs).await?;
        total.add(&s);
        total.referrers += 1;
    }
    Ok(total)
}

/// Prefetches one image through `client`: its manifests first, then its blobs, `jobs` at a
/// time.
async fn image_via(
    client: &Client<'_>,
    name: &ImageName,
    reference: Reference,
    platforms: &[PlatformFilter],
    jobs: usize,
) -> Result<Summary, AirgapError> {
    let top = client.manifest(&reference).await?;
    let mut summary = Summary {
        digest: Some(top.digest.clone()),
        manifests: 1,
        ..Summary::default()
    };
    let mut blobs: Vec<Descriptor> = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![(top, 0)];
    while let Some((m, depth)) = stack.pop() {
        match oci::parse_manifest(&m.media_type, &m.body)? {
            Node::Index(children) => {
                if depth >= oci::MAX_DEPTH {
                    return Err(AirgapError::Other(format!(
                        "{}: indexes nested deeper than {}",
                        m.digest,
                        oci::MAX_DEPTH
                    )));
                }
                let chosen: Vec<&Descriptor> =
                    children.iter().filter(|c| wanted(platforms, c)).collect();
                if chosen.is_empty() {
                    return Err(AirgapError::Other(format!(
                        "index {} has no manifest for {}",
                        m.digest,
                        platforms
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                for c in chosen {
                    let child = client
                        .manifest(&Reference::Digest(c.digest.clone()))
                        .await?;
                    summary.manifests += 1;
                    stack.push((child, depth + 1));
                }
            }
            node @ Node::Image { .. } => {
                for b in node.blobs() {
                    if seen.insert(b.digest.clone()) {
                        blobs.push(b.clone());
                    }
                }
            }
        }
    }
    summary.blobs = blobs.len();
    let total = blobs.iter().map(|b| b.size).sum();
    let progress = Progress::new(&name.to_string(), blobs.len(), total);
    // Polled together on this task (no spawn): the downloads themselves run detached inside
    // the app, and dropping this future only stops reading them.
    let results: Vec<(u64, Result<bool, String>)> = futures_util::stream::iter(&blobs)
        .map(|b| async { (b.size, blob(client, b, &progress).await) })
        .buffer_unordered(jobs)
        .collect()
        .await;
    progress.clear();
    let mut errors = Vec::new();
    for (size, r) in results {
        match r {
            Ok(true) => {
                summary.fetched += 1;
                summary.fetched_bytes += size;
            }
            Ok(false) => summary.cached += 1,
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(AirgapError::Other(format!(
            "{} of {} blobs failed: {}",
            errors.len(),
            blobs.len(),
            errors.join("; ")
        )));
    }
    Ok(summary)
}

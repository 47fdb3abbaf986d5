//! Fetching a manifest upstream (one fetch per key, verified, stored and shared with the
//! fleet) and remembering what a tag resolved to, with the stale fallback for a tag.

use std::sync::Arc;

use http::Response;

use super::{Target, cached_tag, served};
use crate::app::{App, Fetched, ManifestKey};
use crate::body::Body;
use crate::cache::store::{StoredManifest, TagKey, TagRecord};
use crate::cache::tags::TagEntry;
use crate::error::{Error, Kind, UpstreamError};
use crate::media::{self, Accept};
use crate::metrics::{CacheResult, mark};
use crate::reference::{Digest, Reference};

/// Fetches the tag's manifest and remembers the answer. When the upstream is unhealthy,
/// what the cache has for this tag under another client's `Accept` is better than an error,
/// if this client accepts its type.
pub(super) async fn fetch_tag(
    app: &Arc<App>,
    target: &Target,
    key: TagKey,
    accept: &Accept,
    head: bool,
) -> Result<Response<Body>, Error> {
    let reference = Reference::Tag(key.tag.clone());
    let fetched = match fetch_manifest(app, target, &reference, accept, None).await {
        Ok(f) => f,
        Err(Error::Upstream(_, e)) if e.is_unhealthy() => {
            let (tag, repo) = (&key.tag, &key.repository);
            return match cached_tag(app, &key.upstream, repo, tag, accept, head, true).await? {
                Some(r) => {
                    tracing::warn!(error = %e, tag = %tag, repository = %repo, stale = true, "upstream unhealthy; serving a cached answer for the tag");
                    Ok(mark(r, CacheResult::Stale))
                }
                None => Err(Error::Upstream(Kind::Manifest, e)),
            };
        }
        Err(e) => return Err(e),
    };
    if !accept.accepts(&fetched.manifest.media_type) {
        return Err(Error::ManifestNotAccepted(fetched.manifest.media_type));
    }
    remember_tag(app, key, &fetched.digest, &fetched.manifest.media_type).await;
    Ok(served(
        &fetched.manifest,
        &fetched.digest,
        head,
        CacheResult::Miss,
    ))
}

pub(super) async fn remember_tag(app: &App, key: TagKey, digest: &Digest, media_type: &str) {
    let record = TagRecord {
        digest: digest.clone(),
        media_type: media_type.to_owned(),
    };
    if let Err(e) = app.store.put_tag(&key, &record).await {
        tracing::warn!(error = %e, "cannot persist tag record");
    }
    if let Some(f) = &app.fleet {
        f.put_tag(&key, &record);
    }
    app.tags.insert(key, TagEntry::confirmed(record));
}

/// GETs a manifest upstream (one fetch per key at a time), verifies it and stores it.
pub(super) async fn fetch_manifest(
    app: &Arc<App>,
    target: &Target,
    reference: &Reference,
    accept: &Accept,
    expected: Option<&Digest>,
) -> Result<Fetched, Error> {
    let (upstream, repo) = (target.upstream(), target.repository());
    let up = app.upstreams[upstream].clone();
    let key: ManifestKey = (upstream, repo.clone(), reference.to_string(), accept.key());
    let (repo2, reference2, accept_value, expected2) = (
        repo.clone(),
        reference.clone(),
        accept.upstream_value(),
        expected.cloned(),
    );
    let app2 = app.clone();
    app.manifest_flight
        .get(key, move || async move {
            let f = up.manifest(&repo2, &reference2, &accept_value, false).await?;
            let algorithm = expected2
                .as_ref()
                .or(f.digest.as_ref())
                .map(Digest::algorithm)
                .unwrap_or(crate::reference::Algorithm::Sha256);
            let actual = Digest::of(algorithm, &f.body);
            if let Some(want) = expected2.as_ref().or(f.digest.as_ref()) {
                if *want != actual {
                    return Err(UpstreamError::Invalid(format!(
                        "manifest digest mismatch: expected {want}, got {actual}"
                    )));
                }
            }
            let media_type = if f.media_type.is_empty() || f.media_type == "application/octet-stream" {
                media::sniff(&f.body).unwrap_or_else(|| media::OCI_MANIFEST.to_owned())
            } else {
                f.media_type
            };
            let manifest = StoredManifest {
                media_type,
                body: f.body,
            };
            if let Err(e) = app2.store.put_manifest(&actual, &manifest).await {
                tracing::warn!(error = %e, digest = %actual, "cannot cache manifest; serving it uncached");
            }
            if let Some(fleet) = &app2.fleet {
                fleet.put_manifest(&actual, &manifest.media_type, manifest.body.clone());
            }
            Ok((
                Fetched {
                    digest: actual,
                    manifest,
                },
                None,
            ))
        })
        .await
        .map_err(|e| Error::Upstream(Kind::Manifest, e))
}

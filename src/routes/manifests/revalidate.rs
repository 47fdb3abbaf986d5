//! Revalidating a cached tag answer past its TTL with a `HEAD`, and what follows from the
//! upstream's answer (confirmed, stale, moved, gone).

use std::sync::Arc;

use http::Response;

use super::fetch::remember_tag;
use super::fleet::{adopt, fleet_manifest};
use super::{Target, served};
use crate::app::{App, ManifestKey};
use crate::body::Body;
use crate::cache::store::{StoredManifest, TagKey, TagRecord};
use crate::cache::tags::TagEntry;
use crate::error::{Error, Kind, UpstreamError};
use crate::fleet::tags::{SharedTag, TagCheck};
use crate::media::Accept;
use crate::metrics::CacheResult;
use crate::reference::{Digest, Reference};

/// What the upstream said about a cached tag answer past its TTL.
#[derive(Debug)]
pub(super) enum Revalidation {
    /// The tag still points at the cached digest.
    Confirmed,
    /// The `HEAD` carried no digest: it confirms nothing.
    NoDigest,
    /// The tag points at another digest now.
    Moved(Digest),
    /// The tag is gone upstream (a `404` from a healthy upstream).
    Gone,
    /// The upstream could not answer.
    Failed(UpstreamError),
    /// Another replica of the fleet confirmed the tag within the TTL.
    Shared(SharedTag),
    /// The fleet's check of the tag, which this replica waited on, got no answer.
    Unconfirmed,
}

/// Asks the upstream with a `HEAD` whether the tag of `key` still points at `cached`: a
/// `HEAD` does not count against Docker Hub's pull limit, and when it fails the cached answer
/// is served rather than spending a `GET`. Concurrent revalidations of one tag share one
/// `HEAD`; in a fleet, so do the replicas (one `HEAD` per tag per TTL, fleet-wide).
pub(super) async fn revalidate(
    app: &Arc<App>,
    target: &Target,
    key: &TagKey,
    accept: &Accept,
    cached: &TagRecord,
) -> Revalidation {
    let up = app.upstreams[target.upstream()].clone();
    let repo = target.repository().clone();
    let reference = Reference::Tag(key.tag.clone());
    let flight_key: ManifestKey = (
        target.upstream(),
        repo.clone(),
        reference.to_string(),
        accept.key(),
    );
    let accept_value = accept.upstream_value();
    let (fleet, key2, cached2, ttl) = (app.fleet.clone(), key.clone(), cached.clone(), up.tag_ttl);
    // The answer is not kept (`None`): the tag entry records the confirmation, and a check
    // after this one asks again.
    let checked = app
        .tag_checks
        .get(flight_key, move || async move {
            let ask = move || async move {
                let f = up.manifest(&repo, &reference, &accept_value, true).await?;
                Ok(f.digest)
            };
            let checked = match fleet {
                Some(f) => f.check_tag(&key2, ttl, &cached2, ask).await?,
                None => TagCheck::Asked(ask().await?),
            };
            Ok((checked, None))
        })
        .await;
    match checked {
        Ok(TagCheck::Shared(shared)) => Revalidation::Shared(shared),
        Ok(TagCheck::Asked(Some(d))) if d == cached.digest => Revalidation::Confirmed,
        Ok(TagCheck::Asked(Some(d))) => Revalidation::Moved(d),
        Ok(TagCheck::Asked(None)) => Revalidation::NoDigest,
        Ok(TagCheck::Unconfirmed) => Revalidation::Unconfirmed,
        Err(UpstreamError::Status(404)) => Revalidation::Gone,
        Err(e) => Revalidation::Failed(e),
    }
}

/// The answer after a revalidation: the cached one (confirmed, or stale when the upstream
/// could not confirm it), the manifest the tag moved to when the cache has it, or `None`
/// when the manifest has to be fetched.
pub(super) async fn after_revalidation(
    app: &App,
    key: TagKey,
    entry: TagEntry,
    m: &StoredManifest,
    check: Revalidation,
    accept: &Accept,
    head: bool,
) -> Result<Option<Response<Body>>, Error> {
    let digest = &entry.record.digest;
    let (tag, repo) = (&key.tag, &key.repository);
    match check {
        Revalidation::Confirmed => {
            // In a fleet, the check already shared the confirmation.
            let r = served(m, digest, head, CacheResult::Hit);
            app.tags.insert(key, TagEntry::confirmed(entry.record));
            Ok(Some(r))
        }
        Revalidation::NoDigest => {
            // A GET would spend pull quota while a cached answer exists.
            tracing::warn!(tag = %tag, repository = %repo, stale = true, "revalidation HEAD carried no digest; serving the cached answer");
            Ok(Some(served(m, digest, head, CacheResult::Stale)))
        }
        Revalidation::Moved(new) => {
            tracing::info!(tag = %tag, repository = %repo, old = %digest, new = %new, "tag moved upstream");
            let m = match app.store.manifest(&new).await? {
                Some(m) => Some(m),
                None => fleet_manifest(app, &new).await,
            };
            match m {
                Some(m) if accept.accepts(&m.media_type) => {
                    remember_tag(app, key, &new, &m.media_type).await;
                    Ok(Some(served(&m, &new, head, CacheResult::Hit)))
                }
                _ => Ok(None),
            }
        }
        Revalidation::Gone => {
            app.tags.remove(&key);
            if let Err(e) = app.store.remove_tag(&key).await {
                tracing::warn!(error = %e, "cannot remove tag record");
            }
            Err(Error::Upstream(Kind::Manifest, UpstreamError::Status(404)))
        }
        Revalidation::Shared(shared) => {
            adopt(app, key, shared, accept, head, CacheResult::Hit).await
        }
        Revalidation::Unconfirmed => {
            tracing::warn!(tag = %tag, repository = %repo, stale = true, "the fleet's check of this tag got no answer from the upstream; serving the cached answer");
            Ok(Some(served(m, digest, head, CacheResult::Stale)))
        }
        Revalidation::Failed(e) => {
            tracing::warn!(error = %e, tag = %tag, repository = %repo, stale = true, "tag revalidation failed; serving the cached answer");
            Ok(Some(served(m, digest, head, CacheResult::Stale)))
        }
    }
}

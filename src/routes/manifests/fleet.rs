//! The fleet's share in a manifest answer: manifests from its shared tier and tag answers
//! another replica confirmed within the TTL.

use http::Response;

use super::served;
use crate::app::App;
use crate::body::Body;
use crate::cache::store::{StoredManifest, TagKey, TagRecord};
use crate::cache::tags::TagEntry;
use crate::error::Error;
use crate::media::{self, Accept};
use crate::metrics::CacheResult;
use crate::reference::Digest;

/// The manifest `digest` from the fleet's shared tier (verified there), kept on this
/// replica's disk too.
pub(super) async fn fleet_manifest(app: &App, digest: &Digest) -> Option<StoredManifest> {
    let (media_type, body) = app.fleet.as_ref()?.manifest(digest).await?;
    let media_type = if media_type.is_empty() {
        media::sniff(&body).unwrap_or_else(|| media::OCI_MANIFEST.to_owned())
    } else {
        media_type
    };
    let m = StoredManifest { media_type, body };
    if let Err(e) = app.store.put_manifest(digest, &m).await {
        tracing::warn!(error = %e, %digest, "cannot cache manifest; serving it uncached");
    }
    Some(m)
}

/// The fleet's answer for the tag when a replica confirmed it within `ttl`.
pub(super) async fn fleet_tag(
    app: &App,
    key: &TagKey,
    ttl: std::time::Duration,
) -> Option<crate::fleet::tags::SharedTag> {
    let shared = app.fleet.as_ref()?.tag(key).await?;
    (shared.age < ttl).then_some(shared)
}

/// Serves the fleet's answer and takes it as this replica's, confirmed when the other replica
/// confirmed it (never shared again: only a real check refreshes the fleet's answer). `None`
/// when its manifest is neither here nor in the shared tier, or not accepted.
pub(super) async fn adopt(
    app: &App,
    key: TagKey,
    shared: crate::fleet::tags::SharedTag,
    accept: &Accept,
    head: bool,
    result: CacheResult,
) -> Result<Option<Response<Body>>, Error> {
    let d = shared.record.digest.clone();
    let m = match app.store.manifest(&d).await? {
        Some(m) => Some(m),
        None => fleet_manifest(app, &d).await,
    };
    let Some(m) = m.filter(|m| accept.accepts(&m.media_type)) else {
        return Ok(None);
    };
    // The manifest's own media type: the confirming replica may not have known it.
    let record = TagRecord {
        digest: d.clone(),
        media_type: m.media_type.clone(),
    };
    if let Err(e) = app.store.put_tag(&key, &record).await {
        tracing::warn!(error = %e, "cannot persist tag record");
    }
    let checked = tokio::time::Instant::now()
        .checked_sub(shared.age)
        .unwrap_or_else(tokio::time::Instant::now);
    app.tags.insert(
        key,
        TagEntry {
            record,
            checked: Some(checked),
        },
    );
    Ok(Some(served(&m, &d, head, result)))
}

//! `GET|HEAD /v2/<name>/manifests/<reference>`: manifests by digest from the cache, by tag
//! through the pull-through policy, one named step each: the cached answer, whether it may
//! be served unchecked (TTL, immutable tags, offline), its revalidation with a `HEAD`, what
//! follows from it (confirmed, stale, moved, gone), and the fetch with its stale fallback.

use std::sync::Arc;

use http::{HeaderValue, Response, header};

use super::{DOCKER_CONTENT_DIGEST, STALE, Target};
use crate::app::{App, Fetched, ManifestKey};
use crate::body::{self, Body, set_header as set};
use crate::cache::store::{StoredManifest, TagKey, TagRecord};
use crate::cache::tags::TagEntry;
use crate::error::{Error, Kind, UpstreamError};
use crate::media::{self, Accept};
use crate::metrics::{CacheResult, mark};
use crate::reference::{Digest, Reference, Repository, Tag};
use crate::upstream::Upstream;

/// `GET|HEAD /v2/<name>/manifests/<reference>`.
pub async fn manifest(
    app: &Arc<App>,
    target: &Target,
    reference: &Reference,
    accept: &Accept,
    head: bool,
) -> Result<Response<Body>, Error> {
    match reference {
        Reference::Digest(d) => manifest_by_digest(app, target, d, accept, head).await,
        Reference::Tag(tag) => manifest_by_tag(app, target, tag, accept, head).await,
    }
}

/// A manifest by digest: from the cache, else fetched (a digest never changes meaning).
async fn manifest_by_digest(
    app: &Arc<App>,
    target: &Target,
    digest: &Digest,
    accept: &Accept,
    head: bool,
) -> Result<Response<Body>, Error> {
    let (m, result) = match app.store.manifest(digest).await? {
        Some(m) => {
            app.store.note_use(digest).await;
            (m, CacheResult::Hit)
        }
        None if app.upstreams[target.upstream()].offline => {
            return Err(Error::Offline(Kind::Manifest));
        }
        None => match fleet_manifest(app, digest).await {
            Some(m) => (m, CacheResult::Miss),
            None => {
                let reference = Reference::Digest(digest.clone());
                let fetched = fetch_manifest(app, target, &reference, accept, Some(digest)).await?;
                (fetched.manifest, CacheResult::Miss)
            }
        },
    };
    if !accept.accepts(&m.media_type) {
        return Err(Error::ManifestNotAccepted(m.media_type));
    }
    Ok(served(&m, digest, head, result))
}

/// The manifest `digest` from the fleet's shared tier (verified there), kept on this
/// replica's disk too.
async fn fleet_manifest(app: &App, digest: &Digest) -> Option<StoredManifest> {
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
async fn fleet_tag(
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
async fn adopt(
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
    if let Err(e) = app.store.put_tag(&key, &shared.record).await {
        tracing::warn!(error = %e, "cannot persist tag record");
    }
    let checked = tokio::time::Instant::now()
        .checked_sub(shared.age)
        .unwrap_or_else(tokio::time::Instant::now);
    app.tags.insert(
        key,
        TagEntry {
            record: shared.record,
            checked: Some(checked),
        },
    );
    Ok(Some(served(&m, &d, head, result)))
}

/// A manifest by tag: the cached answer while it may be served unchecked, else revalidated
/// with a `HEAD`; fetched when the cache has nothing for this client or the tag moved.
async fn manifest_by_tag(
    app: &Arc<App>,
    target: &Target,
    tag: &Tag,
    accept: &Accept,
    head: bool,
) -> Result<Response<Body>, Error> {
    let up = &app.upstreams[target.upstream()];
    let key = TagKey {
        upstream: up.name.clone(),
        repository: target.repository().clone(),
        tag: tag.clone(),
        accept: accept.key(),
    };
    if let Some((entry, m)) = cached_answer(app, &key, accept).await? {
        let digest = entry.record.digest.clone();
        app.store.note_use(&digest).await;
        if may_serve_unchecked(up, &entry, tag) {
            return Ok(served(&m, &digest, head, CacheResult::Hit));
        }
        // Another replica of the fleet may have asked the upstream within the TTL.
        if let Some(shared) = fleet_tag(app, &key, up.tag_ttl).await {
            let answer = adopt(app, key.clone(), shared, accept, head, CacheResult::Hit).await?;
            if let Some(r) = answer {
                return Ok(r);
            }
        }
        let check = revalidate(app, target, tag, accept, &digest).await;
        if let Some(r) =
            after_revalidation(app, key.clone(), entry, &m, check, accept, head).await?
        {
            return Ok(r);
        }
    }
    // Cold here: the fleet's answer, with the manifest from its shared tier.
    if let Some(shared) = fleet_tag(app, &key, up.tag_ttl).await {
        let answer = adopt(app, key.clone(), shared, accept, head, CacheResult::Miss).await?;
        if let Some(r) = answer {
            return Ok(r);
        }
    }
    if up.offline {
        return cached_tag(app, &up.name, target.repository(), tag, accept, head, false)
            .await?
            .map(|r| mark(r, CacheResult::Hit))
            .ok_or(Error::Offline(Kind::Manifest));
    }
    fetch_tag(app, target, key, accept, head).await
}

/// An answer from the cache (`Stale` marks it as not confirmed by the upstream).
fn served(m: &StoredManifest, digest: &Digest, head: bool, result: CacheResult) -> Response<Body> {
    let stale = result == CacheResult::Stale;
    mark(manifest_response(m, digest, head, stale), result)
}

/// The tag's answer the cache holds for this accept key, if this client accepts its
/// manifest. An answer read from disk is kept in memory as unconfirmed: it is served as it is
/// only when offline or immutable.
async fn cached_answer(
    app: &App,
    key: &TagKey,
    accept: &Accept,
) -> Result<Option<(TagEntry, StoredManifest)>, Error> {
    let entry = match app.tags.get(key) {
        Some(e) => e,
        None => {
            let Some(record) = app.store.tag(key).await? else {
                return Ok(None);
            };
            let e = TagEntry {
                record,
                checked: None,
            };
            app.tags.insert(key.clone(), e.clone());
            e
        }
    };
    let cached = app
        .store
        .manifest(&entry.record.digest)
        .await?
        // The tag key covers the six manifest types; an answer of any other type is checked
        // against this client's own list.
        .filter(|m| accept.accepts(&m.media_type));
    Ok(cached.map(|m| (entry, m)))
}

/// Whether a cached tag answer is served without asking the upstream: it is fresh, the tag
/// is configured as immutable, or there is no upstream to ask.
fn may_serve_unchecked(up: &Upstream, entry: &TagEntry, tag: &Tag) -> bool {
    entry.is_fresh(up.tag_ttl) || up.is_immutable_tag(tag.as_str()) || up.offline
}

/// What the upstream said about a cached tag answer past its TTL.
#[derive(Debug)]
enum Revalidation {
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
}

/// Asks the upstream with a `HEAD` whether `tag` still points at `cached`: a `HEAD` does not
/// count against Docker Hub's pull limit, and when it fails the cached answer is served
/// rather than spending a `GET`. Concurrent revalidations of one tag share one `HEAD`.
async fn revalidate(
    app: &Arc<App>,
    target: &Target,
    tag: &Tag,
    accept: &Accept,
    cached: &Digest,
) -> Revalidation {
    let up = app.upstreams[target.upstream()].clone();
    let repo = target.repository().clone();
    let reference = Reference::Tag(tag.clone());
    let key: ManifestKey = (
        target.upstream(),
        repo.clone(),
        reference.to_string(),
        accept.key(),
    );
    let accept_value = accept.upstream_value();
    // The answer is not kept (`None`): the tag entry records the confirmation, and a check
    // after this one asks the upstream again.
    let named = app
        .tag_checks
        .get(key, move || async move {
            let f = up.manifest(&repo, &reference, &accept_value, true).await?;
            Ok((f.digest, None))
        })
        .await;
    match named {
        Ok(Some(d)) if d == *cached => Revalidation::Confirmed,
        Ok(Some(d)) => Revalidation::Moved(d),
        Ok(None) => Revalidation::NoDigest,
        Err(UpstreamError::Status(404)) => Revalidation::Gone,
        Err(e) => Revalidation::Failed(e),
    }
}

/// The answer after a revalidation: the cached one (confirmed, or stale when the upstream
/// could not confirm it), the manifest the tag moved to when the cache has it, or `None`
/// when the manifest has to be fetched.
async fn after_revalidation(
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
            let r = served(m, digest, head, CacheResult::Hit);
            if let Some(f) = &app.fleet {
                f.put_tag(&key, &entry.record);
            }
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
            app.tags.invalidate(&key);
            if let Err(e) = app.store.remove_tag(&key).await {
                tracing::warn!(error = %e, "cannot remove tag record");
            }
            Err(Error::Upstream(Kind::Manifest, UpstreamError::Status(404)))
        }
        Revalidation::Failed(e) => {
            tracing::warn!(error = %e, tag = %tag, repository = %repo, stale = true, "tag revalidation failed; serving the cached answer");
            Ok(Some(served(m, digest, head, CacheResult::Stale)))
        }
    }
}

/// Fetches the tag's manifest and remembers the answer. When the upstream is unhealthy,
/// what the cache has for this tag under another client's `Accept` is better than an error,
/// if this client accepts its type.
async fn fetch_tag(
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

async fn remember_tag(app: &App, key: TagKey, digest: &Digest, media_type: &str) {
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
async fn fetch_manifest(
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

/// A cached answer for `tag` under any accept key whose manifest this client accepts: what
/// regcache serves for a tag when it may not, or cannot, ask the upstream.
async fn cached_tag(
    app: &Arc<App>,
    upstream: &str,
    repo: &Repository,
    tag: &Tag,
    accept: &Accept,
    head: bool,
    stale: bool,
) -> Result<Option<Response<Body>>, Error> {
    for (t, _, record) in app.store.tags_of(upstream, repo).await? {
        if t != *tag || !accept.accepts(&record.media_type) {
            continue;
        }
        if let Some(m) = app.store.manifest(&record.digest).await? {
            if accept.accepts(&m.media_type) {
                return Ok(Some(manifest_response(&m, &record.digest, head, stale)));
            }
        }
    }
    Ok(None)
}

/// A manifest answer: `Content-Type`, `Content-Length`, `Docker-Content-Digest`, `ETag`, and a
/// `Warning` when it is served stale.
fn manifest_response(
    m: &StoredManifest,
    digest: &Digest,
    head: bool,
    stale: bool,
) -> Response<Body> {
    let len = m.body.len();
    let mut r = Response::new(if head {
        body::empty()
    } else {
        body::full(m.body.clone())
    });
    set(&mut r, header::CONTENT_TYPE, &m.media_type);
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    set(&mut r, DOCKER_CONTENT_DIGEST, &digest.to_string());
    set(&mut r, header::ETAG, &format!("\"{digest}\""));
    if stale {
        r.headers_mut().insert(header::WARNING, STALE);
    }
    r
}

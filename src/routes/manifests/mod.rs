//! `GET|HEAD /v2/<name>/manifests/<reference>`: manifests by digest from the cache, by tag
//! through the pull-through policy, one named step each: the cached answer, whether it may
//! be served unchecked (TTL, immutable tags, offline), its revalidation with a `HEAD`, what
//! follows from it (confirmed, stale, moved, gone), and the fetch with its stale fallback.

mod fetch;
mod fleet;
mod revalidate;

use std::sync::Arc;

use http::{HeaderValue, Response, header};

use super::{STALE, Target, set_digest_headers};
use crate::app::App;
use crate::body::{self, Body, set_header as set};
use crate::cache::store::{StoredManifest, TagKey};
use crate::cache::tags::TagEntry;
use crate::error::{Error, Kind};
use crate::media::Accept;
use crate::metrics::{CacheResult, mark};
use crate::reference::{Digest, Reference, Repository, Tag};
use crate::upstream::Upstream;
use fetch::{fetch_manifest, fetch_tag};
use fleet::{adopt, fleet_manifest, fleet_tag};
use revalidate::{after_revalidation, revalidate};

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
        let check = revalidate(app, target, &key, accept, &entry.record).await;
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
    set_digest_headers(&mut r, digest);
    if stale {
        r.headers_mut().insert(header::WARNING, STALE);
    }
    r
}

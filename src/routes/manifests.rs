//! `GET|HEAD /v2/<name>/manifests/<reference>`: manifests by digest from the cache, by tag
//! through the tag answers with their TTL and stale serving.

use std::sync::Arc;

use http::Response;

use super::{Target, manifest_response};
use crate::app::{App, Fetched, ManifestKey};
use crate::body::Body;
use crate::cache::store::{StoredManifest, TagKey, TagRecord};
use crate::cache::tags::TagEntry;
use crate::error::{Error, Kind, UpstreamError};
use crate::media::{self, Accept};
use crate::metrics::{CacheResult, mark};
use crate::reference::{Digest, Reference, Repository, Tag};

/// `GET|HEAD /v2/<name>/manifests/<reference>`.
pub async fn manifest(
    app: &Arc<App>,
    target: &Target,
    reference: &Reference,
    accept: &Accept,
    head: bool,
) -> Result<Response<Body>, Error> {
    let (upstream, repo) = (target.upstream(), target.repository());
    match reference {
        Reference::Digest(d) => {
            let (m, result) = match app.store.manifest(d).await? {
                Some(m) => {
                    app.store.note_use(d).await;
                    (m, CacheResult::Hit)
                }
                None if app.upstreams[upstream].offline => {
                    return Err(Error::Offline(Kind::Manifest));
                }
                None => (
                    fetch_manifest(app, upstream, repo, reference, accept, Some(d))
                        .await?
                        .manifest,
                    CacheResult::Miss,
                ),
            };
            if !accept.accepts(&m.media_type) {
                return Err(Error::ManifestNotAccepted(m.media_type));
            }
            Ok(mark(manifest_response(&m, d, head, false), result))
        }
        Reference::Tag(tag) => manifest_by_tag(app, upstream, repo, tag, accept, head).await,
    }
}

async fn manifest_by_tag(
    app: &Arc<App>,
    upstream: usize,
    repo: &Repository,
    tag: &Tag,
    accept: &Accept,
    head: bool,
) -> Result<Response<Body>, Error> {
    let up = &app.upstreams[upstream];
    let key = TagKey {
        upstream: up.name.clone(),
        repository: repo.clone(),
        tag: tag.clone(),
        accept: accept.key(),
    };
    let known = match app.tags.get(&key) {
        Some(e) => Some(e),
        None => {
            let entry = app.store.tag(&key).await?.map(|record| TagEntry {
                record,
                checked: None,
            });
            // Kept in memory as unconfirmed: served as is only when offline or immutable.
            if let Some(e) = &entry {
                app.tags.insert(key.clone(), e.clone());
            }
            entry
        }
    };
    if let Some(entry) = known {
        let cached = app
            .store
            .manifest(&entry.record.digest)
            .await?
            // The tag key covers the six manifest types; an answer of any other type is
            // checked against this client's own list.
            .filter(|m| accept.accepts(&m.media_type));
        if let Some(m) = cached {
            let digest = entry.record.digest.clone();
            // Fresh, a tag configured as immutable, or no upstream to ask: served as it is.
            app.store.note_use(&digest).await;
            if entry.is_fresh(up.tag_ttl) || up.is_immutable_tag(tag.as_str()) || up.offline {
                return Ok(mark(
                    manifest_response(&m, &digest, head, false),
                    CacheResult::Hit,
                ));
            }
            // Revalidate with a HEAD: it does not count against Docker Hub's pull limit, and
            // when it fails the cached answer is served rather than spending a GET.
            let reference = Reference::Tag(tag.clone());
            match up
                .manifest(repo, &reference, &accept.upstream_value(), true)
                .await
            {
                Ok(f) if f.digest.as_ref() == Some(&digest) => {
                    app.tags.insert(key, TagEntry::confirmed(entry.record));
                    return Ok(mark(
                        manifest_response(&m, &digest, head, false),
                        CacheResult::Hit,
                    ));
                }
                Ok(f) if f.digest.is_none() => {
                    // Without a digest the HEAD cannot confirm anything; a GET would spend
                    // pull quota while a cached answer exists.
                    tracing::warn!(tag = %tag, repository = %repo, stale = true, "revalidation HEAD carried no digest; serving the cached answer");
                    return Ok(mark(
                        manifest_response(&m, &digest, head, true),
                        CacheResult::Stale,
                    ));
                }
                Ok(f) => {
                    tracing::info!(tag = %tag, repository = %repo, old = %digest, new = ?f.digest.as_ref().map(ToString::to_string), "tag moved upstream");
                    if let Some(new) = f.digest {
                        if let Some(m) = app.store.manifest(&new).await? {
                            if accept.accepts(&m.media_type) {
                                remember_tag(app, key, &new, &m.media_type).await;
                                return Ok(mark(
                                    manifest_response(&m, &new, head, false),
                                    CacheResult::Hit,
                                ));
                            }
                        }
                    }
                }
                Err(UpstreamError::Status(404)) => {
                    app.tags.invalidate(&key);
                    if let Err(e) = app.store.remove_tag(&key).await {
                        tracing::warn!(error = %e, "cannot remove tag record");
                    }
                    return Err(Error::Upstream(Kind::Manifest, UpstreamError::Status(404)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, tag = %tag, repository = %repo, stale = true, "tag revalidation failed; serving the cached answer");
                    return Ok(mark(
                        manifest_response(&m, &digest, head, true),
                        CacheResult::Stale,
                    ));
                }
            }
        }
    }
    if up.offline {
        return cached_tag(app, &up.name, repo, tag, accept, head, false)
            .await?
            .map(|r| mark(r, CacheResult::Hit))
            .ok_or(Error::Offline(Kind::Manifest));
    }
    let fetched = match fetch_manifest(
        app,
        upstream,
        repo,
        &Reference::Tag(tag.clone()),
        accept,
        None,
    )
    .await
    {
        Ok(f) => f,
        // The upstream is unhealthy: what the cache has for this tag under another client's
        // Accept is better than an error, if this client accepts its type.
        Err(Error::Upstream(_, e)) if e.is_unhealthy() => {
            return match cached_tag(app, &up.name, repo, tag, accept, head, true).await? {
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
    Ok(mark(
        manifest_response(&fetched.manifest, &fetched.digest, head, false),
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
    app.tags.insert(key, TagEntry::confirmed(record));
}

/// GETs a manifest upstream (one fetch per key at a time), verifies it and stores it.
async fn fetch_manifest(
    app: &Arc<App>,
    upstream: usize,
    repo: &Repository,
    reference: &Reference,
    accept: &Accept,
    expected: Option<&Digest>,
) -> Result<Fetched, Error> {
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

//! One function per route. Each takes validated names and sets `Content-Type`,
//! `Content-Length`, `Docker-Content-Digest` and `ETag` on its answers.

use std::sync::Arc;

use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt;

use crate::app::App;
use crate::body::{self, Body, set_header as set};
use crate::cache::fill;
use crate::cache::inflight::{FillError, FillState, Join};
use crate::cache::store::{StoredManifest, TagKey, TagRecord};
use crate::cache::tags::TagEntry;
use crate::cache::tail::{ByteStream, Refetch, SharedTail, Tail, file_stream, read_stream};
use crate::error::{Error, Kind, UpstreamError};
use crate::media::{self, Accept};
use crate::metrics::{CacheResult, mark};
use crate::range::{self, RangeSpec};
use crate::reference::{Digest, Reference, Repository, Tag};
use crate::upstream::Upstream;

pub(crate) const DOCKER_CONTENT_DIGEST: header::HeaderName =
    header::HeaderName::from_static("docker-content-digest");

/// Key for coalescing manifest fetches: upstream, repository, reference, accepted types.
pub type ManifestKey = (usize, Repository, String, u8);

/// A manifest fetched and verified, shared by coalesced callers.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Its digest.
    pub digest: Digest,
    /// The manifest.
    pub manifest: StoredManifest,
}

/// Marks an answer served from the cache after the upstream could not confirm it.
const STALE: HeaderValue = HeaderValue::from_static("110 regcache \"Response is Stale\"");

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

/// `GET|HEAD /v2/<name>/manifests/<reference>`.
pub async fn manifest(
    app: &Arc<App>,
    upstream: usize,
    repo: &Repository,
    reference: &Reference,
    accept: &Accept,
    head: bool,
) -> Result<Response<Body>, Error> {
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

fn blob_headers(r: &mut Response<Body>, digest: &Digest, len: u64) {
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    set(r, DOCKER_CONTENT_DIGEST, &digest.to_string());
    set(r, header::ETAG, &format!("\"{digest}\""));
    r.headers_mut()
        .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
}

/// The status, start and length to serve for `range` on a blob of `total` bytes.
fn plan(range: Option<&str>, total: u64) -> Result<(StatusCode, u64, u64), Error> {
    match range::parse(range, total) {
        RangeSpec::Full => Ok((StatusCode::OK, 0, total)),
        RangeSpec::Partial { start, end } => {
            Ok((StatusCode::PARTIAL_CONTENT, start, end - start + 1))
        }
        RangeSpec::Unsatisfiable => Err(Error::RangeNotSatisfiable(total)),
    }
}

fn blob_response(
    digest: &Digest,
    total: u64,
    status: StatusCode,
    start: u64,
    len: u64,
    body: Body,
) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    blob_headers(&mut r, digest, len);
    if status == StatusCode::PARTIAL_CONTENT {
        set(
            &mut r,
            header::CONTENT_RANGE,
            &format!("bytes {}-{}/{}", start, start + len - 1, total),
        );
    }
    r
}

fn fill_error(e: FillError) -> Error {
    match e {
        FillError::Upstream(u) => Error::Upstream(Kind::Blob, u),
        FillError::DigestMismatch(got) => Error::Upstream(
            Kind::Blob,
            UpstreamError::Invalid(format!("blob content hashed to {got}")),
        ),
        FillError::Io(why) => Error::Internal(why),
        FillError::TooLarge(len) => Error::Internal(format!("{len} bytes not cached")),
        FillError::Aborted => Error::Internal("download aborted".into()),
    }
}

/// A blob straight from its upstream, for clients of a download the disk could not take.
struct Straight {
    upstream: Arc<Upstream>,
    repository: Repository,
    digest: Digest,
}

#[async_trait::async_trait]
impl Refetch for Straight {
    async fn from(&self, start: u64) -> std::io::Result<ByteStream> {
        use futures_util::StreamExt;
        let (resp, mut skip) = self
            .upstream
            .blob_from(&self.repository, &self.digest, start)
            .await
            .map_err(std::io::Error::other)?;
        let stats = self.upstream.stats().clone();
        let bytes = resp.into_body().into_data_stream().filter_map(move |r| {
            if let Ok(b) = &r {
                stats.fetched_blob(b.len() as u64);
            }
            let out = match r {
                Ok(mut b) if skip > 0 => {
                    let n = skip.min(b.len() as u64);
                    skip -= n;
                    let rest = b.split_off(n as usize);
                    (!rest.is_empty()).then_some(Ok(rest))
                }
                other => Some(other),
            };
            std::future::ready(out)
        });
        Ok(Box::pin(bytes))
    }
}

/// `GET|HEAD /v2/<name>/blobs/<digest>`, with single `Range` support on cached blobs and on
/// blobs still downloading. A `client` may have `limits.downloads_per_client` GETs not served
/// from the cache under way; cache hits and HEADs are not counted.
pub async fn blob(
    app: &Arc<App>,
    upstream: usize,
    repo: &Repository,
    digest: &Digest,
    range: Option<&str>,
    head: bool,
    client: Option<std::net::IpAddr>,
) -> Result<Response<Body>, Error> {
    if let Some(total) = app.store.blob_len(digest).await? {
        let (status, start, len) = plan(range, total)?;
        app.store.note_use(digest).await;
        if head {
            return Ok(mark(
                blob_response(digest, total, status, start, len, body::empty()),
                CacheResult::Hit,
            ));
        }
        // Gone between the two calls (garbage collection): fetched again below.
        if let Some(b) = app.store.open_blob(digest, start).await? {
            let Some(file) = b.file else {
                let stream = read_stream(b.reader, len);
                let r = blob_response(digest, total, status, start, len, body::stream(stream));
                return Ok(mark(r, CacheResult::Hit));
            };
            // A local file: the plain-HTTP loop sends it with sendfile; other connections
            // read it chunk by chunk.
            let range = crate::fastpath::FileRange::new(file, start, len);
            let stream = file_stream(range.file.clone(), start, len);
            let mut r = blob_response(digest, total, status, start, len, body::stream(stream));
            r.extensions_mut().insert(range);
            return Ok(mark(r, CacheResult::Hit));
        }
    }
    let up = &app.upstreams[upstream];
    if up.offline {
        return Err(Error::Offline(Kind::Blob));
    }
    let mut result = CacheResult::Miss;
    let (fill, slot) = if head {
        // A HEAD alone never starts a download: it follows one under way, or asks upstream.
        match app.inflight.get(digest) {
            Some(f) => (f, None),
            None => {
                let size = up
                    .blob_size(repo, digest)
                    .await
                    .map_err(|e| Error::Upstream(Kind::Blob, e))?;
                let mut r = Response::new(body::empty());
                blob_headers(&mut r, digest, size.unwrap_or(0));
                if size.is_none() {
                    r.headers_mut().remove(header::CONTENT_LENGTH);
                }
                return Ok(mark(r, CacheResult::Miss));
            }
        }
    } else {
        // Held by the response body until it is sent or dropped.
        let slot = match client {
            Some(ip) => Some(app.downloads.try_take(ip).ok_or(Error::TooManyDownloads)?),
            None => None,
        };
        let fill = match app
            .inflight
            .join(digest, || app.store.staging_path(&digest.to_string()))
        {
            Join::Follower(f) => {
                // Every byte already here and verified, only not committed yet: a hit.
                if matches!(*f.subscribe().borrow(), FillState::Verified { .. }) {
                    result = CacheResult::Hit;
                }
                f
            }
            Join::Leader(guard) => {
                let f = guard.fill().clone();
                fill::spawn(guard, app.store.clone(), up.clone(), repo.clone());
                f
            }
        };
        (fill, slot)
    };
    let mut rx = fill.subscribe();
    let direct: Arc<dyn Refetch> = Arc::new(Straight {
        upstream: up.clone(),
        repository: repo.clone(),
        digest: digest.clone(),
    });
    // Headers go out as soon as the upstream has answered (or, for a range on a download of
    // unknown length, once the length is known).
    let total = {
        let wanted_len = range.is_some();
        let state = rx
            .wait_for(|s| match s {
                FillState::Connecting => false,
                FillState::Streaming { len, .. } => len.is_some() || !wanted_len,
                FillState::Verified { .. } | FillState::Complete { .. } | FillState::Failed(_) => {
                    true
                }
            })
            .await
            .map_err(|_| Error::Internal("download state lost".into()))?
            .clone();
        match state {
            // The disk cannot take it: serve this client straight from the upstream.
            FillState::Failed(FillError::TooLarge(len)) => Some(len),
            FillState::Failed(e) if e.is_local() => up
                .blob_size(repo, digest)
                .await
                .map_err(|e| Error::Upstream(Kind::Blob, e))?,
            FillState::Failed(e) => return Err(fill_error(e)),
            FillState::Streaming { len, .. } => len,
            FillState::Verified { len } | FillState::Complete { len } => Some(len),
            FillState::Connecting => None,
        }
    };
    let Some(total) = total else {
        // Unknown length, whole blob: stream it chunked.
        let mut r = Response::new(if head {
            body::empty()
        } else {
            body::hold(
                body::stream(
                    Tail::new(fill, app.store.clone(), 0, None)
                        .with_fallback(direct, true)
                        .into_stream(),
                ),
                slot,
            )
        });
        blob_headers(&mut r, digest, 0);
        r.headers_mut().remove(header::CONTENT_LENGTH);
        return Ok(mark(r, result));
    };
    let (status, start, len) = plan(range, total)?;
    if head {
        return Ok(mark(
            blob_response(digest, total, status, start, len, body::empty()),
            result,
        ));
    }
    // The plain-HTTP loop sends what is on disk with sendfile; other connections read it.
    let tail = SharedTail::new(
        Tail::new(fill, app.store.clone(), start, Some(start + len))
            .with_fallback(direct, status == StatusCode::OK),
    );
    let body = body::hold(body::stream(tail.clone().into_stream()), slot);
    let mut r = blob_response(digest, total, status, start, len, body);
    r.extensions_mut()
        .insert(crate::fastpath::TailBody::new(tail, len));
    Ok(mark(r, result))
}

/// `GET /v2/<name>/tags/list`, passed through with `n` and `last`; a `Link` to the next page
/// is rewritten to the name the client used.
pub async fn tags(
    app: &Arc<App>,
    upstream: usize,
    repo: &Repository,
    client_name: &Repository,
    ns: Option<&str>,
    n: Option<u32>,
    last: Option<String>,
) -> Result<Response<Body>, Error> {
    let up = &app.upstreams[upstream];
    let query = {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(n) = n {
            q.append_pair("n", &n.to_string());
        }
        if let Some(l) = &last {
            q.append_pair("last", l);
        }
        q.finish()
    };
    let fetched = if up.offline {
        None
    } else {
        match up.tags(repo, &query).await {
            Ok(answer) => Some(answer),
            // The upstream is unhealthy: answer from what the cache knows, marked stale.
            Err(e) if e.is_unhealthy() => {
                tracing::warn!(error = %e, repository = %repo, stale = true, "tag list from the cache");
                None
            }
            Err(e) => return Err(Error::Upstream(Kind::Tags, e)),
        }
    };
    let Some((body, link)) = fetched else {
        return cached_tags(app, &up.name, repo, n, last.as_deref(), up.offline).await;
    };
    let mut r = body::json(body, false);
    if let Some(link) = link.and_then(|l| next_page_link(&l, client_name, ns)) {
        set(&mut r, header::LINK, &link);
    }
    Ok(r)
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

/// `tags/list` from the tag answers the cache holds, sorted, with `n`/`last` applied.
async fn cached_tags(
    app: &Arc<App>,
    upstream: &str,
    repo: &Repository,
    n: Option<u32>,
    last: Option<&str>,
    offline: bool,
) -> Result<Response<Body>, Error> {
    let mut tags: Vec<String> = app
        .store
        .tags_of(upstream, repo)
        .await?
        .into_iter()
        .map(|(t, _, _)| t.as_str().to_owned())
        .collect();
    tags.sort();
    tags.dedup();
    if tags.is_empty() {
        return Err(if offline {
            Error::Offline(Kind::Tags)
        } else {
            Error::Upstream(
                Kind::Tags,
                UpstreamError::Unreachable("no cached tags".into()),
            )
        });
    }
    if let Some(l) = last {
        tags.retain(|t| t.as_str() > l);
    }
    if let Some(n) = n {
        tags.truncate(n as usize);
    }
    let payload = serde_json::json!({ "name": repo.as_str(), "tags": tags }).to_string();
    let mut r = body::json(payload, false);
    if !offline {
        r.headers_mut().insert(header::WARNING, STALE);
    }
    Ok(r)
}

/// Rewrites an upstream `Link: <...>; rel="next"` to the name and `ns` the client used. Only
/// the upstream's `n` and `last` parameters are kept, so neither its host nor its repository
/// name reaches the client.
pub fn next_page_link(link: &str, client_name: &Repository, ns: Option<&str>) -> Option<String> {
    let target = link.split_once('<')?.1.split_once('>')?.0;
    let base = url::Url::parse("http://upstream.invalid/").ok()?;
    let url = base.join(target).ok()?;
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in url.query_pairs() {
        if k == "n" || k == "last" {
            q.append_pair(&k, &v);
        }
    }
    if let Some(ns) = ns {
        q.append_pair("ns", ns);
    }
    Some(format!(
        "</v2/{client_name}/tags/list?{}>; rel=\"next\"",
        q.finish()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_rewriting() {
        let name: Repository = "up/team/app".parse().unwrap();
        assert_eq!(
            next_page_link(
                "</v2/team/app/tags/list?last=b&n=2>; rel=\"next\"",
                &name,
                None
            )
            .as_deref(),
            Some("</v2/up/team/app/tags/list?last=b&n=2>; rel=\"next\"")
        );
        assert_eq!(
            next_page_link(
                "<https://registry.example/v2/team/app/tags/list?n=2&last=b&x=y>; rel=\"next\"",
                &name,
                Some("docker.io")
            )
            .as_deref(),
            Some("</v2/up/team/app/tags/list?n=2&last=b&ns=docker.io>; rel=\"next\"")
        );
        assert_eq!(next_page_link("garbage", &name, None), None);
    }
}

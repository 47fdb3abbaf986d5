//! Push through the proxy: upload start, chunked `PATCH`, monolithic and closing `PUT`,
//! cross-repository mount and manifest `PUT`, streamed to the upstream with `Location`
//! headers rewritten to regcache's own paths. Pushed blobs and manifests are written through
//! to the cache, so a pull right after a push is a cache hit.

use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::app::App;
use crate::app::uploads::{SharedSpool, Spool, Taken, Upload, UploadState};
use crate::body::{self, Body, set_header as set};
use crate::cache::hasher::Hasher;
use crate::cache::store::StoredManifest;
use crate::error::{Error, Kind, UpstreamError};
use crate::flight::lock;
use crate::reference::{Algorithm, Digest, Reference, Repository};
use crate::routes::Target;
use crate::upstream::Upstream;
use crate::upstream::push::PushTarget;

/// Headers of a client's push request passed on to the upstream.
const FORWARDED: [HeaderName; 3] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
];
/// A request body that copies every chunk into a spool (hash + local file) on its way
/// upstream. Writes are plain page-cache writes of one network frame each; the spool is
/// fsynced only at commit, on a blocking thread.
struct Tee {
    inner: Body,
    spool: SharedSpool,
}

impl HttpBody for Tee {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(s) = lock(&self.spool).as_mut() {
                        if !s.broken {
                            s.hasher.update(data);
                            if s.file.write_all(data).is_err() {
                                s.broken = true;
                            }
                        }
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(s) = lock(&self.spool).as_mut() {
                    s.broken = true;
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn new_spool(app: &App, label: &str) -> Option<Spool> {
    let path = app.store.staging_path(label);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
    {
        Ok(file) => Some(Spool {
            path,
            file,
            hasher: Hasher::new(Algorithm::Sha256),
            broken: false,
        }),
        Err(e) => {
            // Pushing still works; only the write-through to the cache is lost.
            tracing::warn!(error = %e, "cannot spool a pushed blob; it will not be cached");
            None
        }
    }
}

fn forwarded(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in FORWARDED {
        if let Some(v) = headers.get(&name) {
            out.insert(name, v.clone());
        }
    }
    out
}

fn upstream_err(e: UpstreamError) -> Error {
    Error::Upstream(Kind::Blob, e)
}

/// An upstream answer that is not the success a push step expects: passed back intact.
async fn passthrough(resp: Response<Body>, idle: Duration) -> Error {
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body =
        crate::upstream::read_capped(resp.into_body(), crate::upstream::MAX_ERROR_BODY, idle)
            .await
            .unwrap_or_default();
    Error::Passthrough(status, content_type, body)
}

/// Commits a spool whose content hashes to `digest`; otherwise drops it.
async fn commit_spool(app: &App, spool: &SharedSpool, digest: &Digest) {
    let Some(mut s) = lock(spool).take() else {
        return;
    };
    if s.broken || digest.algorithm() != Algorithm::Sha256 {
        return;
    }
    let actual = std::mem::replace(&mut s.hasher, Hasher::new(Algorithm::Sha256)).finish();
    if actual != *digest {
        tracing::warn!(%digest, %actual, "pushed bytes do not match the digest; not cached");
        return;
    }
    let path = s.path.clone();
    let synced = tokio::task::spawn_blocking(move || s.file.sync_all().map(|_| s))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
    match synced {
        Ok(s) => match app.store.commit_blob(digest, &path).await {
            Ok(()) => tracing::debug!(%digest, "pushed blob written through to the cache"),
            Err(e) => {
                tracing::warn!(error = %e, %digest, "cannot cache a pushed blob");
                drop(s);
            }
        },
        Err(e) => tracing::warn!(error = %e, %digest, "cannot cache a pushed blob"),
    }
}

fn answer(status: StatusCode, location: &str) -> Response<Body> {
    let mut r = Response::new(body::empty());
    *r.status_mut() = status;
    set(&mut r, header::LOCATION, location);
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    r
}

/// Copies the headers a client needs from an upstream upload answer.
fn copy_upload_headers(from: &HeaderMap, to: &mut Response<Body>) {
    for name in [header::RANGE, crate::routes::DOCKER_CONTENT_DIGEST] {
        if let Some(v) = from.get(&name) {
            to.headers_mut().insert(name, v.clone());
        }
    }
}

/// Whether an upstream 404 means the repository does not exist (as opposed to, say, an
/// unknown upload or blob).
fn says_repository_missing(e: &Error) -> bool {
    match e {
        Error::Passthrough(404, _, body) => {
            let text = String::from_utf8_lossy(body);
            text.contains("NAME_UNKNOWN") || text.contains("RepositoryNotFound")
        }
        _ => false,
    }
}

/// Sends a push request whose body (if any) is small and held whole, so it can be sent again:
/// when the upstream is ECR with repository creation on and says the repository does not
/// exist, creates it and sends the request once more.
async fn push_creating(
    up: &Upstream,
    method: &Method,
    repo: &Repository,
    target: &PushTarget,
    headers: HeaderMap,
    body: Option<Bytes>,
) -> Result<Response<Body>, Error> {
    let send =
        |headers: HeaderMap| up.push(method, repo, target, headers, body.clone().map(body::full));
    let resp = send(headers.clone()).await.map_err(upstream_err)?;
    if resp.status() == StatusCode::NOT_FOUND && up.creates_repositories() {
        let err = passthrough(resp, up.read_idle).await;
        if !says_repository_missing(&err) {
            return Err(err);
        }
        up.create_repository(repo).await.map_err(upstream_err)?;
        return send(headers).await.map_err(upstream_err);
    }
    Ok(resp)
}

/// `POST /v2/<name>/blobs/uploads/`.
pub async fn start(
    app: &Arc<App>,
    target: &Target,
    mount: Option<(Digest, Repository)>,
    digest: Option<Digest>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response<Body>, Error> {
    let (upstream, repo, client_name) = (target.upstream(), target.repository(), &target.name);
    let up = &app.upstreams[upstream];
    if up.offline {
        return Err(Error::Offline(Kind::Blob));
    }
    let query = {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some((d, from)) = &mount {
            q.append_pair("mount", &d.to_string());
            q.append_pair("from", from.as_str());
        }
        if let Some(d) = &digest {
            q.append_pair("digest", &d.to_string());
        }
        q.finish()
    };
    let path = if query.is_empty() {
        format!("/v2/{repo}/blobs/uploads/")
    } else {
        format!("/v2/{repo}/blobs/uploads/?{query}")
    };
    let target = PushTarget::Path(path);
    let spool = Arc::new(Mutex::new(None));
    let resp = match &digest {
        // A monolithic upload carries the blob: stream it through once.
        Some(d) => {
            *lock(&spool) = new_spool(app, &d.to_string());
            let tee = Tee {
                inner: body,
                spool: spool.clone(),
            };
            up.push(
                &Method::POST,
                repo,
                &target,
                forwarded(headers),
                Some(tee.boxed_unsync()),
            )
            .await
            .map_err(upstream_err)?
        }
        None => push_creating(up, &Method::POST, repo, &target, forwarded(headers), None).await?,
    };
    match resp.status() {
        StatusCode::CREATED => {
            let d = resp
                .headers()
                .get(crate::routes::DOCKER_CONTENT_DIGEST)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse::<Digest>().ok())
                .or_else(|| digest.clone())
                .or_else(|| mount.as_ref().map(|(d, _)| d.clone()));
            if let Some(d) = &digest {
                commit_spool(app, &spool, d).await;
            }
            let location = match &d {
                Some(d) => format!("/v2/{client_name}/blobs/{d}"),
                None => format!("/v2/{client_name}/blobs/"),
            };
            let mut r = answer(StatusCode::CREATED, &location);
            copy_upload_headers(resp.headers(), &mut r);
            Ok(r)
        }
        StatusCode::ACCEPTED => {
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    upstream_err(UpstreamError::Invalid(
                        "upload started without a Location".into(),
                    ))
                })?;
            let location = up.resolve_location(location).map_err(upstream_err)?;
            let id = hex::encode(rand::random::<[u8; 16]>());
            let spool = Arc::new(Mutex::new(new_spool(app, &format!("upload-{id}"))));
            app.uploads.sessions.insert(
                id.clone(),
                Arc::new(Upload {
                    upstream,
                    repo: repo.clone(),
                    client_name: client_name.clone(),
                    state: Mutex::new(Some(UploadState { location, spool })),
                }),
            );
            let mut r = answer(
                StatusCode::ACCEPTED,
                &format!("/v2/{client_name}/blobs/uploads/{id}"),
            );
            copy_upload_headers(resp.headers(), &mut r);
            set(&mut r, HeaderName::from_static("docker-upload-uuid"), &id);
            if r.headers().get(header::RANGE).is_none() {
                r.headers_mut()
                    .insert(header::RANGE, HeaderValue::from_static("0-0"));
            }
            Ok(r)
        }
        _ => Err(passthrough(resp, up.read_idle).await),
    }
}

/// `PATCH|PUT|GET|DELETE /v2/<name>/blobs/uploads/<id>`.
pub async fn continue_upload(
    app: &Arc<App>,
    method: &Method,
    target: &Target,
    id: &str,
    digest: Option<Digest>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response<Body>, Error> {
    let client_name = &target.name;
    let upload = app.uploads.sessions.get(id).ok_or(Error::UploadUnknown)?;
    if upload.client_name != *client_name {
        return Err(Error::UploadUnknown);
    }
    let (mut taken, location, spool) = Taken::new(upload.clone()).ok_or(Error::UploadUnknown)?;
    let up = &app.upstreams[upload.upstream];
    let mut url = location.clone();
    if let Some(d) = &digest {
        url.query_pairs_mut().append_pair("digest", &d.to_string());
    }
    let target = PushTarget::Url(url);
    let sends_body = *method == Method::PATCH || *method == Method::PUT;
    let result = if sends_body {
        let tee = Tee {
            inner: body,
            spool: spool.clone(),
        };
        up.push(
            method,
            &upload.repo,
            &target,
            forwarded(headers),
            Some(tee.boxed_unsync()),
        )
        .await
    } else {
        up.push(method, &upload.repo, &target, HeaderMap::new(), None)
            .await
    };
    // On any early return from here on (or the client going away), `taken` puts the
    // upload back as it was, so the client can resume it.
    let resp = result.map_err(upstream_err)?;
    let ours = format!("/v2/{client_name}/blobs/uploads/{id}");
    match (method.clone(), resp.status()) {
        (Method::PUT, StatusCode::CREATED) => {
            taken.finish();
            app.uploads.sessions.invalidate(id);
            let d = digest.ok_or(Error::Upstream(
                Kind::Blob,
                UpstreamError::Invalid("upload closed without a digest".into()),
            ))?;
            commit_spool(app, &spool, &d).await;
            let mut r = answer(StatusCode::CREATED, &format!("/v2/{client_name}/blobs/{d}"));
            copy_upload_headers(resp.headers(), &mut r);
            set(&mut r, crate::routes::DOCKER_CONTENT_DIGEST, &d.to_string());
            Ok(r)
        }
        (Method::DELETE, s) if s.is_success() => {
            taken.finish();
            app.uploads.sessions.invalidate(id);
            let mut r = Response::new(body::empty());
            *r.status_mut() = StatusCode::NO_CONTENT;
            Ok(r)
        }
        (_, StatusCode::ACCEPTED) | (_, StatusCode::NO_CONTENT) => {
            let next = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| up.resolve_location(l).ok())
                .unwrap_or(location);
            taken.put_back(UploadState {
                location: next,
                spool,
            });
            // Seen again: a long request does not let the upload idle out.
            app.uploads.sessions.insert(id.to_owned(), upload.clone());
            let mut r = answer(resp.status(), &ours);
            copy_upload_headers(resp.headers(), &mut r);
            set(&mut r, HeaderName::from_static("docker-upload-uuid"), id);
            Ok(r)
        }
        _ => Err(passthrough(resp, up.read_idle).await),
    }
}

/// `PUT /v2/<name>/manifests/<reference>`: the manifest (small, size-capped) is read whole,
/// sent upstream and, once accepted, stored by digest.
pub async fn put_manifest(
    app: &Arc<App>,
    target: &Target,
    reference: &Reference,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response<Body>, Error> {
    let (repo, client_name) = (target.repository(), &target.name);
    let up = &app.upstreams[target.upstream()];
    if up.offline {
        return Err(Error::Offline(Kind::Manifest));
    }
    let max = app.config.cache.max_manifest_size.0;
    let bytes = crate::upstream::read_capped(body, max, up.read_idle)
        .await
        .map_err(|_| {
            Error::ManifestInvalid(format!(
                "manifest missing, unreadable or larger than {max} bytes"
            ))
        })?;
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or("").trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| crate::media::sniff(&bytes))
        .ok_or_else(|| Error::ManifestInvalid("no Content-Type and no mediaType".into()))?;
    let digest = Digest::sha256(&bytes);
    if let Reference::Digest(d) = reference {
        if *d != Digest::of(d.algorithm(), &bytes) {
            return Err(Error::ManifestInvalid(
                "body does not match the digest in the path".into(),
            ));
        }
    }
    let target = PushTarget::Path(format!("/v2/{repo}/manifests/{reference}"));
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    let resp = push_creating(up, &Method::PUT, repo, &target, h, Some(bytes.clone())).await?;
    if resp.status() != StatusCode::CREATED {
        return Err(passthrough(resp, up.read_idle).await);
    }
    if let Reference::Tag(tag) = reference {
        // Every cached answer for this tag, whatever Accept it was for, is now out of date.
        for accept in 0..(1u8 << crate::media::MANIFEST_TYPES.len()) {
            app.tags.invalidate(&crate::cache::store::TagKey {
                upstream: up.name.clone(),
                repository: repo.clone(),
                tag: tag.clone(),
                accept,
            });
        }
    }
    let manifest = StoredManifest {
        media_type,
        body: bytes,
    };
    if let Err(e) = app.store.put_manifest(&digest, &manifest).await {
        tracing::warn!(error = %e, %digest, "cannot cache a pushed manifest");
    }
    let mut r = answer(
        StatusCode::CREATED,
        &format!("/v2/{client_name}/manifests/{digest}"),
    );
    set(
        &mut r,
        crate::routes::DOCKER_CONTENT_DIGEST,
        &digest.to_string(),
    );
    Ok(r)
}

/// `HEAD /v2/<name>/blobs/<digest>` from a pushing client: asks the upstream whether the
/// repository there has the blob (the cache cannot answer that for a push).
pub async fn blob_exists(
    app: &Arc<App>,
    target: &Target,
    digest: &Digest,
) -> Result<Response<Body>, Error> {
    let repo = target.repository();
    let up = &app.upstreams[target.upstream()];
    if up.offline {
        return Err(Error::Offline(Kind::Blob));
    }
    let target = PushTarget::Path(format!("/v2/{repo}/blobs/{digest}"));
    let resp = up
        .push(&Method::HEAD, repo, &target, HeaderMap::new(), None)
        .await
        .map_err(upstream_err)?;
    match resp.status() {
        StatusCode::OK => {
            let mut r = Response::new(body::empty());
            for name in [header::CONTENT_LENGTH, crate::routes::DOCKER_CONTENT_DIGEST] {
                if let Some(v) = resp.headers().get(&name) {
                    r.headers_mut().insert(name, v.clone());
                }
            }
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            Ok(r)
        }
        StatusCode::NOT_FOUND => Err(Error::BlobUnknown),
        _ => Err(passthrough(resp, up.read_idle).await),
    }
}

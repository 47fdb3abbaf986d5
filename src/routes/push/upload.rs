//! Blob uploads through the proxy: upload start (with mount or monolithic), chunked
//! `PATCH`, closing `PUT`, status `GET` and `DELETE`. The bytes are copied into a spool on
//! their way upstream and the spool is committed to the cache once its digest checks out.

use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use super::{answer, forwarded, passthrough, push_creating, upstream_err};
use crate::app::App;
use crate::app::uploads::{SharedSpool, Spool, Taken, Upload, UploadState};
use crate::body::{self, Body, set_header as set};
use crate::cache::hasher::Hasher;
use crate::error::{Error, Kind, UpstreamError};
use crate::flight::lock;
use crate::reference::{Algorithm, Digest, Repository};
use crate::routes::Target;
use crate::upstream::push::PushTarget;

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

/// Copies the headers a client needs from an upstream upload answer.
fn copy_upload_headers(from: &HeaderMap, to: &mut Response<Body>) {
    for name in [header::RANGE, crate::routes::DOCKER_CONTENT_DIGEST] {
        if let Some(v) = from.get(&name) {
            to.headers_mut().insert(name, v.clone());
        }
    }
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
            if let Some(f) = &app.fleet {
                let at = Step {
                    location: &location,
                    step: 0,
                    offset: Some(0),
                };
                share(f, &id, up.name.as_str(), (repo, client_name), at).await;
            }
            let spool = Arc::new(Mutex::new(new_spool(app, &format!("upload-{id}"))));
            app.uploads.sessions.insert(
                id.clone(),
                Arc::new(Upload {
                    upstream,
                    repo: repo.clone(),
                    client_name: client_name.clone(),
                    state: Mutex::new(Some(UploadState {
                        location,
                        spool,
                        offset: Some(0),
                        step: 0,
                    })),
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

/// Where an upload stands after a step.
struct Step<'a> {
    location: &'a url::Url,
    step: u64,
    offset: Option<u64>,
}

/// Writes where upload `id` stands to the fleet's store, so any replica continues it.
async fn share(
    fleet: &crate::fleet::Fleet,
    id: &str,
    upstream: &str,
    (repo, client_name): (&Repository, &Repository),
    at: Step<'_>,
) {
    let state = crate::fleet::uploads::SharedUpload {
        upstream: upstream.to_owned(),
        repository: repo.to_string(),
        client_name: client_name.to_string(),
        location: at.location.to_string(),
        step: at.step,
        offset: at.offset,
    };
    if let Err(error) = fleet.put_upload(id, &state).await {
        // The upload goes on; only a step on another replica would not find it.
        tracing::warn!(%error, "cannot share an upload's state with the fleet");
    }
}

/// An upload another replica started, taken up here from its shared state (without a local
/// copy: its first bytes are elsewhere).
fn adopt_upload(
    app: &App,
    id: &str,
    s: &crate::fleet::uploads::SharedUpload,
) -> Result<Arc<Upload>, Error> {
    let upstream = app
        .upstreams
        .iter()
        .position(|u| u.name == s.upstream)
        .ok_or(Error::UploadUnknown)?;
    let upload = Arc::new(Upload {
        upstream,
        repo: s.repository.parse().map_err(|_| Error::UploadUnknown)?,
        client_name: s.client_name.parse().map_err(|_| Error::UploadUnknown)?,
        state: Mutex::new(Some(UploadState {
            // Checked as an upstream's own `Location` is.
            location: app.upstreams[upstream]
                .resolve_location(&s.location)
                .map_err(|_| Error::UploadUnknown)?,
            spool: Arc::new(Mutex::new(None)),
            offset: s.offset,
            step: s.step,
        })),
    });
    app.uploads.sessions.insert(id.to_owned(), upload.clone());
    Ok(upload)
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
    // In a fleet the store holds where the upload stands: the previous step may have gone
    // to another replica.
    let shared = match &app.fleet {
        Some(f) => f.upload(id).await,
        None => None,
    };
    let upload = match (app.uploads.sessions.get(id), &shared) {
        (Some(u), _) => u,
        (None, Some(s)) => adopt_upload(app, id, s)?,
        (None, None) => return Err(Error::UploadUnknown),
    };
    if upload.client_name != *client_name {
        return Err(Error::UploadUnknown);
    }
    let (mut taken, mut location, spool, mut step) =
        Taken::new(upload.clone()).ok_or(Error::UploadUnknown)?;
    let mut offset = taken.offset();
    if let Some(s) = shared.as_ref().filter(|s| s.step != step) {
        // Another replica took the last steps: go on from there; the local copy misses
        // their bytes, so this replica does not write the blob through.
        location = app.upstreams[upload.upstream]
            .resolve_location(&s.location)
            .map_err(|_| Error::UploadUnknown)?;
        step = s.step;
        offset = s.offset;
        lock(&spool).take();
    }
    if *method == Method::PATCH || *method == Method::PUT {
        // A chunk sent twice or out of order never reaches the upstream; `taken` puts the
        // upload back as it was.
        super::offset::check(offset, headers)?;
    }
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
            if let Some(f) = &app.fleet {
                f.forget_upload(id).await;
            }
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
            if let Some(f) = &app.fleet {
                f.forget_upload(id).await;
            }
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
            let offset = if *method == Method::GET {
                offset
            } else {
                super::offset::after_chunk(offset, headers, resp.headers())
            };
            let step = step + 1;
            if let Some(f) = &app.fleet {
                let at = Step {
                    location: &next,
                    step,
                    offset,
                };
                let names = (&upload.repo, &upload.client_name);
                share(f, id, up.name.as_str(), names, at).await;
            }
            taken.put_back(UploadState {
                location: next,
                spool,
                offset,
                step,
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

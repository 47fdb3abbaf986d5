//! Push through the proxy: upload start, chunked `PATCH`, monolithic and closing `PUT`,
//! cross-repository mount and manifest `PUT`, streamed to the upstream with `Location`
//! headers rewritten to regcache's own paths. Pushed blobs and manifests are written through
//! to the cache, so a pull right after a push is a cache hit. This file holds what the push
//! steps share and the pusher's blob `HEAD`; `upload` the blob uploads, `manifest` the
//! manifest `PUT`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};

use crate::app::App;
use crate::body::{self, Body, set_header as set};
use crate::error::{Error, Kind, UpstreamError};
use crate::reference::{Digest, Repository};
use crate::routes::Target;
use crate::upstream::Upstream;
use crate::upstream::push::PushTarget;

mod manifest;
mod offset;
mod upload;

pub use manifest::put_manifest;
pub use upload::{continue_upload, start};

/// Headers of a client's push request passed on to the upstream.
const FORWARDED: [HeaderName; 3] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
];

/// The headers of a client's push request that go upstream with it.
pub(super) fn forwarded(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in FORWARDED {
        if let Some(v) = headers.get(&name) {
            out.insert(name, v.clone());
        }
    }
    out
}

/// An upstream failure of a push step (blob kind: uploads and mounts).
pub(super) fn upstream_err(e: UpstreamError) -> Error {
    Error::Upstream(Kind::Blob, e)
}

/// An upstream answer that is not the success a push step expects: passed back intact.
pub(super) async fn passthrough(resp: Response<Body>, idle: Duration) -> Error {
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

/// An empty answer with `status` and `Location`.
pub(super) fn answer(status: StatusCode, location: &str) -> Response<Body> {
    let mut r = Response::new(body::empty());
    *r.status_mut() = status;
    set(&mut r, header::LOCATION, location);
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    r
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
pub(super) async fn push_creating(
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

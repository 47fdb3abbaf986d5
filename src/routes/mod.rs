//! Registry routes: one function per route, each shaping its HTTP answer (`Content-Type`,
//! `Content-Length`, `Docker-Content-Digest`, `ETag`) from validated names.

use http::{HeaderValue, Response, header};

use crate::body::{self, Body, set_header as set};
use crate::cache::store::StoredManifest;
use crate::reference::Digest;

pub mod admin;
pub mod blobs;
pub mod manifests;
pub mod push;
pub mod tags;

pub(crate) const DOCKER_CONTENT_DIGEST: header::HeaderName =
    header::HeaderName::from_static("docker-content-digest");

/// Marks an answer served from the cache after the upstream could not confirm it.
pub(crate) const STALE: HeaderValue =
    HeaderValue::from_static("110 regcache \"Response is Stale\"");

pub(crate) fn manifest_response(
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

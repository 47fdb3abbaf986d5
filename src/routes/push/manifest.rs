//! `PUT /v2/<name>/manifests/<reference>` through the proxy: sent upstream, then stored by
//! digest, and every cached answer for a pushed tag forgotten.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};

use super::{answer, passthrough, push_creating};
use crate::app::App;
use crate::body::{Body, set_header as set};
use crate::cache::store::StoredManifest;
use crate::error::{Error, Kind};
use crate::reference::{Digest, Reference};
use crate::routes::Target;
use crate::upstream::push::PushTarget;

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
            app.tags.remove(&crate::cache::store::TagKey {
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

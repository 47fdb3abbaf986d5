//! `DELETE` of manifests (by digest or tag) and blobs: passed on to the upstream for clients
//! with the `delete` permission (checked before this runs), then every cached answer it makes
//! wrong is evicted (the manifest or blob by digest, the tags that pointed at it), so a `GET`
//! right after is the upstream's `404`, not a stale hit. Off unless `auth.delete = true`
//! (`405 UNSUPPORTED`).

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};

use super::Target;
use crate::app::App;
use crate::body::{self, Body};
use crate::cache::store::TagKey;
use crate::error::{Error, Kind};
use crate::reference::{Digest, Reference, Repository};

/// What is deleted.
pub enum What {
    /// A manifest by digest, or a tag.
    Manifest(Reference),
    /// A blob by digest.
    Blob(Digest),
}

/// `DELETE /v2/<name>/manifests/<reference>` and `DELETE /v2/<name>/blobs/<digest>`.
pub async fn delete(app: &Arc<App>, target: &Target, what: What) -> Result<Response<Body>, Error> {
    let up = &app.upstreams[target.upstream()];
    let kind = match what {
        What::Manifest(_) => Kind::Manifest,
        What::Blob(_) => Kind::Blob,
    };
    if up.offline {
        return Err(Error::Offline(kind));
    }
    let repo = target.repository();
    let path = match &what {
        What::Manifest(r) => format!("/v2/{repo}/manifests/{r}"),
        What::Blob(d) => format!("/v2/{repo}/blobs/{d}"),
    };
    // `delete` is the action newer registries check, `*` what distribution 2.x checks for a
    // DELETE; a token server grants whichever of them the account holds.
    let scope = format!("repository:{repo}:delete,*");
    let resp = up
        .exchange(&Method::DELETE, &scope, &path, HeaderMap::new())
        .await
        .map_err(|e| Error::Upstream(kind, e))?;
    let status = resp.status();
    if !status.is_success() {
        // The upstream's own refusal (405 when it does not allow deletes, 404) reaches the
        // client intact.
        return Err(super::push::passthrough(resp, up.read_idle).await);
    }
    match &what {
        What::Manifest(Reference::Tag(tag)) => {
            evict_tags(app, &up.name, repo, |k, _| k.tag == *tag).await;
        }
        What::Manifest(Reference::Digest(d)) => {
            evict_tags(app, &up.name, repo, |_, to| to == d).await;
            remove(app, d).await;
        }
        What::Blob(d) => remove(app, d).await,
    }
    tracing::info!(upstream = %up.name, repository = %repo, %path, "deleted at the upstream");
    let mut r = Response::new(body::empty());
    *r.status_mut() = if status == StatusCode::OK {
        StatusCode::ACCEPTED
    } else {
        status
    };
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    Ok(r)
}

async fn remove(app: &App, d: &Digest) {
    if let Err(e) = app.store.remove_content(d).await {
        tracing::warn!(error = %e, digest = %d, "cannot evict deleted content from the cache");
    }
}

/// Forgets the cached tag answers of `repo` that `matches` (by key and digest), in memory
/// and on disk.
async fn evict_tags(
    app: &App,
    upstream: &str,
    repo: &Repository,
    matches: impl Fn(&TagKey, &Digest) -> bool,
) {
    let in_memory: Vec<TagKey> = app
        .tags
        .iter()
        .filter(|(k, e)| {
            k.upstream == upstream && k.repository == *repo && matches(k, &e.record.digest)
        })
        .map(|(k, _)| k)
        .collect();
    for k in &in_memory {
        app.tags.remove(k);
    }
    let on_disk = match app.store.tags_of(upstream, repo).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list cached tags to evict");
            Vec::new()
        }
    };
    for (tag, accept, record) in on_disk {
        let k = TagKey {
            upstream: upstream.to_owned(),
            repository: repo.clone(),
            tag,
            accept,
        };
        if matches(&k, &record.digest) {
            app.tags.remove(&k);
            if let Err(e) = app.store.remove_tag(&k).await {
                tracing::warn!(error = %e, "cannot evict a deleted tag from the cache");
            }
        }
    }
}

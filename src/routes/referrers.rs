//! `GET /v2/<name>/referrers/<digest>` (OCI 1.1): the signatures, SBOMs and attestations
//! that refer to a manifest. Read from the upstream's referrers API or its referrers tag
//! schema (`upstream::referrers`); either way the client gets an OCI image index, filtered by
//! `artifactType` (announced with `OCI-Filters-Applied`). Answers are cached per subject for
//! the tag TTL and served stale, with a `Warning`, when the upstream cannot be reached.
//!
//! Without an answer in memory (after a restart, or for images loaded by `regcache import`),
//! an offline upstream, or one that cannot be reached, is answered from the cache folder's
//! referrers index: the cached manifests whose `subject` is the digest asked about.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Response, header};

use super::Target;
use crate::app::App;
use crate::body::{self, Body};
use crate::cache::referrers::ReferrersEntry;
use crate::error::{Error, Kind};
use crate::reference::Digest;
use crate::upstream::referrers::INDEX;

const FILTERS_APPLIED: header::HeaderName = header::HeaderName::from_static("oci-filters-applied");

/// Answers a referrers request.
pub async fn referrers(
    app: &Arc<App>,
    target: &Target,
    subject: &Digest,
    artifact_type: Option<String>,
    head: bool,
) -> Result<Response<Body>, Error> {
    let up = &app.upstreams[target.upstream()];
    let key = (
        up.name.clone(),
        target.repository().clone(),
        subject.clone(),
    );
    let cached = app.referrers.entries.get(&key);
    let wanted = artifact_type.as_deref();
    if let Some(c) = &cached {
        if up.offline || c.is_fresh(up.tag_ttl) {
            return Ok(answer(&c.manifests, wanted, head, false));
        }
    }
    if up.offline {
        // The cache is all there is: when it holds the subject, what it has is the answer.
        let subject_cached = app.store.manifest(subject).await?.is_some();
        return match on_disk(app, subject).await? {
            list if !list.is_empty() || subject_cached => Ok(answer(&list, wanted, head, false)),
            _ => Err(Error::Offline(Kind::Manifest)),
        };
    }
    match up.referrers(target.repository(), subject).await {
        Ok(manifests) => {
            let entry = ReferrersEntry::fresh(manifests);
            let r = answer(&entry.manifests, wanted, head, false);
            app.referrers.entries.insert(key, entry);
            Ok(r)
        }
        Err(e) if e.is_unhealthy() && cached.is_some() => {
            tracing::warn!(error = %e, %subject, "serving stale referrers");
            let c = cached
                .as_ref()
                .map(|c| c.manifests.clone())
                .unwrap_or_default();
            Ok(answer(&c, wanted, head, true))
        }
        Err(e) if e.is_unhealthy() => match on_disk(app, subject).await? {
            list if !list.is_empty() => {
                tracing::warn!(error = %e, %subject, "serving referrers from the disk");
                Ok(answer(&list, wanted, head, true))
            }
            _ => Err(Error::Upstream(Kind::Manifest, e)),
        },
        Err(e) => Err(Error::Upstream(Kind::Manifest, e)),
    }
}

/// The descriptors of the cached manifests whose `subject` is `subject`, from the store's
/// on-disk index (bounded by `cache::referrers::MAX_ON_DISK`); markers whose manifest is
/// gone are skipped.
async fn on_disk(app: &App, subject: &Digest) -> Result<Vec<serde_json::Value>, Error> {
    let mut out = Vec::new();
    for d in app.store.referrers_of(subject).await? {
        if let Some(m) = app.store.manifest(&d).await? {
            out.push(crate::cache::referrers::descriptor(
                &d,
                &m.media_type,
                &m.body,
            ));
        }
    }
    Ok(out)
}

/// The index answered to the client, filtered by `artifact_type`.
pub fn index(manifests: &[serde_json::Value], artifact_type: Option<&str>) -> Bytes {
    let kept: Vec<&serde_json::Value> = manifests
        .iter()
        .filter(|d| {
            artifact_type.is_none_or(|t| d.get("artifactType").and_then(|x| x.as_str()) == Some(t))
        })
        .collect();
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": kept,
    })
    .to_string()
    .into()
}

fn answer(
    manifests: &[serde_json::Value],
    artifact_type: Option<&str>,
    head: bool,
    stale: bool,
) -> Response<Body> {
    let b = index(manifests, artifact_type);
    let len = b.len();
    let mut r = Response::new(if head { body::empty() } else { body::full(b) });
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(INDEX));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if artifact_type.is_some() {
        h.insert(FILTERS_APPLIED, HeaderValue::from_static("artifactType"));
    }
    if stale {
        h.insert(header::WARNING, super::STALE);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filtering() {
        let list = vec![
            serde_json::json!({"mediaType":"m","digest":"sha256:1","size":1,"artifactType":"sig"}),
            serde_json::json!({"mediaType":"m","digest":"sha256:2","size":1,"artifactType":"sbom"}),
        ];
        let v: serde_json::Value = serde_json::from_slice(&index(&list, Some("sbom"))).unwrap();
        assert_eq!(v["mediaType"], INDEX);
        assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(v["manifests"][0]["digest"], "sha256:2");
        let v: serde_json::Value = serde_json::from_slice(&index(&[], None)).unwrap();
        assert_eq!(v["manifests"], serde_json::json!([]));
        let r = answer(&list, Some("sig"), false, true);
        assert_eq!(r.headers()[FILTERS_APPLIED], "artifactType");
        assert!(r.headers().contains_key(header::WARNING));
    }
}

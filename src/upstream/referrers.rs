//! The referrers of a manifest (OCI 1.1) at the upstream: the referrers API, or the referrers
//! tag schema (`sha256-<hex>` tag holding an index) when the upstream lacks the API, read into
//! the list of descriptors either way.

use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use super::{Upstream, read_capped};
use crate::error::UpstreamError;
use crate::reference::{Digest, Reference, Repository, Tag};

/// The media type of a referrers answer (and of the fallback tag's manifest).
pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";

impl Upstream {
    /// Every referrer of `subject` in `repo`, unfiltered: from the referrers API, else (a
    /// `404`) from the fallback tag, else none.
    pub async fn referrers(
        &self,
        repo: &Repository,
        subject: &Digest,
    ) -> Result<Vec<serde_json::Value>, UpstreamError> {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_static(INDEX));
        let resp = self
            .request(
                &Method::GET,
                repo,
                &format!("/v2/{repo}/referrers/{subject}"),
                h,
            )
            .await?;
        match resp.status() {
            StatusCode::OK => {
                let (parts, body) = resp.into_parts();
                let body = read_capped(body, self.max_manifest_size, self.read_idle)
                    .await
                    .map_err(|e| e.at(&self.name))?;
                manifests_of(&super::encoding::decode(
                    &parts.headers,
                    body,
                    self.max_manifest_size,
                )?)
            }
            // No referrers API: the tag schema. No tag either: no referrers.
            StatusCode::NOT_FOUND => {
                let Some(tag) = fallback_tag(subject) else {
                    return Ok(Vec::new());
                };
                match self
                    .manifest(repo, &Reference::Tag(tag), INDEX, false)
                    .await
                {
                    Ok(m) => manifests_of(&m.body),
                    Err(UpstreamError::Status(404)) => Ok(Vec::new()),
                    Err(e) => Err(e),
                }
            }
            s => Err(UpstreamError::Status(s.as_u16())),
        }
    }
}

/// The referrers tag schema's tag for `subject`: `<algorithm>-<hex>`, at most 128 characters
/// (`None` only if the tag grammar refused it).
pub fn fallback_tag(subject: &Digest) -> Option<Tag> {
    let mut s = format!("{}-{}", subject.algorithm().as_str(), subject.hex());
    s.truncate(128);
    s.parse().ok()
}

/// The descriptors in an index's `manifests` (those with a digest); anything that is not an
/// index is an error.
pub fn manifests_of(body: &[u8]) -> Result<Vec<serde_json::Value>, UpstreamError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| UpstreamError::Invalid("referrers answer is not JSON".into()))?;
    let list = v
        .get("manifests")
        .and_then(|m| m.as_array())
        .ok_or_else(|| UpstreamError::Invalid("referrers answer is not an image index".into()))?;
    Ok(list
        .iter()
        .filter(|d| d.get("digest").and_then(|x| x.as_str()).is_some())
        .cloned()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_schema_and_descriptors() {
        let d: Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        assert_eq!(
            fallback_tag(&d).unwrap().to_string(),
            format!("sha256-{}", "ab".repeat(32))
        );
        let list = manifests_of(
            br#"{"schemaVersion":2,"manifests":[
                {"mediaType":"m","digest":"sha256:1","size":1,"artifactType":"sig"},
                {"mediaType":"m","digest":"sha256:2","size":1,"artifactType":"sbom"},
                {"nodigest":true}]}"#,
        )
        .unwrap();
        assert_eq!(list.len(), 2);
        assert!(manifests_of(b"{}").is_err());
        assert!(manifests_of(b"nope").is_err());
    }
}

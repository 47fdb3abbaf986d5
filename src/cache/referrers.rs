//! Referrers answers (OCI 1.1) held in memory per `(upstream, repository, subject)`: the
//! descriptors last read from the upstream and when, so they are served for the tag TTL and
//! served stale while the upstream cannot be reached.
//!
//! Also the two pure steps of the on-disk referrers index (see `layout`): the `subject` a
//! manifest names, and the descriptor a referrers index lists for a cached manifest.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use serde::Deserialize;

use crate::reference::{Digest, Repository};

/// Which subject: upstream name, repository at the upstream, subject digest.
pub type ReferrersKey = (String, Repository, Digest);

/// The referrers of one subject as last read from the upstream, unfiltered.
#[derive(Debug, Clone)]
pub struct ReferrersEntry {
    /// The index's `manifests` descriptors.
    pub manifests: Arc<Vec<serde_json::Value>>,
    /// When the upstream answered them.
    pub checked: Instant,
}

impl ReferrersEntry {
    /// An answer the upstream gave just now.
    pub fn fresh(manifests: Vec<serde_json::Value>) -> Self {
        ReferrersEntry {
            manifests: Arc::new(manifests),
            checked: Instant::now(),
        }
    }

    /// Whether it is younger than `ttl`.
    pub fn is_fresh(&self, ttl: Duration) -> bool {
        self.checked.elapsed() < ttl
    }
}

/// Most referrers of one subject listed from the disk (a bound on one answer's work).
pub const MAX_ON_DISK: usize = 1000;

/// Referrers answers, bounded in number.
pub struct ReferrersCache {
    /// By subject.
    pub entries: moka::sync::Cache<ReferrersKey, ReferrersEntry>,
}

impl Default for ReferrersCache {
    fn default() -> Self {
        ReferrersCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(10_000)
                // Kept well past the TTL so a stale answer can stand in while the upstream
                // is down; idle ones go.
                .time_to_idle(Duration::from_secs(7 * 24 * 3600))
                .build(),
        }
    }
}

/// The digest a manifest's `subject` field names; `None` when it has none or is not JSON.
pub fn subject_of(body: &[u8]) -> Option<Digest> {
    #[derive(Deserialize)]
    struct Subject {
        digest: String,
    }
    #[derive(Deserialize)]
    struct Shape {
        subject: Option<Subject>,
    }
    // Most manifests have no subject: skip parsing those.
    if !body.windows(9).any(|w| w == b"\"subject\"") {
        return None;
    }
    serde_json::from_slice::<Shape>(body)
        .ok()?
        .subject?
        .digest
        .parse()
        .ok()
}

/// The descriptor of a cached referrer, as a referrers index lists it: `mediaType`,
/// `digest`, `size`, `artifactType` (the manifest's own, else its config's media type) and
/// its `annotations`.
pub fn descriptor(digest: &Digest, media_type: &str, body: &[u8]) -> serde_json::Value {
    #[derive(Deserialize)]
    struct Config {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    #[derive(Deserialize)]
    struct Shape {
        #[serde(rename = "artifactType")]
        artifact_type: Option<String>,
        config: Option<Config>,
        annotations: Option<serde_json::Map<String, serde_json::Value>>,
    }
    let shape = serde_json::from_slice::<Shape>(body).ok();
    let mut d = serde_json::json!({
        "mediaType": media_type,
        "digest": digest.to_string(),
        "size": body.len(),
    });
    if let Some(s) = shape {
        let artifact_type = s
            .artifact_type
            .or_else(|| s.config.and_then(|c| c.media_type))
            .filter(|t| !t.is_empty());
        if let Some(t) = artifact_type {
            d["artifactType"] = t.into();
        }
        if let Some(a) = s.annotations.filter(|a| !a.is_empty()) {
            d["annotations"] = a.into();
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn subjects_are_read_and_junk_is_skipped() {
        let s = Digest::sha256(b"image");
        let m = manifest(serde_json::json!({
            "schemaVersion": 2,
            "subject": {"mediaType": "x", "digest": s.to_string(), "size": 5},
        }));
        assert_eq!(subject_of(&m), Some(s));
        assert_eq!(subject_of(br#"{"schemaVersion":2}"#), None);
        assert_eq!(subject_of(br#"{"subject":{"digest":"sha256:zz"}}"#), None);
        assert_eq!(subject_of(br#"{"subject": not json"#), None);
        assert_eq!(subject_of(br#"{"subject":null}"#), None);
    }

    #[test]
    fn descriptors_name_the_artifact_type() {
        let own = manifest(serde_json::json!({
            "schemaVersion": 2, "artifactType": "application/spdx+json",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json"},
            "annotations": {"org.opencontainers.image.created": "2026-01-01T00:00:00Z"},
        }));
        let d = Digest::sha256(&own);
        let v = descriptor(&d, crate::media::OCI_MANIFEST, &own);
        assert_eq!(v["artifactType"], "application/spdx+json");
        assert_eq!(v["digest"], d.to_string());
        assert_eq!(v["size"], own.len());
        assert_eq!(v["mediaType"], crate::media::OCI_MANIFEST);
        assert_eq!(
            v["annotations"]["org.opencontainers.image.created"],
            "2026-01-01T00:00:00Z"
        );
        let by_config = manifest(serde_json::json!({
            "schemaVersion": 2, "config": {"mediaType": "application/vnd.dev.cosign"},
        }));
        let v = descriptor(&d, crate::media::OCI_MANIFEST, &by_config);
        assert_eq!(v["artifactType"], "application/vnd.dev.cosign");
        assert!(v.get("annotations").is_none());
    }
}

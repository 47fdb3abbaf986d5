//! `regcache prefetch` carries an image's referrers (signatures, SBOMs, attestations): each
//! manifest the referrers API lists is fetched with its blobs, by default; `--no-referrers`
//! (here `referrers: false`) leaves them out.

mod fake;

use std::path::Path;

use fake::*;
use regcache::airgap::name::ImageName;
use regcache::airgap::prefetch::{self, PrefetchArgs};

const MT: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn cached_manifest(cache: &Path, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    cache
        .join("manifests/sha256")
        .join(&hex[..2])
        .join(hex)
        .exists()
}

fn cached_blob(cache: &Path, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    cache
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .exists()
}

/// An image `lib/app:1` and one SBOM referring to it, listed by the referrers tag schema.
fn upstream_with_a_referrer(up: &FakeUpstream) -> (String, String, String) {
    let config = bytes::Bytes::from_static(b"{\"architecture\":\"amd64\",\"os\":\"linux\"}");
    let c = up.add_blob(config.clone());
    let image = serde_json::json!({
        "schemaVersion": 2, "mediaType": MT,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c, "size": config.len()},
        "layers": [],
    })
    .to_string();
    let image_digest = up.add_manifest("lib/app", "1", MT, image.as_bytes());
    let sbom = bytes::Bytes::from_static(b"{\"spdxVersion\":\"SPDX-2.3\"}");
    let s = up.add_blob(sbom.clone());
    let referrer = serde_json::json!({
        "schemaVersion": 2, "mediaType": MT,
        "artifactType": "application/spdx+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": c, "size": config.len()},
        "layers": [{"mediaType": "application/spdx+json", "digest": s, "size": sbom.len()}],
        "subject": {"mediaType": MT, "digest": image_digest, "size": image.len()},
    })
    .to_string();
    let referrer_digest = sha(referrer.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2, "mediaType": INDEX,
        "manifests": [{"mediaType": MT, "digest": referrer_digest, "size": referrer.len(), "artifactType": "application/spdx+json"}],
    })
    .to_string();
    let fallback = format!("sha256-{}", image_digest.trim_start_matches("sha256:"));
    up.add_manifest("lib/app", &fallback, INDEX, index.as_bytes());
    // The referrer by digest (the fake derives digest lookups from tagged manifests).
    up.add_manifest("lib/app", "sbom", MT, referrer.as_bytes());
    (image_digest, referrer_digest, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_carries_referrers_unless_told_not_to() {
    let up = FakeUpstream::start().await;
    let (image, referrer, sbom_blob) = upstream_with_a_referrer(&up);
    for with in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config_for(&up.url());
        cfg.cache_dir = dir.path().to_owned();
        let args = PrefetchArgs {
            images: vec!["lib/app:1".parse::<ImageName>().unwrap()],
            platforms: Vec::new(),
            jobs: 2,
            referrers: with,
        };
        assert!(prefetch::run(cfg, args).await.unwrap(), "prefetch failed");
        assert!(cached_manifest(dir.path(), &image));
        assert_eq!(
            cached_manifest(dir.path(), &referrer),
            with,
            "referrer, with={with}"
        );
        assert_eq!(
            cached_blob(dir.path(), &sbom_blob),
            with,
            "its blob, with={with}"
        );
    }
}

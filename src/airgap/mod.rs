//! Air-gapped farms: `regcache prefetch` warms a cache from the upstreams, `regcache export`
//! writes cached images as an OCI image layout, `regcache import` loads one into a cache that
//! an offline regcache then serves.
//!
//! Shared here: the error type, the `Accept` lists real clients send (tag records are keyed
//! by them), and recording a tag for all of those clients at once.
//!
//! - [`name`]: image names and `--platform` values, and their routing (pure).
//! - [`oci`]: descriptors, manifest children, `oci-layout` and `index.json` (pure).
//! - [`prefetch`], [`export`], [`import`]: the three commands.
//! - [`archive`]: layouts as tar files, written and read.
//! - [`progress`]: what the commands print.
//! - [`verify`]: content hashed while it is copied, staged only when it matches.

pub mod archive;
pub mod export;
pub mod import;
pub mod name;
pub mod oci;
pub mod prefetch;
pub mod progress;
pub mod verify;

use std::io;

use http::{HeaderMap, HeaderValue, header};

use crate::cache::store::{BlobStore, TagKey, TagRecord};
use crate::media::{self, Accept};
use crate::reference::{Digest, Repository, Tag};

/// Why an image could not be prefetched, exported or imported.
#[derive(Debug, thiserror::Error)]
pub enum AirgapError {
    /// The name cannot be parsed or routed.
    #[error(transparent)]
    Name(#[from] name::NameError),
    /// Manifest or layout content is not what it must be.
    #[error(transparent)]
    Format(#[from] oci::FormatError),
    /// A file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// Which file or step.
        context: String,
        /// Why.
        source: io::Error,
    },
    /// regcache answered a request with an error.
    #[error("{0}")]
    Fetch(String),
    /// Content an image needs is not there.
    #[error("missing {}", .0.join("; "))]
    Missing(Vec<String>),
    /// Content does not hash to its digest, or has the wrong size.
    #[error("{}", .0.join("; "))]
    Corrupt(Vec<String>),
    /// A layout was refused as a whole; each problem in words.
    #[error("layout refused, nothing imported: {}", .0.join("; "))]
    Rejected(Vec<String>),
    /// Anything else, said in words.
    #[error("{0}")]
    Other(String),
}

/// Wraps an I/O error with what was being done.
pub(crate) fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> AirgapError {
    let context = context.into();
    move |source| AirgapError::Io { context, source }
}

/// Wraps an I/O error on writing `path`.
pub(crate) fn write_error(path: &std::path::Path) -> impl FnOnce(io::Error) -> AirgapError + '_ {
    move |source| AirgapError::Io {
        context: format!("writing {}", path.display()),
        source,
    }
}

/// Docker 20.10: six `Accept` lines.
pub const DOCKER_ACCEPT: [&str; 6] = [
    media::DOCKER_V2,
    media::DOCKER_LIST,
    media::OCI_MANIFEST,
    media::OCI_INDEX,
    media::DOCKER_V1_SIGNED,
    "application/json",
];

/// containerd 1.6: one line ending in `*/*`.
const CONTAINERD_ACCEPT: [&str; 1] = ["application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, */*"];

/// skopeo and podman (containers/image): six `Accept` lines.
const CONTAINERS_IMAGE_ACCEPT: [&str; 6] = [
    media::OCI_MANIFEST,
    media::DOCKER_V2,
    media::DOCKER_V1_SIGNED,
    media::DOCKER_V1,
    media::DOCKER_LIST,
    media::OCI_INDEX,
];

/// What Docker, containerd and skopeo/podman accept, as regcache reads their headers.
pub fn client_accepts() -> Vec<Accept> {
    [
        &DOCKER_ACCEPT[..],
        &CONTAINERD_ACCEPT[..],
        &CONTAINERS_IMAGE_ACCEPT[..],
    ]
    .iter()
    .map(|lines| {
        let mut h = HeaderMap::new();
        for l in *lines {
            h.append(header::ACCEPT, HeaderValue::from_static(l));
        }
        Accept::from_headers(&h)
    })
    .collect()
}

/// The accept keys under which a tag answer of `media_type` is recorded: those of the
/// clients in [`client_accepts`] that take it, each once.
pub fn tag_keys_for(media_type: &str) -> Vec<u8> {
    let mut keys: Vec<u8> = client_accepts()
        .iter()
        .filter(|a| a.accepts(media_type))
        .map(Accept::key)
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Records that `tag` is `digest` for every client of [`client_accepts`] that accepts its
/// type, and forgets what the cache held for the tag under other keys, so no client is
/// served an older answer. Returns how many records were written.
pub async fn record_tag(
    store: &dyn BlobStore,
    upstream: &str,
    repository: &Repository,
    tag: &Tag,
    digest: &Digest,
    media_type: &str,
) -> io::Result<usize> {
    let keys = tag_keys_for(media_type);
    let key = |accept| TagKey {
        upstream: upstream.to_owned(),
        repository: repository.clone(),
        tag: tag.clone(),
        accept,
    };
    for (t, accept, _) in store.tags_of(upstream, repository).await? {
        if t == *tag && !keys.contains(&accept) {
            store.remove_tag(&key(accept)).await?;
        }
    }
    let record = TagRecord {
        digest: digest.clone(),
        media_type: media_type.to_owned(),
    };
    for k in &keys {
        store.put_tag(&key(*k), &record).await?;
    }
    Ok(keys.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_keys_cover_each_client_once() {
        let accepts = client_accepts();
        // Docker leaves out schema 1 unsigned; containerd and skopeo take all six types.
        assert_eq!(
            accepts.iter().map(Accept::key).collect::<Vec<_>>(),
            vec![0b01_1111, 0b11_1111, 0b11_1111]
        );
        assert_eq!(tag_keys_for(media::OCI_INDEX), vec![0b01_1111, 0b11_1111]);
        assert_eq!(tag_keys_for(media::DOCKER_V2), vec![0b01_1111, 0b11_1111]);
        // Only containerd's `*/*` takes an artifact type.
        assert_eq!(
            tag_keys_for("application/vnd.example.artifact+json"),
            vec![0b11_1111]
        );
    }

    #[tokio::test]
    async fn a_recorded_tag_replaces_older_answers() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::cache::store::FsStore::open(dir.path())
            .await
            .unwrap();
        let repo: Repository = "library/app".parse().unwrap();
        let tag: Tag = "1".parse().unwrap();
        let old = TagKey {
            upstream: "hub".into(),
            repository: repo.clone(),
            tag: tag.clone(),
            accept: 0b00_1000,
        };
        let other = TagKey {
            tag: "2".parse().unwrap(),
            ..old.clone()
        };
        let stale = TagRecord {
            digest: Digest::sha256(b"old"),
            media_type: media::DOCKER_V2.into(),
        };
        store.put_tag(&old, &stale).await.unwrap();
        store.put_tag(&other, &stale).await.unwrap();
        let d = Digest::sha256(b"new");
        let n = record_tag(&store, "hub", &repo, &tag, &d, media::OCI_INDEX)
            .await
            .unwrap();
        assert_eq!(n, 2);
        let mut got = store.tags_of("hub", &repo).await.unwrap();
        got.sort_by_key(|(t, k, _)| (t.clone(), *k));
        let summary: Vec<(String, u8, String)> = got
            .into_iter()
            .map(|(t, k, r)| (t.to_string(), k, r.digest.to_string()))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("1".into(), 0b01_1111, d.to_string()),
                ("1".into(), 0b11_1111, d.to_string()),
                ("2".into(), 0b00_1000, stale.digest.to_string()),
            ]
        );
    }
}

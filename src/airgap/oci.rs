//! Pure OCI formats: descriptors, what a manifest or index refers to, and the small files of
//! an OCI image layout (`oci-layout`, `index.json`, `blobs/<alg>/<hex>` paths).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::media;
use crate::reference::Digest;

/// Deepest nesting of indexes followed (an index of indexes of ...).
pub const MAX_DEPTH: usize = 4;
/// The annotation naming an image in a layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The layout marker file.
pub const LAYOUT_FILE: &str = "oci-layout";
/// The layout's entry points.
pub const INDEX_FILE: &str = "index.json";
/// The content of `oci-layout` regcache writes.
pub const LAYOUT_MARKER: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Why layout or manifest content was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(pub String);

fn bad(why: impl Into<String>) -> FormatError {
    FormatError(why.into())
}

/// The platform of an index entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// e.g. `linux`
    pub os: String,
    /// e.g. `arm64`
    pub architecture: String,
    /// e.g. `v8`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

mod digest_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::reference::Digest;

    pub fn serialize<S: Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(d)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A content descriptor (the fields regcache reads; others are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type of the content (may be empty in hand-made layouts).
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// Digest of the content.
    #[serde(with = "digest_text")]
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Platform, for entries of an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// What kind of artifact a referrer is (signature, SBOM, ...).
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
    /// Annotations (`org.opencontainers.image.ref.name` in `index.json`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// The `org.opencontainers.image.ref.name` annotation.
    pub fn ref_name(&self) -> Option<&str> {
        self.annotations.get(REF_NAME).map(String::as_str)
    }

    /// A top-level `index.json` entry naming `digest` `ref_name`.
    pub fn named(media_type: &str, digest: Digest, size: u64, ref_name: &str) -> Self {
        Descriptor {
            media_type: media_type.to_owned(),
            digest,
            size,
            platform: None,
            artifact_type: None,
            annotations: [(REF_NAME.to_owned(), ref_name.to_owned())].into(),
        }
    }

    /// A top-level `index.json` entry without a ref name (the OCI image layout allows them):
    /// a referrer, brought as content and found again by its `subject`.
    pub fn unnamed(
        media_type: &str,
        digest: Digest,
        size: u64,
        artifact_type: Option<String>,
    ) -> Self {
        Descriptor {
            media_type: media_type.to_owned(),
            digest,
            size,
            platform: None,
            artifact_type,
            annotations: BTreeMap::new(),
        }
    }

    /// `os/arch` of an index entry, for messages.
    pub fn platform_text(&self) -> String {
        self.platform
            .as_ref()
            .map_or_else(|| "no platform".to_owned(), ToString::to_string)
    }
}

/// What a manifest refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// An image index or manifest list: manifests.
    Index(Vec<Descriptor>),
    /// An image manifest: its config and layers (layers that registries do not distribute,
    /// such as Windows foreign layers, are left out).
    Image {
        /// The config blob.
        config: Descriptor,
        /// Layer blobs, bottom first.
        layers: Vec<Descriptor>,
    },
}

impl Node {
    /// The blobs of an image manifest, config first; none for an index.
    pub fn blobs(&self) -> Vec<&Descriptor> {
        match self {
            Node::Index(_) => Vec::new(),
            Node::Image { config, layers } => std::iter::once(config).chain(layers).collect(),
        }
    }
}

/// Whether `media_type` is an image index or manifest list.
pub fn is_index(media_type: &str) -> bool {
    media_type == media::OCI_INDEX || media_type == media::DOCKER_LIST
}

fn distributable(d: &Descriptor) -> bool {
    !(d.media_type.contains(".foreign.") || d.media_type.contains(".nondistributable."))
}

#[derive(Deserialize)]
struct Shape {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u32>,
    manifests: Option<Vec<Descriptor>>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// What a manifest of `media_type` refers to. Schema 1 manifests are refused: they cannot go
/// in an OCI layout and registries have stopped serving them.
pub fn parse_manifest(media_type: &str, body: &[u8]) -> Result<Node, FormatError> {
    if media_type == media::DOCKER_V1 || media_type == media::DOCKER_V1_SIGNED {
        return Err(bad(format!("{media_type} (schema 1) is not supported")));
    }
    let s: Shape = serde_json::from_slice(body)
        .map_err(|e| bad(format!("manifest of type {media_type} is not valid: {e}")))?;
    if s.schema_version == Some(1) {
        return Err(bad("schema 1 manifests are not supported"));
    }
    match (s.manifests, s.config) {
        (Some(m), None) => Ok(Node::Index(m)),
        (None, Some(config)) => Ok(Node::Image {
            config,
            layers: s.layers.into_iter().filter(distributable).collect(),
        }),
        _ => Err(bad(format!(
            "manifest of type {media_type} has neither `manifests` nor `config`"
        ))),
    }
}

/// The media type to store a manifest under: its own `mediaType` field, else the one its
/// descriptor gives, else a guess from its shape. A body and a descriptor that disagree are
/// refused.
pub fn manifest_media_type(descriptor_type: &str, body: &[u8]) -> Result<String, FormatError> {
    #[derive(Deserialize)]
    struct Own {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    let own = serde_json::from_slice::<Own>(body)
        .map_err(|e| bad(format!("manifest is not valid JSON: {e}")))?
        .media_type
        .filter(|t| !t.is_empty());
    match own {
        Some(own) if !descriptor_type.is_empty() && own != descriptor_type => Err(bad(format!(
            "manifest says it is {own} but is listed as {descriptor_type}"
        ))),
        Some(own) => Ok(own),
        None if !descriptor_type.is_empty() => Ok(descriptor_type.to_owned()),
        None => media::sniff(body).ok_or_else(|| bad("manifest of unknown type")),
    }
}

/// Where content lives inside a layout: `blobs/<alg>/<hex>`.
pub fn blob_path(d: &Digest) -> String {
    format!("blobs/{}/{}", d.algorithm().as_str(), d.hex())
}

/// The digest a layout path names (`blobs/<alg>/<hex>`, `./` allowed in front, as tar files
/// written by some tools have); `None` for any other path.
pub fn digest_of_path(path: &str) -> Option<Digest> {
    let p = path.trim_start_matches("./");
    let (alg, hex) = p.strip_prefix("blobs/")?.split_once('/')?;
    format!("{alg}:{hex}").parse().ok()
}

/// Checks an `oci-layout` marker (version 1.x).
pub fn check_marker(bytes: &[u8]) -> Result<(), FormatError> {
    #[derive(Deserialize)]
    struct Marker {
        #[serde(rename = "imageLayoutVersion")]
        version: String,
    }
    let m: Marker = serde_json::from_slice(bytes)
        .map_err(|e| bad(format!("{LAYOUT_FILE} is not valid: {e}")))?;
    if m.version.split('.').next() != Some("1") {
        return Err(bad(format!(
            "{LAYOUT_FILE}: unsupported layout version {}",
            m.version
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
struct IndexFile<T> {
    #[serde(default = "Vec::new")]
    manifests: Vec<T>,
}

/// The entries of an `index.json`.
pub fn parse_index(bytes: &[u8]) -> Result<Vec<Descriptor>, FormatError> {
    serde_json::from_slice::<IndexFile<Descriptor>>(bytes)
        .map(|f| f.manifests)
        .map_err(|e| bad(format!("{INDEX_FILE} is not valid: {e}")))
}

/// An `index.json` holding `existing` entries (kept as they are, whatever fields they have)
/// except those whose ref name one of `new` takes over, and entries without a ref name
/// that one of `new` lists again, then `new`.
pub fn index_json(existing: &[u8], new: &[Descriptor]) -> Result<Vec<u8>, FormatError> {
    let mut entries: Vec<serde_json::Value> = if existing.is_empty() {
        Vec::new()
    } else {
        serde_json::from_slice::<IndexFile<serde_json::Value>>(existing)
            .map_err(|e| bad(format!("existing {INDEX_FILE} is not valid: {e}")))?
            .manifests
    };
    entries.retain(|e| {
        let name = e["annotations"][REF_NAME].as_str();
        let digest = e["digest"].as_str();
        !new.iter().any(|n| match n.ref_name() {
            Some(_) => n.ref_name() == name,
            None => name.is_none() && digest == Some(n.digest.to_string().as_str()),
        })
    });
    for n in new {
        entries.push(serde_json::to_value(n).map_err(|e| bad(e.to_string()))?);
    }
    let doc = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": entries,
    });
    serde_json::to_vec_pretty(&doc).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(mt: &str, data: &[u8]) -> serde_json::Value {
        serde_json::json!({
            "mediaType": mt, "digest": Digest::sha256(data).to_string(), "size": data.len()
        })
    }

    #[test]
    fn manifests_name_their_children() {
        let mut child = desc(media::OCI_MANIFEST, b"m");
        child["platform"] =
            serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        let index = serde_json::json!({
            "schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": [child]
        });
        let body = serde_json::to_vec(&index).unwrap();
        let Node::Index(children) = parse_manifest(media::OCI_INDEX, &body).unwrap() else {
            panic!("not an index")
        };
        assert_eq!(children.len(), 1);
        assert_eq!(children[0].platform_text(), "linux/arm64/v8");
        assert_eq!(children[0].digest, Digest::sha256(b"m"));

        let image = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::DOCKER_V2,
            "config": desc("application/vnd.docker.container.image.v1+json", b"c"),
            "layers": [
                desc("application/vnd.docker.image.rootfs.diff.tar.gzip", b"l1"),
                desc("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", b"win"),
                desc("application/vnd.oci.image.layer.v1.tar", b"l2"),
            ],
        });
        let node = parse_manifest(media::DOCKER_V2, &serde_json::to_vec(&image).unwrap()).unwrap();
        let blobs: Vec<Digest> = node.blobs().iter().map(|d| d.digest.clone()).collect();
        assert_eq!(
            blobs,
            vec![
                Digest::sha256(b"c"),
                Digest::sha256(b"l1"),
                Digest::sha256(b"l2")
            ],
            "config first, foreign layer left out"
        );
    }

    #[test]
    fn bad_manifests_are_refused() {
        let schema1 = br#"{"schemaVersion":1,"fsLayers":[]}"#;
        assert!(parse_manifest(media::DOCKER_V1_SIGNED, schema1).is_err());
        assert!(parse_manifest("application/json", schema1).is_err());
        assert!(parse_manifest(media::OCI_MANIFEST, b"not json").is_err());
        assert!(parse_manifest(media::OCI_MANIFEST, br#"{"schemaVersion":2}"#).is_err());
        let bad_digest =
            br#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha256:zz","size":1}]}"#;
        assert!(parse_manifest(media::OCI_INDEX, bad_digest).is_err());
        let negative = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"x","digest":"{}","size":-1}}]}}"#,
            Digest::sha256(b"")
        );
        assert!(parse_manifest(media::OCI_INDEX, negative.as_bytes()).is_err());
    }

    #[test]
    fn media_types_come_from_the_body_first() {
        let own = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert_eq!(manifest_media_type("", own).unwrap(), media::OCI_INDEX);
        assert_eq!(
            manifest_media_type(media::OCI_INDEX, own).unwrap(),
            media::OCI_INDEX
        );
        assert!(manifest_media_type(media::OCI_MANIFEST, own).is_err());
        let bare = br#"{"schemaVersion":2,"config":{}}"#;
        assert_eq!(
            manifest_media_type(media::DOCKER_V2, bare).unwrap(),
            media::DOCKER_V2
        );
        assert_eq!(manifest_media_type("", bare).unwrap(), media::OCI_MANIFEST);
    }

    #[test]
    fn layout_paths() {
        let d = Digest::sha256(b"x");
        let p = blob_path(&d);
        assert_eq!(p, format!("blobs/sha256/{}", d.hex()));
        assert_eq!(digest_of_path(&p), Some(d.clone()));
        assert_eq!(digest_of_path(&format!("./{p}")), Some(d));
        for other in [
            "index.json",
            "oci-layout",
            "blobs/",
            "blobs/sha256/",
            "blobs/sha256/../../etc/passwd",
            "blobs/md5/abc",
            "x/blobs/sha256/00",
        ] {
            assert_eq!(digest_of_path(other), None, "{other}");
        }
        check_marker(LAYOUT_MARKER).unwrap();
        check_marker(br#"{"imageLayoutVersion":"1.1.0"}"#).unwrap();
        assert!(check_marker(br#"{"imageLayoutVersion":"2.0.0"}"#).is_err());
        assert!(check_marker(b"{}").is_err());
    }

    #[test]
    fn index_json_replaces_entries_by_ref_name_and_keeps_the_rest() {
        let a = Descriptor::named(media::OCI_INDEX, Digest::sha256(b"a"), 1, "x/app:1");
        let b = Descriptor::named(media::OCI_MANIFEST, Digest::sha256(b"b"), 2, "x/app:2");
        let first = index_json(b"", &[a.clone(), b.clone()]).unwrap();
        assert_eq!(parse_index(&first).unwrap(), vec![a.clone(), b.clone()]);
        // Another tool's entry with fields regcache does not know survives a merge.
        let mut doc: serde_json::Value = serde_json::from_slice(&first).unwrap();
        doc["manifests"][1]["artifactType"] = "application/example".into();
        let a2 = Descriptor::named(media::OCI_INDEX, Digest::sha256(b"a2"), 3, "x/app:1");
        let merged = index_json(
            &serde_json::to_vec(&doc).unwrap(),
            std::slice::from_ref(&a2),
        )
        .unwrap();
        let entries = parse_index(&merged).unwrap();
        let b = Descriptor {
            artifact_type: Some("application/example".into()),
            ..b
        };
        assert_eq!(entries, vec![b, a2]);
        let raw: serde_json::Value = serde_json::from_slice(&merged).unwrap();
        assert_eq!(raw["manifests"][0]["artifactType"], "application/example");
        assert_eq!(raw["mediaType"], media::OCI_INDEX);
        assert_eq!(raw["schemaVersion"], 2);
        assert!(index_json(b"[", &[]).is_err());
        // Entries without a ref name (referrers) are listed once, however often written.
        let r = Descriptor::unnamed(
            media::OCI_MANIFEST,
            Digest::sha256(b"sbom"),
            4,
            Some("application/spdx+json".into()),
        );
        let once = index_json(&merged, std::slice::from_ref(&r)).unwrap();
        let twice = index_json(&once, std::slice::from_ref(&r)).unwrap();
        let entries = parse_index(&twice).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[2], r);
        assert_eq!(entries[2].ref_name(), None);
        let raw: serde_json::Value = serde_json::from_slice(&twice).unwrap();
        assert_eq!(raw["manifests"][2]["artifactType"], "application/spdx+json");
        assert!(raw["manifests"][2].get("annotations").is_none());
    }
}

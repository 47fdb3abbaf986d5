//! Pure `Accept` handling for manifests: every `Accept` line merged, matched against the
//! manifest media types, and the value forwarded upstream.

use std::borrow::Cow;

use http::{HeaderMap, header};

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 2.
pub const DOCKER_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker image manifest, schema 1 (signed).
pub const DOCKER_V1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// Docker image manifest, schema 1.
pub const DOCKER_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";

/// Manifest media types in a fixed order; a type's index is its bit in [`Accept::key`].
pub const MANIFEST_TYPES: [&str; 6] = [
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_LIST,
    DOCKER_V2,
    DOCKER_V1_SIGNED,
    DOCKER_V1,
];

/// What a client will take, from all of its `Accept` lines. The manifest types are bits, so
/// a request's parse copies no string and its tag-cache key is a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    // Bit i: `MANIFEST_TYPES[i]` is taken.
    known: u8,
    // The taken manifest types' indexes in the client's order, three bits each, for the
    // upstream's list.
    order: u32,
    // Any other types taken, lowercase, ", "-joined in the client's order. Docker's list
    // includes `application/json`, which is borrowed, not copied.
    others: Cow<'static, str>,
    wildcard: bool,
}

/// The type outside [`MANIFEST_TYPES`] that the Docker daemon sends with every manifest
/// request (containerd sends `*/*` instead).
const JSON: &str = "application/json";

/// The index of `media_type` (in any case) in [`MANIFEST_TYPES`]. Clients write the types in
/// lowercase, so an exact match is tried first.
fn manifest_index(media_type: &str) -> Option<usize> {
    MANIFEST_TYPES
        .iter()
        .position(|t| *t == media_type)
        .or_else(|| {
            MANIFEST_TYPES
                .iter()
                .position(|t| t.eq_ignore_ascii_case(media_type))
        })
}

impl Accept {
    /// Merges every `Accept` header line (podman and Docker send six separate lines).
    /// No `Accept` at all means anything is acceptable.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut a = Accept {
            known: 0,
            order: 0,
            others: Cow::Borrowed(""),
            wildcard: false,
        };
        let mut seen_any = false;
        for v in headers.get_all(header::ACCEPT) {
            let Ok(s) = v.to_str() else { continue };
            for item in s.split(',') {
                let mut parts = item.split(';');
                let mt = parts.next().unwrap_or("").trim();
                if mt.is_empty() {
                    continue;
                }
                seen_any = true;
                if parts.any(refuses) {
                    continue;
                }
                if mt == "*/*" || mt.eq_ignore_ascii_case("application/*") {
                    a.wildcard = true;
                    continue;
                }
                match manifest_index(mt) {
                    Some(i) if a.known & (1 << i) == 0 => {
                        a.order |= (i as u32) << (3 * a.known.count_ones());
                        a.known |= 1 << i;
                    }
                    Some(_) => {}
                    None => a.add_other(mt),
                }
            }
        }
        a.wildcard |= !seen_any;
        a
    }

    /// Adds a type outside [`MANIFEST_TYPES`], once.
    fn add_other(&mut self, mt: &str) {
        if self.other_types().any(|t| t.eq_ignore_ascii_case(mt)) {
            return;
        }
        if self.others.is_empty() && mt.eq_ignore_ascii_case(JSON) {
            self.others = Cow::Borrowed(JSON);
            return;
        }
        let others = self.others.to_mut();
        if !others.is_empty() {
            others.push_str(", ");
        }
        others.push_str(&mt.to_ascii_lowercase());
    }

    /// The types outside [`MANIFEST_TYPES`] taken, in the client's order.
    fn other_types(&self) -> impl Iterator<Item = &str> {
        self.others.split(", ").filter(|t| !t.is_empty())
    }

    /// Whether a manifest of `media_type` may be served to this client.
    pub fn accepts(&self, media_type: &str) -> bool {
        self.wildcard
            || match manifest_index(media_type) {
                Some(i) => self.known & (1 << i) != 0,
                None => self
                    .other_types()
                    .any(|t| t.eq_ignore_ascii_case(media_type)),
            }
    }

    /// The `Accept` value sent upstream: the client's own list (its manifest types first),
    /// or every modern manifest type when the client takes anything (so the upstream never
    /// falls back to schema 1).
    pub fn upstream_value(&self) -> String {
        let mut list: Vec<&str> = (0..self.known.count_ones())
            .map(|n| MANIFEST_TYPES[((self.order >> (3 * n)) & 0b111) as usize])
            .chain(self.other_types())
            .collect();
        if self.wildcard {
            for t in &MANIFEST_TYPES[..4] {
                if !list.contains(t) {
                    list.push(t);
                }
            }
            list.push("*/*");
        }
        list.join(", ")
    }

    /// A bitmask of the manifest types accepted: clients with equal keys get equal answers for
    /// a tag, so the tag cache is keyed by it.
    pub fn key(&self) -> u8 {
        if self.wildcard {
            (1 << MANIFEST_TYPES.len()) - 1
        } else {
            self.known
        }
    }
}

/// Whether an `Accept` parameter is `q=0` (the type is refused): `q=0`, `q=0.0`, `q=0.00` or
/// `q=0.000`, spaces inside ignored.
fn refuses(param: &str) -> bool {
    let mut b = param.trim().bytes().filter(|b| *b != b' ');
    if (b.next(), b.next(), b.next()) != (Some(b'q'), Some(b'='), Some(b'0')) {
        return false;
    }
    match b.next() {
        None => true,
        Some(b'.') => {
            let zeros = b.clone().count();
            (1..=3).contains(&zeros) && b.all(|d| d == b'0')
        }
        Some(_) => false,
    }
}

/// The media type of a manifest body that came without one: its `mediaType` field, or a
/// guess from its shape as the OCI spec allows.
pub fn sniff(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Shape {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
        manifests: Option<serde_json::Value>,
        config: Option<serde_json::Value>,
        signatures: Option<serde_json::Value>,
    }
    let s: Shape = serde_json::from_slice(body).ok()?;
    if let Some(mt) = s.media_type {
        return Some(mt);
    }
    if s.schema_version == Some(1) {
        return Some(
            if s.signatures.is_some() {
                DOCKER_V1_SIGNED
            } else {
                DOCKER_V1
            }
            .to_owned(),
        );
    }
    if s.manifests.is_some() {
        return Some(OCI_INDEX.to_owned());
    }
    s.config.map(|_| OCI_MANIFEST.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(header::ACCEPT, HeaderValue::from_str(l).unwrap());
        }
        h
    }

    #[test]
    fn six_lines_are_merged() {
        let a = Accept::from_headers(&headers(&[
            DOCKER_V2,
            DOCKER_LIST,
            OCI_MANIFEST,
            OCI_INDEX,
            DOCKER_V1_SIGNED,
            "application/json",
        ]));
        for t in MANIFEST_TYPES[..5].iter() {
            assert!(a.accepts(t), "{t}");
        }
        assert!(!a.accepts(DOCKER_V1));
        assert_eq!(a.key(), 0b011111);
        let up = a.upstream_value();
        assert!(
            up.contains(OCI_INDEX) && up.contains(DOCKER_V2) && up.contains("application/json")
        );
    }

    #[test]
    fn single_type_and_refusals() {
        let a = Accept::from_headers(&headers(&[&format!("{DOCKER_V2}, {OCI_INDEX};q=0")]));
        assert!(a.accepts(DOCKER_V2));
        assert!(!a.accepts(OCI_INDEX));
        assert!(!a.accepts(OCI_MANIFEST));
        assert_eq!(a.upstream_value(), DOCKER_V2);
    }

    #[test]
    fn types_in_any_case_and_every_spelling_of_q_zero() {
        let a = Accept::from_headers(&headers(&[
            "Application/VND.Docker.Distribution.Manifest.V2+JSON",
            &format!("{OCI_INDEX}; q = 0.000, {OCI_MANIFEST};q=0.0000, {DOCKER_LIST};q=0."),
            &format!("{DOCKER_V1};q=0.5, {DOCKER_V1_SIGNED} ;q=0 , Text/Other"),
        ]));
        assert!(a.accepts(DOCKER_V2));
        assert!(!a.accepts(OCI_INDEX), "q = 0.000 refuses");
        assert!(a.accepts(OCI_MANIFEST), "q=0.0000 is not one of the forms");
        assert!(a.accepts(DOCKER_LIST), "q=0. is not one of the forms");
        assert!(a.accepts(DOCKER_V1));
        assert!(!a.accepts(DOCKER_V1_SIGNED));
        assert_eq!(
            a.upstream_value(),
            format!("{DOCKER_V2}, {OCI_MANIFEST}, {DOCKER_LIST}, {DOCKER_V1}, text/other")
        );
        for p in ["q=0", " q=0.0", "q=0.00 ", "q =0.000"] {
            assert!(refuses(p), "{p:?}");
        }
        for p in [
            "q=0.0000", "q=0.", "q=0.5", "q=1", "Q=0", "q=00", "level=0", "",
        ] {
            assert!(!refuses(p), "{p:?}");
        }
    }

    #[test]
    fn other_types_are_matched_kept_once_and_listed_after_manifest_types() {
        let a = Accept::from_headers(&headers(&[
            "Application/JSON, text/other",
            &format!("{DOCKER_V2}, application/json, TEXT/OTHER, {OCI_INDEX}, {DOCKER_V2}"),
        ]));
        assert!(a.accepts("application/json") && a.accepts("Text/Other"));
        assert!(!a.accepts("text/oth") && !a.accepts(OCI_MANIFEST));
        assert!(matches!(a.others, Cow::Owned(_)));
        assert_eq!(a.key(), 0b001001);
        assert_eq!(
            a.upstream_value(),
            format!("{DOCKER_V2}, {OCI_INDEX}, application/json, text/other")
        );
        let docker = Accept::from_headers(&headers(&[&format!("{DOCKER_V2}, application/json")]));
        assert!(matches!(docker.others, Cow::Borrowed(JSON)));
        assert!(docker.accepts(JSON));
    }

    #[test]
    fn wildcard_and_absent() {
        let a = Accept::from_headers(&headers(&[&format!("{OCI_MANIFEST}, */*")]));
        assert!(a.accepts(DOCKER_LIST));
        let none = Accept::from_headers(&HeaderMap::new());
        assert!(none.accepts(OCI_INDEX));
        assert_eq!(none.key(), 0b111111);
        assert!(none.upstream_value().contains(OCI_INDEX));
        assert!(!none.upstream_value().contains(DOCKER_V1));
    }

    #[test]
    fn sniffing() {
        assert_eq!(
            sniff(br#"{"schemaVersion":2,"mediaType":"x/y"}"#).as_deref(),
            Some("x/y")
        );
        assert_eq!(
            sniff(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(OCI_INDEX)
        );
        assert_eq!(
            sniff(br#"{"schemaVersion":2,"config":{}}"#).as_deref(),
            Some(OCI_MANIFEST)
        );
        assert_eq!(sniff(b"nope"), None);
    }
}

//! Validated registry names: `Repository`, `Tag`, `Digest` and `Reference`, parsed once at the edge.
//!
//! The grammar follows the distribution reference grammar: repository path components are
//! lowercase alphanumerics joined by `.`, `_`, `__` or runs of `-`, separated by `/`, at most
//! 255 bytes in all; tags are `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`; digests are
//! `sha256:<64 hex>` or `sha512:<128 hex>`, lowercase. [`Hasher`] computes digests incrementally.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

/// Longest repository name accepted, as in distribution.
pub const MAX_REPOSITORY_LEN: usize = 255;
/// Longest tag accepted.
pub const MAX_TAG_LEN: usize = 128;

/// Why a name, tag or digest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The repository name breaks the grammar.
    #[error("invalid repository name: {0}")]
    Repository(&'static str),
    /// The tag breaks the grammar.
    #[error("invalid tag: {0}")]
    Tag(&'static str),
    /// The digest breaks the grammar or uses an unsupported algorithm.
    #[error("invalid digest: {0}")]
    Digest(&'static str),
}

/// A validated repository path such as `library/alpine`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository(String);

impl Repository {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path components (`library`, `alpine`).
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// A new repository with `prefix/` in front (used for `library/`).
    pub fn with_prefix(&self, prefix: &str) -> Result<Self, ParseError> {
        format!("{prefix}/{}", self.0).parse()
    }
}

fn valid_component(c: &str) -> Result<(), &'static str> {
    let b = c.as_bytes();
    if b.is_empty() {
        return Err("empty path component");
    }
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return Err("path components must start and end with a lowercase letter or digit");
    }
    let mut i = 0;
    while i < b.len() {
        let x = b[i];
        if alnum(x) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        match x {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return Err("only lowercase letters, digits, '.', '_', '-' and '/' are allowed"),
        }
        if i >= b.len() || !alnum(b[i]) || i == start {
            return Err("separators must sit between letters or digits");
        }
    }
    Ok(())
}

impl FromStr for Repository {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ParseError::Repository("empty name"));
        }
        if s.len() > MAX_REPOSITORY_LEN {
            return Err(ParseError::Repository("longer than 255 characters"));
        }
        for c in s.split('/') {
            valid_component(c).map_err(ParseError::Repository)?;
        }
        Ok(Repository(s.to_owned()))
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated tag such as `3.20`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    /// The tag as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `latest`, the tag of a name given without one.
    pub fn latest() -> Self {
        Tag("latest".to_owned())
    }
}

impl FromStr for Tag {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        if b.is_empty() {
            return Err(ParseError::Tag("empty tag"));
        }
        if b.len() > MAX_TAG_LEN {
            return Err(ParseError::Tag("longer than 128 characters"));
        }
        let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
        if !word(b[0]) {
            return Err(ParseError::Tag("must start with a letter, digit or '_'"));
        }
        if !b[1..].iter().all(|&x| word(x) || x == b'.' || x == b'-') {
            return Err(ParseError::Tag(
                "only letters, digits, '_', '.' and '-' are allowed",
            ));
        }
        Ok(Tag(s.to_owned()))
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A digest algorithm regcache can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// SHA-256, the algorithm every registry uses.
    Sha256,
    /// SHA-512, allowed by the OCI image spec.
    Sha512,
}

impl Algorithm {
    /// The name used in digests and in the cache layout.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A validated content digest such as `sha256:9f86…`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lowercase hex part.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// `<algorithm>:<hex>` written into `out` (what `Display` gives, without the formatting
    /// machinery: every blob and manifest answer carries it twice, see
    /// `routes::set_digest_headers`).
    pub fn push_to(&self, out: &mut String) {
        out.reserve(self.algorithm.as_str().len() + 1 + self.hex.len());
        out.push_str(self.algorithm.as_str());
        out.push(':');
        out.push_str(&self.hex);
    }

    /// Builds a digest from raw hash output.
    pub fn from_raw(algorithm: Algorithm, raw: &[u8]) -> Self {
        Digest {
            algorithm,
            hex: hex::encode(raw),
        }
    }

    /// The digest of `data` under `algorithm`.
    pub fn of(algorithm: Algorithm, data: &[u8]) -> Self {
        let mut h = Hasher::new(algorithm);
        h.update(data);
        h.finish()
    }

    /// The SHA-256 digest of `data`.
    pub fn sha256(data: &[u8]) -> Self {
        Self::of(Algorithm::Sha256, data)
    }
}

/// A running hash of one digest algorithm, fed incrementally (downloads, uploads, imports).
#[derive(Clone)]
pub enum Hasher {
    /// SHA-256 state.
    Sha256(Sha256),
    /// SHA-512 state.
    Sha512(Sha512),
}

impl Hasher {
    /// A fresh hash for `algorithm`.
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest::from_raw(Algorithm::Sha256, &h.finalize()),
            Hasher::Sha512(h) => Digest::from_raw(Algorithm::Sha512, &h.finalize()),
        }
    }
}

impl FromStr for Digest {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or(ParseError::Digest("expected <algorithm>:<hex>"))?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(ParseError::Digest("unsupported algorithm")),
        };
        if hex.len() != algorithm.hex_len() {
            return Err(ParseError::Digest("wrong length for the algorithm"));
        }
        if !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ParseError::Digest("hex part must be lowercase hexadecimal"));
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_owned(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A mutable tag.
    Tag(Tag),
    /// An immutable digest.
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            s.parse().map(Reference::Digest)
        } else {
            s.parse().map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories() {
        let ok = [
            "alpine",
            "library/alpine",
            "a/b/c/d",
            "my-app",
            "my--app",
            "a.b_c__d",
            "x0/y1",
            "127",
        ];
        for s in ok {
            assert_eq!(s.parse::<Repository>().unwrap().as_str(), s, "{s}");
        }
        let bad = [
            "", "Alpine", "../etc", "a/../b", "a//b", "/a", "a/", "-a", "a-", "a___b", "a..b",
            "a._b", "a b", "a%2e", ".", "..", "a/.", "ä",
        ];
        for s in bad {
            assert!(s.parse::<Repository>().is_err(), "{s:?} accepted");
        }
        assert!("a".repeat(256).parse::<Repository>().is_err());
        assert!("a".repeat(255).parse::<Repository>().is_ok());
    }

    #[test]
    fn tags() {
        for s in ["latest", "3.20", "v1.0-rc_1", "_x", "A"] {
            assert!(s.parse::<Tag>().is_ok(), "{s}");
        }
        for s in ["", ".x", "-x", "a/b", "a:b", "a b", "é"] {
            assert!(s.parse::<Tag>().is_err(), "{s:?}");
        }
        assert!("a".repeat(128).parse::<Tag>().is_ok());
        assert!("a".repeat(129).parse::<Tag>().is_err());
    }

    #[test]
    fn digests() {
        let hex = "a".repeat(64);
        let d: Digest = format!("sha256:{hex}").parse().unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.to_string(), format!("sha256:{hex}"));
        assert!(
            format!("sha512:{}", "0".repeat(128))
                .parse::<Digest>()
                .is_ok()
        );
        for s in [
            "sha256".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:{}", "g".repeat(64)),
            format!("md5:{}", "a".repeat(32)),
            format!("sha256:../{}", "a".repeat(61)),
            format!(":{hex}"),
        ] {
            assert!(s.parse::<Digest>().is_err(), "{s:?}");
        }
        assert_eq!(
            Digest::sha256(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn references() {
        assert!(matches!("latest".parse(), Ok(Reference::Tag(_))));
        let d = format!("sha256:{}", "b".repeat(64));
        assert!(matches!(d.parse(), Ok(Reference::Digest(_))));
        assert!("sha256:zz".parse::<Reference>().is_err());
    }
}

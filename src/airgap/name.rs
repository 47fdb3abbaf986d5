//! Pure parsing of image names as clients type them against regcache (`alpine:3.20`,
//! `library/alpine@sha256:…`, `ghcr/owner/app:1`, `docker.io/library/alpine:3.20`) and of
//! `--platform` values, and the routing of a name to an upstream and repository.
//!
//! The rule, first match wins:
//! 1. a first component equal to an upstream's name selects that upstream (as in a request);
//! 2. a first component that looks like a registry host (it contains `.` or `:`, or is
//!    `localhost`, as Docker reads names) selects the upstream mirroring that registry, the
//!    way containerd's `ns=` does (`docker.io`, the upstream URL's `host:port`,
//!    `registry_hosts`); a host no upstream mirrors is refused;
//! 3. anything else is routed like a request path: the default upstream, with Docker Hub's
//!    `library/` rule where it applies.
//!
//! Without a tag or digest the tag is `latest`.

use std::fmt;
use std::str::FromStr;

use super::oci;
use crate::reference::{Digest, ParseError, Reference, Repository, Tag};
use crate::rewrite::{RewriteError, RoutingTable};

/// Why an image name or platform was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// A part of the name breaks the grammar.
    #[error("{name:?}: {source}")]
    Parse {
        /// The name as given.
        name: String,
        /// Which part and why.
        source: ParseError,
    },
    /// No upstream can serve the name.
    #[error("{name:?}: {source}")]
    Route {
        /// The name as given.
        name: String,
        /// Why.
        source: RewriteError,
    },
    /// Not `os/architecture[/variant]`.
    #[error("{0:?}: expected os/architecture[/variant], e.g. linux/arm64")]
    Platform(String),
}

/// An image as a client names it through regcache: `[host/]path[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageName {
    text: String,
    name: String,
    tag: Option<Tag>,
    digest: Option<Digest>,
}

/// Where an image name leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Index of the upstream in the configuration.
    pub upstream: usize,
    /// Repository at the upstream.
    pub repository: Repository,
    /// Digest if one was given, else the tag (`latest` when none was).
    pub reference: Reference,
    /// The name a client sends in `/v2/<name>/…` for this image.
    pub request_name: Repository,
    /// The `ns=` a client sends with it (rule 2), if any.
    pub ns: Option<String>,
}

fn looks_like_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

fn valid_host(h: &str) -> bool {
    let b = h.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphanumeric() || b[0] == b'[')
        && (b[b.len() - 1].is_ascii_alphanumeric() || b[b.len() - 1] == b']')
        && !h.contains("..")
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b".-:[]".contains(c))
}

impl FromStr for ImageName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |source| NameError::Parse {
            name: s.to_owned(),
            source,
        };
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => (rest, Some(d.parse::<Digest>().map_err(err)?)),
            None => (s, None),
        };
        // A tag follows the last ':' after the last '/': `localhost:5000/app` has none.
        let last = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last..].find(':') {
            Some(i) => (
                &rest[..last + i],
                Some(rest[last + i + 1..].parse::<Tag>().map_err(err)?),
            ),
            None => (rest, None),
        };
        let path = match name.split_once('/') {
            Some((first, path)) if looks_like_host(first) => {
                if !valid_host(first) {
                    return Err(err(ParseError::Repository("invalid registry host")));
                }
                path
            }
            _ => name,
        };
        path.parse::<Repository>().map_err(err)?;
        Ok(ImageName {
            text: s.to_owned(),
            name: name.to_owned(),
            tag,
            digest,
        })
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl ImageName {
    /// The name without tag and digest.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tag, if one was given.
    pub fn tag(&self) -> Option<&Tag> {
        self.tag.as_ref()
    }

    /// The digest, if one was given.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// Whether a tag or digest was given.
    pub fn has_reference(&self) -> bool {
        self.tag.is_some() || self.digest.is_some()
    }

    /// The digest if given (it wins over a tag, as for Docker), else the tag, else `latest`.
    pub fn reference(&self) -> Reference {
        match (&self.digest, &self.tag) {
            (Some(d), _) => Reference::Digest(d.clone()),
            (None, Some(t)) => Reference::Tag(t.clone()),
            (None, None) => Reference::Tag(Tag::latest()),
        }
    }

    /// This name with another tag and no digest (`--repository` plus a bare ref name).
    pub fn with_tag(&self, tag: Tag) -> ImageName {
        ImageName {
            text: format!("{}:{tag}", self.name),
            name: self.name.clone(),
            tag: Some(tag),
            digest: None,
        }
    }

    /// The name and `ns=` a client sends for this image: a first component that looks like
    /// a registry host and is not an upstream's name becomes `ns=` (as containerd sends it).
    pub fn request_form(
        &self,
        is_upstream: impl Fn(&str) -> bool,
    ) -> Result<(Repository, Option<String>), NameError> {
        let parse = |source| NameError::Parse {
            name: self.text.clone(),
            source,
        };
        Ok(match self.name.split_once('/') {
            Some((first, path)) if looks_like_host(first) && !is_upstream(first) => (
                path.parse::<Repository>().map_err(parse)?,
                Some(first.to_ascii_lowercase()),
            ),
            _ => (self.name.parse::<Repository>().map_err(parse)?, None),
        })
    }

    /// Routes the name by the rule in this module's documentation.
    pub fn resolve(&self, table: &RoutingTable) -> Result<Resolved, NameError> {
        let route = |source| NameError::Route {
            name: self.text.clone(),
            source,
        };
        let (request_name, ns) = self.request_form(|first| table.by_name(first).is_some())?;
        let target = table
            .resolve(&request_name, None, ns.as_deref())
            .map_err(route)?;
        Ok(Resolved {
            upstream: target.upstream,
            repository: target.repository,
            reference: self.reference(),
            request_name,
            ns,
        })
    }
}

/// Image names from a list file: one per line, blank lines and `#` comments skipped.
pub fn parse_list(text: &str) -> Result<Vec<ImageName>, NameError> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::parse)
        .collect()
}

/// The name written as `org.opencontainers.image.ref.name` for an image: the upstream's name
/// in front of the repository there (`docker.io/library/alpine:3.20`), so that it routes
/// back to the same place by rule 1; the name as given if that form does not.
pub fn ref_name(table: &RoutingTable, given: &ImageName, r: &Resolved) -> String {
    let suffix = match &r.reference {
        Reference::Tag(t) => format!(":{t}"),
        Reference::Digest(d) => format!("@{d}"),
    };
    let canonical = format!("{}/{}{suffix}", table.name(r.upstream), r.repository);
    let same_place = canonical
        .parse::<ImageName>()
        .and_then(|n| n.resolve(table))
        .is_ok_and(|back| back.upstream == r.upstream && back.repository == r.repository);
    if same_place {
        canonical
    } else {
        format!("{}{suffix}", given.name)
    }
}

/// A `--platform` value: `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformFilter {
    os: String,
    architecture: String,
    variant: Option<String>,
}

impl FromStr for PlatformFilter {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let word = |w: &str| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        let parts: Vec<&str> = s.split('/').collect();
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| word(p)) {
            return Err(NameError::Platform(s.to_owned()));
        }
        Ok(PlatformFilter {
            os: parts[0].to_ascii_lowercase(),
            architecture: parts[1].to_ascii_lowercase(),
            variant: parts.get(2).map(|v| v.to_ascii_lowercase()),
        })
    }
}

impl fmt::Display for PlatformFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl PlatformFilter {
    /// Whether an index entry's platform is this one (a filter without a variant takes every
    /// variant).
    pub fn matches(&self, p: &oci::Platform) -> bool {
        p.os.eq_ignore_ascii_case(&self.os)
            && p.architecture.eq_ignore_ascii_case(&self.architecture)
            && self.variant.as_ref().is_none_or(|v| {
                p.variant
                    .as_deref()
                    .is_some_and(|pv| pv.eq_ignore_ascii_case(v))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, UpstreamConfig};

    fn table() -> RoutingTable {
        let mut c = Config::default();
        c.upstreams.push(UpstreamConfig::new(
            "ghcr",
            "https://ghcr.io".parse().unwrap(),
        ));
        let mut local = UpstreamConfig::new("local", "http://127.0.0.1:5001".parse().unwrap());
        local.registry_hosts = vec!["registry.internal".into()];
        c.upstreams.push(local);
        RoutingTable::new(&c.validate().unwrap())
    }

    #[test]
    fn names_split_into_name_tag_and_digest() {
        let d = format!("sha256:{}", "a".repeat(64));
        // (input, name, tag, digest given)
        let cases: &[(&str, &str, Option<&str>, bool)] = &[
            ("alpine", "alpine", None, false),
            ("alpine:3.20", "alpine", Some("3.20"), false),
            ("library/alpine:3.20", "library/alpine", Some("3.20"), false),
            ("localhost:5000/app", "localhost:5000/app", None, false),
            (
                "localhost:5000/app:1",
                "localhost:5000/app",
                Some("1"),
                false,
            ),
            (
                "docker.io/library/alpine:3.20",
                "docker.io/library/alpine",
                Some("3.20"),
                false,
            ),
            (&format!("alpine@{d}"), "alpine", None, true),
            (&format!("alpine:3.20@{d}"), "alpine", Some("3.20"), true),
            (
                "127.0.0.1:5000/team/app:v1",
                "127.0.0.1:5000/team/app",
                Some("v1"),
                false,
            ),
        ];
        for (input, name, tag, digest) in cases {
            let n: ImageName = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(n.name(), *name, "{input}");
            assert_eq!(n.tag().map(Tag::as_str), *tag, "{input}");
            assert_eq!(n.digest().is_some(), *digest, "{input}");
            assert_eq!(n.to_string(), *input);
        }
        let n: ImageName = format!("alpine:3.20@{d}").parse().unwrap();
        assert!(matches!(n.reference(), Reference::Digest(_)), "digest wins");
        let n: ImageName = "alpine".parse().unwrap();
        assert_eq!(n.reference().to_string(), "latest");
        assert!(!n.has_reference());
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in [
            "",
            ":1",
            "Alpine:1",
            "alpine:",
            "alpine:-x",
            "alpine@sha256:abc",
            "alpine@",
            "a//b",
            "../etc/passwd",
            "ex ample.com/app",
            "host.example/",
            "host.example/UP",
            "a/b:c:d",
        ] {
            assert!(bad.parse::<ImageName>().is_err(), "{bad:?} accepted");
        }
    }

    fn route(t: &RoutingTable, s: &str) -> Result<(String, String, Option<String>), NameError> {
        let r = s.parse::<ImageName>()?.resolve(t)?;
        Ok((
            t.name(r.upstream).to_owned(),
            r.repository.to_string(),
            r.ns,
        ))
    }

    #[test]
    fn routing_follows_the_documented_rule() {
        let t = table();
        let ok = |s: &str, up: &str, repo: &str| {
            let (u, r, _) = route(&t, s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!((u.as_str(), r.as_str()), (up, repo), "{s}");
        };
        // Rule 3: like a request path, Docker Hub normalisation on the default upstream.
        ok("alpine:3.20", "docker.io", "library/alpine");
        ok("library/alpine", "docker.io", "library/alpine");
        ok("bitnami/redis:7", "docker.io", "bitnami/redis");
        // Rule 1: an upstream's name in front.
        ok("ghcr/owner/app:1", "ghcr", "owner/app");
        ok(
            "docker.io/library/alpine:3.20",
            "docker.io",
            "library/alpine",
        );
        ok("docker.io/alpine", "docker.io", "library/alpine");
        // Rule 2: a registry host an upstream mirrors.
        ok("ghcr.io/owner/app:1", "ghcr", "owner/app");
        ok("index.docker.io/alpine", "docker.io", "library/alpine");
        ok("127.0.0.1:5001/team/app:1", "local", "team/app");
        ok("registry.internal/team/app", "local", "team/app");
        let (_, _, ns) = route(&t, "ghcr.io/owner/app").unwrap();
        assert_eq!(ns.as_deref(), Some("ghcr.io"));
        let (_, _, ns) = route(&t, "ghcr/owner/app").unwrap();
        assert_eq!(ns, None);
        // A registry nobody mirrors is refused, never guessed.
        assert!(matches!(
            route(&t, "quay.io/team/app"),
            Err(NameError::Route { .. })
        ));
    }

    #[test]
    fn ref_names_route_back_to_the_same_place() {
        let t = table();
        for (given, expected) in [
            ("alpine:3.20", "docker.io/library/alpine:3.20"),
            ("ghcr.io/owner/app:1", "ghcr/owner/app:1"),
            ("127.0.0.1:5001/team/app", "local/team/app:latest"),
        ] {
            let n: ImageName = given.parse().unwrap();
            let r = n.resolve(&t).unwrap();
            let name = ref_name(&t, &n, &r);
            assert_eq!(name, expected);
            let back = name.parse::<ImageName>().unwrap().resolve(&t).unwrap();
            assert_eq!(
                (back.upstream, back.repository, back.reference),
                (r.upstream, r.repository, r.reference)
            );
        }
        let d = Digest::sha256(b"x");
        let n: ImageName = format!("ghcr/owner/app@{d}").parse().unwrap();
        let r = n.resolve(&t).unwrap();
        assert_eq!(ref_name(&t, &n, &r), format!("ghcr/owner/app@{d}"));
    }

    #[test]
    fn lists() {
        let got = parse_list("# images\nalpine:3.20\n\n  ghcr/owner/app:1  # pinned\n").unwrap();
        let names: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["alpine:3.20", "ghcr/owner/app:1"]);
        assert!(parse_list("alpine\nNot/Valid\n").is_err());
        assert!(parse_list("").unwrap().is_empty());
    }

    #[test]
    fn platforms() {
        let p = |os: &str, arch: &str, variant: Option<&str>| oci::Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.map(Into::into),
        };
        let arm: PlatformFilter = "linux/arm64".parse().unwrap();
        assert!(arm.matches(&p("linux", "arm64", Some("v8"))));
        assert!(arm.matches(&p("linux", "arm64", None)));
        assert!(!arm.matches(&p("linux", "amd64", None)));
        assert!(!arm.matches(&p("unknown", "unknown", None)));
        let v7: PlatformFilter = "linux/arm/v7".parse().unwrap();
        assert!(v7.matches(&p("linux", "arm", Some("v7"))));
        assert!(!v7.matches(&p("linux", "arm", Some("v6"))));
        assert!(!v7.matches(&p("linux", "arm", None)));
        assert_eq!(v7.to_string(), "linux/arm/v7");
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            assert!(bad.parse::<PlatformFilter>().is_err(), "{bad:?}");
        }
    }
}

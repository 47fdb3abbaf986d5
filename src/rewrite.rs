//! Pure name rewriting: which configured upstream a request goes to, and the repository name
//! there (Docker Hub's `library/` rule, `docker.io/` prefixes, path prefixes, `ns=`, `Host`).
//!
//! Only configured upstreams can ever be chosen: a host named by the request selects an
//! upstream by lookup, never becomes a connection target.

use std::collections::HashMap;

use crate::config::{Config, DOCKER_HUB_HOSTS};
use crate::reference::Repository;

/// Why no upstream could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// `ns=` names a registry no upstream mirrors.
    #[error("no upstream is configured for registry {0:?}")]
    UnknownNamespace(String),
    /// What is left after removing a prefix is not a repository name.
    #[error("{0}")]
    Name(String),
}

/// The routing facts of one upstream.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    docker_hub: bool,
}

/// Lookup tables built once from the configuration.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
    by_registry_host: HashMap<String, usize>,
    by_virtual_host: HashMap<String, usize>,
    default: usize,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Index of the upstream in the configuration.
    pub upstream: usize,
    /// Repository name at that upstream.
    pub repository: Repository,
}

impl RoutingTable {
    /// Builds the tables from a validated configuration.
    pub fn new(config: &Config) -> Self {
        let mut t = RoutingTable {
            entries: Vec::new(),
            by_name: HashMap::new(),
            by_registry_host: HashMap::new(),
            by_virtual_host: HashMap::new(),
            default: 0,
        };
        for (i, u) in config.upstreams.iter().enumerate() {
            t.entries.push(Entry {
                name: u.name.clone(),
                docker_hub: u.is_docker_hub(),
            });
            t.by_name.insert(u.name.clone(), i);
            for h in u.all_registry_hosts() {
                t.by_registry_host.insert(h, i);
            }
            for h in &u.virtual_hosts {
                t.by_virtual_host.insert(h.to_ascii_lowercase(), i);
            }
            if u.name == config.default_upstream {
                t.default = i;
            }
        }
        t
    }

    /// Name of upstream `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.entries[i].name
    }

    /// Index of the upstream called `name`.
    pub fn by_name(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Chooses the upstream and repository for a request. Rules, first match wins:
    /// `ns=` (containerd), the `Host` header (virtual hosts), a first path component equal to
    /// an upstream name, then the default upstream. Docker Hub upstreams also accept
    /// `docker.io/` style prefixes and put one-component names under `library/`.
    pub fn resolve(
        &self,
        name: &Repository,
        host: Option<&str>,
        ns: Option<&str>,
    ) -> Result<Target, RewriteError> {
        let (upstream, rest) = if let Some(ns) = ns {
            let i = *self
                .by_registry_host
                .get(ns)
                .ok_or_else(|| RewriteError::UnknownNamespace(ns.to_owned()))?;
            (i, name.as_str())
        } else if let Some(i) = host.and_then(|h| self.virtual_host(h)) {
            (i, name.as_str())
        } else {
            match name.as_str().split_once('/') {
                Some((first, rest)) if self.by_name.contains_key(first) => {
                    (self.by_name[first], rest)
                }
                _ => (self.default, name.as_str()),
            }
        };
        let repository = if self.entries[upstream].docker_hub {
            docker_hub_name(rest)?
        } else {
            parse_name(rest)?
        };
        Ok(Target {
            upstream,
            repository,
        })
    }

    fn virtual_host(&self, host: &str) -> Option<usize> {
        let host = host.to_ascii_lowercase();
        if let Some(i) = self.by_virtual_host.get(&host) {
            return Some(*i);
        }
        // Also match without the port, so `cache.example:5000` finds `cache.example`.
        let bare = host.rsplit_once(':').map(|(h, _)| h)?;
        self.by_virtual_host.get(bare).copied()
    }
}

fn parse_name(s: &str) -> Result<Repository, RewriteError> {
    s.parse()
        .map_err(|e: crate::reference::ParseError| RewriteError::Name(e.to_string()))
}

/// Docker's normalisation: strip a Docker Hub host prefix, then one component → `library/x`.
pub fn docker_hub_name(s: &str) -> Result<Repository, RewriteError> {
    let mut rest = s;
    for h in DOCKER_HUB_HOSTS {
        if let Some(r) = s.strip_prefix(h).and_then(|r| r.strip_prefix('/')) {
            rest = r;
            break;
        }
    }
    if rest.contains('/') {
        parse_name(rest)
    } else {
        parse_name(&format!("library/{rest}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;
    use url::Url;

    fn table() -> RoutingTable {
        let mut c = Config::default();
        let mut ghcr = UpstreamConfig::new("ghcr", Url::parse("https://ghcr.io").unwrap());
        ghcr.virtual_hosts = vec!["ghcr.cache.local".into()];
        c.upstreams.push(ghcr);
        let mut q = UpstreamConfig::new("quay", Url::parse("https://quay.io").unwrap());
        q.registry_hosts = vec!["quay.example".into()];
        c.upstreams.push(q);
        RoutingTable::new(&c.validate().unwrap())
    }

    fn r(t: &RoutingTable, name: &str, host: Option<&str>, ns: Option<&str>) -> (String, String) {
        let target = t.resolve(&name.parse().unwrap(), host, ns).unwrap();
        (
            t.name(target.upstream).to_owned(),
            target.repository.to_string(),
        )
    }

    #[test]
    fn rules() {
        let t = table();
        // (name, Host, ns, expected upstream, expected repository)
        type Case<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a str, &'a str);
        let cases: &[Case] = &[
            ("alpine", None, None, "docker.io", "library/alpine"),
            ("library/alpine", None, None, "docker.io", "library/alpine"),
            (
                "docker.io/alpine",
                None,
                None,
                "docker.io",
                "library/alpine",
            ),
            (
                "index.docker.io/alpine",
                None,
                None,
                "docker.io",
                "library/alpine",
            ),
            (
                "docker.io/bitnami/redis",
                None,
                None,
                "docker.io",
                "bitnami/redis",
            ),
            ("bitnami/redis", None, None, "docker.io", "bitnami/redis"),
            ("ghcr/owner/app", None, None, "ghcr", "owner/app"),
            ("ghcr", None, None, "docker.io", "library/ghcr"),
            (
                "owner/app",
                Some("ghcr.cache.local"),
                None,
                "ghcr",
                "owner/app",
            ),
            (
                "owner/app",
                Some("GHCR.cache.local:5000"),
                None,
                "ghcr",
                "owner/app",
            ),
            (
                "owner/app",
                Some("other.host"),
                None,
                "docker.io",
                "owner/app",
            ),
            (
                "library/x",
                None,
                Some("docker.io"),
                "docker.io",
                "library/x",
            ),
            ("x", None, Some("index.docker.io"), "docker.io", "library/x"),
            ("owner/app", None, Some("ghcr.io"), "ghcr", "owner/app"),
            ("a/b", None, Some("quay.example"), "quay", "a/b"),
            ("quay/a/b", None, None, "quay", "a/b"),
            ("single", None, Some("quay.io"), "quay", "single"),
        ];
        for (name, host, ns, up, repo) in cases {
            assert_eq!(
                r(&t, name, *host, *ns),
                (up.to_string(), repo.to_string()),
                "{name} {host:?} {ns:?}"
            );
        }
    }

    #[test]
    fn unknown_ns_is_refused_not_contacted() {
        let t = table();
        let e = t
            .resolve(&"a/b".parse().unwrap(), None, Some("evil.example"))
            .unwrap_err();
        assert_eq!(e, RewriteError::UnknownNamespace("evil.example".into()));
    }

    #[test]
    fn prefix_without_rest_is_a_name_error() {
        let t = table();
        // `docker.io/library` stays a two-component Docker Hub name.
        assert_eq!(
            r(&t, "docker.io/library", None, None).1,
            "library/library".to_string()
        );
        // A name too long once `library/` is added is refused.
        let long = "a".repeat(250);
        assert!(matches!(
            t.resolve(&long.parse().unwrap(), None, None),
            Err(RewriteError::Name(_))
        ));
    }
}

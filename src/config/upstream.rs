//! The `[[upstream]]` part of the configuration: one upstream registry (its URL, name rules,
//! credentials, ECR settings), the ECR registry host grammar, and the rules each upstream must
//! keep on its own and against the others. Every error names its key (`upstream[1].url`).

use std::collections::HashSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use url::Url;

use super::{ConfigError, DOCKER_HUB_HOSTS, invalid};
use crate::units::HumanDuration;

/// One upstream registry.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Name; also the path prefix that selects it (`/v2/<name>/<repo>/...`).
    pub name: String,
    /// Base URL of the registry API, e.g. `https://registry-1.docker.io`. May be left out for
    /// an ECR upstream given by `ecr.account_id` and `ecr.region`; validation fills it in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<Url>,
    /// Apply Docker Hub's name rules (`alpine` → `library/alpine`). Default: true when the URL
    /// is Docker Hub's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_hub: Option<bool>,
    /// Registry host names this upstream mirrors, matched against containerd's `?ns=` and
    /// name prefixes. The URL's host is always included; Docker Hub adds its own names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registry_hosts: Vec<String>,
    /// `Host` header values (virtual hosts) under which clients reach this upstream.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtual_hosts: Vec<String>,
    /// Hosts besides the upstream's own whose token realm may receive the credentials.
    /// Docker Hub adds `auth.docker.io`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_hosts: Vec<String>,
    /// User name for the upstream (token realm or basic auth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password or access token, inline. Prefer `password_file` or `password_env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// File holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// Extra CA certificates (PEM) trusted for this upstream, besides the webpki roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Overrides `cache.tag_ttl` for this upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_ttl: Option<HumanDuration>,
    /// Tag patterns (`*` and `?` wildcards) that never move once cached, e.g. `v*.*.*`:
    /// they are never revalidated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub immutable_tags: Vec<String>,
    /// Serve this upstream from the cache only, never contacting it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub offline: bool,
    /// Makes this an Amazon ECR upstream authenticated through the AWS credential chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecr: Option<EcrConfig>,
}

/// Image tag mutability of repositories regcache creates in ECR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum TagMutability {
    /// Tags may be moved.
    #[default]
    Mutable,
    /// Tags may not be moved.
    Immutable,
}

/// Encryption of repositories regcache creates in ECR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum Encryption {
    /// S3-managed AES-256.
    #[default]
    #[serde(rename = "AES256")]
    Aes256,
    /// AWS KMS, with `kms_key` or the AWS-managed key.
    #[serde(rename = "KMS")]
    Kms,
}

/// Amazon ECR settings of an upstream.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EcrConfig {
    /// AWS account id (12 digits). Default: taken from the registry host in `url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    /// AWS region. Default: taken from the registry host in `url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Role to assume through STS (cross-account access); the credential chain's identity
    /// otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    /// ECR API endpoint override (VPC endpoint, tests). `AWS_ENDPOINT_URL_ECR` also works.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_endpoint: Option<Url>,
    /// Create a missing repository on first push.
    pub create_repositories: bool,
    /// Tag mutability of created repositories.
    pub tag_mutability: TagMutability,
    /// Scan created repositories on push.
    pub scan_on_push: bool,
    /// Encryption of created repositories.
    pub encryption: Encryption,
    /// KMS key for `encryption = "KMS"` (the AWS-managed key when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_key: Option<String>,
}

impl EcrConfig {
    /// `(account, region)` from an ECR registry host `<account>.dkr.ecr.<region>.amazonaws.com`
    /// (`.com.cn` in China).
    pub fn parse_registry_host(host: &str) -> Option<(String, String)> {
        let mut parts = host.split('.');
        let account = parts.next()?;
        if parts.next()? != "dkr" || parts.next()? != "ecr" {
            return None;
        }
        let region = parts.next()?;
        let rest: Vec<&str> = parts.collect();
        if !(rest == ["amazonaws", "com"] || rest == ["amazonaws", "com", "cn"]) {
            return None;
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) || region.is_empty()
        {
            return None;
        }
        Some((account.to_owned(), region.to_owned()))
    }
}

impl UpstreamConfig {
    /// An upstream with only a name and URL set.
    pub fn new(name: &str, url: Url) -> Self {
        UpstreamConfig {
            name: name.to_owned(),
            url: Some(url),
            docker_hub: None,
            registry_hosts: Vec::new(),
            virtual_hosts: Vec::new(),
            token_hosts: Vec::new(),
            username: None,
            password: None,
            password_file: None,
            password_env: None,
            ca_file: None,
            tag_ttl: None,
            immutable_tags: Vec::new(),
            offline: false,
            ecr: None,
        }
    }

    /// `host[:port]` of the URL (empty before validation filled in a missing URL).
    pub fn url_authority(&self) -> String {
        let Some(url) = &self.url else {
            return String::new();
        };
        let host = url.host_str().unwrap_or_default();
        match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        }
    }

    /// Whether Docker Hub's naming rules apply.
    pub fn is_docker_hub(&self) -> bool {
        self.docker_hub.unwrap_or_else(|| {
            self.url
                .as_ref()
                .and_then(Url::host_str)
                .is_some_and(|h| DOCKER_HUB_HOSTS.contains(&h))
        })
    }

    /// All registry host names that select this upstream through `ns=`.
    pub fn all_registry_hosts(&self) -> Vec<String> {
        let mut hosts = vec![self.url_authority()];
        if self.is_docker_hub() {
            hosts.extend(DOCKER_HUB_HOSTS.iter().map(|h| h.to_string()));
        }
        hosts.extend(self.registry_hosts.iter().map(|h| h.to_ascii_lowercase()));
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// Hosts whose token realm may receive this upstream's credentials.
    pub fn all_token_hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .token_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        if self.is_docker_hub() {
            hosts.push("auth.docker.io".to_owned());
        }
        hosts
    }

    /// Resolves the password from whichever source is configured.
    pub fn resolve_password(&self, key: &str) -> Result<Option<String>, ConfigError> {
        if let Some(p) = &self.password {
            return Ok(Some(p.clone()));
        }
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    format!("{key}.password_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            return Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()));
        }
        if let Some(var) = &self.password_env {
            let value = std::env::var(var).map_err(|_| {
                invalid(
                    format!("{key}.password_env"),
                    format!("environment variable {var} is not set"),
                )
            })?;
            return Ok(Some(value));
        }
        Ok(None)
    }
}

/// Why an `[upstream.ecr]` table is refused by a build without the `ecr` cargo feature.
pub const ECR_NOT_BUILT: &str = "this regcache was built without Amazon ECR support \
(cargo feature `ecr`, on by default); rebuild it with default features to use an ECR upstream";

/// Completes an ECR upstream: derives account and region from the URL, or the URL from them.
pub(super) fn fill_ecr(u: &mut UpstreamConfig, key: &str) -> Result<(), ConfigError> {
    let Some(ecr) = &mut u.ecr else {
        return Ok(());
    };
    let from_host = u
        .url
        .as_ref()
        .and_then(|url| url.host_str())
        .and_then(EcrConfig::parse_registry_host);
    if ecr.account_id.is_none() {
        ecr.account_id = from_host.as_ref().map(|(a, _)| a.clone());
    }
    if ecr.region.is_none() {
        ecr.region = from_host.as_ref().map(|(_, r)| r.clone());
    }
    let (Some(account), Some(region)) = (&ecr.account_id, &ecr.region) else {
        return Err(invalid(
            format!("{key}.ecr"),
            "set url to <account>.dkr.ecr.<region>.amazonaws.com, or ecr.account_id and ecr.region",
        ));
    };
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(
            format!("{key}.ecr.account_id"),
            "must be 12 digits",
        ));
    }
    if region.is_empty()
        || !region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(format!("{key}.ecr.region"), "is not a region name"));
    }
    if ecr.kms_key.is_some() && ecr.encryption != Encryption::Kms {
        return Err(invalid(
            format!("{key}.ecr.kms_key"),
            "needs encryption = \"KMS\"",
        ));
    }
    if let Some(arn) = &ecr.role_arn {
        if !arn.starts_with("arn:") || !arn.contains(":role/") {
            return Err(invalid(
                format!("{key}.ecr.role_arn"),
                "is not an IAM role ARN",
            ));
        }
    }
    if !cfg!(feature = "ecr") {
        return Err(invalid(format!("{key}.ecr"), ECR_NOT_BUILT));
    }
    if u.url.is_none() {
        let suffix = if region.starts_with("cn-") {
            "amazonaws.com.cn"
        } else {
            "amazonaws.com"
        };
        let url = Url::parse(&format!("https://{account}.dkr.ecr.{region}.{suffix}"))
            .map_err(|e| invalid(format!("{key}.ecr.region"), e.to_string()))?;
        u.url = Some(url);
    }
    Ok(())
}

/// True when `s` is usable as an upstream name and path prefix: one repository path component
/// (lowercase letters and digits, joined by `.`, `_`, `__` or runs of `-`), at most 64 bytes.
/// The same grammar as `reference::Repository` for a single component, which the configuration
/// cannot import (it sits below the protocol types); a test keeps the two in step.
pub(super) fn valid_upstream_name(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || b.len() > 64 || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        match b[i] {
            b'.' => i += 1,
            b'_' if b.get(i + 1) == Some(&b'_') => i += 2,
            b'_' => i += 1,
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        // Every separator sits between letters or digits.
        if !b.get(i).copied().is_some_and(alnum) {
            return false;
        }
    }
    true
}

impl UpstreamConfig {
    /// The rules one upstream keeps on its own (after [`fill_ecr`]); `key` is its dotted path.
    pub(super) fn validate(&self, key: &str) -> Result<(), ConfigError> {
        self.check_name(key)?;
        self.check_url(key)?;
        self.check_credentials(key)?;
        self.check_ca_file(key)?;
        self.check_immutable_tags(key)?;
        self.check_tag_ttl(key)
    }

    fn check_name(&self, key: &str) -> Result<(), ConfigError> {
        if valid_upstream_name(&self.name) {
            return Ok(());
        }
        Err(invalid(
            format!("{key}.name"),
            format!(
                "{:?} must be one lowercase path component (letters, digits, '.', '_', '-')",
                self.name
            ),
        ))
    }

    fn check_url(&self, key: &str) -> Result<(), ConfigError> {
        let Some(url) = &self.url else {
            return Err(invalid(format!("{key}.url"), "is required"));
        };
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(invalid(
                format!("{key}.url"),
                "must be an http:// or https:// URL with a host",
            ));
        }
        if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
            return Err(invalid(
                format!("{key}.url"),
                "must be scheme://host[:port] only (no path, query or credentials)",
            ));
        }
        Ok(())
    }

    /// One password source at most, given together with a user name, and readable.
    fn check_credentials(&self, key: &str) -> Result<(), ConfigError> {
        let sources = [
            self.password.is_some(),
            self.password_file.is_some(),
            self.password_env.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            return Err(invalid(
                format!("{key}.password"),
                "set only one of password, password_file and password_env",
            ));
        }
        if sources.iter().any(|s| *s) != self.username.is_some() {
            return Err(invalid(
                format!("{key}.username"),
                "username and a password source go together",
            ));
        }
        self.resolve_password(key).map(drop)
    }

    fn check_ca_file(&self, key: &str) -> Result<(), ConfigError> {
        match &self.ca_file {
            Some(ca) if !ca.is_file() => Err(invalid(
                format!("{key}.ca_file"),
                format!("{} is not a readable file", ca.display()),
            )),
            _ => Ok(()),
        }
    }

    fn check_immutable_tags(&self, key: &str) -> Result<(), ConfigError> {
        for (j, p) in self.immutable_tags.iter().enumerate() {
            if p.is_empty() || p.len() > 128 || p.contains('/') {
                return Err(invalid(
                    format!("{key}.immutable_tags[{j}]"),
                    "must be a tag pattern of 1 to 128 characters without '/'",
                ));
            }
        }
        Ok(())
    }

    fn check_tag_ttl(&self, key: &str) -> Result<(), ConfigError> {
        if self.tag_ttl.is_some_and(|t| t.0.is_zero()) {
            return Err(invalid(
                format!("{key}.tag_ttl"),
                "must be longer than zero",
            ));
        }
        Ok(())
    }
}

/// What no two upstreams may share: names, registry hosts (`ns=` and name prefixes would be
/// ambiguous) and virtual hosts. Fed one upstream at a time, in order.
#[derive(Default)]
pub(super) struct Distinct<'a> {
    names: HashSet<&'a str>,
    hosts: HashSet<String>,
    vhosts: HashSet<String>,
}

impl<'a> Distinct<'a> {
    /// Adds upstream `u` (at `key`), failing on the first thing an earlier one already has.
    pub fn add(&mut self, u: &'a UpstreamConfig, key: &str) -> Result<(), ConfigError> {
        if !self.names.insert(u.name.as_str()) {
            return Err(invalid(
                format!("{key}.name"),
                format!("{:?} is used twice", u.name),
            ));
        }
        for h in u.all_registry_hosts() {
            if !self.hosts.insert(h.clone()) {
                return Err(invalid(
                    format!("{key}.registry_hosts"),
                    format!("{h:?} already belongs to another upstream"),
                ));
            }
        }
        for h in &u.virtual_hosts {
            if h.is_empty() || !self.vhosts.insert(h.to_ascii_lowercase()) {
                return Err(invalid(
                    format!("{key}.virtual_hosts"),
                    format!("{h:?} is empty or used twice"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn plain() -> UpstreamConfig {
        UpstreamConfig::new("b", Url::parse("http://x").unwrap())
    }

    /// Each rule on its own: a plain upstream passes, one breaking the rule fails naming its key.
    #[test]
    fn each_rule_names_its_key() {
        type Rule = fn(&UpstreamConfig, &str) -> Result<(), ConfigError>;
        type Break = fn(&mut UpstreamConfig);
        let cases: [(Rule, Break, &str); 7] = [
            (
                UpstreamConfig::check_name,
                |u| u.name = "B".into(),
                "u.name",
            ),
            (UpstreamConfig::check_url, |u| u.url = None, "u.url"),
            (
                UpstreamConfig::check_url,
                |u| u.url = Url::parse("http://x/v2").ok(),
                "u.url",
            ),
            (
                UpstreamConfig::check_credentials,
                |u| u.password = Some("p".into()),
                "u.username",
            ),
            (
                UpstreamConfig::check_ca_file,
                |u| u.ca_file = Some("/nonexistent/ca.pem".into()),
                "u.ca_file",
            ),
            (
                UpstreamConfig::check_immutable_tags,
                |u| u.immutable_tags = vec!["v*".into(), "a/b".into()],
                "u.immutable_tags[1]",
            ),
            (
                UpstreamConfig::check_tag_ttl,
                |u| u.tag_ttl = Some(HumanDuration(std::time::Duration::ZERO)),
                "u.tag_ttl",
            ),
        ];
        for (rule, make_bad, key) in cases {
            assert!(rule(&plain(), "u").is_ok(), "{key}");
            let mut u = plain();
            make_bad(&mut u);
            let e = rule(&u, "u").unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{e}");
        }
    }

    #[test]
    fn upstream_names_follow_the_repository_component_grammar() {
        for name in [
            "docker.io",
            "a",
            "ghcr.io",
            "my-reg",
            "my--reg",
            "a_b",
            "a__b",
            "0",
            "quay.io",
            "B",
            "",
            "a/b",
            "-a",
            "a-",
            ".a",
            "a.",
            "a..b",
            "a___b",
            "a_-b",
            "a:b",
            "é",
            "a.-b",
        ] {
            let reference =
                name.parse::<crate::reference::Repository>().is_ok() && !name.contains('/');
            assert_eq!(valid_upstream_name(name), reference, "{name:?}");
        }
        assert!(!valid_upstream_name(&"a".repeat(65)));
        assert!(valid_upstream_name(&"a".repeat(64)));
    }

    #[test]
    fn distinct_names_and_hosts() {
        let a = UpstreamConfig::new("a", Url::parse("http://127.0.0.1:1").unwrap());
        let mut d = Distinct::default();
        d.add(&a, "upstream[0]").unwrap();
        let e = d.add(&a, "upstream[1]").unwrap_err().to_string();
        assert!(e.contains("`upstream[1].name`"), "{e}");
        let same_host = UpstreamConfig::new("c", Url::parse("http://127.0.0.1:1").unwrap());
        let e = d.add(&same_host, "upstream[2]").unwrap_err().to_string();
        assert!(e.contains("`upstream[2].registry_hosts`"), "{e}");
        let mut b = UpstreamConfig::new("b", Url::parse("http://127.0.0.1:2").unwrap());
        b.virtual_hosts = vec!["H".into(), "h".into()];
        let e = d.add(&b, "upstream[3]").unwrap_err().to_string();
        assert!(e.contains("`upstream[3].virtual_hosts`"), "{e}");
    }

    #[test]
    fn ecr_registry_hosts() {
        assert_eq!(
            EcrConfig::parse_registry_host("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn"),
            Some(("123456789012".into(), "cn-north-1".into()))
        );
        for bad in [
            "ecr.amazonaws.com",
            "12345.dkr.ecr.x.amazonaws.com",
            "123456789012.dkr.ecr.x.evil.com",
        ] {
            assert_eq!(EcrConfig::parse_registry_host(bad), None, "{bad}");
        }
    }

    #[test]
    fn docker_hub_hosts() {
        let c = Config::default();
        let hosts = c.upstreams[0].all_registry_hosts();
        assert!(hosts.contains(&"docker.io".to_string()));
        assert!(hosts.contains(&"index.docker.io".to_string()));
        let u = UpstreamConfig::new("q", Url::parse("http://127.0.0.1:8080").unwrap());
        assert!(!u.is_docker_hub());
        assert_eq!(u.all_registry_hosts(), vec!["127.0.0.1:8080".to_string()]);
    }
}

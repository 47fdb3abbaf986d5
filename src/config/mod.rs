//! The configuration file: serde structs with one `Default`, loaded and validated once at start-up.
//!
//! Every key is documented, with its default, in `config/regcache.toml`; a test loads that file
//! and checks it describes exactly these defaults.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use url::Url;

use crate::units::{ByteSize, HumanDuration};

mod auth;
mod fleet;
mod redact;
pub use auth::{AuthConfig, Permission, RuleConfig, TokenConfig};
pub use fleet::FleetConfig;
pub use redact::REDACTED;

/// Docker Hub's registry endpoint.
pub const DOCKER_HUB_URL: &str = "https://registry-1.docker.io";
/// Registry host names that all mean Docker Hub (for `ns=` and name prefixes).
pub const DOCKER_HUB_HOSTS: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type, bad value).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A value breaks a rule.
    #[error("invalid config: `{key}`: {message}")]
    Invalid {
        /// Dotted path of the key, e.g. `upstream[1].url`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the registry API listens on.
    pub listen: SocketAddr,
    /// Address of a separate listener for `/metrics`, `/healthz`, `/readyz` and the status
    /// page. Unset: they are served on `listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,
    /// Folder holding the cache.
    pub cache_dir: PathBuf,
    /// Name of the upstream that serves requests no other rule routes.
    pub default_upstream: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Serve every upstream from the cache only, never contacting any (air-gapped use).
    pub offline: bool,
    /// Serve HTTPS instead of plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Cache behaviour.
    pub cache: CacheConfig,
    /// Network timeouts.
    pub timeouts: TimeoutConfig,
    /// Upstream retries on connection errors.
    pub retry: RetryConfig,
    /// Client authentication and permissions.
    pub auth: AuthConfig,
    /// Limits on what clients may hold: connections, request heads, downloads.
    pub limits: LimitsConfig,
    /// The upstream registries.
    #[serde(rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
    /// Replicas sharing an object store (`[fleet]`); unset: this replica works alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetConfig>,
}

/// TLS certificate and key (PEM files).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Cache behaviour.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// How long a tag → digest answer is used before it is revalidated with a `HEAD` upstream.
    pub tag_ttl: HumanDuration,
    /// Largest manifest accepted from upstream.
    pub max_manifest_size: ByteSize,
    /// How many tag entries are kept in memory (they are also kept on disk).
    pub tag_cache_entries: u64,
    /// Remove blobs and manifests unused for this long, every `gc_interval` while serving.
    /// Unset: no periodic collection (`regcache gc` still works).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gc_max_age: Option<HumanDuration>,
    /// How often the periodic collection runs.
    pub gc_interval: HumanDuration,
    /// Most bytes of blobs and manifests kept on disk (downloads in progress come on top).
    /// Unset: unbounded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_size: Option<ByteSize>,
    /// Fraction of `max_size` above which least recently used entries are evicted.
    pub high_watermark: f64,
    /// Fraction of `max_size` eviction brings the cache down to.
    pub low_watermark: f64,
}

impl CacheConfig {
    /// The size limits for the store, when bounded.
    pub fn limits(&self) -> Option<crate::cache::budget::Limits> {
        self.max_size.map(|m| {
            crate::cache::budget::Limits::new(m.0, self.high_watermark, self.low_watermark)
        })
    }
}

/// Network timeouts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutConfig {
    /// TCP + TLS connect to an upstream.
    pub connect: HumanDuration,
    /// From sending a request upstream to its response headers.
    pub response: HumanDuration,
    /// Longest pause between two chunks of an upstream body before it is abandoned.
    pub read_idle: HumanDuration,
    /// How long open requests may run on after a shutdown signal.
    pub shutdown_grace: HumanDuration,
}

/// Limits on what clients of regcache may hold.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open client connections at most; more are answered 503 and closed at once.
    pub max_connections: u32,
    /// Largest request head (request line and header fields); larger ones get 431.
    pub max_header_bytes: ByteSize,
    /// Most header fields in one HTTP/1 request; more get 431.
    pub max_headers: usize,
    /// Time a client has to send a complete request head: after connecting (the TLS handshake
    /// has as long again) and, on HTTP/1, after its previous request.
    pub header_read_timeout: HumanDuration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: HumanDuration,
    /// Concurrent blob downloads not served from the cache, per client IP address; more get
    /// 429 `TOOMANYREQUESTS`.
    pub downloads_per_client: usize,
}

/// Upstream retries on connection errors (idempotent requests only).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// Wait before the second try; doubled for each further one.
    pub backoff: HumanDuration,
    /// Wait after an upstream is marked down (or failing) before its `/v2/` is probed;
    /// doubled after each probe that finds it still unwell.
    pub probe_backoff: HumanDuration,
    /// Longest wait between two probes of an unwell upstream.
    pub probe_backoff_max: HumanDuration,
}

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

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 5000)),
            admin_listen: None,
            cache_dir: PathBuf::from("regcache-data"),
            default_upstream: "docker.io".to_owned(),
            log_format: LogFormat::Pretty,
            offline: false,
            tls: None,
            cache: CacheConfig::default(),
            timeouts: TimeoutConfig::default(),
            retry: RetryConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            upstreams: vec![UpstreamConfig::new(
                "docker.io",
                // The literal is a valid URL; covered by the defaults test.
                Url::parse(DOCKER_HUB_URL).expect("constant URL"),
            )],
            fleet: None,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            tag_ttl: HumanDuration(std::time::Duration::from_secs(300)),
            max_manifest_size: ByteSize(4 << 20),
            tag_cache_entries: 100_000,
            gc_max_age: None,
            gc_interval: HumanDuration(std::time::Duration::from_secs(3600)),
            max_size: None,
            high_watermark: 0.95,
            low_watermark: 0.85,
        }
    }
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        use std::time::Duration;
        TimeoutConfig {
            connect: HumanDuration(Duration::from_secs(10)),
            response: HumanDuration(Duration::from_secs(60)),
            read_idle: HumanDuration(Duration::from_secs(60)),
            shutdown_grace: HumanDuration(Duration::from_secs(30)),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        use std::time::Duration;
        LimitsConfig {
            max_connections: 4096,
            max_header_bytes: ByteSize(64 << 10),
            max_headers: 100,
            header_read_timeout: HumanDuration(Duration::from_secs(30)),
            idle_timeout: HumanDuration(Duration::from_secs(60)),
            downloads_per_client: 32,
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 3,
            backoff: HumanDuration(std::time::Duration::from_millis(200)),
            probe_backoff: HumanDuration(std::time::Duration::from_secs(5)),
            probe_backoff_max: HumanDuration(std::time::Duration::from_secs(60)),
        }
    }
}

/// Why an `[upstream.ecr]` table is refused by a build without the `ecr` cargo feature.
pub const ECR_NOT_BUILT: &str = "this regcache was built without Amazon ECR support \
(cargo feature `ecr`, on by default); rebuild it with default features to use an ECR upstream";

/// Completes an ECR upstream: derives account and region from the URL, or the URL from them.
fn fill_ecr(u: &mut UpstreamConfig, key: &str) -> Result<(), ConfigError> {
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

/// Matches `text` against `pattern`, where `*` is any run of characters and `?` one.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // Iterative matching with one backtrack point: linear in practice, no recursion.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// True when `s` is usable as an upstream name and path prefix.
fn valid_upstream_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.split('/').count() == 1
        && s.parse::<crate::reference::Repository>().is_ok()
}

impl Config {
    /// Reads and parses a TOML file (not yet validated).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text (not yet validated).
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks every rule once; returns the configuration unchanged when it holds.
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        for (i, u) in self.upstreams.iter_mut().enumerate() {
            fill_ecr(u, &format!("upstream[{i}]"))?;
        }
        if self.upstreams.is_empty() {
            return Err(invalid("upstream", "at least one upstream is required"));
        }
        let positive = [
            ("cache.tag_ttl", self.cache.tag_ttl),
            ("timeouts.connect", self.timeouts.connect),
            ("timeouts.response", self.timeouts.response),
            ("timeouts.read_idle", self.timeouts.read_idle),
            (
                "limits.header_read_timeout",
                self.limits.header_read_timeout,
            ),
            ("limits.idle_timeout", self.limits.idle_timeout),
        ];
        for (key, d) in positive {
            if d.0.is_zero() {
                return Err(invalid(key, "must be longer than zero"));
            }
        }
        let l = &self.limits;
        if !(1..=1_000_000).contains(&l.max_connections) {
            return Err(invalid("limits.max_connections", "must be 1 to 1000000"));
        }
        // hyper's HTTP/1 buffer cannot be smaller than 8 KiB.
        if !(8 << 10..=16 << 20).contains(&l.max_header_bytes.0) {
            return Err(invalid("limits.max_header_bytes", "must be 8KiB to 16MiB"));
        }
        if !(8..=10_000).contains(&l.max_headers) {
            return Err(invalid("limits.max_headers", "must be 8 to 10000"));
        }
        if l.downloads_per_client == 0 {
            return Err(invalid("limits.downloads_per_client", "must be at least 1"));
        }
        if self.cache.max_manifest_size.0 == 0 {
            return Err(invalid(
                "cache.max_manifest_size",
                "must be larger than zero",
            ));
        }
        if self.cache.gc_interval.0.is_zero() {
            return Err(invalid("cache.gc_interval", "must be longer than zero"));
        }
        if self
            .cache
            .gc_max_age
            .is_some_and(|a| a.0 < std::time::Duration::from_secs(60))
        {
            return Err(invalid("cache.gc_max_age", "must be at least 1m"));
        }
        if self.cache.max_size.is_some_and(|m| m.0 < 1 << 20) {
            return Err(invalid("cache.max_size", "must be at least 1MiB"));
        }
        let (high, low) = (self.cache.high_watermark, self.cache.low_watermark);
        if !(high > 0.0 && high <= 1.0) {
            return Err(invalid(
                "cache.high_watermark",
                "must be a fraction of max_size above 0 and at most 1",
            ));
        }
        if !(low > 0.0 && low < high) {
            return Err(invalid(
                "cache.low_watermark",
                "must be a fraction of max_size above 0 and below high_watermark",
            ));
        }
        if self.cache.tag_cache_entries == 0 {
            return Err(invalid("cache.tag_cache_entries", "must be at least 1"));
        }
        if self.retry.attempts == 0 || self.retry.attempts > 10 {
            return Err(invalid("retry.attempts", "must be between 1 and 10"));
        }
        if self.retry.backoff.0 > std::time::Duration::from_secs(60) {
            return Err(invalid("retry.backoff", "must be at most 1m"));
        }
        if self.retry.probe_backoff.0.is_zero() {
            return Err(invalid("retry.probe_backoff", "must be more than 0s"));
        }
        if self.retry.probe_backoff_max.0 < self.retry.probe_backoff.0 {
            return Err(invalid(
                "retry.probe_backoff_max",
                "must be at least retry.probe_backoff",
            ));
        }
        if let Some(a) = self.admin_listen {
            let l = self.listen;
            let overlap = a.ip() == l.ip() || a.ip().is_unspecified() || l.ip().is_unspecified();
            if a.port() == l.port() && a.port() != 0 && overlap {
                return Err(invalid(
                    "admin_listen",
                    "must not be the address or port of listen",
                ));
            }
        }
        if self.cache_dir.as_os_str().is_empty() {
            return Err(invalid("cache_dir", "must not be empty"));
        }
        if let Some(tls) = &self.tls {
            for (key, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
                if !path.is_file() {
                    return Err(invalid(
                        key,
                        format!("{} is not a readable file", path.display()),
                    ));
                }
            }
        }
        let mut names = HashSet::new();
        let mut hosts = HashSet::new();
        let mut vhosts = HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let key = format!("upstream[{i}]");
            if !valid_upstream_name(&u.name) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!(
                        "{:?} must be one lowercase path component (letters, digits, '.', '_', '-')",
                        u.name
                    ),
                ));
            }
            if !names.insert(u.name.as_str()) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("{:?} is used twice", u.name),
                ));
            }
            let Some(url) = &u.url else {
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
            let sources = [
                u.password.is_some(),
                u.password_file.is_some(),
                u.password_env.is_some(),
            ];
            if sources.iter().filter(|s| **s).count() > 1 {
                return Err(invalid(
                    format!("{key}.password"),
                    "set only one of password, password_file and password_env",
                ));
            }
            if sources.iter().any(|s| *s) != u.username.is_some() {
                return Err(invalid(
                    format!("{key}.username"),
                    "username and a password source go together",
                ));
            }
            u.resolve_password(&key)?;
            if let Some(ca) = &u.ca_file {
                if !ca.is_file() {
                    return Err(invalid(
                        format!("{key}.ca_file"),
                        format!("{} is not a readable file", ca.display()),
                    ));
                }
            }
            for (j, p) in u.immutable_tags.iter().enumerate() {
                if p.is_empty() || p.len() > 128 || p.contains('/') {
                    return Err(invalid(
                        format!("{key}.immutable_tags[{j}]"),
                        "must be a tag pattern of 1 to 128 characters without '/'",
                    ));
                }
            }
            if u.tag_ttl.is_some_and(|t| t.0.is_zero()) {
                return Err(invalid(
                    format!("{key}.tag_ttl"),
                    "must be longer than zero",
                ));
            }
            for h in u.all_registry_hosts() {
                if !hosts.insert(h.clone()) {
                    return Err(invalid(
                        format!("{key}.registry_hosts"),
                        format!("{h:?} already belongs to another upstream"),
                    ));
                }
            }
            for h in &u.virtual_hosts {
                if h.is_empty() || !vhosts.insert(h.to_ascii_lowercase()) {
                    return Err(invalid(
                        format!("{key}.virtual_hosts"),
                        format!("{h:?} is empty or used twice"),
                    ));
                }
            }
        }
        self.auth.validate(&self.upstreams)?;
        if let Some(f) = &self.fleet {
            f.validate()?;
        }
        if !names.contains(self.default_upstream.as_str()) {
            return Err(invalid(
                "default_upstream",
                format!("{:?} is not the name of an upstream", self.default_upstream),
            ));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_upstreams(extra: &str) -> Result<Config, String> {
        let text = format!(
            "default_upstream = \"a\"\n[[upstream]]\nname = \"a\"\nurl = \"http://127.0.0.1:1\"\n{extra}"
        );
        Config::from_toml(&text)?
            .validate()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn default_is_valid_and_uses_docker_hub() {
        let c = Config::default().validate().unwrap();
        assert_eq!(c.upstreams[0].name, "docker.io");
        assert!(c.upstreams[0].is_docker_hub());
        assert_eq!(c.listen.port(), 5000);
    }

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn the_example_file_documents_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/regcache.toml");
        let c = Config::from_file(&path).unwrap().validate().unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::from_toml("listen = \"0.0.0.0:1\"\nlisten_port = 3").unwrap_err();
        assert!(e.contains("listen_port"), "{e}");
        let e = Config::from_toml("[cache]\nttl = \"5m\"").unwrap_err();
        assert!(e.contains("ttl"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::from_toml("[cache]\ntag_ttl = \"5 weeks\"").unwrap_err();
        assert!(e.contains("tag_ttl"), "{e}");
        let e = Config::from_toml("[cache]\nmax_size = \"many\"").unwrap_err();
        assert!(e.contains("max_size"), "{e}");
        let e = Config::from_toml("listen = \"nowhere\"").unwrap_err();
        assert!(e.contains("listen"), "{e}");
    }

    #[test]
    fn admin_listen_must_not_take_the_registry_port() {
        for text in [
            "admin_listen = \"127.0.0.1:5000\"",
            "admin_listen = \"0.0.0.0:5000\"",
            "listen = \"127.0.0.1:7000\"\nadmin_listen = \"0.0.0.0:7000\"",
        ] {
            let e = Config::from_toml(text)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(e.contains("`admin_listen`"), "{text}: {e}");
        }
        let c = Config::from_toml("admin_listen = \"127.0.0.1:9090\"")
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
        // Both OS-chosen (tests): allowed.
        let c = Config::from_toml("listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"");
        assert!(c.unwrap().validate().is_ok());
    }

    #[test]
    fn rejection_rules() {
        let cases = [
            ("[cache]\ntag_ttl = \"0s\"", "cache.tag_ttl"),
            ("[cache]\nmax_manifest_size = 0", "cache.max_manifest_size"),
            ("[retry]\nattempts = 0", "retry.attempts"),
            ("[retry]\nbackoff = \"2h\"", "retry.backoff"),
            ("[retry]\nprobe_backoff = \"0s\"", "retry.probe_backoff"),
            (
                "[retry]\nprobe_backoff = \"10s\"\nprobe_backoff_max = \"5s\"",
                "retry.probe_backoff_max",
            ),
            ("[cache]\ngc_max_age = \"5s\"", "cache.gc_max_age"),
            ("[cache]\nmax_size = \"10KiB\"", "cache.max_size"),
            ("[cache]\nhigh_watermark = 1.5", "cache.high_watermark"),
            ("[cache]\nlow_watermark = 0.99", "cache.low_watermark"),
            ("[cache]\ngc_interval = \"0s\"", "cache.gc_interval"),
            ("[timeouts]\nread_idle = \"0ms\"", "timeouts.read_idle"),
            ("[limits]\nmax_connections = 0", "limits.max_connections"),
            (
                "[limits]\nmax_header_bytes = \"4KiB\"",
                "limits.max_header_bytes",
            ),
            (
                "[limits]\nmax_header_bytes = \"1GiB\"",
                "limits.max_header_bytes",
            ),
            ("[limits]\nmax_headers = 2", "limits.max_headers"),
            (
                "[limits]\nheader_read_timeout = \"0s\"",
                "limits.header_read_timeout",
            ),
            ("[limits]\nidle_timeout = \"0s\"", "limits.idle_timeout"),
            (
                "[limits]\ndownloads_per_client = 0",
                "limits.downloads_per_client",
            ),
            (
                "[[upstream]]\nname = \"a\"\nurl = \"http://x\"",
                "upstream[1].name",
            ),
            (
                "[[upstream]]\nname = \"B\"\nurl = \"http://x\"",
                "upstream[1].name",
            ),
            (
                "[[upstream]]\nname = \"b/c\"\nurl = \"http://x\"",
                "upstream[1].name",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"ftp://x\"",
                "upstream[1].url",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://x/v2\"",
                "upstream[1].url",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://u:p@x\"",
                "upstream[1].url",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://127.0.0.1:1\"",
                "upstream[1].registry_hosts",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://x\"\npassword = \"p\"",
                "upstream[1].username",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://x\"\nusername = \"u\"\npassword = \"p\"\npassword_env = \"E\"",
                "upstream[1].password",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://x\"\nusername = \"u\"\npassword_env = \"REGCACHE_TEST_SURELY_UNSET\"",
                "upstream[1].password_env",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://x\"\nusername = \"u\"\npassword_file = \"/nonexistent/pw\"",
                "upstream[1].password_file",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://x\"\nca_file = \"/nonexistent/ca.pem\"",
                "upstream[1].ca_file",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://x\"\nvirtual_hosts = [\"h\", \"h\"]",
                "upstream[1].virtual_hosts",
            ),
            (
                "[tls]\ncert = \"/nonexistent/c\"\nkey = \"/nonexistent/k\"",
                "tls.cert",
            ),
        ];
        for (extra, key) in cases {
            let e = with_upstreams(extra).unwrap_err();
            assert!(e.contains(&format!("`{key}`")), "{extra:?}: {e}");
        }
        let e = Config::from_toml("default_upstream = \"nope\"")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("`default_upstream`"), "{e}");
        let e = Config::from_toml("upstream = []")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("`upstream`"), "{e}");
    }

    #[cfg(feature = "ecr")]
    #[test]
    fn ecr_upstreams_by_host_or_by_account_and_region() {
        let c = with_upstreams(
            "[[upstream]]\nname = \"prod\"\nurl = \"https://123456789012.dkr.ecr.eu-west-1.amazonaws.com\"\n[upstream.ecr]\n\
             [[upstream]]\nname = \"dev\"\n[upstream.ecr]\naccount_id = \"210987654321\"\nregion = \"us-east-2\"\n",
        )
        .unwrap();
        let prod = c.upstreams[1].ecr.as_ref().unwrap();
        assert_eq!(prod.account_id.as_deref(), Some("123456789012"));
        assert_eq!(prod.region.as_deref(), Some("eu-west-1"));
        assert_eq!(
            c.upstreams[2].url.as_ref().unwrap().as_str(),
            "https://210987654321.dkr.ecr.us-east-2.amazonaws.com/"
        );
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

    /// Without the `ecr` feature a well-formed ECR upstream is a configuration error that
    /// names its key and says how to get ECR support.
    #[cfg(not(feature = "ecr"))]
    #[test]
    fn ecr_upstream_without_the_feature_names_the_key() {
        for extra in [
            "[[upstream]]\nname = \"prod\"\nurl = \"https://123456789012.dkr.ecr.eu-west-1.amazonaws.com\"\n[upstream.ecr]\n",
            "[[upstream]]\nname = \"dev\"\n[upstream.ecr]\naccount_id = \"210987654321\"\nregion = \"us-east-2\"\n",
        ] {
            let e = with_upstreams(extra).unwrap_err();
            assert!(e.contains("`upstream[1].ecr`"), "{e}");
            assert!(e.contains("cargo feature `ecr`"), "{e}");
        }
        let e = crate::upstream::ecr::Ecr::new(&EcrConfig::default()).unwrap_err();
        assert!(e.contains("cargo feature `ecr`"), "{e}");
    }

    #[test]
    fn ecr_and_auth_rejection_rules() {
        let cases = [
            (
                "[[upstream]]\nname = \"e\"\n[upstream.ecr]\n",
                "upstream[1].ecr",
            ),
            (
                "[[upstream]]\nname = \"e\"\nurl = \"https://example.com\"\n[upstream.ecr]\n",
                "upstream[1].ecr",
            ),
            (
                "[[upstream]]\nname = \"e\"\n[upstream.ecr]\naccount_id = \"12\"\nregion = \"us-east-1\"\n",
                "upstream[1].ecr.account_id",
            ),
            (
                "[[upstream]]\nname = \"e\"\n[upstream.ecr]\naccount_id = \"123456789012\"\nregion = \"US East\"\n",
                "upstream[1].ecr.region",
            ),
            (
                "[[upstream]]\nname = \"e\"\n[upstream.ecr]\naccount_id = \"123456789012\"\nregion = \"us-east-1\"\nkms_key = \"k\"\n",
                "upstream[1].ecr.kms_key",
            ),
            (
                "[[upstream]]\nname = \"e\"\n[upstream.ecr]\naccount_id = \"123456789012\"\nregion = \"us-east-1\"\nrole_arn = \"me\"\n",
                "upstream[1].ecr.role_arn",
            ),
            ("[[upstream]]\nname = \"n\"\n", "upstream[1].url"),
            ("[auth]\npush = true\n", "auth.push"),
            ("[auth]\nanonymous_pull = false\n", "auth.anonymous_pull"),
            (
                "[auth]\nhtpasswd = \"/nonexistent/htpasswd\"\n",
                "auth.htpasswd",
            ),
        ];
        for (extra, key) in cases {
            let e = with_upstreams(extra).unwrap_err();
            assert!(e.contains(&format!("`{key}`")), "{extra:?}: {e}");
        }
        let e = Config::from_toml("[[upstream]]\nname = \"e\"\nurl = \"https://x\"\n[upstream.ecr]\nencryption = \"DES\"\n")
            .unwrap_err();
        assert!(e.contains("encryption"), "{e}");
    }

    #[test]
    fn glob_patterns() {
        for (p, t, want) in [
            ("v*.*.*", "v1.2.3", true),
            ("v*.*.*", "v1.2", false),
            ("sha-*", "sha-abc", true),
            ("*", "anything", true),
            ("1.?", "1.2", true),
            ("1.?", "1.23", false),
            ("latest", "latest", true),
            ("latest", "latest2", false),
            ("*-rc*", "1.0-rc1", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
        ] {
            assert_eq!(glob_match(p, t), want, "{p} {t}");
        }
        let e = with_upstreams(
            "[[upstream]]\nname = \"b\"\nurl = \"http://x\"\nimmutable_tags = [\"\"]\n",
        )
        .unwrap_err();
        assert!(e.contains("`upstream[1].immutable_tags[0]`"), "{e}");
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

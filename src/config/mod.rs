//! The configuration file: serde structs with one `Default`, loaded and validated once at start-up.
//!
//! Every key is documented, with its default, in `config/regcache.toml`; a test loads that file
//! and checks it describes exactly these defaults. This file holds the top-level schema and
//! its defaults; `upstream.rs` the `[[upstream]]` part, `auth.rs` the `[auth]` part,
//! `validate.rs` the rules, `glob.rs` the wildcard patterns they use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use url::Url;

use crate::units::{ByteSize, HumanDuration};

mod auth;
mod fleet;
mod glob;
mod redact;
mod upstream;
mod validate;

pub use auth::{AuthConfig, MIN_TOKEN_LEN, Permission, RuleConfig, TokenConfig};
pub use fleet::FleetConfig;
pub use glob::glob_match;
pub use redact::REDACTED;
pub use upstream::{ECR_NOT_BUILT, EcrConfig, Encryption, TagMutability, UpstreamConfig};

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

impl ConfigError {
    /// A value of `key` breaks a rule. Also for checks made where the configuration is used
    /// (the htpasswd file's entries are judged where the file is loaded).
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::invalid(key, message)
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
            max_connections: 8192,
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

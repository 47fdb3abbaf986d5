//! One configured upstream registry: builds registry API requests, authenticates them, and
//! hands back manifests (read whole, size-capped) or blob responses (streamed).

pub mod auth;
pub mod cause;
pub mod client;
#[cfg(feature = "ecr")]
pub mod ecr;
#[cfg(not(feature = "ecr"))]
#[path = "ecr_off.rs"]
pub mod ecr;
pub mod encoding;
mod exchange;
mod fetch;
pub mod probe;
pub mod push;
mod read;
pub mod redirect;
pub mod referrers;
pub mod stats;

use std::sync::Arc;
use std::time::Duration;

use url::Url;

use crate::config::{Config, UpstreamConfig};
use crate::error::UpstreamError;
use auth::{Authenticator, CredentialProvider, Credentials, StaticCredentials};
use client::HttpClient;
pub use fetch::{BlobAnswer, FetchedManifest};
use read::content_range;
pub(crate) use read::{MAX_ERROR_BODY, read_capped};
pub use read::{box_incoming, content_length};

/// One upstream registry and its client, authenticator and settings.
pub struct Upstream {
    /// Configured name.
    pub name: String,
    base: Url,
    client: HttpClient,
    auth: Authenticator,
    /// How long a tag answer is fresh.
    pub tag_ttl: Duration,
    max_manifest_size: u64,
    /// Longest pause between two body chunks.
    pub read_idle: Duration,
    /// Longest time to obtain a response's headers, token fetch and redirects included.
    pub exchange_deadline: Duration,
    /// Creates repositories a push finds missing, when the upstream is configured to.
    pub(crate) repository_creator: Option<Arc<dyn push::RepositoryCreator>>,
    /// The Amazon ECR side (credentials, repository creation) of an ECR upstream.
    ecr: Option<Arc<ecr::Ecr>>,
    /// Served from the cache only; never contacted.
    pub offline: bool,
    immutable_tags: Vec<String>,
    /// Latency, traffic and health figures.
    stats: Arc<stats::UpstreamStats>,
    /// Set once the bodiless `GET /v2/` that learns the authentication scheme before the
    /// first blob request has been made (see [`Upstream::learn_scheme`]); concurrent first
    /// blob requests wait for that one probe.
    scheme_probe: tokio::sync::OnceCell<()>,
}

/// Failure building an upstream at start-up.
#[derive(Debug, thiserror::Error)]
#[error("upstream {name}: {source}")]
pub struct BuildError {
    name: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl Upstream {
    /// Builds the upstream from its validated configuration.
    pub fn new(cfg: &UpstreamConfig, global: &Config) -> Result<Self, BuildError> {
        let wrap = |e: Box<dyn std::error::Error + Send + Sync>| BuildError {
            name: cfg.name.clone(),
            source: e,
        };
        let client = HttpClient::new(
            cfg.ca_file.as_deref(),
            global.timeouts.connect.0,
            global.timeouts.response.0,
            global.retry.clone(),
        )
        .map_err(|e| wrap(Box::new(e)))?
        .named(&cfg.name);
        let client = match &cfg.url {
            Some(base) => client
                .with_redirect_policy(redirect::RedirectPolicy::new(base, &cfg.redirect_hosts)),
            None => client,
        };
        let password = cfg
            .resolve_password(&cfg.name)
            .map_err(|e| wrap(Box::new(e)))?;
        let url = cfg
            .url
            .clone()
            .ok_or_else(|| wrap("no URL (configuration not validated)".into()))?;
        // An ECR upstream's credentials come from GetAuthorizationToken, never the file.
        let ecr = match &cfg.ecr {
            Some(e) => Some(Arc::new(ecr::Ecr::new(e).map_err(|e| wrap(e.into()))?)),
            None => None,
        };
        let credentials: Option<Arc<dyn CredentialProvider>> = match (&ecr, &cfg.username, password)
        {
            (Some(e), _, _) => Some(e.clone()),
            (None, Some(u), Some(p)) => Some(Arc::new(StaticCredentials(Credentials {
                username: u.clone(),
                password: p,
            }))),
            _ => None,
        };
        let repository_creator: Option<Arc<dyn push::RepositoryCreator>> = match &ecr {
            Some(e) if e.creates_repositories() => Some(e.clone()),
            _ => None,
        };
        Ok(Upstream {
            name: cfg.name.clone(),
            base: url.clone(),
            auth: Authenticator::new(
                url,
                cfg.all_token_hosts(),
                credentials,
                client.clone(),
                global.timeouts.read_idle.0,
            ),
            client,
            tag_ttl: cfg.tag_ttl.unwrap_or(global.cache.tag_ttl).0,
            max_manifest_size: global.cache.max_manifest_size.0,
            read_idle: global.timeouts.read_idle.0,
            // A token fetch, the request and its redirects each get the response timeout.
            exchange_deadline: global.timeouts.response.0.saturating_mul(3)
                + global.timeouts.connect.0.saturating_mul(2),
            repository_creator,
            ecr,
            offline: global.offline || cfg.offline,
            immutable_tags: cfg.immutable_tags.clone(),
            stats: Arc::new(stats::UpstreamStats::detached(&cfg.name)),
            scheme_probe: tokio::sync::OnceCell::new(),
        })
    }

    /// This upstream, reporting to `stats` (registered with the app's metrics).
    pub fn with_stats(mut self, stats: Arc<stats::UpstreamStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Latency, traffic and health figures.
    pub fn stats(&self) -> &Arc<stats::UpstreamStats> {
        &self.stats
    }

    /// The registry's base URL.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// Whether a cached answer for `tag` is never revalidated.
    pub fn is_immutable_tag(&self, tag: &str) -> bool {
        self.immutable_tags
            .iter()
            .any(|p| crate::config::glob_match(p, tag))
    }

    /// The Amazon ECR side of an ECR upstream (token counters, repository creation).
    pub fn ecr(&self) -> Option<&Arc<ecr::Ecr>> {
        self.ecr.as_ref()
    }

    /// Token requests this upstream has made.
    pub fn token_fetches(&self) -> u64 {
        self.auth.token_fetches()
    }

    fn url(&self, path_and_query: &str) -> Result<Url, UpstreamError> {
        self.base
            .join(path_and_query)
            .map_err(|_| UpstreamError::Invalid("cannot build upstream URL".into()))
    }
}

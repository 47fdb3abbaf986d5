//! Upstream authentication: `WWW-Authenticate` parsing, the bearer-token dance, basic auth, and
//! a token cache per scope (one fetch at a time, kept until shortly before expiry).
//!
//! Credentials go only to the upstream itself (basic) or to a token realm on the upstream's
//! own domain; they never appear in logs (`Credentials` has a redacting `Debug`).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use http::{HeaderMap, HeaderValue, Method, header};
use serde::Deserialize;
use tokio::time::Instant;
use url::Url;

use super::client::HttpClient;
use crate::error::UpstreamError;
use crate::flight::{Flight, lock};

/// An authentication scheme offered by a `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercased scheme name (`bearer`, `basic`).
    pub scheme: String,
    /// Parameters with lowercased names.
    pub params: HashMap<String, String>,
}

/// Parses a `WWW-Authenticate` value into its challenges (RFC 7235: several challenges may
/// share one header, separated by commas).
pub fn parse_challenges(value: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let s = value.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] == b' ' || s[*i] == b'\t' || s[*i] == b',') {
            *i += 1;
        }
    };
    let is_token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&c);
    while i < s.len() {
        skip_ws(&mut i);
        let start = i;
        while i < s.len() && is_token(s[i]) {
            i += 1;
        }
        if start == i {
            i += 1;
            continue;
        }
        let word = &value[start..i];
        // `word=` starts a parameter of the current challenge; otherwise `word` is a scheme.
        let mut j = i;
        while j < s.len() && (s[j] == b' ' || s[j] == b'\t') {
            j += 1;
        }
        if j < s.len() && s[j] == b'=' && !out.is_empty() {
            i = j + 1;
            while i < s.len() && (s[i] == b' ' || s[i] == b'\t') {
                i += 1;
            }
            let mut val = String::new();
            if i < s.len() && s[i] == b'"' {
                i += 1;
                while i < s.len() && s[i] != b'"' {
                    if s[i] == b'\\' && i + 1 < s.len() {
                        i += 1;
                    }
                    let ch_start = i;
                    // Copy one UTF-8 character.
                    i += 1;
                    while i < s.len() && (s[i] & 0xC0) == 0x80 {
                        i += 1;
                    }
                    val.push_str(&value[ch_start..i]);
                }
                i += 1;
            } else {
                let vs = i;
                while i < s.len() && s[i] != b',' && s[i] != b' ' {
                    i += 1;
                }
                val.push_str(&value[vs..i]);
            }
            if let Some(c) = out.last_mut() {
                c.params.insert(word.to_ascii_lowercase(), val);
            }
        } else {
            out.push(Challenge {
                scheme: word.to_ascii_lowercase(),
                params: HashMap::new(),
            });
        }
    }
    out
}

/// A user name and password; `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// The `Authorization: Basic` value for these credentials, marked sensitive.
    pub fn basic_header(&self) -> Result<HeaderValue, UpstreamError> {
        let raw = format!("{}:{}", self.username, self.password);
        let enc = base64::engine::general_purpose::STANDARD.encode(raw);
        let mut v = HeaderValue::from_str(&format!("Basic {enc}"))
            .map_err(|_| UpstreamError::Auth("credentials are not valid header text".into()))?;
        v.set_sensitive(true);
        Ok(v)
    }
}

/// Where an upstream's credentials come from: fixed configuration, or a provider that mints
/// them (ECR's GetAuthorizationToken) and caches them.
#[async_trait::async_trait]
pub trait CredentialProvider: Send + Sync + 'static {
    /// The credentials to use now (cached by the provider).
    async fn credentials(&self) -> Result<Credentials, UpstreamError>;
    /// The upstream refused the request that carried `rejected` (a `Basic` header made from
    /// earlier credentials). Returns fresh credentials worth one retry, or `None` when a retry
    /// cannot help.
    async fn refresh(&self, rejected: &HeaderValue) -> Result<Option<Credentials>, UpstreamError>;
    /// Whether `refresh` can ever return fresh credentials (static ones cannot).
    fn refreshes(&self) -> bool {
        false
    }
}

/// Credentials from the configuration file.
pub struct StaticCredentials(pub Credentials);

#[async_trait::async_trait]
impl CredentialProvider for StaticCredentials {
    async fn credentials(&self) -> Result<Credentials, UpstreamError> {
        Ok(self.0.clone())
    }

    async fn refresh(&self, _: &HeaderValue) -> Result<Option<Credentials>, UpstreamError> {
        Ok(None)
    }
}

/// What an upstream asked for last time, so later requests authenticate up front instead of
/// paying a 401 round trip each.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Known {
    Bearer { realm: Url, service: Option<String> },
    Basic,
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// Per-upstream authenticator with its token cache.
pub struct Authenticator {
    upstream: Url,
    token_hosts: Vec<String>,
    read_idle: Duration,
    credentials: Option<Arc<dyn CredentialProvider>>,
    client: HttpClient,
    // Protects only the learned scheme; short critical sections, never across `.await`.
    known: Mutex<Option<Known>>,
    tokens: Flight<String, HeaderValue, UpstreamError>,
    token_fetches: std::sync::atomic::AtomicU64,
}

/// Largest token response read.
const MAX_TOKEN_RESPONSE: u64 = 64 * 1024;
/// Longest token lifetime believed, whatever the realm says.
const MAX_TOKEN_LIFETIME_S: u64 = 86_400;

/// How long before a token's expiry it stops being used.
fn margin(lifetime: Duration) -> Duration {
    (lifetime / 5).min(Duration::from_secs(30))
}

impl Authenticator {
    /// An authenticator for the upstream at `upstream`. `token_hosts` are the hosts besides
    /// the upstream itself whose token realm may receive the credentials.
    pub fn new(
        upstream: Url,
        token_hosts: Vec<String>,
        credentials: Option<Arc<dyn CredentialProvider>>,
        client: HttpClient,
        read_idle: Duration,
    ) -> Self {
        Authenticator {
            upstream,
            token_hosts,
            read_idle,
            credentials,
            client,
            known: Mutex::new(None),
            tokens: Flight::default(),
            token_fetches: Default::default(),
        }
    }

    /// Token requests made so far (for tests and metrics).
    pub fn token_fetches(&self) -> u64 {
        self.token_fetches
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn known(&self) -> Option<Known> {
        lock(&self.known).clone()
    }

    /// Whether the upstream's scheme has been learned from a challenge.
    pub fn scheme_known(&self) -> bool {
        lock(&self.known).is_some()
    }

    /// The `Authorization` to send up front for `scope`, once the upstream's scheme is known.
    pub async fn header_for(&self, scope: &str) -> Result<Option<HeaderValue>, UpstreamError> {
        match self.known() {
            None => Ok(None),
            Some(Known::Basic) => match &self.credentials {
                Some(p) => p.credentials().await?.basic_header().map(Some),
                None => Ok(None),
            },
            Some(Known::Bearer { realm, service }) => {
                self.token(realm, service, scope).await.map(Some)
            }
        }
    }

    /// Handles a 401: learns the challenge and returns the header to retry with. `rejected`
    /// is the header the refused request carried; a cached token equal to it is dropped.
    pub async fn on_challenge(
        &self,
        www_authenticate: &HeaderValue,
        scope: &str,
        rejected: Option<&HeaderValue>,
    ) -> Result<HeaderValue, UpstreamError> {
        let text = www_authenticate
            .to_str()
            .map_err(|_| UpstreamError::Auth("unreadable WWW-Authenticate".into()))?;
        let challenges = parse_challenges(text);
        if let Some(c) = challenges.iter().find(|c| c.scheme == "bearer") {
            let realm = c
                .params
                .get("realm")
                .and_then(|r| Url::parse(r).ok())
                .filter(|r| matches!(r.scheme(), "http" | "https"))
                .ok_or_else(|| {
                    UpstreamError::Auth("bearer challenge without a usable realm".into())
                })?;
            let service = c.params.get("service").cloned();
            self.learn(Known::Bearer {
                realm: realm.clone(),
                service: service.clone(),
            });
            if let Some(r) = rejected {
                self.tokens.invalidate(&scope.to_owned(), |v| v == r);
            }
            return self.token(realm, service, scope).await;
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let provider = self.credentials.as_ref().ok_or_else(|| {
                UpstreamError::Auth(
                    "upstream wants basic auth and no credentials are configured".into(),
                )
            })?;
            self.learn(Known::Basic);
            return match rejected {
                None => provider.credentials().await?.basic_header(),
                Some(r) => match provider.refresh(r).await? {
                    Some(fresh) => fresh.basic_header(),
                    None => Err(UpstreamError::Auth(
                        "upstream refused the configured credentials".into(),
                    )),
                },
            };
        }
        Err(UpstreamError::Auth(
            "no supported authentication scheme offered".into(),
        ))
    }

    /// Whether a refusal (403, or 400 "expired") may be answered by
    /// [`Authenticator::after_refusal`]: only credentials that can be refreshed, sent as
    /// `Basic`.
    pub fn may_refresh(&self) -> bool {
        matches!(
            (&self.credentials, self.known()),
            (Some(p), Some(Known::Basic)) if p.refreshes()
        )
    }

    /// The upstream refused a request that carried `rejected` with something other than a
    /// 401 challenge (ECR: 403, or 400 with an expired-token message). Returns the header to
    /// retry with once, when fresh credentials can be had.
    pub async fn after_refusal(
        &self,
        rejected: &HeaderValue,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        match (&self.credentials, self.known()) {
            (Some(p), Some(Known::Basic)) => match p.refresh(rejected).await? {
                Some(fresh) => fresh.basic_header().map(Some),
                None => Ok(None),
            },
            _ => Ok(None),
        }
    }

    fn learn(&self, k: Known) {
        *lock(&self.known) = Some(k);
    }

    /// May credentials be sent to `realm`? Only over HTTPS (or plain HTTP when the upstream
    /// itself is plain HTTP), and only to the upstream's own host or a host the operator
    /// listed in `token_hosts` (Docker Hub: `auth.docker.io`). A guess from the parent domain
    /// would trust every tenant of shared domains such as `azurecr.io` or `amazonaws.com`.
    pub fn realm_may_receive_credentials(
        upstream: &Url,
        realm: &Url,
        token_hosts: &[String],
    ) -> bool {
        let scheme_ok = realm.scheme() == "https" || upstream.scheme() == "http";
        let host_ok = match (upstream.host(), realm.host()) {
            (Some(u), Some(r)) => {
                u == r
                    || token_hosts
                        .iter()
                        .any(|h| r.to_string().eq_ignore_ascii_case(h))
            }
            _ => false,
        };
        scheme_ok && host_ok
    }

    async fn token(
        &self,
        realm: Url,
        service: Option<String>,
        scope: &str,
    ) -> Result<HeaderValue, UpstreamError> {
        let allowed =
            Self::realm_may_receive_credentials(&self.upstream, &realm, &self.token_hosts);
        let creds = match &self.credentials {
            Some(p) if allowed => Some(p.credentials().await?),
            Some(_) => {
                tracing::warn!(
                    realm = realm.host_str().unwrap_or(""),
                    "token realm is not the upstream's host nor in token_hosts; asking for an anonymous token"
                );
                None
            }
            None => None,
        };
        let client = self.client.clone();
        let read_idle = self.read_idle;
        let scope_owned = scope.to_owned();
        let counter = &self.token_fetches;
        self.tokens
            .get(scope.to_owned(), || {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                fetch_token(client, realm, service, scope_owned, creds, read_idle)
            })
            .await
    }
}

async fn fetch_token(
    client: HttpClient,
    mut realm: Url,
    service: Option<String>,
    scope: String,
    creds: Option<Credentials>,
    read_idle: Duration,
) -> Result<(HeaderValue, Option<Instant>), UpstreamError> {
    {
        let mut q = realm.query_pairs_mut();
        if let Some(s) = &service {
            q.append_pair("service", s);
        }
        q.append_pair("scope", &scope);
        if let Some(c) = &creds {
            q.append_pair("account", &c.username);
        }
    }
    let mut headers = HeaderMap::new();
    if let Some(c) = &creds {
        headers.insert(header::AUTHORIZATION, c.basic_header()?);
    }
    let started = Instant::now();
    let resp = client.send(&Method::GET, &realm, &headers).await?;
    let status = resp.status();
    if status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN {
        return Err(UpstreamError::Auth(format!(
            "token realm refused the request ({})",
            status.as_u16()
        )));
    }
    if !status.is_success() {
        return Err(UpstreamError::Status(status.as_u16()));
    }
    // A token answer is small; a larger or stalled one is an error, never a hang.
    let body = super::read_capped(resp.into_body(), MAX_TOKEN_RESPONSE, read_idle).await?;
    let parsed: TokenResponse = serde_json::from_slice(&body)
        .map_err(|_| UpstreamError::Auth("token realm sent unreadable JSON".into()))?;
    let token = parsed
        .token
        .or(parsed.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| UpstreamError::Auth("token realm sent no token".into()))?;
    // The distribution token spec's default lifetime is 60 s; a day at most is believed.
    let lifetime = Duration::from_secs(
        parsed
            .expires_in
            .unwrap_or(60)
            .clamp(1, MAX_TOKEN_LIFETIME_S),
    );
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| UpstreamError::Auth("token is not valid header text".into()))?;
    value.set_sensitive(true);
    tracing::debug!(scope = %scope, lifetime_s = lifetime.as_secs(), "fetched upstream token");
    Ok((value, Some(started + lifetime - margin(lifetime))))
}

/// Shared handle type.
pub type SharedAuthenticator = Arc<Authenticator>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_challenge() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].params["realm"], "https://auth.docker.io/token");
        assert_eq!(c[0].params["service"], "registry.docker.io");
        assert_eq!(c[0].params["scope"], "repository:library/alpine:pull");
    }

    #[test]
    fn several_and_odd_challenges() {
        let c = parse_challenges(
            r#"Basic realm="Registry Realm", Bearer realm="https://a/t", service=svc ,error="insufficient_scope""#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].params["realm"], "Registry Realm");
        assert_eq!(c[1].params["service"], "svc");
        assert_eq!(c[1].params["error"], "insufficient_scope");
        let c = parse_challenges(r#"BEARER Realm="x\"y",scope="a,b""#);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].params["realm"], "x\"y");
        assert_eq!(c[0].params["scope"], "a,b");
        assert!(parse_challenges("").is_empty());
        assert_eq!(parse_challenges("Basic")[0].scheme, "basic");
        // Garbage never panics.
        for s in [
            "=",
            "==,,",
            "\"",
            "a=\"",
            "Bearer realm=\"é",
            ",,,Bearer ,=",
        ] {
            let _ = parse_challenges(s);
        }
    }

    #[test]
    fn realm_rule() {
        let u = |s: &str| Url::parse(s).unwrap();
        let hub = vec!["auth.docker.io".to_string()];
        let ok = |a: &str, b: &str, hosts: &[String]| {
            Authenticator::realm_may_receive_credentials(&u(a), &u(b), hosts)
        };
        assert!(ok(
            "https://registry-1.docker.io",
            "https://auth.docker.io/token",
            &hub
        ));
        assert!(ok("https://ghcr.io", "https://ghcr.io/token", &[]));
        assert!(ok(
            "http://127.0.0.1:5000",
            "http://127.0.0.1:6000/token",
            &[]
        ));
        assert!(!ok(
            "https://registry-1.docker.io",
            "http://auth.docker.io/token",
            &hub
        ));
        assert!(!ok(
            "https://registry-1.docker.io",
            "https://auth.docker.io/token",
            &[]
        ));
        assert!(!ok(
            "https://registry-1.docker.io",
            "https://evil.io/token",
            &hub
        ));
        assert!(!ok(
            "https://registry-1.docker.io",
            "https://docker.io.evil.com/token",
            &hub
        ));
        assert!(!ok(
            "https://me.azurecr.io",
            "https://other.azurecr.io/token",
            &[]
        ));
        assert!(!ok("http://127.0.0.1:5000", "http://127.0.0.2/token", &[]));
    }

    #[test]
    fn credentials_debug_is_redacted() {
        let c = Credentials {
            username: "me".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}

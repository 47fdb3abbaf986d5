//! Client access control: who may pull and who may push through regcache, checked against an
//! htpasswd file with bcrypt entries. Upstream credentials are never involved here.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::{HeaderMap, header};
use sha2::Sha256;

use crate::config::AuthConfig;

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Read access (pull, `/v2/`).
    Pull,
    /// Write access (push).
    Push,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// Push is switched off on this proxy.
    #[error("push is not enabled on this proxy")]
    PushDisabled,
    /// No credentials, or wrong ones: answered 401 with a challenge pointing at regcache's
    /// token endpoint.
    #[error("authentication required")]
    Unauthenticated,
    /// Valid credentials without the permission: answered 403.
    #[error("user {0} may not push")]
    Forbidden(String),
}

/// The service name in challenges and tokens.
pub const SERVICE: &str = "regcache";
/// Path of regcache's token endpoint (the realm of its `Bearer` challenge).
pub const TOKEN_PATH: &str = "/auth/token";
/// Lifetime of the tokens regcache issues.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(300);

type HmacSha256 = hmac::Hmac<Sha256>;

/// Access rules and the user table, built once at start-up.
pub struct Access {
    config: AuthConfig,
    users: HashMap<String, String>,
    // Remembers credentials that verified, keyed by a hash of "user:password", so bcrypt's
    // deliberate slowness is paid once per client rather than on every write request.
    verified: moka::sync::Cache<[u8; 32], String>,
    // Credentials that failed recently: refused again without another bcrypt run.
    failed: moka::sync::Cache<[u8; 32], ()>,
    // At most two bcrypt runs at once, so a flood of bad logins cannot take every core.
    bcrypt_slots: tokio::sync::Semaphore,
    // A hash of the file's cost, checked for unknown users so that timing does not tell
    // which user names exist.
    dummy_hash: Option<String>,
    // Signs the bearer tokens regcache issues; random per process, so a restart invalidates
    // them and clients simply fetch new ones.
    token_key: [u8; 32],
}

impl Access {
    /// Loads the htpasswd file named by the configuration, if any. Only bcrypt entries
    /// (`$2a$`, `$2b$`, `$2y$`) are accepted.
    pub fn new(config: &AuthConfig) -> Result<Self, String> {
        let users = match &config.htpasswd {
            Some(path) => load_htpasswd(path)?,
            None => HashMap::new(),
        };
        let dummy_hash = users
            .values()
            .next()
            .and_then(|h| h.get(4..6)?.parse::<u32>().ok())
            .and_then(|cost| bcrypt::hash("regcache-dummy", cost).ok());
        Ok(Access {
            config: config.clone(),
            users,
            failed: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
            bcrypt_slots: tokio::sync::Semaphore::new(2),
            dummy_hash,
            token_key: rand::random(),
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(300))
                .build(),
        })
    }

    /// Whether `/v2/` must challenge clients without credentials: when anything needs them,
    /// so that `docker login` verifies the password and `docker push` sends it.
    pub fn challenges(&self) -> bool {
        self.config.push || !self.config.anonymous_pull
    }

    /// Checks a request. Returns the user name when credentials were given and are valid.
    /// With anonymous pull allowed, a pull ignores whatever `Authorization` it carries (Docker
    /// sends the user's Docker Hub credentials to mirrors).
    pub async fn check(
        self: &Arc<Self>,
        headers: &HeaderMap,
        need: Need,
    ) -> Result<Option<String>, Denied> {
        match need {
            Need::Pull if self.config.anonymous_pull => return Ok(None),
            Need::Push if !self.config.push => return Err(Denied::PushDisabled),
            _ => {}
        }
        let user = self
            .identify(headers)
            .await?
            .ok_or(Denied::Unauthenticated)?;
        if need == Need::Push
            && !self.config.push_users.is_empty()
            && !self.config.push_users.contains(&user)
        {
            return Err(Denied::Forbidden(user));
        }
        Ok(Some(user))
    }

    /// Whether the request carries valid credentials of a user who may push.
    pub async fn may_push(self: &Arc<Self>, headers: &HeaderMap) -> bool {
        self.config.push
            && headers.contains_key(header::AUTHORIZATION)
            && self.check(headers, Need::Push).await.is_ok()
    }

    /// Who the request's `Authorization` says it is: a user (`Basic` checked against the
    /// htpasswd file, or a `Bearer` token regcache issued to that user), or `None` for an
    /// anonymous token. No or bad credentials are `Unauthenticated`.
    pub async fn identify(self: &Arc<Self>, headers: &HeaderMap) -> Result<Option<String>, Denied> {
        let value = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(Denied::Unauthenticated)?;
        match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => self
                .verify_token(token.trim())
                .ok_or(Denied::Unauthenticated),
            _ => self.authenticate(headers).await.map(Some),
        }
    }

    /// A token for `user` (`None`: anonymous), valid for [`TOKEN_LIFETIME`].
    pub fn issue_token(&self, user: Option<&str>) -> String {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            + TOKEN_LIFETIME.as_secs();
        let payload = serde_json::json!({ "sub": user, "exp": exp }).to_string();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let body = b64.encode(payload);
        format!("{body}.{}", b64.encode(self.sign(body.as_bytes())))
    }

    fn sign(&self, data: &[u8]) -> Vec<u8> {
        use hmac::Mac;
        // HMAC accepts keys of any length; 32 bytes cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.token_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(data);
        mac.finalize().into_bytes().to_vec()
    }

    /// The subject of a valid, unexpired token regcache issued.
    fn verify_token(&self, token: &str) -> Option<Option<String>> {
        use hmac::Mac;
        let (body, sig) = token.split_once('.')?;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let sig = b64.decode(sig).ok()?;
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.token_key).ok()?;
        mac.update(body.as_bytes());
        mac.verify_slice(&sig).ok()?;
        let payload: serde_json::Value = serde_json::from_slice(&b64.decode(body).ok()?).ok()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs();
        if payload["exp"].as_u64()? < now {
            return None;
        }
        Some(payload["sub"].as_str().map(str::to_owned))
    }

    /// Whether anonymous pulls are allowed.
    pub fn anonymous_pull(&self) -> bool {
        self.config.anonymous_pull
    }

    /// Verifies `Authorization: Basic` against the user table.
    pub async fn authenticate(self: &Arc<Self>, headers: &HeaderMap) -> Result<String, Denied> {
        let (user, password) = basic_credentials(headers).ok_or(Denied::Unauthenticated)?;
        // Keyed with the process's secret, so the table holds no plain password hashes.
        let Ok(key) = <[u8; 32]>::try_from(self.sign(format!("{user}:{password}").as_bytes()))
        else {
            return Err(Denied::Unauthenticated);
        };
        if let Some(u) = self.verified.get(&key) {
            return Ok(u);
        }
        if self.failed.contains_key(&key) {
            return Err(Denied::Unauthenticated);
        }
        let (known, hash) = match self.users.get(&user) {
            Some(h) => (true, h.clone()),
            None => (false, self.dummy_hash.clone().unwrap_or_default()),
        };
        let verified = {
            let _slot = self
                .bcrypt_slots
                .acquire()
                .await
                .map_err(|_| Denied::Unauthenticated)?;
            // bcrypt is slow by design: keep it off the async workers.
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false)
        };
        let ok = verified && known;
        if !ok {
            self.failed.insert(key, ());
            tracing::info!(user = %user, "client authentication failed");
            return Err(Denied::Unauthenticated);
        }
        self.verified.insert(key, user.clone());
        Ok(user)
    }
}

/// The user and password of an `Authorization: Basic` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

fn load_htpasswd(path: &Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("auth.htpasswd: cannot read {}: {e}", path.display()))?;
    let mut users = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| format!("auth.htpasswd: line {} is not user:hash", n + 1))?;
        if !(hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$")) {
            return Err(format!(
                "auth.htpasswd: line {} ({user}) is not a bcrypt entry; create it with htpasswd -B",
                n + 1
            ));
        }
        users.insert(user.to_owned(), hash.to_owned());
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::io::Write;

    fn basic(u: &str, p: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let enc = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {enc}")).unwrap(),
        );
        h
    }

    fn access(
        push: bool,
        push_users: &[&str],
        anonymous_pull: bool,
    ) -> (Arc<Access>, tempfile::NamedTempFile) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        for (u, p) in [("ci", "ci-pass"), ("reader", "read-pass")] {
            writeln!(f, "{u}:{}", bcrypt::hash(p, 4).unwrap()).unwrap();
        }
        let cfg = AuthConfig {
            htpasswd: Some(f.path().to_owned()),
            push,
            push_users: push_users.iter().map(|s| s.to_string()).collect(),
            anonymous_pull,
        };
        (Arc::new(Access::new(&cfg).unwrap()), f)
    }

    #[tokio::test]
    async fn rules() {
        let (a, _f) = access(true, &["ci"], true);
        assert!(a.challenges());
        assert_eq!(a.check(&HeaderMap::new(), Need::Pull).await, Ok(None));
        assert_eq!(a.check(&basic("x", "y"), Need::Pull).await, Ok(None));
        assert_eq!(
            a.check(&HeaderMap::new(), Need::Push).await,
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            a.check(&basic("ci", "wrong"), Need::Push).await,
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            a.check(&basic("nobody", "x"), Need::Push).await,
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            a.check(&basic("reader", "read-pass"), Need::Push).await,
            Err(Denied::Forbidden("reader".into()))
        );
        assert_eq!(
            a.check(&basic("ci", "ci-pass"), Need::Push).await,
            Ok(Some("ci".into()))
        );
        // Cached after the first verification, still correct.
        assert_eq!(
            a.check(&basic("ci", "ci-pass"), Need::Push).await,
            Ok(Some("ci".into()))
        );

        let (off, _f) = access(false, &[], true);
        assert!(!off.challenges());
        assert_eq!(
            off.check(&basic("ci", "ci-pass"), Need::Push).await,
            Err(Denied::PushDisabled)
        );

        let (closed, _f) = access(false, &[], false);
        assert_eq!(
            closed.check(&HeaderMap::new(), Need::Pull).await,
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            closed
                .check(&basic("reader", "read-pass"), Need::Pull)
                .await,
            Ok(Some("reader".into()))
        );
    }

    #[tokio::test]
    async fn issued_tokens() {
        let (a, _f) = access(true, &["ci"], true);
        let bearer = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
            );
            h
        };
        let ci = a.issue_token(Some("ci"));
        assert_eq!(
            a.check(&bearer(&ci), Need::Push).await,
            Ok(Some("ci".into()))
        );
        let anon = a.issue_token(None);
        assert_eq!(a.identify(&bearer(&anon)).await, Ok(None));
        assert_eq!(
            a.check(&bearer(&anon), Need::Push).await,
            Err(Denied::Unauthenticated)
        );
        let reader = a.issue_token(Some("reader"));
        assert_eq!(
            a.check(&bearer(&reader), Need::Push).await,
            Err(Denied::Forbidden("reader".into()))
        );
        // Tampered or foreign tokens are refused.
        let (body, _) = ci.split_once('.').unwrap();
        let forged = format!("{body}.AAAA");
        assert_eq!(
            a.identify(&bearer(&forged)).await,
            Err(Denied::Unauthenticated)
        );
        let (other, _g) = access(true, &["ci"], true);
        assert_eq!(
            a.identify(&bearer(&other.issue_token(Some("ci")))).await,
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            a.identify(&bearer("garbage")).await,
            Err(Denied::Unauthenticated)
        );
    }

    #[test]
    fn htpasswd_must_be_bcrypt() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "u:{{SHA}}abc").unwrap();
        let cfg = AuthConfig {
            htpasswd: Some(f.path().to_owned()),
            ..AuthConfig::default()
        };
        let e = Access::new(&cfg).err().unwrap();
        assert!(e.contains("auth.htpasswd") && e.contains("bcrypt"), "{e}");
    }
}

//! Client access control: who may pull and who may push through regcache, checked against an
//! htpasswd file with bcrypt entries. Upstream credentials are never involved here.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::{HeaderMap, header};
use sha2::{Digest as _, Sha256};

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
    /// No credentials, or wrong ones: answered 401 with a `Basic` challenge.
    #[error("authentication required")]
    Unauthenticated,
    /// Valid credentials without the permission: answered 403.
    #[error("user {0} may not push")]
    Forbidden(String),
}

/// The realm clients are challenged with.
pub const REALM: &str = "regcache";

/// Access rules and the user table, built once at start-up.
pub struct Access {
    config: AuthConfig,
    users: HashMap<String, String>,
    // Remembers credentials that verified, keyed by a hash of "user:password", so bcrypt's
    // deliberate slowness is paid once per client rather than on every write request.
    verified: moka::sync::Cache<[u8; 32], String>,
}

impl Access {
    /// Loads the htpasswd file named by the configuration, if any. Only bcrypt entries
    /// (`$2a$`, `$2b$`, `$2y$`) are accepted.
    pub fn new(config: &AuthConfig) -> Result<Self, String> {
        let users = match &config.htpasswd {
            Some(path) => load_htpasswd(path)?,
            None => HashMap::new(),
        };
        Ok(Access {
            config: config.clone(),
            users,
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
        let user = self.authenticate(headers).await?;
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

    /// Verifies `Authorization: Basic` against the user table.
    pub async fn authenticate(self: &Arc<Self>, headers: &HeaderMap) -> Result<String, Denied> {
        let (user, password) = basic_credentials(headers).ok_or(Denied::Unauthenticated)?;
        let key: [u8; 32] = Sha256::digest(format!("{user}:{password}").as_bytes()).into();
        if let Some(u) = self.verified.get(&key) {
            return Ok(u);
        }
        let Some(hash) = self.users.get(&user).cloned() else {
            return Err(Denied::Unauthenticated);
        };
        // bcrypt is slow by design: keep it off the async workers.
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if !ok {
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

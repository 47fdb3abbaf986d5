//! Client access control: who a request comes from (htpasswd users with bcrypt entries, static
//! bearer tokens, tokens regcache issues), whether it may pull or push a repository at the
//! upstream it is routed to ([`policy`]), scoped tokens from the token endpoint ([`token`]),
//! and the failed-login limit per client address ([`limit`]). Upstream credentials are never
//! involved here.

pub mod htpasswd;
pub mod limit;
pub mod policy;
pub mod token;

mod caller;
mod login;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, header};

use crate::config::Config;
use crate::reference::Repository;
use crate::rewrite::{RoutingTable, Target};
pub use caller::Caller;
use limit::FailedLogins;
use policy::Policy;
use token::{Claims, Grant, Signer};

/// Why a request was refused; defined beside the error mapping, which answers it.
pub use crate::error::Denied;

/// The address of the client a request came from; the server puts it in every request's
/// extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Read access (pull).
    Pull,
    /// Write access (push).
    Push,
    /// Deleting manifests, tags and blobs.
    Delete,
}

impl Need {
    /// The action's name in scopes and tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Need::Pull => "pull",
            Need::Push => "push",
            Need::Delete => "delete",
        }
    }
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// No credentials, or an anonymous token.
    Anonymous,
    /// An htpasswd user or a static token, by name.
    Named(String),
}

/// An authenticated client and, when it came with a token regcache issued, what that token
/// allows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Principal {
    identity: Identity,
    /// `None`: credentials that carry no scope (basic auth, static tokens).
    scope: Option<Vec<Grant>>,
}

/// The service name in challenges and tokens.
pub const SERVICE: &str = "regcache";
/// Path of regcache's token endpoint (the realm of its `Bearer` challenge).
pub const TOKEN_PATH: &str = "/auth/token";
/// Lifetime of the tokens regcache issues.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// Credentials, permissions and counters, built once at start-up.
pub struct Access {
    policy: Policy,
    // Routing, to find every upstream a scope's name can reach when granting it.
    routing: RoutingTable,
    // One registry host per upstream, to route a name as containerd's `ns=` would.
    namespaces: Vec<String>,
    users: HashMap<String, String>,
    // SHA-256 of each static token → its name, and the other way round.
    tokens: HashMap<[u8; 32], String>,
    token_by_name: HashMap<String, [u8; 32]>,
    // Remembers credentials that verified, keyed by a MAC of "user:password", so bcrypt's
    // deliberate slowness is paid once per client rather than on every request.
    verified: moka::sync::Cache<[u8; 32], String>,
    // Credentials that failed recently: refused again without another bcrypt run.
    failed: moka::sync::Cache<[u8; 32], ()>,
    // At most two bcrypt runs at once, so a flood of bad logins cannot take every core.
    bcrypt_slots: tokio::sync::Semaphore,
    // A hash of the file's cost, checked for unknown users so that timing does not tell
    // which user names exist.
    dummy_hash: Option<String>,
    signer: Signer,
    limiter: FailedLogins,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Access {
    /// Loads the htpasswd file and the static tokens of a validated configuration, checks the
    /// user names its rules refer to, and compiles its rules. Errors name the key at fault.
    pub fn new(config: &Config) -> Result<Self, String> {
        let auth = &config.auth;
        let users = match &auth.htpasswd {
            Some(path) => htpasswd::load(path).map_err(|e| e.to_string())?,
            None => HashMap::new(),
        };
        htpasswd::check_names(auth, &users).map_err(|e| e.to_string())?;
        let mut tokens = HashMap::new();
        let mut token_by_name = HashMap::new();
        for (i, t) in auth.tokens.iter().enumerate() {
            let hash = t
                .resolve_sha256(&format!("auth.token[{i}]"))
                .map_err(|e| e.to_string())?;
            tokens.insert(hash, t.name.clone());
            token_by_name.insert(t.name.clone(), hash);
        }
        let dummy_hash = users
            .values()
            .next()
            .and_then(|h| h.get(4..6)?.parse::<u32>().ok())
            .and_then(|cost| bcrypt::hash("regcache-dummy", cost).ok());
        let names: Vec<String> = config.upstreams.iter().map(|u| u.name.clone()).collect();
        Ok(Access {
            policy: Policy::new(auth, &names),
            routing: RoutingTable::new(config),
            namespaces: config.upstreams.iter().map(|u| u.url_authority()).collect(),
            users,
            tokens,
            token_by_name,
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(300))
                .build(),
            failed: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
            bcrypt_slots: tokio::sync::Semaphore::new(2),
            dummy_hash,
            // In a fleet every replica must accept the tokens any of them issued (a push behind
            // a round-robin balancer lands on each in turn); alone, a random key will do.
            signer: match &config.fleet {
                Some(f) => Signer::shared(&f.read_token().map_err(|e| e.to_string())?),
                None => Signer::random(),
            },
            limiter: FailedLogins::new(auth.max_failed_logins, auth.failed_login_window.0),
        })
    }

    /// Whether `/v2/` must challenge clients without credentials: when anything needs them,
    /// so that `docker login` verifies the password and `docker push` sends it.
    pub fn challenges(&self) -> bool {
        self.policy.challenges()
    }

    /// Whether the request carries a valid token regcache issued (so a refusal means its
    /// scope is too narrow, not that the client is unknown).
    pub fn holds_issued_token(&self, authorization: &HeaderValue) -> bool {
        authorization
            .to_str()
            .ok()
            .and_then(|v| v.trim().split_once(' '))
            .is_some_and(|(scheme, token)| {
                scheme.eq_ignore_ascii_case("bearer")
                    && self.signer.verify(token.trim(), unix_now()).is_some()
            })
    }

    /// The access checks of one request, which authenticates it at most once.
    pub fn caller<'a>(&'a self, headers: &'a HeaderMap, client: Option<ClientAddr>) -> Caller<'a> {
        Caller {
            access: self,
            headers,
            client: client_ip(client),
            principal: tokio::sync::OnceCell::new(),
        }
    }

    /// The token endpoint: a token for the client its credentials name (basic auth with a
    /// password or static token, or a static bearer token), or an anonymous one where
    /// anonymous clients may pull anything. It carries only the requested scopes' actions the
    /// client is granted on some upstream the name can be routed to; every request is checked
    /// again against the upstream it is actually routed to.
    pub async fn issue(
        &self,
        headers: &HeaderMap,
        client: Option<ClientAddr>,
        query: Option<&str>,
        host: Option<&str>,
    ) -> Result<String, Denied> {
        let identity = if headers.contains_key(header::AUTHORIZATION) {
            self.verify(headers, client_ip(client), false)
                .await?
                .identity
        } else if self.policy.anonymous_pulls_somewhere() {
            Identity::Anonymous
        } else {
            return Err(Denied::Unauthenticated);
        };
        let access: Vec<Grant> = token::requested_scopes(query)
            .into_iter()
            .filter_map(|(name, needs)| {
                let targets = self.routes(&name, host);
                let granted: Vec<Need> = needs
                    .into_iter()
                    .filter(|need| {
                        targets.iter().any(|t| {
                            self.policy
                                .allows(&identity, *need, t.upstream, t.repository.as_str())
                        })
                    })
                    .collect();
                (!granted.is_empty()).then(|| Grant::new(&name, &granted))
            })
            .collect();
        let sub = match identity {
            Identity::Anonymous => None,
            Identity::Named(n) => Some(n),
        };
        tracing::debug!(subject = ?sub, grants = access.len(), "token issued");
        Ok(self.signer.issue(&Claims {
            sub,
            exp: unix_now() + TOKEN_LIFETIME.as_secs(),
            access,
        }))
    }

    /// Every target `name` can be routed to: as a path under `host`, and with `ns=` naming
    /// each upstream.
    fn routes(&self, name: &Repository, host: Option<&str>) -> Vec<Target> {
        let mut out: Vec<Target> = Vec::new();
        let by_ns = self
            .namespaces
            .iter()
            .map(|ns| self.routing.resolve(name, host, Some(ns)));
        for t in std::iter::once(self.routing.resolve(name, host, None))
            .chain(by_ns)
            .flatten()
        {
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }
}

fn client_ip(client: Option<ClientAddr>) -> IpAddr {
    // Requests that did not come through the server (none in practice) share one counter.
    client.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use http::HeaderValue;
    use sha2::Digest as _;
    use std::io::Write;

    const CI_TOKEN: &str = "ci-token-0123456789abcdef";

    fn auth_header(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    fn basic(u: &str, p: &str) -> HeaderMap {
        let enc = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        auth_header(&format!("Basic {enc}"))
    }

    fn bearer(t: &str) -> HeaderMap {
        auth_header(&format!("Bearer {t}"))
    }

    fn repo(s: &str) -> Repository {
        s.parse().unwrap()
    }

    /// Upstreams `hub` (Docker Hub rules, default) and `internal`; htpasswd users `ci` and
    /// `reader`, static token `robot`; `auth` is the rest of the `[auth]` table.
    fn access(auth: &str) -> (Access, tempfile::NamedTempFile) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        for (u, p) in [("ci", "ci-pass"), ("reader", "read-pass")] {
            writeln!(f, "{u}:{}", bcrypt::hash(p, 4).unwrap()).unwrap();
        }
        let sha = hex::encode(sha2::Sha256::digest(CI_TOKEN.as_bytes()));
        let text = format!(
            r#"default_upstream = "hub"
[auth]
htpasswd = "{}"
{auth}
[[auth.token]]
name = "robot"
token_sha256 = "{sha}"
[[upstream]]
name = "hub"
url = "http://127.0.0.1:1"
docker_hub = true
[[upstream]]
name = "internal"
url = "http://127.0.0.1:2"
"#,
            f.path().display()
        );
        let cfg = Config::from_toml(&text).unwrap().validate().unwrap();
        (Access::new(&cfg).unwrap(), f)
    }

    fn target(upstream: usize, repository: &str) -> Target {
        Target {
            upstream,
            repository: repo(repository),
        }
    }

    async fn check(
        a: &Access,
        h: &HeaderMap,
        need: Need,
        name: &str,
        up: usize,
    ) -> Result<(), Denied> {
        let t = target(up, name);
        a.caller(h, None).require(need, &repo(name), &t).await
    }

    #[tokio::test]
    async fn without_rules_push_users_push_and_everyone_pulls() {
        let (a, _f) = access("push = true\npush_users = [\"ci\"]\n");
        assert!(a.challenges());
        let none = HeaderMap::new();
        assert_eq!(check(&a, &none, Need::Pull, "x/y", 0).await, Ok(()));
        // A pull anonymous clients may do ignores the credentials it carries.
        assert_eq!(
            check(&a, &basic("x", "y"), Need::Pull, "x/y", 0).await,
            Ok(())
        );
        assert_eq!(
            check(&a, &none, Need::Push, "x/y", 0).await,
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            check(&a, &basic("ci", "wrong"), Need::Push, "x/y", 0).await,
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            check(&a, &basic("nobody", "x"), Need::Push, "x/y", 0).await,
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            check(&a, &basic("reader", "read-pass"), Need::Push, "x/y", 0).await,
            Err(Denied::Forbidden("reader".into()))
        );
        for _ in 0..2 {
            // The second time from the cache of verified credentials.
            assert_eq!(
                check(&a, &basic("ci", "ci-pass"), Need::Push, "x/y", 0).await,
                Ok(())
            );
        }
        let (off, _f) = access("");
        assert!(!off.challenges());
        assert_eq!(
            check(&off, &basic("ci", "ci-pass"), Need::Push, "x/y", 0).await,
            Err(Denied::PushDisabled)
        );
    }

    #[tokio::test]
    async fn static_tokens_as_bearer_and_as_basic_password() {
        let (a, _f) = access(
            "anonymous_pull = false\n[[auth.rule]]\nusers = [\"robot\"]\nupstreams = [\"internal\"]\nrepositories = [\"team/*\"]\nallow = [\"pull\"]\n",
        );
        for h in [bearer(CI_TOKEN), basic("robot", CI_TOKEN)] {
            assert_eq!(check(&a, &h, Need::Pull, "team/app", 1).await, Ok(()));
            assert_eq!(
                check(&a, &h, Need::Pull, "team/app", 0).await,
                Err(Denied::Forbidden("robot".into()))
            );
            assert_eq!(
                check(&a, &h, Need::Pull, "other/app", 1).await,
                Err(Denied::Forbidden("robot".into()))
            );
            assert_eq!(
                a.caller(&h, None).identify().await,
                Ok(&Identity::Named("robot".into()))
            );
        }
        for h in [
            bearer("ci-token-wrong-0123456789"),
            basic("robot", "ci-token-wrong-0123456789"),
            // The token belongs to its name only.
            basic("ci", CI_TOKEN),
            auth_header("Digest username=\"robot\""),
        ] {
            assert_eq!(
                check(&a, &h, Need::Pull, "team/app", 1).await,
                Err(Denied::Unauthenticated),
                "{h:?}"
            );
        }
        // Only `*` and names from the rules: `ci` may not pull here.
        assert_eq!(
            check(&a, &basic("ci", "ci-pass"), Need::Pull, "team/app", 1).await,
            Err(Denied::Forbidden("ci".into()))
        );
    }

    #[tokio::test]
    async fn issued_tokens_carry_only_the_granted_scope() {
        let (a, _f) = access(
            "push = true\nanonymous_pull = false\n\
             [[auth.rule]]\nanonymous = true\nupstreams = [\"hub\"]\nrepositories = [\"library/*\"]\nallow = [\"pull\"]\n\
             [[auth.rule]]\nusers = [\"ci\"]\nupstreams = [\"internal\"]\nrepositories = [\"team/*\"]\nallow = [\"pull\", \"push\"]\n\
             [[auth.rule]]\nusers = [\"reader\"]\nupstreams = [\"internal\"]\nallow = [\"pull\"]\n",
        );
        let query = "service=regcache&scope=repository:internal/team/app:pull,push\
                     &scope=repository:alpine:pull,push&scope=repository:internal/other/x:pull";
        let claims = |t: &str| a.signer.verify(t, unix_now()).unwrap();
        let names = |c: &Claims| -> Vec<(String, Vec<String>)> {
            c.access
                .iter()
                .map(|g| (g.name.clone(), g.actions.clone()))
                .collect()
        };
        let ci = a
            .issue(&basic("ci", "ci-pass"), None, Some(query), None)
            .await
            .unwrap();
        let c = claims(&ci);
        assert_eq!(c.sub.as_deref(), Some("ci"));
        assert_eq!(
            names(&c),
            vec![
                (
                    "internal/team/app".into(),
                    vec!["pull".into(), "push".into()]
                ),
                ("alpine".into(), vec!["pull".into()]),
            ]
        );
        let reader = a
            .issue(&basic("reader", "read-pass"), None, Some(query), None)
            .await
            .unwrap();
        assert_eq!(
            names(&claims(&reader)),
            vec![
                ("internal/team/app".into(), vec!["pull".into()]),
                ("alpine".into(), vec!["pull".into()]),
                ("internal/other/x".into(), vec!["pull".into()]),
            ]
        );
        let anon = a
            .issue(&HeaderMap::new(), None, Some(query), None)
            .await
            .unwrap();
        let c = claims(&anon);
        assert_eq!(c.sub, None);
        assert_eq!(names(&c), vec![("alpine".into(), vec!["pull".into()])]);
        // A static token is accepted as the password; a wrong password gets nothing.
        assert!(
            a.issue(&basic("robot", CI_TOKEN), None, Some(query), None)
                .await
                .is_ok()
        );
        assert_eq!(
            a.issue(&basic("ci", "wrong"), None, Some(query), None)
                .await,
            Err(Denied::Unauthenticated)
        );
        // Issued tokens cannot be renewed at the token endpoint.
        assert_eq!(
            a.issue(&bearer(&ci), None, Some(query), None).await,
            Err(Denied::Unauthenticated)
        );

        // Using them: within scope and permission, or refused.
        let (team, other) = (target(1, "team/app"), target(1, "other/x"));
        let (team_name, other_name) = (repo("internal/team/app"), repo("internal/other/x"));
        let h = bearer(&ci);
        let caller = a.caller(&h, None);
        assert_eq!(caller.require(Need::Push, &team_name, &team).await, Ok(()));
        assert_eq!(
            caller.require(Need::Pull, &other_name, &other).await,
            Err(Denied::Forbidden("ci".into()))
        );
        let h = bearer(&reader);
        let caller = a.caller(&h, None);
        assert_eq!(
            caller.require(Need::Push, &team_name, &team).await,
            Err(Denied::Forbidden("reader".into()))
        );
        // Allowed to the user, but not in this token: back to the token endpoint.
        let narrow = a
            .issue(
                &basic("reader", "read-pass"),
                None,
                Some("scope=repository:internal/team/app:pull"),
                None,
            )
            .await
            .unwrap();
        let h = bearer(&narrow);
        assert_eq!(
            a.caller(&h, None)
                .require(Need::Pull, &other_name, &other)
                .await,
            Err(Denied::Unauthenticated)
        );
        let h = bearer(&anon);
        let caller = a.caller(&h, None);
        assert_eq!(caller.identify().await, Ok(&Identity::Anonymous));
        assert_eq!(
            caller.require(Need::Pull, &team_name, &team).await,
            Err(Denied::Unauthenticated)
        );
        // Tampered, foreign and garbage tokens are refused.
        let (body, _) = ci.split_once('.').unwrap();
        let (other_access, _g) = access("");
        for t in [
            format!("{body}.AAAA"),
            other_access.signer.issue(&claims(&ci)),
            "garbage".into(),
        ] {
            assert_eq!(
                a.caller(&bearer(&t), None).identify().await.err(),
                Some(Denied::Unauthenticated)
            );
        }
    }

    #[tokio::test]
    async fn scopes_are_granted_for_every_route_of_the_name() {
        // `library/x` reaches `internal` only through `ns=` (containerd), which the token
        // request does not carry: the grant covers it, the request is checked as routed.
        let (a, _f) = access(
            "anonymous_pull = false\n[[auth.rule]]\nusers = [\"ci\"]\nupstreams = [\"internal\"]\nallow = [\"pull\"]\n",
        );
        let t = a
            .issue(
                &basic("ci", "ci-pass"),
                None,
                Some("scope=repository:team/app:pull"),
                None,
            )
            .await
            .unwrap();
        let c = a.signer.verify(&t, unix_now()).unwrap();
        assert_eq!(c.access.len(), 1);
        let h = bearer(&t);
        let caller = a.caller(&h, None);
        let name = repo("team/app");
        assert_eq!(
            caller
                .require(Need::Pull, &name, &target(1, "team/app"))
                .await,
            Ok(())
        );
        assert_eq!(
            caller
                .require(Need::Pull, &name, &target(0, "team/app"))
                .await,
            Err(Denied::Forbidden("ci".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failed_logins_are_limited_per_address() {
        let (a, _f) = access(
            "max_failed_logins = 2\nfailed_login_window = \"30s\"\nanonymous_pull = false\n",
        );
        let one = Some(ClientAddr("192.0.2.1:4000".parse().unwrap()));
        let two = Some(ClientAddr("192.0.2.2:4000".parse().unwrap()));
        let t = target(0, "library/x");
        let name = repo("library/x");
        let try_as = |h: HeaderMap, from: Option<ClientAddr>| {
            let t = t.clone();
            let name = name.clone();
            let a = &a;
            async move { a.caller(&h, from).require(Need::Pull, &name, &t).await }
        };
        assert_eq!(
            try_as(basic("ci", "bad"), one).await,
            Err(Denied::Unauthenticated)
        );
        // Expired or foreign issued tokens do not count.
        let foreign = Signer::random().issue(&Claims {
            sub: None,
            exp: 0,
            access: vec![],
        });
        for _ in 0..3 {
            assert_eq!(
                try_as(bearer(&foreign), one).await,
                Err(Denied::Unauthenticated)
            );
        }
        assert_eq!(
            try_as(bearer("guess-0123456789abcdef"), one).await,
            Err(Denied::Unauthenticated)
        );
        // Blocked now, even with the right password; the other address is not.
        assert_eq!(
            try_as(basic("ci", "ci-pass"), one).await,
            Err(Denied::TooManyFailures(Duration::from_secs(30)))
        );
        assert_eq!(
            try_as(bearer(CI_TOKEN), one).await,
            Err(Denied::TooManyFailures(Duration::from_secs(30)))
        );
        assert_eq!(try_as(basic("ci", "ci-pass"), two).await, Ok(()));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(try_as(basic("ci", "ci-pass"), one).await, Ok(()));
    }

    #[test]
    fn htpasswd_must_be_bcrypt() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "u:{{SHA}}abc").unwrap();
        let e = htpasswd::load(f.path()).err().unwrap().to_string();
        assert!(e.contains("line 1") && e.contains("bcrypt"), "{e}");
        let mut cfg = Config::default();
        cfg.auth.htpasswd = Some(f.path().to_owned());
        let e = Access::new(&cfg).err().unwrap();
        assert!(e.contains("auth.htpasswd") && e.contains("bcrypt"), "{e}");
    }

    #[test]
    fn rules_naming_unknown_users_fail_start_up_naming_the_key() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "ci:{}", bcrypt::hash("ci-pass", 4).unwrap()).unwrap();
        let text = format!(
            "[auth]\nhtpasswd = \"{}\"\nanonymous_pull = false\n[[auth.rule]]\nusers = [\"nobody\"]\nallow = [\"pull\"]\n",
            f.path().display()
        );
        let cfg = Config::from_toml(&text).unwrap().validate().unwrap();
        let e = Access::new(&cfg).err().unwrap();
        assert!(e.contains("`auth.rule[0].users[0]`"), "{e}");
    }
}

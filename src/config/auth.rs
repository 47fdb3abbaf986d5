//! The `[auth]` part of the configuration: client credentials (htpasswd users, static bearer
//! tokens), permission rules per upstream and repository pattern, and the failed-login limit;
//! validated once at start-up, every error naming its key.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, UpstreamConfig, glob_match, invalid};
use crate::units::HumanDuration;

/// Shortest static token accepted from `token_file` or `token_env`.
pub const MIN_TOKEN_LEN: usize = 16;

/// Client authentication and permissions.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// htpasswd file with bcrypt entries (`htpasswd -nbB user password`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub htpasswd: Option<PathBuf>,
    /// Allow pushes through the proxy. Requires client credentials (`htpasswd` or `token`):
    /// every write is authenticated.
    pub push: bool,
    /// Without rules: users allowed to push; empty means every user. Not used with rules.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub push_users: Vec<String>,
    /// Allow pulls of everything without credentials. When false, anonymous clients may pull
    /// only what a rule with `anonymous = true` allows.
    pub anonymous_pull: bool,
    /// Static bearer tokens (CI), each under a name rules can refer to.
    #[serde(rename = "token", skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<TokenConfig>,
    /// Permission rules. Without any, every authenticated client may pull everything and
    /// `push_users` may push everything; with some, a client may do what a matching rule
    /// allows (plus whatever anonymous clients may).
    #[serde(rename = "rule", skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleConfig>,
    /// Failed logins from one client address within `failed_login_window` after which that
    /// address gets `429` for logins until the window is over.
    pub max_failed_logins: u32,
    /// The window failed logins are counted in.
    pub failed_login_window: HumanDuration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            htpasswd: None,
            push: false,
            push_users: Vec::new(),
            anonymous_pull: true,
            tokens: Vec::new(),
            rules: Vec::new(),
            max_failed_logins: 10,
            failed_login_window: HumanDuration(Duration::from_secs(60)),
        }
    }
}

/// A static bearer token. The plain token is never in the configuration file: give its
/// SHA-256, or a file or environment variable holding it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Name of the token: the user name in basic auth (`docker login -u <name>`) and in rules.
    pub name: String,
    /// Hex SHA-256 of the token (`printf %s "$TOKEN" | sha256sum`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// File holding the token (a trailing newline is ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
}

impl TokenConfig {
    /// The SHA-256 of the token, from whichever source is configured. `key` is the token's
    /// dotted path, e.g. `auth.token[0]`.
    pub fn resolve_sha256(&self, key: &str) -> Result<[u8; 32], ConfigError> {
        let sources = [
            self.token_sha256.is_some(),
            self.token_file.is_some(),
            self.token_env.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err(invalid(
                key,
                "set exactly one of token_sha256, token_file and token_env",
            ));
        }
        if let Some(hex_digest) = &self.token_sha256 {
            let mut out = [0u8; 32];
            return match hex::decode_to_slice(hex_digest.trim(), &mut out) {
                Ok(()) => Ok(out),
                Err(_) => Err(invalid(
                    format!("{key}.token_sha256"),
                    "must be 64 hex digits (the SHA-256 of the token)",
                )),
            };
        }
        let (source_key, token) = if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    format!("{key}.token_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let token = text.trim_end_matches(['\r', '\n']).to_owned();
            ("token_file", token)
        } else {
            let var = self.token_env.as_deref().unwrap_or_default();
            let token = std::env::var(var).map_err(|_| {
                invalid(
                    format!("{key}.token_env"),
                    format!("environment variable {var} is not set"),
                )
            })?;
            ("token_env", token)
        };
        if token.chars().count() < MIN_TOKEN_LEN || token.chars().any(char::is_whitespace) {
            return Err(invalid(
                format!("{key}.{source_key}"),
                format!(
                    "the token must be at least {MIN_TOKEN_LEN} characters without spaces \
                     (e.g. openssl rand -hex 32)"
                ),
            ));
        }
        use sha2::Digest;
        Ok(sha2::Sha256::digest(token.as_bytes()).into())
    }
}

/// What a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Pull manifests, blobs and tag lists.
    Pull,
    /// Push blobs and manifests.
    Push,
}

/// One permission rule: these clients may do `allow` on repositories matching
/// `repositories` at upstreams matching `upstreams`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// htpasswd users and token names the rule applies to; `"*"` is every authenticated
    /// client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// The rule also applies to clients without credentials (pull only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub anonymous: bool,
    /// Upstream name patterns (`*`, `?`).
    #[serde(default = "everything")]
    pub upstreams: Vec<String>,
    /// Repository patterns (`*`, `?`; `*` also matches `/`), matched against the name at the
    /// upstream after rewriting (`alpine` on Docker Hub is `library/alpine`).
    #[serde(default = "everything")]
    pub repositories: Vec<String>,
    /// What the rule allows.
    pub allow: Vec<Permission>,
}

fn everything() -> Vec<String> {
    vec!["*".to_owned()]
}

/// Characters a repository pattern may hold: those of repository names, and the wildcards.
fn valid_repository_pattern(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 255
        && p.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/*?".contains(&b))
}

/// True when `name` can be a token name: usable as a basic-auth user name.
fn valid_token_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
}

impl AuthConfig {
    /// Whether clients can present any credentials at all.
    fn has_credentials(&self) -> bool {
        self.htpasswd.is_some() || !self.tokens.is_empty()
    }

    /// Checks the `[auth]` rules against the upstreams (reads the token files and variables;
    /// the htpasswd file only has to be readable here: `access::htpasswd` checks its entries
    /// and that every user a rule names exists, when it loads the file at start-up).
    pub(super) fn validate(&self, upstreams: &[UpstreamConfig]) -> Result<(), ConfigError> {
        if self.push && !self.has_credentials() {
            return Err(invalid(
                "auth.push",
                "pushing through regcache requires client authentication: set auth.htpasswd or add an auth.token",
            ));
        }
        if !self.anonymous_pull && !self.has_credentials() {
            return Err(invalid(
                "auth.anonymous_pull",
                "turning anonymous pull off requires auth.htpasswd or an auth.token",
            ));
        }
        // The file's entries (and the user names rules refer to) are checked where the file
        // is loaded, when client access control is built at start-up.
        if let Some(p) = &self.htpasswd {
            if !p.is_file() {
                return Err(invalid(
                    "auth.htpasswd",
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }
        let mut names: HashSet<&str> = HashSet::new();
        let mut hashes: HashMap<[u8; 32], usize> = HashMap::new();
        for (i, t) in self.tokens.iter().enumerate() {
            let key = format!("auth.token[{i}]");
            if !valid_token_name(&t.name) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!(
                        "{:?} must be 1 to 64 letters, digits, '.', '_', '-' or '@'",
                        t.name
                    ),
                ));
            }
            if !names.insert(&t.name) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!(
                        "{:?} is already a user in auth.htpasswd or another token",
                        t.name
                    ),
                ));
            }
            let hash = t.resolve_sha256(&key)?;
            if let Some(j) = hashes.insert(hash, i) {
                return Err(invalid(
                    key,
                    format!("is the same token as auth.token[{j}]"),
                ));
            }
        }
        if self.max_failed_logins == 0 {
            return Err(invalid("auth.max_failed_logins", "must be at least 1"));
        }
        let window = self.failed_login_window.0;
        if window.is_zero() || window > Duration::from_secs(86_400) {
            return Err(invalid(
                "auth.failed_login_window",
                "must be longer than zero and at most 1d",
            ));
        }
        if !self.rules.is_empty() && !self.push_users.is_empty() {
            return Err(invalid(
                "auth.push_users",
                "with [[auth.rule]], push is granted by rules: move these users into a rule with allow = [\"push\"]",
            ));
        }
        for (i, r) in self.rules.iter().enumerate() {
            self.validate_rule(&format!("auth.rule[{i}]"), r, upstreams)?;
        }
        Ok(())
    }

    fn validate_rule(
        &self,
        key: &str,
        r: &RuleConfig,
        upstreams: &[UpstreamConfig],
    ) -> Result<(), ConfigError> {
        if r.users.is_empty() && !r.anonymous {
            return Err(invalid(
                format!("{key}.users"),
                "name at least one user or token, \"*\" for every authenticated client, or set anonymous = true",
            ));
        }
        if r.anonymous && self.anonymous_pull {
            return Err(invalid(
                format!("{key}.anonymous"),
                "auth.anonymous_pull = true already lets anonymous clients pull everything; set it to false to allow anonymous pulls only where rules say",
            ));
        }
        if r.allow.is_empty() {
            return Err(invalid(
                format!("{key}.allow"),
                "must name at least one of \"pull\" and \"push\"",
            ));
        }
        if r.allow.contains(&Permission::Push) {
            if !self.push {
                return Err(invalid(
                    format!("{key}.allow"),
                    "allows push, but auth.push is false",
                ));
            }
            if r.anonymous {
                return Err(invalid(
                    format!("{key}.allow"),
                    "anonymous clients may not push: put push in a rule for named users",
                ));
            }
        }
        if r.upstreams.is_empty() {
            return Err(invalid(format!("{key}.upstreams"), "must not be empty"));
        }
        for (j, p) in r.upstreams.iter().enumerate() {
            if !upstreams.iter().any(|u| glob_match(p, &u.name)) {
                return Err(invalid(
                    format!("{key}.upstreams[{j}]"),
                    format!("{p:?} matches no configured upstream name"),
                ));
            }
        }
        if r.repositories.is_empty() {
            return Err(invalid(format!("{key}.repositories"), "must not be empty"));
        }
        for (j, p) in r.repositories.iter().enumerate() {
            if !valid_repository_pattern(p) {
                return Err(invalid(
                    format!("{key}.repositories[{j}]"),
                    format!(
                        "{p:?} must be a repository name pattern: lowercase letters, digits, '.', '_', '-', '/' and the wildcards '*' and '?'"
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use std::io::Write;

    /// Validates `auth` (the body of `[auth]` and its tables) with upstreams `docker.io` and
    /// `internal` and an htpasswd file holding the user `ci`.
    fn validate(auth: &str) -> Result<Config, String> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "ci:{}", bcrypt::hash("ci-pass", 4).unwrap()).unwrap();
        let text = format!(
            "[auth]\nhtpasswd = \"{}\"\n{auth}\n[[upstream]]\nname = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\n\
             [[upstream]]\nname = \"internal\"\nurl = \"http://127.0.0.1:1\"\n",
            f.path().display()
        );
        Config::from_toml(&text)?
            .validate()
            .map_err(|e| e.to_string())
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_full_example_is_accepted() {
        let token_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(token_file.path(), "a-long-random-token-value\n").unwrap();
        let c = validate(&format!(
            r#"push = true
anonymous_pull = false
max_failed_logins = 5
failed_login_window = "5m"
[[auth.token]]
name = "build"
token_sha256 = "{SHA}"
[[auth.token]]
name = "deploy"
token_file = "{}"
[[auth.rule]]
anonymous = true
upstreams = ["docker.io"]
repositories = ["library/*"]
allow = ["pull"]
[[auth.rule]]
users = ["build", "ci"]
upstreams = ["intern*"]
repositories = ["team/*"]
allow = ["pull", "push"]
[[auth.rule]]
users = ["*"]
allow = ["pull"]
"#,
            token_file.path().display()
        ))
        .unwrap();
        assert_eq!(c.auth.tokens.len(), 2);
        assert_eq!(c.auth.rules.len(), 3);
        assert_eq!(c.auth.rules[2].upstreams, vec!["*".to_string()]);
        assert_eq!(c.auth.rules[2].repositories, vec!["*".to_string()]);
        let hash = c.auth.tokens[1].resolve_sha256("t").unwrap();
        use sha2::Digest;
        assert_eq!(
            hash,
            <[u8; 32]>::from(sha2::Sha256::digest(b"a-long-random-token-value"))
        );
    }

    #[test]
    fn every_bad_value_is_named() {
        let short = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(short.path(), "short\n").unwrap();
        let short = short.path().display().to_string();
        let token = |extra: &str| format!("[[auth.token]]\nname = \"build\"\n{extra}\n");
        // An unknown user in a rule, or a token named like an htpasswd user, is refused where
        // the htpasswd file is loaded: see `access::htpasswd`.
        let rule =
            |body: &str| format!("push = true\nanonymous_pull = false\n[[auth.rule]]\n{body}\n");
        let cases: Vec<(String, &str)> = vec![
            (token(&format!("token_sha256 = \"{}\"", &SHA[1..])), "auth.token[0].token_sha256"),
            (token("token_sha256 = \"not hex\""), "auth.token[0].token_sha256"),
            (token(""), "auth.token[0]"),
            (
                token(&format!("token_sha256 = \"{SHA}\"\ntoken_env = \"X\"")),
                "auth.token[0]",
            ),
            (token("token_file = \"/nonexistent/token\""), "auth.token[0].token_file"),
            (token(&format!("token_file = \"{short}\"")), "auth.token[0].token_file"),
            (
                token("token_env = \"REGCACHE_TEST_SURELY_UNSET\""),
                "auth.token[0].token_env",
            ),
            (
                format!("[[auth.token]]\nname = \"a:b\"\ntoken_sha256 = \"{SHA}\"\n"),
                "auth.token[0].name",
            ),
            (
                format!(
                    "{}[[auth.token]]\nname = \"other\"\ntoken_sha256 = \"{SHA}\"\n",
                    token(&format!("token_sha256 = \"{SHA}\""))
                ),
                "auth.token[1]",
            ),
            ("max_failed_logins = 0".into(), "auth.max_failed_logins"),
            ("failed_login_window = \"0s\"".into(), "auth.failed_login_window"),
            ("failed_login_window = \"2d\"".into(), "auth.failed_login_window"),
            (rule("allow = [\"pull\"]"), "auth.rule[0].users"),
            (rule("users = [\"ci\"]\nallow = []"), "auth.rule[0].allow"),
            (rule("users = [\"ci\"]\nallow = [\"delete\"]"), "allow"),
            (
                rule("users = [\"ci\"]\nupstreams = [\"docker.io\", \"dockerhub\"]\nallow = [\"pull\"]"),
                "auth.rule[0].upstreams[1]",
            ),
            (rule("users = [\"ci\"]\nupstreams = []\nallow = [\"pull\"]"), "auth.rule[0].upstreams"),
            (
                rule("users = [\"ci\"]\nrepositories = [\"Team/*\"]\nallow = [\"pull\"]"),
                "auth.rule[0].repositories[0]",
            ),
            (
                rule("users = [\"ci\"]\nrepositories = [\"\"]\nallow = [\"pull\"]"),
                "auth.rule[0].repositories[0]",
            ),
            (rule("anonymous = true\nallow = [\"push\"]"), "auth.rule[0].allow"),
            (
                "[[auth.rule]]\nusers = [\"ci\"]\nallow = [\"push\"]".into(),
                "auth.rule[0].allow",
            ),
            (
                "[[auth.rule]]\nanonymous = true\nallow = [\"pull\"]".into(),
                "auth.rule[0].anonymous",
            ),
            (
                "push = true\npush_users = [\"ci\"]\n[[auth.rule]]\nusers = [\"ci\"]\nallow = [\"push\"]".into(),
                "auth.push_users",
            ),
            (rule("users = [\"ci\"]\nallow = [\"pull\"]\nwho = 1"), "who"),
        ];
        for (auth, key) in cases {
            let e = validate(&auth).unwrap_err();
            assert!(e.contains(key), "{auth:?}: {e}");
            assert!(!e.contains("a-long-random"), "{e}");
        }
        // Credentials are needed before anything can require them.
        for (auth, key) in [
            ("[auth]\npush = true\n", "auth.push"),
            ("[auth]\nanonymous_pull = false\n", "auth.anonymous_pull"),
        ] {
            let e = Config::from_toml(auth)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("`{key}`")), "{e}");
        }
        let only_tokens = format!(
            "[auth]\npush = true\nanonymous_pull = false\n[[auth.token]]\nname = \"b\"\ntoken_sha256 = \"{SHA}\"\n"
        );
        Config::from_toml(&only_tokens).unwrap().validate().unwrap();
    }
}

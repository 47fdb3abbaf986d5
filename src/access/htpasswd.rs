//! htpasswd files: the pure parser of their text (user → bcrypt hash, bcrypt entries only) and
//! the start-up checks that need the user names (rules naming users, tokens named like users).
//! The configuration only checks that the file is readable; its content is judged here.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::config::{AuthConfig, ConfigError};

/// The configuration key of the file, named in every error about it.
const KEY: &str = "auth.htpasswd";

/// Parses htpasswd text: user → bcrypt hash. Blank lines and `#` comments are skipped; only
/// bcrypt entries (`$2a$`, `$2b$`, `$2y$`) are accepted.
pub fn parse(text: &str) -> Result<HashMap<String, String>, String> {
    let mut users = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| format!("line {} is not user:hash", n + 1))?;
        if !(hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$")) {
            return Err(format!(
                "line {} ({user}) is not a bcrypt entry; create it with htpasswd -B",
                n + 1
            ));
        }
        users.insert(user.to_owned(), hash.to_owned());
    }
    Ok(users)
}

/// Reads and parses the file at `path`; errors name the `auth.htpasswd` key.
pub fn load(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::invalid(KEY, format!("cannot read {}: {e}", path.display())))?;
    parse(&text).map_err(|e| ConfigError::invalid(KEY, e))
}

/// Checks the names of `[auth]` against the htpasswd `users`: no token may share a user's
/// name, and every user a rule names (other than `"*"`) is a user or a token.
pub fn check_names(auth: &AuthConfig, users: &HashMap<String, String>) -> Result<(), ConfigError> {
    for (i, t) in auth.tokens.iter().enumerate() {
        if users.contains_key(&t.name) {
            return Err(ConfigError::invalid(
                format!("auth.token[{i}].name"),
                format!(
                    "{:?} is already a user in auth.htpasswd or another token",
                    t.name
                ),
            ));
        }
    }
    let tokens: HashSet<&str> = auth.tokens.iter().map(|t| t.name.as_str()).collect();
    for (i, r) in auth.rules.iter().enumerate() {
        for (j, u) in r.users.iter().enumerate() {
            if u != "*" && !users.contains_key(u) && !tokens.contains(u.as_str()) {
                return Err(ConfigError::invalid(
                    format!("auth.rule[{i}].users[{j}]"),
                    format!("{u:?} is not a user in auth.htpasswd nor an auth.token name"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const HASH: &str = "$2y$04$abcdefghijklmnopqrstuu5s1c3Gx2q6Q3o8bKz2m3lq6a3l4m5n6";

    #[test]
    fn parses_bcrypt_entries_and_refuses_others() {
        let text = format!("# users\n\nci:{HASH}\n  reader:{HASH}  \n");
        let users = parse(&text).unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!(users["reader"], HASH);
        let e = parse("ci:{SHA}abc\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("bcrypt"), "{e}");
        let e = parse(&format!("ci:{HASH}\nno colon\n")).unwrap_err();
        assert!(e.contains("line 2") && e.contains("user:hash"), "{e}");
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn load_names_the_key() {
        let e = load(Path::new("/nonexistent/htpasswd"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`auth.htpasswd`"), "{e}");
    }

    /// Moved from the configuration's rejection table: these need the file's user names.
    #[test]
    fn rules_name_known_users_and_tokens_do_not_take_user_names() {
        let sha = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let users = parse(&format!("ci:{HASH}\n")).unwrap();
        let auth = |text: &str| Config::from_toml(&format!("[auth]\n{text}")).unwrap().auth;
        let rule = |body: &str| {
            format!(
                "push = true\nanonymous_pull = false\n[[auth.token]]\nname = \"build\"\n\
                 token_sha256 = \"{sha}\"\n[[auth.rule]]\n{body}\n"
            )
        };
        for (text, key) in [
            (
                rule("users = [\"nobody\"]\nallow = [\"pull\"]"),
                "auth.rule[0].users[0]",
            ),
            (
                format!("[[auth.token]]\nname = \"ci\"\ntoken_sha256 = \"{sha}\"\n"),
                "auth.token[0].name",
            ),
        ] {
            let e = check_names(&auth(&text), &users).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{text:?}: {e}");
        }
        let known = rule("users = [\"ci\", \"build\", \"*\"]\nallow = [\"pull\"]");
        check_names(&auth(&known), &users).unwrap();
    }
}

//! The effective configuration as `regcache check-config` prints it: every default filled in,
//! secrets replaced by a marker. Secrets are inline upstream passwords and token hashes;
//! files and environment variables holding secrets are named, never read into the output.

use super::{Config, ConfigError};

/// What stands in for a secret.
pub const REDACTED: &str = "<redacted>";

/// Keys whose values are secrets, wherever they appear.
const SECRET_KEYS: [&str; 2] = ["password", "token_sha256"];

impl Config {
    /// This configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> Result<String, ConfigError> {
        let mut value = toml::Value::try_from(self).map_err(|e| ConfigError::Invalid {
            key: "(whole file)".into(),
            message: format!("cannot be shown as TOML: {e}"),
        })?;
        redact(&mut value);
        toml::to_string(&value).map_err(|e| ConfigError::Invalid {
            key: "(whole file)".into(),
            message: format!("cannot be shown as TOML: {e}"),
        })
    }
}

fn redact(value: &mut toml::Value) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                if SECRET_KEYS.contains(&k.as_str()) {
                    *v = toml::Value::String(REDACTED.into());
                } else {
                    redact(v);
                }
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{TokenConfig, UpstreamConfig};

    #[test]
    fn secrets_are_redacted_and_the_rest_reads_back() {
        let mut c = Config::default();
        let mut u = UpstreamConfig::new("mine", "https://registry.example".parse().unwrap());
        u.username = Some("robot".into());
        u.password = Some("hunter2".into());
        c.upstreams.push(u);
        c.auth.tokens.push(TokenConfig {
            name: "ci".into(),
            token_sha256: Some("ab".repeat(32)),
            token_file: None,
            token_env: None,
        });
        let text = c.to_redacted_toml().unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains(&"ab".repeat(32)),
            "{text}"
        );
        assert_eq!(text.matches(REDACTED).count(), 2, "{text}");
        assert!(text.contains("username = \"robot\""), "{text}");
        // Apart from the secrets, what is printed is the same configuration.
        let mut back: Config = toml::from_str(&text).unwrap();
        back.upstreams[1].password = Some("hunter2".into());
        back.auth.tokens[0].token_sha256 = Some("ab".repeat(32));
        assert_eq!(back, c);
    }
}

//! The `[fleet]` section: several replicas sharing one object store (the shared tier, the
//! download leases, tag answers and push uploads), reaching each other at their `advertise`
//! URLs with a shared peer token. Absent: the replica works alone, exactly as without it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use super::{ConfigError, invalid};
use crate::units::HumanDuration;

/// Object-store URL schemes the fleet accepts.
pub const STORE_SCHEMES: [&str; 3] = ["s3", "gs", "az"];

/// Shortest and longest `lease_ttl`.
const LEASE_TTL_MIN: Duration = Duration::from_millis(300);
const LEASE_TTL_MAX: Duration = Duration::from_secs(600);

/// `[fleet]`: replicas behind one balancer sharing an object store.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// The shared store: `s3://bucket/prefix`, `gs://bucket/prefix` or `az://container/prefix`.
    /// Credentials, region and endpoint come from the environment (`AWS_*`,
    /// `GOOGLE_*`, `AZURE_*`).
    pub store: Url,
    /// How the other replicas reach this one (its registry listener), e.g.
    /// `http://10.1.2.3:5000`.
    pub advertise: Url,
    /// A file holding the secret every replica shares, on one line.
    pub peer_token_file: PathBuf,
    /// How long a download lease lives without renewal before another replica may take the
    /// download over. Renewed every third of it.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: HumanDuration,
}

fn default_lease_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(15))
}

impl FleetConfig {
    /// Checks every rule of the section, naming the key at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !STORE_SCHEMES.contains(&self.store.scheme()) {
            return Err(invalid(
                "fleet.store",
                format!(
                    "{} is not an object-store URL (use s3://bucket/prefix, gs://bucket/prefix \
                     or az://container/prefix)",
                    self.store
                ),
            ));
        }
        if self.store.host_str().is_none_or(str::is_empty) {
            return Err(invalid(
                "fleet.store",
                format!("{} names no bucket", self.store),
            ));
        }
        if self.store.query().is_some() || self.store.fragment().is_some() {
            return Err(invalid(
                "fleet.store",
                "must not have a query or fragment: settings come from the environment",
            ));
        }
        if !["http", "https"].contains(&self.advertise.scheme())
            || self.advertise.host_str().is_none_or(str::is_empty)
        {
            return Err(invalid(
                "fleet.advertise",
                format!(
                    "{} is not an http:// or https:// URL with a host",
                    self.advertise
                ),
            ));
        }
        if self.advertise.path() != "/" || self.advertise.query().is_some() {
            return Err(invalid(
                "fleet.advertise",
                "must be a scheme, host and port only (no path or query)",
            ));
        }
        if !self.advertise.username().is_empty() || self.advertise.password().is_some() {
            return Err(invalid(
                "fleet.advertise",
                "must not hold credentials (the peer token authenticates replicas)",
            ));
        }
        let ttl = self.lease_ttl.0;
        if !(LEASE_TTL_MIN..=LEASE_TTL_MAX).contains(&ttl) {
            return Err(invalid(
                "fleet.lease_ttl",
                format!(
                    "must be {} to {}",
                    HumanDuration(LEASE_TTL_MIN),
                    HumanDuration(LEASE_TTL_MAX)
                ),
            ));
        }
        self.read_token()?;
        Ok(())
    }

    /// The peer token, read from `peer_token_file` (its first line, surrounding spaces
    /// removed).
    pub fn read_token(&self) -> Result<String, ConfigError> {
        read_token(&self.peer_token_file)
    }

    /// The store's prefix inside its bucket, without slashes at either end (empty for the
    /// bucket's root).
    pub fn prefix(&self) -> &str {
        self.store.path().trim_matches('/')
    }

    /// How often the leader renews a lease.
    pub fn renew_every(&self) -> Duration {
        self.lease_ttl.0 / 3
    }
}

fn read_token(path: &Path) -> Result<String, ConfigError> {
    let key = "fleet.peer_token_file";
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(invalid(key, format!("{} holds no token", path.display())));
    }
    if text.lines().skip(1).any(|l| !l.trim().is_empty()) {
        return Err(invalid(
            key,
            format!("{} must hold the token on one line", path.display()),
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            key,
            "the token must be printable ASCII without spaces (it is sent in a header)",
        ));
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn with_fleet(section: &str, token: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, token).unwrap();
        let text = format!(
            "[fleet]\npeer_token_file = {:?}\n{section}",
            file.display().to_string()
        );
        let c = Config::from_toml(&text)?;
        c.validate().map_err(|e| e.to_string())
    }

    const GOOD: &str = "store = \"s3://bucket/regcache\"\nadvertise = \"http://127.0.0.1:5001\"\n";

    #[test]
    fn a_fleet_section_parses_with_its_defaults() {
        let c = with_fleet(GOOD, "s3cret-token\n").unwrap();
        let f = c.fleet.unwrap();
        assert_eq!(f.lease_ttl.0, std::time::Duration::from_secs(15));
        assert_eq!(f.prefix(), "regcache");
        let c = with_fleet(&format!("{GOOD}lease_ttl = \"1500ms\"\n"), "t0ken").unwrap();
        let f = c.fleet.unwrap();
        assert_eq!(f.lease_ttl.0, std::time::Duration::from_millis(1500));
        assert_eq!(f.renew_every(), std::time::Duration::from_millis(500));
    }

    #[test]
    fn without_the_section_there_is_no_fleet() {
        assert_eq!(Config::from_toml("").unwrap().fleet, None);
    }

    #[test]
    fn each_bad_value_names_its_key() {
        let cases = [
            (
                "store = \"http://bucket/x\"\nadvertise = \"http://127.0.0.1:5001\"\n",
                "t",
                "`fleet.store`",
            ),
            (
                "store = \"s3:///x\"\nadvertise = \"http://127.0.0.1:5001\"\n",
                "t",
                "`fleet.store`",
            ),
            (
                "store = \"s3://b/x?region=y\"\nadvertise = \"http://127.0.0.1:5001\"\n",
                "t",
                "`fleet.store`",
            ),
            (
                "store = \"gs://b\"\nadvertise = \"ftp://127.0.0.1:5001\"\n",
                "t",
                "`fleet.advertise`",
            ),
            (
                "store = \"az://c/p\"\nadvertise = \"http://127.0.0.1:5001/v2\"\n",
                "t",
                "`fleet.advertise`",
            ),
            (
                "store = \"az://c/p\"\nadvertise = \"http://u:p@127.0.0.1:5001\"\n",
                "t",
                "`fleet.advertise`",
            ),
            (
                &format!("{GOOD}lease_ttl = \"100ms\"\n"),
                "t",
                "`fleet.lease_ttl`",
            ),
            (
                &format!("{GOOD}lease_ttl = \"1h\"\n"),
                "t",
                "`fleet.lease_ttl`",
            ),
            (GOOD, "\n", "`fleet.peer_token_file`"),
            (GOOD, "two\nlines", "`fleet.peer_token_file`"),
            (GOOD, "with space", "`fleet.peer_token_file`"),
        ];
        for (section, token, key) in cases {
            let e = with_fleet(section, token).unwrap_err();
            assert!(e.contains(key), "{section} / {token:?}: {e}");
        }
    }

    #[test]
    fn parse_errors_name_the_key() {
        let e = Config::from_toml("[fleet]\nstore = \"s3://b\"\n").unwrap_err();
        assert!(e.contains("advertise"), "{e}");
        let e = Config::from_toml(
            "[fleet]\nstore = \"s3://b\"\nadvertise = \"http://a:1\"\npeer_token_file = \"/t\"\nlease_ttl = \"soon\"\n",
        )
        .unwrap_err();
        assert!(e.contains("lease_ttl"), "{e}");
        let e = Config::from_toml(
            "[fleet]\nstore = \"s3://b\"\nadvertise = \"http://a:1\"\npeer_token_file = \"/t\"\nrenew = \"1s\"\n",
        )
        .unwrap_err();
        assert!(e.contains("renew"), "{e}");
        let e = Config::from_toml(
            "[fleet]\nstore = \"s3://b\"\nadvertise = \"http://a:1\"\npeer_token_file = \"/nonexistent/token\"\n",
        )
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("`fleet.peer_token_file`"), "{e}");
    }
}

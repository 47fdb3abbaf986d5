//! The rules a configuration must keep, checked once at start-up by [`Config::validate`]: one
//! small named function per rule, each error naming the key at fault. The per-upstream rules
//! live with the upstream schema (`upstream.rs`), the `[auth]` rules with theirs (`auth.rs`).

use std::time::Duration;

use super::upstream::{Distinct, fill_ecr};
use super::{Config, ConfigError, invalid};

/// A rule over the whole configuration.
type Rule = fn(&Config) -> Result<(), ConfigError>;

/// The rules that need nothing but the configuration itself, in the order they are checked.
const RULES: [Rule; 12] = [
    upstreams_present,
    durations_positive,
    connection_limits,
    manifest_size,
    gc_schedule,
    size_limit,
    watermarks,
    tag_cache_entries,
    retry,
    admin_listen_apart,
    cache_dir_set,
    tls_files,
];

impl Config {
    /// Checks every rule once; returns the configuration when it holds, with what the rules
    /// derive filled in (an ECR upstream's URL, account and region).
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        for (i, u) in self.upstreams.iter_mut().enumerate() {
            fill_ecr(u, &format!("upstream[{i}]"))?;
        }
        for rule in RULES {
            rule(&self)?;
        }
        upstreams(&self)?;
        self.auth.validate(&self.upstreams)?;
        default_upstream_exists(&self)?;
        if let Some(f) = &self.fleet {
            f.validate()?;
        }
        Ok(self)
    }
}

fn upstreams_present(c: &Config) -> Result<(), ConfigError> {
    if c.upstreams.is_empty() {
        return Err(invalid("upstream", "at least one upstream is required"));
    }
    Ok(())
}

fn durations_positive(c: &Config) -> Result<(), ConfigError> {
    let positive = [
        ("cache.tag_ttl", c.cache.tag_ttl),
        ("timeouts.connect", c.timeouts.connect),
        ("timeouts.response", c.timeouts.response),
        ("timeouts.read_idle", c.timeouts.read_idle),
        ("limits.header_read_timeout", c.limits.header_read_timeout),
        ("limits.idle_timeout", c.limits.idle_timeout),
    ];
    for (key, d) in positive {
        if d.0.is_zero() {
            return Err(invalid(key, "must be longer than zero"));
        }
    }
    Ok(())
}

fn connection_limits(c: &Config) -> Result<(), ConfigError> {
    let l = &c.limits;
    if !(1..=1_000_000).contains(&l.max_connections) {
        return Err(invalid("limits.max_connections", "must be 1 to 1000000"));
    }
    // hyper's HTTP/1 buffer cannot be smaller than 8 KiB.
    if !(8 << 10..=16 << 20).contains(&l.max_header_bytes.0) {
        return Err(invalid("limits.max_header_bytes", "must be 8KiB to 16MiB"));
    }
    if !(8..=10_000).contains(&l.max_headers) {
        return Err(invalid("limits.max_headers", "must be 8 to 10000"));
    }
    if l.downloads_per_client == 0 {
        return Err(invalid("limits.downloads_per_client", "must be at least 1"));
    }
    Ok(())
}

fn manifest_size(c: &Config) -> Result<(), ConfigError> {
    if c.cache.max_manifest_size.0 == 0 {
        return Err(invalid(
            "cache.max_manifest_size",
            "must be larger than zero",
        ));
    }
    Ok(())
}

fn gc_schedule(c: &Config) -> Result<(), ConfigError> {
    if c.cache.gc_interval.0.is_zero() {
        return Err(invalid("cache.gc_interval", "must be longer than zero"));
    }
    if c.cache
        .gc_max_age
        .is_some_and(|a| a.0 < Duration::from_secs(60))
    {
        return Err(invalid("cache.gc_max_age", "must be at least 1m"));
    }
    Ok(())
}

fn size_limit(c: &Config) -> Result<(), ConfigError> {
    if c.cache.max_size.is_some_and(|m| m.0 < 1 << 20) {
        return Err(invalid("cache.max_size", "must be at least 1MiB"));
    }
    Ok(())
}

fn watermarks(c: &Config) -> Result<(), ConfigError> {
    let (high, low) = (c.cache.high_watermark, c.cache.low_watermark);
    if !(high > 0.0 && high <= 1.0) {
        return Err(invalid(
            "cache.high_watermark",
            "must be a fraction of max_size above 0 and at most 1",
        ));
    }
    if !(low > 0.0 && low < high) {
        return Err(invalid(
            "cache.low_watermark",
            "must be a fraction of max_size above 0 and below high_watermark",
        ));
    }
    Ok(())
}

fn tag_cache_entries(c: &Config) -> Result<(), ConfigError> {
    if c.cache.tag_cache_entries == 0 {
        return Err(invalid("cache.tag_cache_entries", "must be at least 1"));
    }
    Ok(())
}

fn retry(c: &Config) -> Result<(), ConfigError> {
    if c.retry.attempts == 0 || c.retry.attempts > 10 {
        return Err(invalid("retry.attempts", "must be between 1 and 10"));
    }
    if c.retry.backoff.0 > Duration::from_secs(60) {
        return Err(invalid("retry.backoff", "must be at most 1m"));
    }
    if c.retry.probe_backoff.0.is_zero() {
        return Err(invalid("retry.probe_backoff", "must be more than 0s"));
    }
    if c.retry.probe_backoff_max.0 < c.retry.probe_backoff.0 {
        return Err(invalid(
            "retry.probe_backoff_max",
            "must be at least retry.probe_backoff",
        ));
    }
    Ok(())
}

/// The admin listener may not take the registry's port on an address that overlaps it
/// (both OS-chosen, port 0, is allowed: tests).
fn admin_listen_apart(c: &Config) -> Result<(), ConfigError> {
    let Some(a) = c.admin_listen else {
        return Ok(());
    };
    let l = c.listen;
    let overlap = a.ip() == l.ip() || a.ip().is_unspecified() || l.ip().is_unspecified();
    if a.port() == l.port() && a.port() != 0 && overlap {
        return Err(invalid(
            "admin_listen",
            "must not be the address or port of listen",
        ));
    }
    Ok(())
}

fn cache_dir_set(c: &Config) -> Result<(), ConfigError> {
    if c.cache_dir.as_os_str().is_empty() {
        return Err(invalid("cache_dir", "must not be empty"));
    }
    Ok(())
}

fn tls_files(c: &Config) -> Result<(), ConfigError> {
    let Some(tls) = &c.tls else {
        return Ok(());
    };
    for (key, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
        if !path.is_file() {
            return Err(invalid(
                key,
                format!("{} is not a readable file", path.display()),
            ));
        }
    }
    Ok(())
}

/// Each upstream on its own, then against those before it.
fn upstreams(c: &Config) -> Result<(), ConfigError> {
    let mut distinct = Distinct::default();
    for (i, u) in c.upstreams.iter().enumerate() {
        let key = format!("upstream[{i}]");
        u.validate(&key)?;
        distinct.add(u, &key)?;
    }
    Ok(())
}

fn default_upstream_exists(c: &Config) -> Result<(), ConfigError> {
    if !c.upstreams.iter().any(|u| u.name == c.default_upstream) {
        return Err(invalid(
            "default_upstream",
            format!("{:?} is not the name of an upstream", c.default_upstream),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_upstreams(extra: &str) -> Result<Config, String> {
        let text = format!(
            "default_upstream = \"a\"\n[[upstream]]\nname = \"a\"\nurl = \"http://127.0.0.1:1\"\n{extra}"
        );
        Config::from_toml(&text)?
            .validate()
            .map_err(|e| e.to_string())
    }

    /// Each rule on its own: the default passes, a configuration breaking it fails naming the
    /// key.
    #[test]
    fn each_rule_names_its_key() {
        type Break = fn(&mut Config);
        let cases: [(Rule, Break, &str); 15] = [
            (upstreams_present, |c| c.upstreams.clear(), "upstream"),
            (
                durations_positive,
                |c| c.timeouts.response.0 = Duration::ZERO,
                "timeouts.response",
            ),
            (
                connection_limits,
                |c| c.limits.max_headers = 7,
                "limits.max_headers",
            ),
            (
                manifest_size,
                |c| c.cache.max_manifest_size.0 = 0,
                "cache.max_manifest_size",
            ),
            (
                gc_schedule,
                |c| c.cache.gc_interval.0 = Duration::ZERO,
                "cache.gc_interval",
            ),
            (
                gc_schedule,
                |c| c.cache.gc_max_age = Some(crate::units::HumanDuration(Duration::from_secs(59))),
                "cache.gc_max_age",
            ),
            (
                size_limit,
                |c| c.cache.max_size = Some(crate::units::ByteSize(1 << 19)),
                "cache.max_size",
            ),
            (
                watermarks,
                |c| c.cache.high_watermark = 0.0,
                "cache.high_watermark",
            ),
            (
                watermarks,
                |c| c.cache.low_watermark = c.cache.high_watermark,
                "cache.low_watermark",
            ),
            (
                tag_cache_entries,
                |c| c.cache.tag_cache_entries = 0,
                "cache.tag_cache_entries",
            ),
            (retry, |c| c.retry.attempts = 11, "retry.attempts"),
            (
                admin_listen_apart,
                |c| c.admin_listen = Some(c.listen),
                "admin_listen",
            ),
            (cache_dir_set, |c| c.cache_dir = "".into(), "cache_dir"),
            (
                tls_files,
                |c| {
                    c.tls = Some(crate::config::TlsConfig {
                        cert: "/nonexistent/c".into(),
                        key: "/nonexistent/k".into(),
                    })
                },
                "tls.cert",
            ),
            (
                default_upstream_exists,
                |c| c.default_upstream = "nope".into(),
                "default_upstream",
            ),
        ];
        for (rule, make_bad, key) in cases {
            assert!(rule(&Config::default()).is_ok(), "{key}");
            let mut c = Config::default();
            make_bad(&mut c);
            let e = rule(&c).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{e}");
        }
    }

    #[test]
    fn admin_listen_must_not_take_the_registry_port() {
        for text in [
            "admin_listen = \"127.0.0.1:5000\"",
            "admin_listen = \"0.0.0.0:5000\"",
            "listen = \"127.0.0.1:7000\"\nadmin_listen = \"0.0.0.0:7000\"",
        ] {
            let e = Config::from_toml(text)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(e.contains("`admin_listen`"), "{text}: {e}");
        }
        let c = Config::from_toml("admin_listen = \"127.0.0.1:9090\"")
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
        // Both OS-chosen (tests): allowed.
        let c = Config::from_toml("listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"");
        assert!(c.unwrap().validate().is_ok());
    }

    #[test]
    fn rejection_rules() {
        let cases = [
            ("[cache]\ntag_ttl = \"0s\"", "cache.tag_ttl"),
            ("[cache]\nmax_manifest_size = 0", "cache.max_manifest_size"),
            ("[retry]\nattempts = 0", "retry.attempts"),
            ("[retry]\nbackoff = \"2h\"", "retry.backoff"),
            ("[retry]\nprobe_backoff = \"0s\"", "retry.probe_backoff"),
            (
                "[retry]\nprobe_backoff = \"10s\"\nprobe_backoff_max = \"5s\"",
                "retry.probe_backoff_max",
            ),
            ("[cache]\ngc_max_age = \"5s\"", "cache.gc_max_age"),
            ("[cache]\nmax_size = \"10KiB\"", "cache.max_size"),
            ("[cache]\nhigh_watermark = 1.5", "cache.high_watermark"),
            ("[cache]\nlow_watermark = 0.99", "cache.low_watermark"),
            ("[cache]\ngc_interval = \"0s\"", "cache.gc_interval"),
            ("[timeouts]\nread_idle = \"0ms\"", "timeouts.read_idle"),
            ("[limits]\nmax_connections = 0", "limits.max_connections"),
            (
                "[limits]\nmax_header_bytes = \"4KiB\"",
                "limits.max_header_bytes",
            ),
            (
                "[limits]\nmax_header_bytes = \"1GiB\"",
                "limits.max_header_bytes",
            ),
            ("[limits]\nmax_headers = 2", "limits.max_headers"),
            (
                "[limits]\nheader_read_timeout = \"0s\"",
                "limits.header_read_timeout",
            ),
            ("[limits]\nidle_timeout = \"0s\"", "limits.idle_timeout"),
            (
                "[limits]\ndownloads_per_client = 0",
                "limits.downloads_per_client",
            ),
            (
                "[[upstream]]\nname = \"a\"\nurl = \"http://x\"",
                "upstream[1].name",
            ),
            (
                "[[upstream]]\nname = \"B\"\nurl = \"http://x\"",
                "upstream[1].name",
            ),
            (
                "[[upstream]]\nname = \"b/c\"\nurl = \"http://x\"",
                "upstream[1].name",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"ftp://x\"",
                "upstream[1].url",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://x/v2\"",
                "upstream[1].url",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://u:p@x\"",
                "upstream[1].url",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://127.0.0.1:1\"",
                "upstream[1].registry_hosts",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://x\"\npassword = \"p\"",
                "upstream[1].username",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://x\"\nusername = \"u\"\npassword = \"p\"\npassword_env = \"E\"",
                "upstream[1].password",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://x\"\nusername = \"u\"\npassword_env = \"REGCACHE_TEST_SURELY_UNSET\"",
                "upstream[1].password_env",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://x\"\nusername = \"u\"\npassword_file = \"/nonexistent/pw\"",
                "upstream[1].password_file",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://x\"\nca_file = \"/nonexistent/ca.pem\"",
                "upstream[1].ca_file",
            ),
            (
                "[[upstream]]\nname = \"b\"\nurl = \"http://x\"\nvirtual_hosts = [\"h\", \"h\"]",
                "upstream[1].virtual_hosts",
            ),
            (
                "[tls]\ncert = \"/nonexistent/c\"\nkey = \"/nonexistent/k\"",
                "tls.cert",
            ),
        ];
        for (extra, key) in cases {
            let e = with_upstreams(extra).unwrap_err();
            assert!(e.contains(&format!("`{key}`")), "{extra:?}: {e}");
        }
        let e = Config::from_toml("default_upstream = \"nope\"")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("`default_upstream`"), "{e}");
        let e = Config::from_toml("upstream = []")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("`upstream`"), "{e}");
    }

    #[cfg(feature = "ecr")]
    #[test]
    fn ecr_upstreams_by_host_or_by_account_and_region() {
        let c = with_upstreams(
            "[[upstream]]\nname = \"prod\"\nurl = \"https://123456789012.dkr.ecr.eu-west-1.amazonaws.com\"\n[upstream.ecr]\n\
             [[upstream]]\nname = \"dev\"\n[upstream.ecr]\naccount_id = \"210987654321\"\nregion = \"us-east-2\"\n",
        )
        .unwrap();
        let prod = c.upstreams[1].ecr.as_ref().unwrap();
        assert_eq!(prod.account_id.as_deref(), Some("123456789012"));
        assert_eq!(prod.region.as_deref(), Some("eu-west-1"));
        assert_eq!(
            c.upstreams[2].url.as_ref().unwrap().as_str(),
            "https://210987654321.dkr.ecr.us-east-2.amazonaws.com/"
        );
    }

    /// Without the `ecr` feature a well-formed ECR upstream is a configuration error that
    /// names its key and says how to get ECR support.
    #[cfg(not(feature = "ecr"))]
    #[test]
    fn ecr_upstream_without_the_feature_names_the_key() {
        for extra in [
            "[[upstream]]\nname = \"prod\"\nurl = \"https://123456789012.dkr.ecr.eu-west-1.amazonaws.com\"\n[upstream.ecr]\n",
            "[[upstream]]\nname = \"dev\"\n[upstream.ecr]\naccount_id = \"210987654321\"\nregion = \"us-east-2\"\n",
        ] {
            let e = with_upstreams(extra).unwrap_err();
            assert!(e.contains("`upstream[1].ecr`"), "{e}");
            assert!(e.contains("cargo feature `ecr`"), "{e}");
        }
        let e = crate::upstream::ecr::Ecr::new(&crate::config::EcrConfig::default()).unwrap_err();
        assert!(e.contains("cargo feature `ecr`"), "{e}");
    }

    #[test]
    fn ecr_and_auth_rejection_rules() {
        let cases = [
            (
                "[[upstream]]\nname = \"e\"\n[upstream.ecr]\n",
                "upstream[1].ecr",
            ),
            (
                "[[upstream]]\nname = \"e\"\nurl = \"https://example.com\"\n[upstream.ecr]\n",
                "upstream[1].ecr",
            ),
            (
                "[[upstream]]\nname = \"e\"\n[upstream.ecr]\naccount_id = \"12\"\nregion = \"us-east-1\"\n",
                "upstream[1].ecr.account_id",
            ),
            (
                "[[upstream]]\nname = \"e\"\n[upstream.ecr]\naccount_id = \"123456789012\"\nregion = \"US East\"\n",
                "upstream[1].ecr.region",
            ),
            (
                "[[upstream]]\nname = \"e\"\n[upstream.ecr]\naccount_id = \"123456789012\"\nregion = \"us-east-1\"\nkms_key = \"k\"\n",
                "upstream[1].ecr.kms_key",
            ),
            (
                "[[upstream]]\nname = \"e\"\n[upstream.ecr]\naccount_id = \"123456789012\"\nregion = \"us-east-1\"\nrole_arn = \"me\"\n",
                "upstream[1].ecr.role_arn",
            ),
            ("[[upstream]]\nname = \"n\"\n", "upstream[1].url"),
            ("[auth]\npush = true\n", "auth.push"),
            ("[auth]\nanonymous_pull = false\n", "auth.anonymous_pull"),
            (
                "[auth]\nhtpasswd = \"/nonexistent/htpasswd\"\n",
                "auth.htpasswd",
            ),
        ];
        for (extra, key) in cases {
            let e = with_upstreams(extra).unwrap_err();
            assert!(e.contains(&format!("`{key}`")), "{extra:?}: {e}");
        }
        let e = Config::from_toml("[[upstream]]\nname = \"e\"\nurl = \"https://x\"\n[upstream.ecr]\nencryption = \"DES\"\n")
            .unwrap_err();
        assert!(e.contains("encryption"), "{e}");
    }

    #[test]
    fn immutable_tag_patterns_are_checked() {
        let e = with_upstreams(
            "[[upstream]]\nname = \"b\"\nurl = \"http://x\"\nimmutable_tags = [\"\"]\n",
        )
        .unwrap_err();
        assert!(e.contains("`upstream[1].immutable_tags[0]`"), "{e}");
    }
}

//! Command-line interface (clap). Precedence: flags > environment > config file > defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::airgap::name::{ImageName, PlatformFilter};
use crate::config::{Config, ConfigError, LogFormat};
use crate::units::HumanDuration;

/// A pull-through caching proxy for container registries.
#[derive(Debug, Parser)]
#[command(name = "regcache", version, about)]
pub struct Cli {
    /// TOML configuration file; without it the embedded default is used (listen on
    /// 0.0.0.0:5000, Docker Hub upstream, cache in ./regcache-data).
    #[arg(long, short = 'c', env = "REGCACHE_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides `listen`).
    #[arg(long, env = "REGCACHE_LISTEN", global = true)]
    pub listen: Option<SocketAddr>,
    /// Cache folder (overrides `cache_dir`).
    #[arg(long, env = "REGCACHE_CACHE_DIR", global = true)]
    pub cache_dir: Option<PathBuf>,
    /// Log format (overrides `log_format`).
    #[arg(long, value_enum, env = "REGCACHE_LOG_FORMAT", global = true)]
    pub log_format: Option<LogFormat>,
    /// Serve from the cache only and never contact an upstream (sets `offline`).
    #[arg(long, env = "REGCACHE_OFFLINE", global = true)]
    pub offline: bool,
    /// What to do; without a command regcache serves.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Commands besides serving. The options above may come before or after the command.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Check the configuration as start-up does (passwords, token and htpasswd files must be
    /// readable) and print the effective configuration, defaults filled in and secrets
    /// redacted. Exits 2 when it is invalid.
    CheckConfig,
    /// Remove cached blobs and manifests unused for a while and report what was freed. Safe to
    /// run while regcache serves the same cache.
    Gc {
        /// Remove what was unused for this long (e.g. "30d"). Default: `cache.gc_max_age`,
        /// else 30d.
        #[arg(long)]
        max_age: Option<HumanDuration>,
    },
    /// List the cached repositories and tags with their size and last use (reads the cache
    /// folder; no server needed).
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print cache totals: size against `cache.max_size`, entries, downloads in progress.
    Stats {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Warm the cache from the upstreams: every manifest, config and layer of each image, all
    /// platforms of an index unless --platform says otherwise. Run it again after an
    /// interruption: what is cached is skipped. Refused while a regcache serves the same
    /// cache folder: warm a running regcache with --server instead.
    Prefetch {
        /// Images as clients name them through regcache: `alpine:3.20`,
        /// `library/alpine@sha256:…`, `<upstream>/<repo>:<tag>`, `docker.io/library/alpine`.
        images: Vec<ImageName>,
        /// Also take image names from this file, one per line (`#` starts a comment; `-`
        /// reads standard input).
        #[arg(long, short = 'f', value_name = "LIST")]
        file: Option<PathBuf>,
        /// Only this platform of an index (`os/arch[/variant]`); repeat for more.
        #[arg(long = "platform", value_name = "OS/ARCH")]
        platforms: Vec<PlatformFilter>,
        /// Blob downloads at a time.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: u16,
        /// Warm this running regcache (`http://HOST:PORT`) through its registry API instead
        /// of the cache folder: it fetches and caches what it is asked for.
        #[arg(long, value_name = "URL")]
        server: Option<url::Url>,
        /// Leave out each image's referrers (signatures, SBOMs, attestations), which are
        /// fetched with it by default.
        #[arg(long)]
        no_referrers: bool,
    },
    /// Write cached images as an OCI image layout, read straight from the cache folder (no
    /// server needed). Nothing is written unless every image is complete in the cache.
    Export {
        /// Images, named as for `prefetch`.
        #[arg(required = true)]
        images: Vec<ImageName>,
        /// A directory (created, or an existing layout added to), or a tar file when the
        /// name ends in `.tar`.
        #[arg(long, short = 'o', value_name = "DIR|FILE.tar")]
        output: PathBuf,
        /// Leave out manifests and blobs that are not cached (each is named) instead of
        /// failing.
        #[arg(long)]
        allow_partial: bool,
        /// Leave out each image's cached referrers (signatures, SBOMs, attestations), which
        /// are written with it by default.
        #[arg(long)]
        no_referrers: bool,
    },
    /// Ask the regcache this configuration describes whether it is healthy: `GET /healthz` on
    /// `admin_listen` when set, else on `listen` (over TLS when `[tls]` is set). Exit code 0
    /// when it answers 200, 1 otherwise, with a one-line reason. Takes the same `--config`,
    /// `--listen` and environment as serving (a container health check).
    Healthcheck {
        /// Give up after this long.
        #[arg(long, default_value = "5s")]
        timeout: HumanDuration,
    },
    /// Load an OCI image layout (a directory or a tar) into the cache, verifying every
    /// digest, and record its ref names as tags for an offline regcache to serve. A layout
    /// with any damaged or missing content is refused whole. Safe while an offline regcache
    /// serves the same cache, not while one fetches into it.
    Import {
        /// The layout directory or tar file.
        path: PathBuf,
        /// The image that ref names which are only a tag (`3.20`) belong to, e.g.
        /// `docker.io/library/alpine`.
        #[arg(long, value_name = "NAME")]
        repository: Option<ImageName>,
        /// Import even when content the layout refers to is missing from it and the cache.
        #[arg(long)]
        allow_partial: bool,
    },
}

/// Whether log lines get ANSI colours: only on a terminal, and not when `NO_COLOR` is set to
/// anything but the empty string (<https://no-color.org>).
pub fn use_colour(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

impl Cli {
    /// Loads the file (or the embedded default), applies overrides, and validates once.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(l) = self.listen {
            config.listen = l;
        }
        if let Some(d) = &self.cache_dir {
            config.cache_dir = d.clone();
        }
        if let Some(f) = self.log_format {
            config.log_format = f;
        }
        if self.offline {
            config.offline = true;
        }
        config.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:7000\"\ncache_dir = \"/x\"\n").unwrap();
        let cli = Cli::try_parse_from([
            "regcache",
            "--config",
            f.to_str().unwrap(),
            "--cache-dir",
            "/y",
            "--log-format",
            "json",
        ])
        .unwrap();
        let c = cli.load_config().unwrap();
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.cache_dir, PathBuf::from("/y"));
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn gc_command() {
        let cli = Cli::try_parse_from(["regcache", "--cache-dir", "/c", "gc", "--max-age", "7d"])
            .unwrap();
        match cli.command {
            Some(Command::Gc { max_age }) => {
                assert_eq!(
                    max_age,
                    Some(HumanDuration(std::time::Duration::from_secs(7 * 86400)))
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["regcache", "gc", "--max-age", "soon"]).is_err());
    }

    #[test]
    fn airgap_commands() {
        let cli = Cli::try_parse_from([
            "regcache",
            "prefetch",
            "alpine:3.20",
            "ghcr/owner/app@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "--platform",
            "linux/arm64",
            "-f",
            "list.txt",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Prefetch {
                images,
                file,
                platforms,
                jobs,
                server: None,
                no_referrers: false,
            }) => {
                assert_eq!(images.len(), 2);
                assert_eq!(file, Some(PathBuf::from("list.txt")));
                assert_eq!(platforms.len(), 1);
                assert_eq!(jobs, 4);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["regcache", "export", "a:1", "b", "-o", "out.tar"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Export { images, allow_partial: false, no_referrers: false, .. })
                if images.len() == 2
        ));
        let cli = Cli::try_parse_from(["regcache", "export", "a:1", "-o", "d", "--no-referrers"])
            .unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Export {
                no_referrers: true,
                ..
            })
        ));
        let cli =
            Cli::try_parse_from(["regcache", "import", "x.tar", "--repository", "alpine"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Import {
                repository: Some(_),
                ..
            })
        ));
        for bad in [
            &["regcache", "export", "a:1"][..],
            &["regcache", "export", "-o", "x"],
            &["regcache", "prefetch", "Bad:1"],
            &["regcache", "prefetch", "a", "--platform", "linux"],
            &["regcache", "prefetch", "a", "--jobs", "0"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn healthcheck_command() {
        let cli = Cli::try_parse_from(["regcache", "-c", "x.toml", "healthcheck"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Healthcheck { timeout }) if timeout.0 == std::time::Duration::from_secs(5)
        ));
        assert!(Cli::try_parse_from(["regcache", "healthcheck", "--timeout", "x"]).is_err());
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
    }

    #[test]
    fn options_work_after_the_command_too() {
        let cli = Cli::try_parse_from([
            "regcache",
            "ls",
            "-c",
            "x.toml",
            "--cache-dir",
            "/c",
            "--json",
        ])
        .unwrap();
        assert_eq!(cli.config, Some(PathBuf::from("x.toml")));
        assert_eq!(cli.cache_dir, Some(PathBuf::from("/c")));
        assert!(matches!(cli.command, Some(Command::Ls { json: true })));
        let cli = Cli::try_parse_from(["regcache", "check-config", "--config", "y.toml"]).unwrap();
        assert_eq!(cli.config, Some(PathBuf::from("y.toml")));
        assert!(matches!(cli.command, Some(Command::CheckConfig)));
    }

    #[test]
    fn offline_flag() {
        let cli = Cli::try_parse_from(["regcache", "--offline"]).unwrap();
        assert!(cli.load_config().unwrap().offline);
    }

    #[test]
    fn no_arguments_is_the_embedded_default() {
        let cli = Cli::try_parse_from(["regcache"]).unwrap();
        if cli.config.is_none() && cli.listen.is_none() && cli.cache_dir.is_none() {
            assert_eq!(cli.load_config().unwrap(), Config::default());
        }
    }

    #[test]
    fn a_bad_file_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[[upstream]]\nname = \"x\"\nurl = \"gopher://h\"\n").unwrap();
        let cli = Cli::try_parse_from(["regcache", "-c", f.to_str().unwrap()]).unwrap();
        let e = cli.load_config().unwrap_err().to_string();
        assert!(e.contains("upstream[0].url"), "{e}");
    }
}

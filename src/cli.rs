//! Command-line interface (clap). Precedence: flags > environment > config file > defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::config::{Config, ConfigError, LogFormat};
use crate::units::HumanDuration;

/// A pull-through caching proxy for container registries.
#[derive(Debug, Parser)]
#[command(name = "regcache", version, about)]
pub struct Cli {
    /// TOML configuration file; without it the embedded default is used (listen on
    /// 0.0.0.0:5000, Docker Hub upstream, cache in ./regcache-data).
    #[arg(long, short = 'c', env = "REGCACHE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides `listen`).
    #[arg(long, env = "REGCACHE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Cache folder (overrides `cache_dir`).
    #[arg(long, env = "REGCACHE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Log format (overrides `log_format`).
    #[arg(long, value_enum, env = "REGCACHE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Serve from the cache only and never contact an upstream (sets `offline`).
    #[arg(long, env = "REGCACHE_OFFLINE")]
    pub offline: bool,
    /// What to do; without a command regcache serves.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Commands besides serving.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
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

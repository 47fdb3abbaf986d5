//! The `regcache` binary: parse the CLI, set up logging, load and validate the configuration,
//! and serve until SIGINT or SIGTERM (SIGHUP reloads the TLS certificate).

use anyhow::Context;
use clap::Parser;
use regcache::airgap::{export, import, name, prefetch};
use regcache::cache::lock::{CacheLock, Holder};
use regcache::cli::{Cli, Command};
use regcache::config::{Config, LogFormat};

/// mimalloc: a cached hit allocates a few dozen small buffers (headers, the request's
/// record, its log line), often freed on another worker thread; glibc's allocator took
/// about a tenth of a manifest hit's samples. Built without transparent huge pages, its
/// resident memory under 5,000 connections stays where glibc's was.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Serving logs at `info` on stdout; commands (which print their own results) log warnings
/// only, on stderr. `RUST_LOG` overrides the level either way.
///
/// While serving, lines are formatted where they happen and written by a thread of their
/// own, which writes whatever has queued up in one system call rather than one per line
/// (an access line per request would otherwise cost a `write(2)` per request) and is woken
/// once per batch, within 50 ms of a batch's first line. Nothing is dropped: a full queue
/// makes the logging side wait. The returned guard writes out the queue when dropped at
/// exit. The access line has a formatter of its own (the same text, without the generic
/// formatter's cost), except in colour at a terminal.
fn init_tracing(
    format: LogFormat,
    command: bool,
) -> anyhow::Result<Option<regcache::access_log::batch::Flusher>> {
    use regcache::access_log::batch::batched;
    use regcache::access_log::line::{AccessLines, Style, TARGET};
    use std::io::IsTerminal;
    use tracing_subscriber::filter::{LevelFilter, filter_fn};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer, fmt};
    let default = if command { "warn" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colour only for a person at a terminal: never into files, `docker logs` or journald.
    let terminal = if command {
        std::io::stderr().is_terminal()
    } else {
        std::io::stdout().is_terminal()
    };
    let colour = regcache::cli::use_colour(terminal, std::env::var_os("NO_COLOR").as_deref());
    if command {
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(colour);
        match format {
            LogFormat::Json => builder
                .json()
                .flatten_event(true)
                .with_writer(std::io::stderr)
                .init(),
            LogFormat::Pretty => builder.with_writer(std::io::stderr).init(),
        }
        return Ok(None);
    }
    let (writer, guard) =
        batched(std::io::stdout(), "regcache-log").context("cannot start the log writer")?;
    let style = match format {
        LogFormat::Json => Style::Json,
        LogFormat::Pretty if !colour => Style::Plain,
        // In colour the generic formatter writes the access line too.
        LogFormat::Pretty => {
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(true)
                .with_writer(writer)
                .init();
            return Ok(Some(guard));
        }
    };
    // The filters pass on RUST_LOG's most verbose level, so events (and `log` records) above
    // it are still dropped at their call sites.
    let most = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let access = AccessLines::new(writer.clone(), style)
        .with_filter(filter_fn(|m| m.target() == TARGET).with_max_level_hint(most));
    let others = filter_fn(|m| m.target() != TARGET).with_max_level_hint(most);
    let registry = tracing_subscriber::registry().with(filter).with(access);
    match style {
        Style::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(writer)
                    .with_filter(others),
            )
            .init(),
        Style::Plain => registry
            .with(
                fmt::layer()
                    .with_ansi(false)
                    .with_writer(writer)
                    .with_filter(others),
            )
            .init(),
    }
    Ok(Some(guard))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C will stop regcache");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}

/// Re-reads the TLS certificate and key on every SIGHUP; a bad pair keeps the current one.
fn reload_on_hangup(tls: Option<std::sync::Arc<regcache::server::Tls>>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Registered before "ready" is logged, so a SIGHUP never hits the default action (exit).
    let mut hangup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    // Detached on purpose: it lives as long as the process.
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match &tls {
                None => tracing::info!("SIGHUP received; no TLS certificate to reload"),
                Some(tls) => match tls.reload() {
                    Ok(()) => tracing::info!("SIGHUP received; TLS certificate reloaded"),
                    Err(e) => tracing::error!(
                        error = %e,
                        "SIGHUP received; TLS certificate reload failed, keeping the current one"
                    ),
                },
            }
        }
    });
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match cli.load_config() {
        Ok(c) => c,
        Err(e) => {
            // A health check says why in one line, and fails with 1 (Docker reserves 2).
            if matches!(cli.command, Some(Command::Healthcheck { .. })) {
                eprintln!(
                    "unhealthy: regcache: {}",
                    regcache::healthcheck::one_line(&e.to_string())
                );
                std::process::exit(1);
            }
            eprintln!("regcache: {e}");
            std::process::exit(2);
        }
    };
    if let Some(command) = cli.command {
        init_tracing(config.log_format, true)?;
        let ok = run_command(command, config).await?;
        if !ok {
            std::process::exit(1);
        }
        return Ok(());
    }
    // Held until `main` returns: dropping it writes out the lines still queued.
    let _log = init_tracing(config.log_format, false)?;
    let tls = match &config.tls {
        Some(t) => Some(regcache::server::Tls::load(&t.cert, &t.key).map_err(anyhow::Error::msg)?),
        None => None,
    };
    reload_on_hangup(tls.clone())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin = match config.admin_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a} (admin_listen)"))?,
        ),
        None => None,
    };
    let grace = config.timeouts.shutdown_grace.0;
    let upstreams: Vec<String> = config
        .upstreams
        .iter()
        .map(|u| {
            format!(
                "{}={}",
                u.name,
                u.url.as_ref().map(|u| u.as_str()).unwrap_or("")
            )
        })
        .collect();
    // Taken before the cache is opened (which clears `tmp/`), held until exit; the kernel
    // releases it however the process ends.
    let fetches = !(config.offline || config.upstreams.iter().all(|u| u.offline));
    let _lock = CacheLock::take(&config.cache_dir, Holder::Server { fetches })
        .context("regcache cannot serve")?;
    let app = match regcache::app::App::new(config).await {
        Ok(app) => app,
        // An unfit object store is a configuration error, like the others.
        Err(regcache::app::StartError::Fleet(e)) => {
            eprintln!("regcache: {e}");
            std::process::exit(2);
        }
        Err(e) => return Err(e.into()),
    };
    let max_connections = app.config.limits.max_connections;
    let files = regcache::server::fds::raise();
    if files.now != files.before {
        tracing::info!(from = ?files.before, to = ?files.now, "open-file limit raised to the hard limit");
    }
    if !files.fits(max_connections) {
        tracing::warn!(
            open_files = ?files.now,
            max_connections,
            reserved = regcache::server::fds::RESERVED,
            "the open-file limit is below limits.max_connections plus descriptors for cache files and upstreams: connections past it fail to be accepted; raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower limits.max_connections"
        );
    }
    tracing::info!(
        listen = %listener.local_addr()?,
        cache_dir = %app.config.cache_dir.display(),
        upstreams = ?upstreams,
        default_upstream = %app.config.default_upstream,
        tls = tls.is_some(),
        admin_listen = admin
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.to_string()),
        "regcache ready"
    );
    app.start_periodic_gc();
    app.start_health_probes();
    // Operator requests are short and hold nothing: the admin listener stops with the process.
    let admin = admin.map(|l| {
        tokio::spawn(regcache::server::serve_admin(
            l,
            app.clone(),
            std::future::pending(),
        ))
    });
    regcache::server::serve(listener, app, tls, grace, shutdown_signal()).await?;
    if let Some(a) = admin {
        a.abort();
    }
    Ok(())
}

/// `regcache check-config`: what start-up would refuse besides the file itself (secret
/// files and variables, the htpasswd file, static tokens), then the effective configuration
/// with secrets redacted. Exits 2 on a problem, as start-up does.
fn check_config(config: &Config) {
    let problems = config
        .upstreams
        .iter()
        .enumerate()
        .filter_map(|(i, u)| u.resolve_password(&format!("upstream[{i}]")).err())
        .map(|e| e.to_string())
        .chain(regcache::access::Access::new(config).err());
    let mut failed = false;
    for p in problems {
        eprintln!("regcache: {p}");
        failed = true;
    }
    if failed {
        std::process::exit(2);
    }
    match config.to_redacted_toml() {
        Ok(text) => print!(
            "# Effective configuration: defaults filled in, secrets shown as \"{}\".\n{text}",
            regcache::config::REDACTED
        ),
        Err(e) => {
            eprintln!("regcache: {e}");
            std::process::exit(2);
        }
    }
}

/// Runs a command other than serving; `Ok(false)` when it failed and said why.
async fn run_command(command: Command, config: Config) -> anyhow::Result<bool> {
    match command {
        Command::CheckConfig => {
            check_config(&config);
            Ok(true)
        }
        Command::Gc { max_age } => {
            use regcache::cache::store::BlobStore;
            let max_age =
                max_age
                    .or(config.cache.gc_max_age)
                    .unwrap_or(regcache::units::HumanDuration(
                        std::time::Duration::from_secs(30 * 86400),
                    ));
            let store = regcache::cache::store::FsStore::open_shared(&config.cache_dir)
                .with_context(|| format!("cache_dir {}", config.cache_dir.display()))?;
            let r = store.collect_garbage(max_age.0).await?;
            use regcache::units::{count, human_bytes};
            println!(
                "gc: removed {} unused for {max_age}, freed {}, kept {}; removed {} whose manifest was gone",
                count(r.files, "file"),
                human_bytes(r.bytes),
                count(r.kept, "file"),
                count(r.tags, "tag record"),
            );
            Ok(true)
        }
        Command::Ls { json } => {
            let rows = regcache::inspect::list(&config.cache_dir)
                .with_context(|| format!("cache_dir {}", config.cache_dir.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!(
                    "{}",
                    regcache::inspect::render_list(&rows, std::time::SystemTime::now())
                );
            }
            Ok(true)
        }
        Command::Stats { json } => {
            let limit = config.cache.max_size.map(|m| m.0);
            let s = regcache::inspect::stats(&config.cache_dir, limit)
                .with_context(|| format!("cache_dir {}", config.cache_dir.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!(
                    "{}",
                    regcache::inspect::render_stats(&s, std::time::SystemTime::now())
                );
            }
            Ok(true)
        }
        Command::Prefetch {
            mut images,
            file,
            platforms,
            jobs,
            server,
            no_referrers,
        } => {
            if let Some(file) = file {
                let text = if file.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin()).context("reading standard input")?
                } else {
                    std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?
                };
                images.extend(name::parse_list(&text).with_context(|| file.display().to_string())?);
            }
            anyhow::ensure!(!images.is_empty(), "prefetch: no images given");
            let args = prefetch::PrefetchArgs {
                images,
                platforms,
                jobs: usize::from(jobs),
                referrers: !no_referrers,
            };
            if let Some(url) = server {
                let server = prefetch::Server::new(url, &config)?;
                return Ok(prefetch::run_remote(&server, args).await?);
            }
            let _lock = CacheLock::take(&config.cache_dir, Holder::Prefetch)
                .context("regcache prefetch")?;
            Ok(prefetch::run(config, args).await?)
        }
        Command::Export {
            images,
            output,
            allow_partial,
            no_referrers,
        } => {
            let args = export::ExportArgs {
                images,
                output,
                allow_partial,
                referrers: !no_referrers,
            };
            Ok(export::run(&config, args).await?)
        }
        Command::Healthcheck { timeout } => {
            match regcache::healthcheck::probe(&config, timeout.0).await {
                Ok(line) => {
                    println!("{line}");
                    Ok(true)
                }
                Err(line) => {
                    eprintln!("{line}");
                    Ok(false)
                }
            }
        }
        Command::Import {
            path,
            repository,
            allow_partial,
        } => {
            let _lock =
                CacheLock::take(&config.cache_dir, Holder::Import).context("regcache import")?;
            let args = import::ImportArgs {
                path,
                repository,
                allow_partial,
            };
            Ok(import::run(&config, args).await?)
        }
    }
}

//! The `regcache` binary: parse the CLI, set up logging, load and validate the configuration,
//! and serve until SIGINT or SIGTERM.

use anyhow::Context;
use clap::Parser;
use regcache::cli::Cli;
use regcache::config::LogFormat;

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Pretty => builder.init(),
    }
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match cli.load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("regcache: {e}");
            std::process::exit(2);
        }
    };
    init_tracing(config.log_format);
    if let Some(regcache::cli::Command::Gc { max_age }) = &cli.command {
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
        println!(
            "gc: removed {} files unused for {max_age}, freed {}, kept {} files",
            r.files,
            regcache::units::ByteSize(r.bytes),
            r.kept
        );
        return Ok(());
    }
    let tls = match &config.tls {
        Some(t) => {
            Some(regcache::server::tls_acceptor(&t.cert, &t.key).map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
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
    let app = regcache::app::App::new(config).await?;
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
    // Operator requests are short and hold nothing: the admin listener stops with the process.
    let admin = admin.map(|l| {
        tokio::spawn(regcache::admin::serve(
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

//! End-to-end comparison of regcache with the caches people run today, side by side in one
//! run on loopback (issue 6):
//!
//! - the upstream: a real `docker-registry` (distribution 2.8) with Docker-Hub-style bearer
//!   token auth and a login (the token server of `tests/support/token.rs`);
//! - **regcache**: the binary cargo builds with this bench (release under `cargo bench`), as
//!   deployed with `cache.max_size = "20GiB"` (so every hit records a use), plain and, as a
//!   second process, over TLS; a third without `max_size` for the manifest rows;
//! - **distribution** in proxy mode (`proxy: remoteurl:` with the login, its own storage);
//! - **nginx `proxy_cache`** in front of the upstream, sending a bearer token this bench
//!   fetched from the token server;
//! - **nginx static**: the same blob and manifest as files (sendfile), plain and TLS.
//!
//! Measured in each round, every server in turn (the order rotates from round to round):
//! - cache-hit blob throughput with 1, 8, 32 `curl` processes at once, plain and TLS, and
//!   the server's CPU seconds (`/proc/<pid>/stat` utime + stime) per GiB served;
//! - cached manifest `GET` (`wrk --latency`) and `HEAD` (a small client of this bench: wrk
//!   4.1 cannot parse `HEAD` answers), by digest and by tag, 32 connections, with Docker's
//!   full six-type `Accept` list: requests per second, p50 and p99 latency;
//! - many clients: 5,000 keep-alive connections at once (`wrk -t2`) on the manifest by tag,
//!   regcache and nginx `proxy_cache`: rate, p50, p99, errors and the server's peak RSS
//!   during the run (the bench raises its open-file limit to the hard limit first);
//! - a cold miss: one fresh blob from the upstream directly, then through each cache; total
//!   time, time to the first body byte, the wait for the last chunk and each cache's CPU
//!   seconds per GiB, beside the floor (one SHA-256 pass and one copy, timed here);
//! - an image of 200 small layers (1 KiB – 5 MiB, log-uniform) pushed fresh per server,
//!   pulled by 16 `skopeo` processes at once, cold and then warm, from the upstream
//!   directly and through each cache: wall time and requests the upstream saw;
//! - the thundering herd: 32 and 64 clients released together on one fresh blob per cache,
//!   every body's SHA-256 checked; upstream `GET`s counted from the upstream's access log;
//! - at the end, each server's peak RSS (`VmHWM`) and CPU seconds over all rounds.
//!
//! The table shows the median of the rounds, then the ratios against the targets (figures,
//! never assertions). The run is written to `<target>/bench-results/compare-<UTC time>.json`
//! (every round's values) and `compare.svg`. Blobs that served one measurement are deleted
//! from every store right after it, so the run needs disk for about ten blobs at a time.
//!
//! `cargo bench --bench compare` runs the full size. Environment: `REGCACHE_BENCH_ROUNDS`
//! (3), `REGCACHE_BENCH_BLOB_MIB` (256), `REGCACHE_BENCH_CLIENTS` (`1,8,32`),
//! `REGCACHE_BENCH_HERD` (`32,64`), `REGCACHE_BENCH_CONNS` (32), `REGCACHE_BENCH_SECS` (5,
//! per manifest run), `REGCACHE_BENCH_MANY_CONNS` (5000), `REGCACHE_BENCH_LAYERS` (200),
//! `REGCACHE_BENCH_PULLERS` (16), `REGCACHE_BENCH_ONLY` (all; a comma list of `hits`, `tls`,
//! `manifests`, `conns`, `cold`, `layers`, `herd` to run just those). Under `cargo test
//! --benches` it is a smoke run (1 MiB, 1 round, 1 and 8 clients, a herd of 4, 8 connections
//! for 1 s, 300 connections at once, an image of 8 layers of 1–64 KiB pulled by 2 clients),
//! or prints `SKIPPED compare: <why>` when a peer program is missing (`SKIPPED layers` when
//! only skopeo is). It exits non-zero only when a component fails to start (or a
//! smoke run hangs); a failed measurement shows as `err`, a slow one is just a figure.

#[path = "../../tests/support/mod.rs"]
mod support;

mod clients;
mod lab;
mod layers;
mod measure;
mod report;
mod servers;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use lab::Lab;
use measure::rotated;
use report::{NGINX_PROXY, REGCACHE, Results};
use support::peers::which;

const PEERS: [&str; 5] = ["docker-registry", "nginx", "wrk", "curl", "openssl"];
/// A smoke run that takes longer than this has hung somewhere: it fails instead.
const SMOKE_LIMIT: Duration = Duration::from_secs(300);

/// What to run, from the environment.
#[derive(Debug)]
struct Settings {
    full: bool,
    rounds: usize,
    blob_bytes: u64,
    hit_clients: Vec<usize>,
    herd_clients: Vec<usize>,
    conns: usize,
    wrk_secs: u64,
    /// Connections of the many-clients run.
    many_conns: usize,
    /// The small-layer image and its pullers.
    layers: layers::Shape,
    /// Measurements to run (`REGCACHE_BENCH_ONLY`); empty: all.
    only: Vec<String>,
}

fn env_or<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.split(',')
                .filter_map(|n| n.trim().parse().ok())
                .filter(|&n| n > 0)
                .collect::<Vec<usize>>()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

impl Settings {
    fn from_env(full: bool) -> Settings {
        // Smoke defaults keep `cargo test --benches` well under a minute.
        let (rounds, mib, hit, herd, conns, secs): (usize, u64, &[usize], &[usize], usize, u64) =
            if full {
                (3, 256, &[1, 8, 32], &[32, 64], 32, 5)
            } else {
                (1, 1, &[1, 8], &[4], 8, 1)
            };
        let (many, layers, max_layer, pullers) = if full {
            (5000, 200, 5 << 20, 16)
        } else {
            (300, 8, 64 << 10, 2)
        };
        Settings {
            full,
            rounds: env_or("REGCACHE_BENCH_ROUNDS", rounds).max(1),
            blob_bytes: env_or("REGCACHE_BENCH_BLOB_MIB", mib).max(1) << 20,
            hit_clients: env_list("REGCACHE_BENCH_CLIENTS", hit),
            herd_clients: env_list("REGCACHE_BENCH_HERD", herd),
            conns: env_or("REGCACHE_BENCH_CONNS", conns).max(1),
            wrk_secs: env_or("REGCACHE_BENCH_SECS", secs).max(1),
            many_conns: env_or("REGCACHE_BENCH_MANY_CONNS", many).max(1),
            layers: layers::Shape {
                layers: env_or("REGCACHE_BENCH_LAYERS", layers).max(1),
                min: 1 << 10,
                max: max_layer,
                clients: env_or("REGCACHE_BENCH_PULLERS", pullers).max(1),
            },
            only: std::env::var("REGCACHE_BENCH_ONLY")
                .unwrap_or_default()
                .split(',')
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty())
                .collect(),
        }
    }

    /// Whether measurement `what` runs.
    fn runs(&self, what: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|m| m == what)
    }
}

fn main() -> ExitCode {
    let settings = Settings::from_env(std::env::args().any(|a| a == "--bench"));
    if let Some(missing) = PEERS.iter().find(|b| which(b).is_none()) {
        let why = format!(
            "`{missing}` not found on PATH (Debian packages docker-registry nginx-light wrk curl openssl)"
        );
        if settings.full {
            eprintln!("compare: cannot start: {why}");
            return ExitCode::FAILURE;
        }
        println!("SKIPPED compare: {why}");
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("compare: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = rt.block_on(async {
        if settings.full {
            return run(&settings).await;
        }
        tokio::time::timeout(SMOKE_LIMIT, run(&settings))
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "smoke run still going after {SMOKE_LIMIT:?}"
                ))
            })
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compare: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn first_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or_default().trim().to_owned()
        })
        .unwrap_or_default()
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_default()
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Now in UTC as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    support::token::rfc3339(secs)
}

/// `<target dir>/bench-results`: `CARGO_TARGET_DIR`, else the directory three levels above
/// this executable (`<target>/<profile>/deps/compare-…`).
fn results_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| Path::new(env!("CARGO_MANIFEST_DIR")).join(d))
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|e| e.ancestors().nth(3).map(Path::to_path_buf))
        })
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench-results")
}

async fn run(s: &Settings) -> anyhow::Result<()> {
    let started = Instant::now();
    let date = utc_now();
    let load_before = loadavg();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let mib = s.blob_bytes as f64 / (1024.0 * 1024.0);
    println!(
        "compare: blob {mib:.0} MiB, {} round(s), hit clients {:?}, herd {:?}, \
         {} connections x {} s per manifest run, {} at once, image of {} layers x {} pullers, \
         regcache {profile} build",
        s.rounds,
        s.hit_clients,
        s.herd_clients,
        s.conns,
        s.wrk_secs,
        s.many_conns,
        s.layers.layers,
        s.layers.clients
    );
    // The many-clients run needs a descriptor per connection in wrk and in each server.
    let files = if s.runs("conns") {
        servers::raise_open_files(s.many_conns as u64 + 1024)
    } else {
        0
    };
    let lab = Lab::start(s.blob_bytes)
        .await
        .context("a component failed to start")?;
    println!(
        "compare: all servers up and warm after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut processes: Vec<(&str, servers::Procs)> = lab
        .plain
        .iter()
        .filter_map(|srv| Some((srv.column, srv.procs?)))
        .collect();
    if let Some(p) = lab.tls.iter().find(|srv| srv.column == REGCACHE) {
        processes.extend(p.procs.map(|procs| ("regcache TLS", procs)));
    }
    let cpu_before: Vec<f64> = processes.iter().map(|(_, p)| p.cpu_secs()).collect();
    let mut results = Results::default();
    let mut herd_blobs = Vec::new();
    for round in 0..s.rounds {
        println!(
            "compare: round {}/{} ({:.0} s so far)",
            round + 1,
            s.rounds,
            started.elapsed().as_secs_f64()
        );
        let plain = rotated(&lab.plain, round);
        if s.runs("hits") {
            measure::hits(&mut results, s, &lab, &plain, false).await;
        }
        if s.runs("tls") {
            measure::hits(&mut results, s, &lab, &rotated(&lab.tls, round), true).await;
        }
        if s.runs("manifests") {
            let mut servers = plain.clone();
            servers.push(lab.unbounded.clone());
            measure::manifests(&mut results, s, &lab, &servers).await;
        }
        if s.runs("conns") {
            let servers: Vec<_> = plain
                .iter()
                .filter(|srv| [REGCACHE, NGINX_PROXY].contains(&srv.column))
                .cloned()
                .collect();
            measure::many_conns(&mut results, s, &servers, files).await;
        }
        let caches = rotated(&lab.caches, round);
        if s.runs("layers") {
            if which("skopeo").is_some() {
                layers::run(&mut results, s.layers, &lab, &caches, round).await;
            } else if round == 0 {
                println!("SKIPPED layers: `skopeo` not found on PATH (Debian package skopeo)");
            }
        }
        let mut fetched = Vec::new();
        if s.runs("cold") {
            let cold = measure::cold(&mut results, s, &lab, &caches).await;
            fetched.push(cold.context("push a cold blob to the upstream")?);
        }
        let mut herds = Vec::new();
        if s.runs("herd") {
            let run = measure::herds(&mut results, s, &lab, &caches).await;
            herds = run.context("push a herd blob to the upstream")?;
        }
        // Copies a cache committed after its measurement ended go too.
        lab.upstream.settle_log().await;
        for digest in fetched.iter().chain(herds.iter().map(|h| &h.2)) {
            lab.forget(digest);
        }
        lab.truncate_logs();
        herd_blobs.extend(herds);
    }
    lab.upstream.settle_log().await;
    for (n, column, digest) in &herd_blobs {
        let gets = lab.upstream.blob_get_count(digest) as f64;
        results.add(&format!("herd {n} upstream GETs"), "count", column, gets);
    }
    for ((name, procs), before) in processes.iter().zip(&cpu_before) {
        let (column, prefix) = match *name {
            "regcache TLS" => (REGCACHE, "TLS instance "),
            column => (column, ""),
        };
        let rss = procs.peak_rss_mib();
        results.add(&format!("{prefix}peak RSS (VmHWM)"), "MiB", column, rss);
        let cpu = procs.cpu_secs() - before;
        results.add(&format!("{prefix}CPU in all rounds"), "s", column, cpu);
    }
    drop(lab);

    let checks = report::checks(
        &results,
        &report::Targets {
            hit_clients: &s.hit_clients,
            herd: &s.herd_clients,
            conns: s.conns,
            many_conns: s.many_conns,
            layers: s.layers.rows(),
        },
    );
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_after = loadavg();
    println!(
        "\ncompare: {date}, {nproc} cores ({}), load average {load_before} before, \
         {load_after} after; {:.0} s",
        cpu_model(),
        started.elapsed().as_secs_f64()
    );
    println!("{}", results.table());
    println!("targets (medians; not assertions):");
    for c in &checks {
        let verdict = match c.met {
            Some(true) => "ok",
            Some(false) => "MISS",
            None => "note",
        };
        println!(
            "  {verdict:4}  {:64} {:>9.3}  (target {})",
            c.what, c.value, c.target
        );
    }
    println!(
        "  note  peak RSS <= 50 MiB serving 1 GiB to 16 clients: see `cargo bench --bench load`"
    );
    println!("  note  herd times include every client hashing its whole body on the same cores");

    let meta = serde_json::json!({
        "date": date,
        "machine": {
            "nproc": nproc, "cpu": cpu_model(),
            "loadavg_before": load_before, "loadavg_after": load_after,
        },
        "regcache_commit": first_line(
            "git", &["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short", "HEAD"]),
        "regcache_build": profile,
        "peers": {
            "docker-registry": first_line("docker-registry", &["--version"]),
            "nginx": first_line("nginx", &["-v"]),
            "wrk": first_line("wrk", &["-v"]),
            "curl": first_line("curl", &["--version"]),
        },
        "settings": {
            "rounds": s.rounds, "blob_mib": mib, "hit_clients": s.hit_clients,
            "herd_clients": s.herd_clients, "manifest_conns": s.conns,
            "manifest_secs": s.wrk_secs, "full": s.full, "only": s.only,
            "many_conns": s.many_conns, "open_files": files,
            "layers": s.layers.layers, "layer_bytes": [s.layers.min, s.layers.max],
            "layer_pullers": s.layers.clients,
            "regcache_max_size": report::REGCACHE_MAX_SIZE,
        },
        "seconds": started.elapsed().as_secs_f64(),
    });
    let out = results_dir();
    fs::create_dir_all(&out)?;
    let (json_path, svg_path) = if s.full {
        let stamp = date.replace(':', "-");
        let json = out.join(format!("compare-{stamp}.json"));
        (json, out.join("compare.svg"))
    } else {
        (
            out.join("compare-smoke.json"),
            out.join("compare-smoke.svg"),
        )
    };
    let json = results.json(meta, &checks);
    fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")?;
    let title = format!(
        "Cache hits: {mib:.0} MiB blob, {nproc} cores, {}{}",
        &date[..10],
        if s.full { "" } else { ", smoke run" }
    );
    fs::write(&svg_path, results.svg(&s.hit_clients, &title))?;
    println!(
        "compare: wrote {} and {}",
        json_path.display(),
        svg_path.display()
    );
    Ok(())
}

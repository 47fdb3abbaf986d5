//! Fleet bench: three real `regcache` replicas on one SeaweedFS bucket in front of a real
//! `docker-registry`, against one replica alone and three replicas without `[fleet]`.
//!
//! - Cold herd: 96 clients (32 per replica) pull one cold 256 MiB blob: wall time, upstream
//!   GETs and bytes, bytes written to the store. The same herd on one replica alone and on
//!   three replicas without `[fleet]` (on fresh blobs of the same size).
//! - Hits: warm blob GETs (1 MiB) and manifest GETs by tag on one replica, `[fleet]` on vs
//!   off, as requests per second from 16 keep-alive clients.
//!
//! `cargo bench --bench fleet` runs the full sizes and writes the table and the raw numbers
//! to `<target>/bench-results/fleet.md` (the README quotes that file). Under
//! `cargo test --benches` it runs once at a small size (8 MiB, 12 clients) as a smoke test
//! and writes `fleet-smoke.md`. Where SeaweedFS, the registry or nginx cannot start, it
//! prints `SKIPPED` and succeeds. Numbers are reported, never asserted.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use support::fleet::{Fleet, Lane, REPO, Replica, ReplicaSpec, blob_of, metric_total_of};
use tokio::sync::Barrier;

/// Sizes of one run.
struct Settings {
    full: bool,
    blob: usize,
    clients: usize,
    hit_requests: usize,
}

impl Settings {
    fn new(full: bool) -> Settings {
        if full {
            Settings {
                full,
                blob: 256 << 20,
                clients: 96,
                hit_requests: 20_000,
            }
        } else {
            Settings {
                full,
                blob: 8 << 20,
                clients: 12,
                hit_requests: 400,
            }
        }
    }
}

/// Turns of the hit rows (off, then on, each turn); each side's best is kept.
const HIT_TURNS: usize = 3;

/// Every limit the bench's own load would hit: many clients from one address.
const LIMITS: &str = "[limits]\ndownloads_per_client = 10000\n";

fn main() -> ExitCode {
    let s = Settings::new(std::env::args().any(|a| a == "--bench"));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleet bench: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&s)) {
        Ok(Outcome::Done(file)) => {
            println!("fleet bench: results in {}", file.display());
            ExitCode::SUCCESS
        }
        Ok(Outcome::Skipped(why)) => {
            println!("SKIPPED fleet bench: {why}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleet bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

enum Outcome {
    Done(PathBuf),
    Skipped(String),
}

/// One herd's figures.
struct Herd {
    name: &'static str,
    wall: Duration,
    upstream_gets: usize,
    upstream_bytes: u64,
    store_written: f64,
}

/// One hit row's figures.
struct Hits {
    name: String,
    off: f64,
    on: f64,
}

async fn run(s: &Settings) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let mut fleet = match Fleet::start(Lane::Seaweed, Duration::from_secs(15)).await {
        Ok(f) => f,
        Err(skip) => return Ok(Outcome::Skipped(skip.reason)),
    };
    let mut spec = fleet.spec();
    spec.extra = LIMITS.to_string();
    for _ in 0..3 {
        fleet
            .add_replica_with(&spec)
            .await
            .context("fleet replica")?;
    }
    let mut plain = ReplicaSpec::new(&fleet.upstream.url(), None);
    plain.extra = LIMITS.to_string();
    let seeds = [101u64, 102, 103];
    let mut digests = Vec::new();
    for seed in seeds {
        let data = blob_of(s.blob, seed);
        digests.push(fleet.upstream.push_blob(REPO, data).await?);
    }

    // 1. The fleet: 3 replicas, one bucket.
    let urls: Vec<String> = fleet.replicas.iter().map(|r| r.url()).collect();
    let wall = herd(&urls, &digests[0], s.clients, s.blob).await?;
    // The upload to tier 2 runs after the clients are served: wait for the blob's key.
    let key = fleet.key(&format!(
        "blobs/sha256/{}",
        digests[0].trim_start_matches("sha256:")
    ));
    let uploaded = support::fleet::wait_until(Duration::from_secs(300), || async {
        fleet
            .s3
            .list(&fleet.bucket, &key)
            .await
            .is_ok_and(|keys| keys.contains(&key))
    })
    .await;
    if !uploaded {
        bail!("{key} not in the store 300 s after the herd");
    }
    let written = metric_total_of(
        &fleet.replicas,
        "regcache_fleet_store_bytes_total",
        &[("direction", "write")],
    )
    .await;
    let fleet_herd = Herd {
        name: "3 replicas, `[fleet]` on",
        wall,
        upstream_gets: fleet.upstream.blob_gets(&digests[0]).len(),
        upstream_bytes: fleet.upstream.relay.bytes("GET", &digests[0]),
        store_written: written,
    };

    // 2. One replica alone (the herd today's single node takes).
    let single = Replica::start("single", &plain).await?;
    let wall = herd(&[single.url()], &digests[1], s.clients, s.blob).await?;
    let single_herd = Herd {
        name: "1 replica",
        wall,
        upstream_gets: fleet.upstream.blob_gets(&digests[1]).len(),
        upstream_bytes: fleet.upstream.relay.bytes("GET", &digests[1]),
        store_written: 0.0,
    };

    // 3. Three replicas without `[fleet]` behind the same spread.
    let mut alone = Vec::new();
    for i in 0..3 {
        alone.push(Replica::start(&format!("alone{i}"), &plain).await?);
    }
    let urls: Vec<String> = alone.iter().map(|r| r.url()).collect();
    let wall = herd(&urls, &digests[2], s.clients, s.blob).await?;
    let alone_herd = Herd {
        name: "3 replicas, `[fleet]` off",
        wall,
        upstream_gets: fleet.upstream.blob_gets(&digests[2]).len(),
        upstream_bytes: fleet.upstream.relay.bytes("GET", &digests[2]),
        store_written: 0.0,
    };
    drop(alone);

    // 4. Hits on one replica, fleet on (r0 of the fleet) vs off (the single replica).
    let small = blob_of(1 << 20, 104);
    let small_digest = fleet.upstream.push_blob(REPO, small).await?;
    let manifest = push_image(&fleet).await?;
    let on = &fleet.replicas[0];
    let blob_path = format!("/v2/{REPO}/blobs/{small_digest}");
    let manifest_path = format!("/v2/{REPO}/manifests/1");
    let mut hits = Vec::new();
    // Manifests take ten times the requests, so each measurement lasts seconds like the
    // blob's rather than a fraction of one (at 0.4 s, runs differed by 10% either way).
    for (name, path, requests) in [
        ("warm blob GET (1 MiB)", &blob_path, s.hit_requests),
        ("manifest GET by tag", &manifest_path, s.hit_requests * 10),
    ] {
        // Warm both, then measure off, on, three times in turn and keep each side's best.
        for url in [single.url(), on.url()] {
            hit_rate(&url, path, 16, 32).await?;
        }
        let (mut off, mut on_rate) = (0f64, 0f64);
        for _ in 0..HIT_TURNS {
            off = off.max(hit_rate(&single.url(), path, 16, requests).await?);
            on_rate = on_rate.max(hit_rate(&on.url(), path, 16, requests).await?);
        }
        hits.push(Hits {
            name: format!("{name}, {requests} requests"),
            off,
            on: on_rate,
        });
    }
    let _ = manifest;

    let file = write_results(s, &[fleet_herd, single_herd, alone_herd], &hits, started)?;
    Ok(Outcome::Done(file))
}

/// `clients` pulls of `digest` spread round robin over `urls`, released together; returns
/// the wall time until the last body ends. The first client of each replica hashes its
/// body; every client checks its length.
async fn herd(
    urls: &[String],
    digest: &str,
    clients: usize,
    size: usize,
) -> anyhow::Result<Duration> {
    let start = Arc::new(Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let url = format!("{}/v2/{REPO}/blobs/{digest}", urls[c % urls.len()]);
        let (start, digest) = (start.clone(), digest.to_string());
        let verify = c < urls.len();
        tasks.push(tokio::spawn(async move {
            let client = support::fleet::client();
            start.wait().await;
            let resp = client.get(&url).send().await?;
            if resp.status() != 200 {
                bail!("{url}: {}", resp.status());
            }
            let mut body = resp.bytes_stream();
            let mut n = 0usize;
            let mut h = verify.then(Sha256::new);
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                n += chunk.len();
                if let Some(h) = h.as_mut() {
                    h.update(&chunk);
                }
            }
            if n != size {
                bail!("{url}: {n} bytes, want {size}");
            }
            if let Some(h) = h {
                let got = format!("sha256:{}", hex::encode(h.finalize()));
                if got != digest {
                    bail!("{url}: body hashes to {got}");
                }
            }
            Ok(())
        }));
    }
    start.wait().await;
    let t = Instant::now();
    for task in tasks {
        task.await??;
    }
    Ok(t.elapsed())
}

/// Requests per second for `total` GETs of `path` on `base` from `workers` keep-alive
/// clients.
async fn hit_rate(base: &str, path: &str, workers: usize, total: usize) -> anyhow::Result<f64> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(workers)
        .build()?;
    let left = Arc::new(AtomicU64::new(total as u64));
    let url = format!("{base}{path}");
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, left, url) = (client.clone(), left.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let r = client
                    .get(&url)
                    .header("accept", support::image::OCI_MANIFEST)
                    .send()
                    .await?;
                if r.status() != 200 {
                    bail!("{url}: {}", r.status());
                }
                r.bytes().await?;
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

/// Pushes a small image (config, one layer, an OCI manifest tagged `1`) straight to the
/// upstream; returns the manifest digest.
async fn push_image(fleet: &Fleet) -> anyhow::Result<String> {
    let config = Bytes::from_static(
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    );
    let layer = blob_of(4096, 105);
    let config_digest = fleet.upstream.push_blob(REPO, config.clone()).await?;
    let layer_digest = fleet.upstream.push_blob(REPO, layer.clone()).await?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": support::image::OCI_MANIFEST,
        "config": {"mediaType": support::image::OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": support::image::OCI_LAYER_GZIP, "digest": layer_digest, "size": layer.len()}],
    });
    fleet
        .upstream
        .push_manifest(
            REPO,
            "1",
            support::image::OCI_MANIFEST,
            Bytes::from(serde_json::to_vec(&manifest)?),
        )
        .await
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn write_results(
    s: &Settings,
    herds: &[Herd],
    hits: &[Hits],
    started: Instant,
) -> anyhow::Result<PathBuf> {
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# regcache fleet bench, {date}\n\n{} clients on one cold {} MiB blob; SeaweedFS 4.48 \
         (`weed mini`), docker-registry 2.8 upstream, all on loopback; {profile} build; \
         load average before: {}.\n",
        s.clients,
        s.blob >> 20,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(
        md,
        "| cold herd | wall time | upstream GETs | upstream MiB | MiB written to the store |\n|---|---:|---:|---:|---:|"
    );
    for h in herds {
        let _ = writeln!(
            md,
            "| {} | {:.2} s | {} | {:.0} | {:.0} |",
            h.name,
            h.wall.as_secs_f64(),
            h.upstream_gets,
            mib(h.upstream_bytes),
            h.store_written / (1 << 20) as f64
        );
    }
    let _ = writeln!(
        md,
        "\n| hits on one replica (16 keep-alive clients, best of {HIT_TURNS}) | `[fleet]` off | `[fleet]` on | on / off |\n|---|---:|---:|---:|"
    );
    for h in hits {
        let _ = writeln!(
            md,
            "| {} | {:.0} req/s | {:.0} req/s | {:.3} |",
            h.name,
            h.off,
            h.on,
            h.on / h.off
        );
    }
    let _ = writeln!(
        md,
        "\nBench run took {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    let dir = results_dir();
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(if s.full { "fleet.md" } else { "fleet-smoke.md" });
    std::fs::write(&file, &md)?;
    print!("{md}");
    Ok(file)
}

/// `<target dir>/bench-results`: `CARGO_TARGET_DIR`, else three levels above this executable
/// (`<target>/<profile>/deps/fleet-…`).
fn results_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| Path::new(env!("CARGO_MANIFEST_DIR")).join(d))
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|e| e.ancestors().nth(3).map(Path::to_path_buf))
        })
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench-results")
}

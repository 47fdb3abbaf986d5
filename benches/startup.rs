//! Start-up time with a large cache: `App::new` on a cache folder holding 100,000 blobs (and
//! some stale temp files) must not read or list the blobs. `cargo bench --bench startup`
//! runs 100,000 entries; under `cargo test --benches` a smoke size. Override with
//! `REGCACHE_BENCH_ENTRIES`.

use std::time::{Duration, Instant};

use regcache::app::App;
use regcache::config::Config;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let entries: usize = std::env::var("REGCACHE_BENCH_ENTRIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if full { 100_000 } else { 2_000 });
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    let made = Instant::now();
    for i in 0..entries {
        let hex = format!(
            "{:064x}",
            (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
        );
        let d = cache.join("blobs/sha256").join(&hex[..2]);
        if i < 256 || !d.exists() {
            std::fs::create_dir_all(&d).expect("mkdir");
        }
        std::fs::write(d.join(&hex), b"x").expect("write");
    }
    std::fs::create_dir_all(cache.join("tmp")).expect("mkdir tmp");
    println!(
        "startup: made {entries} cache entries in {:.1} s",
        made.elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut times: Vec<Duration> = Vec::new();
    for _ in 0..7 {
        // Each start finds a few unfinished downloads to clear, as after a crash.
        for j in 0..10 {
            std::fs::write(cache.join(format!("tmp/stale-{j}.part")), b"partial").expect("write");
        }
        let cfg = Config {
            cache_dir: cache.clone(),
            ..Config::default()
        }
        .validate()
        .expect("config");
        let started = Instant::now();
        let app = rt.block_on(App::new(cfg)).expect("start");
        times.push(started.elapsed());
        drop(app);
    }
    times.sort();
    println!(
        "startup: App::new with {entries} cached blobs: median {:.2} ms, max {:.2} ms (7 runs)",
        times[3].as_secs_f64() * 1e3,
        times[6].as_secs_f64() * 1e3
    );
}

//! End-to-end load bench: the real `regcache` binary as a child process in front of a
//! generating upstream, N clients pulling one large blob cold (single flight) and warm (from
//! disk). Reports throughput, upstream GETs and the proxy's peak resident memory.
//!
//! `cargo bench --bench load` runs 1 GiB × 16 clients; under `cargo test --benches` it runs a
//! small smoke size. Override with `REGCACHE_BENCH_BYTES` and `REGCACHE_BENCH_CLIENTS`.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest as _, Sha256};

const BLOCK: usize = 1 << 20;

/// Block `i` of the generated blob: a fixed random megabyte stamped with its index.
fn block(base: &[u8], i: u64, len: usize) -> Bytes {
    let mut b = base[..len].to_vec();
    let stamp = i.to_le_bytes();
    let n = stamp.len().min(len);
    b[..n].copy_from_slice(&stamp[..n]);
    Bytes::from(b)
}

fn blocks(size: u64) -> impl Iterator<Item = (u64, usize)> {
    let n = size.div_ceil(BLOCK as u64);
    (0..n).map(move |i| (i, (size - i * BLOCK as u64).min(BLOCK as u64) as usize))
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn round(
    client: &reqwest::Client,
    url: &str,
    clients: usize,
    digest: &str,
    size: u64,
) -> Duration {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, url, digest) = (client.clone(), url.to_owned(), digest.to_owned());
        tasks.push(tokio::spawn(async move {
            let r = client.get(&url).send().await.expect("request");
            assert_eq!(r.status(), 200);
            let mut s = r.bytes_stream();
            let mut n = 0u64;
            // Client 0 verifies the digest; the rest count bytes, so the bench measures the
            // proxy rather than 16 hashers sharing two cores.
            let mut h = (c == 0).then(Sha256::new);
            while let Some(chunk) = s.next().await {
                let chunk = chunk.expect("body");
                n += chunk.len() as u64;
                if let Some(h) = h.as_mut() {
                    h.update(&chunk);
                }
            }
            assert_eq!(n, size, "client {c} got a short body");
            if let Some(h) = h {
                assert_eq!(format!("sha256:{}", hex::encode(h.finalize())), digest);
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    started.elapsed()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let size: u64 = std::env::var("REGCACHE_BENCH_BYTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if full { 1 << 30 } else { 16 << 20 });
    let clients: usize = std::env::var("REGCACHE_BENCH_CLIENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(size, clients));
}

async fn run(size: u64, clients: usize) {
    let base: Arc<Vec<u8>> = Arc::new(
        (0..BLOCK)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect(),
    );
    let mut h = Sha256::new();
    for (i, len) in blocks(size) {
        h.update(block(&base, i, len));
    }
    let digest = format!("sha256:{}", hex::encode(h.finalize()));

    // The generating upstream: streams the blob block by block, never whole.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let up_addr = listener.local_addr().expect("addr");
    let upstream_gets = Arc::new(AtomicU64::new(0));
    {
        let (base, gets) = (base.clone(), upstream_gets.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let (base, gets) = (base.clone(), gets.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let base = base.clone();
                        let is_blob = req.uri().path().contains("/blobs/");
                        if is_blob && req.method() == hyper::Method::GET {
                            gets.fetch_add(1, Ordering::SeqCst);
                        }
                        async move {
                            let stream =
                                futures_util::stream::iter(blocks(size)).map(move |(i, len)| {
                                    Ok::<_, Infallible>(Frame::data(block(&base, i, len)))
                                });
                            let mut r =
                                hyper::Response::new(BodyExt::boxed(StreamBody::new(stream)));
                            r.headers_mut().insert("content-length", size.into());
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bench.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ncache_dir = \"{}\"\ndefault_upstream = \"up\"\n[limits]\ndownloads_per_client = 10000\n[[upstream]]\nname = \"up\"\nurl = \"http://{up_addr}\"\n",
            dir.path().join("cache").display()
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args([
            "--config",
            cfg.to_str().expect("utf-8 path"),
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start regcache");
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let listen = loop {
        let line = lines
            .next()
            .expect("regcache exited before it was ready")
            .expect("read");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "regcache ready" {
            break v["listen"].as_str().expect("listen field").to_owned();
        }
    };
    // Drain the log so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    let done = Arc::new(AtomicBool::new(false));
    let max_rss = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, max_rss) = (done.clone(), max_rss.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if let Some(kib) = status_kib(pid, "VmRSS:") {
                    max_rss.fetch_max(kib, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let url = format!("http://{listen}/v2/bench/blob/blobs/{digest}");
    let cold = round(&client, &url, clients, &digest, size).await;
    let warm = round(&client, &url, clients, &digest, size).await;
    let hwm = status_kib(pid, "VmHWM:").unwrap_or(0);
    done.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    let _ = child.kill();
    let _ = child.wait();

    let mib = |b: f64| b / (1024.0 * 1024.0);
    let total = size as f64 * clients as f64;
    println!("load: blob {:.0} MiB x {clients} clients", mib(size as f64));
    println!(
        "load: cold (single flight) {:.2} s, {:.0} MiB/s delivered in all",
        cold.as_secs_f64(),
        mib(total) / cold.as_secs_f64()
    );
    println!(
        "load: warm (from disk)     {:.2} s, {:.0} MiB/s delivered in all",
        warm.as_secs_f64(),
        mib(total) / warm.as_secs_f64()
    );
    println!(
        "load: upstream blob GETs   {}",
        upstream_gets.load(Ordering::SeqCst)
    );
    println!(
        "load: regcache peak RSS    {:.1} MiB (VmHWM), {:.1} MiB max sampled VmRSS",
        hwm as f64 / 1024.0,
        max_rss.load(Ordering::SeqCst) as f64 / 1024.0
    );
    assert_eq!(
        upstream_gets.load(Ordering::SeqCst),
        1,
        "single flight broken"
    );
}

//! Owns the measurements of one round, each server in turn: cache-hit throughput (plain and
//! TLS) with CPU per GiB, manifest request rates (32 connections, and thousands at once with
//! the server's memory), a cold miss with its CPU beside the floor of the work it needs, the
//! thundering herd. A failed measurement is recorded as such and the run goes on.

use crate::Settings;
use crate::clients;
use crate::lab::{Lab, Server};
use crate::report::{COLD_CPU_FLOOR, DIRECT, REGCACHE, Results, hit_cpu_row, hit_row};
use crate::servers::Procs;

const MIB: f64 = 1024.0 * 1024.0;

/// Manifest rows: (row name, `HEAD`?, by tag?).
pub const MANIFEST_KINDS: [(&str, bool, bool); 4] = [
    ("manifest GET by digest", false, false),
    ("manifest GET by tag", false, true),
    ("manifest HEAD by digest", true, false),
    ("manifest HEAD by tag", true, true),
];

/// `v` rotated left by `by`, so each round starts with another server.
pub fn rotated<T: Clone>(v: &[T], by: usize) -> Vec<T> {
    let mut v = v.to_vec();
    if !v.is_empty() {
        let k = by % v.len();
        v.rotate_left(k);
    }
    v
}

/// Cache-hit blob throughput and the server's CPU seconds per GiB served, for each client
/// count, `curl` processes all downloading the image's blob (`tls`: over HTTPS). CPU per GiB
/// is also pooled over the client counts: a single 1-client run of a small blob can be
/// shorter than the 10 ms tick of `/proc/<pid>/stat`.
pub async fn hits(results: &mut Results, s: &Settings, lab: &Lab, servers: &[Server], tls: bool) {
    let prefix = if tls { "TLS hit" } else { "hit" };
    let ca = tls.then_some(lab.cert.as_path());
    // Per server: CPU seconds and GiB served over all client counts of this round.
    let mut pooled = vec![(0.0, 0.0); servers.len()];
    for &n in &s.hit_clients {
        let row = hit_row(prefix, n);
        for (srv, pool) in servers.iter().zip(pooled.iter_mut()) {
            let url = format!("{}/v2/bench/hit/blobs/{}", srv.url, lab.image.blob);
            let cpu_before = srv.procs.map(Procs::cpu_secs);
            let clients_before = crate::servers::finished_children_cpu_secs();
            match clients::curl_parallel(&url, n, lab.image.size, ca).await {
                Ok(t) => {
                    let bytes = n as f64 * lab.image.size as f64;
                    results.add(&row, "MiB/s", srv.column, bytes / MIB / t.as_secs_f64());
                    // The curl processes' own CPU: on two cores, what the clients need
                    // bounds what any server can reach.
                    let clients = crate::servers::finished_children_cpu_secs() - clients_before;
                    let gib = bytes / (1024.0 * MIB);
                    results.add(
                        &format!("{row} curl CPU"),
                        "s/GiB",
                        srv.column,
                        clients / gib,
                    );
                    if let (Some(p), Some(before)) = (srv.procs, cpu_before) {
                        let (cpu, gib) = (p.cpu_secs() - before, bytes / (1024.0 * MIB));
                        results.add(&format!("{row} CPU"), "s/GiB", srv.column, cpu / gib);
                        pool.0 += cpu;
                        pool.1 += gib;
                    }
                }
                Err(e) => results.fail(&row, "MiB/s", srv.column, format!("{e:#}")),
            }
        }
    }
    for (srv, (cpu, gib)) in servers.iter().zip(pooled) {
        if gib > 0.0 {
            results.add(&hit_cpu_row(prefix), "s/GiB", srv.column, cpu / gib);
        }
    }
}

/// Manifest request rate and latency, by digest and by tag: `GET` with wrk, `HEAD` with
/// [`clients::head_load`].
pub async fn manifests(results: &mut Results, s: &Settings, lab: &Lab, servers: &[Server]) {
    for (kind, head, by_tag) in MANIFEST_KINDS {
        let reference = if by_tag {
            "latest"
        } else {
            &lab.image.manifest
        };
        for srv in servers {
            let url = format!("{}/v2/bench/hit/manifests/{reference}", srv.url);
            let run = if head {
                clients::head_load(&url, s.conns, s.wrk_secs).await
            } else {
                clients::wrk(&url, s.conns, s.wrk_secs).await
            };
            match run {
                Ok(w) => {
                    results.add(kind, "req/s", srv.column, w.rps);
                    results.add(&format!("{kind} p50"), "ms", srv.column, w.p50_ms);
                    results.add(&format!("{kind} p99"), "ms", srv.column, w.p99_ms);
                    let errors = w.errors as f64;
                    results.add(&format!("{kind} errors"), "count", srv.column, errors);
                }
                Err(e) => results.fail(kind, "req/s", srv.column, format!("{e:#}")),
            }
        }
    }
}

/// The row names of the many-connections run with `conns` connections.
pub fn many_rows(conns: usize) -> [String; 5] {
    let kind = format!("manifest GET by tag, {conns} conns");
    [
        format!("{kind} p50"),
        format!("{kind} p99"),
        format!("{kind} errors"),
        format!("peak RSS during {conns} conns"),
        kind,
    ]
}

/// `conns` keep-alive connections at once (`wrk -t2`) asking for the manifest by tag for
/// `secs` seconds: requests per second, p50, p99, errors, and the server's peak resident
/// memory while they were open (`VmRSS` read every 50 ms). `files` is this process's open
/// file limit, which wrk and the servers inherit: with too few the run fails, saying so.
pub async fn many_conns(results: &mut Results, s: &Settings, servers: &[Server], files: u64) {
    let conns = s.many_conns;
    let [p50, p99, errors, rss, kind] = many_rows(conns);
    for srv in servers {
        // Each side holds one descriptor per connection, plus its own files and sockets.
        let needed = conns as u64 + 1024;
        if files < needed {
            let why = format!(
                "open file limit {files} < {needed}: raise it (`ulimit -n {needed}`, or prlimit)                  before the bench"
            );
            results.fail(&kind, "req/s", srv.column, why);
            continue;
        }
        let url = format!("{}/v2/bench/hit/manifests/latest", srv.url);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = srv.procs.map(|procs| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut peak = procs.rss_mib();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    peak = peak.max(procs.rss_mib());
                }
                peak
            })
        });
        let run = clients::wrk(&url, conns, s.wrk_secs).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match run {
            Ok(w) => {
                results.add(&kind, "req/s", srv.column, w.rps);
                results.add(&p50, "ms", srv.column, w.p50_ms);
                results.add(&p99, "ms", srv.column, w.p99_ms);
                results.add(&errors, "count", srv.column, w.errors as f64);
            }
            Err(e) => results.fail(&kind, "req/s", srv.column, format!("{e:#}")),
        }
        if let Some(Ok(peak)) = match sampler {
            Some(t) => Some(t.await),
            None => None,
        } {
            results.add(&rss, "MiB", srv.column, peak);
        }
    }
}

/// CPU seconds per GiB that a cold miss cannot go below on this machine: one SHA-256 pass
/// over the bytes and one copy of them (into fresh memory, 1 MiB at a time), timed on one
/// thread by its own CPU clock (`/proc/thread-self/schedstat`).
pub async fn cold_cpu_floor(bytes: u64) -> anyhow::Result<f64> {
    tokio::task::spawn_blocking(move || {
        use sha2::Digest as _;
        let data = crate::lab::random_blob(bytes);
        let mut copy = vec![0u8; data.len()];
        let cpu_ns = || -> anyhow::Result<u64> {
            let s = std::fs::read_to_string("/proc/thread-self/schedstat")?;
            let ns = s.split_whitespace().next().unwrap_or_default();
            Ok(ns.parse()?)
        };
        let before = cpu_ns()?;
        let mut h = sha2::Sha256::new();
        for (from, to) in data.chunks(1 << 20).zip(copy.chunks_mut(1 << 20)) {
            to.copy_from_slice(from);
            h.update(to);
        }
        std::hint::black_box(h.finalize());
        let secs = (cpu_ns()? - before) as f64 / 1e9;
        Ok(secs / (bytes as f64 / (1024.0 * MIB)))
    })
    .await?
}

/// One fresh blob, fetched from the upstream directly (which also puts it in the page cache
/// for everyone) and then once through each cache: total time, time to first byte, and the
/// wait between the last two body chunks (regcache holds the last byte back until the
/// download is verified and committed), and each cache's CPU seconds per GiB fetched, with
/// the floor of [`cold_cpu_floor`] beside it. Every copy is deleted afterwards; returns the
/// digest.
pub async fn cold(
    results: &mut Results,
    s: &Settings,
    lab: &Lab,
    caches: &[Server],
) -> anyhow::Result<String> {
    let digest = lab.push_fresh_blob("bench/cold", s.blob_bytes).await?;
    let direct = Server {
        column: DIRECT,
        url: lab.upstream.url(),
        procs: None,
    };
    let gib = s.blob_bytes as f64 / (1024.0 * MIB);
    for srv in std::iter::once(&direct).chain(caches) {
        let url = format!("{}/v2/bench/cold/blobs/{digest}", srv.url);
        let bearer = (srv.column == DIRECT).then_some(lab.pull.as_str());
        let cpu_before = srv.procs.map(Procs::cpu_secs);
        match clients::timed_get(&lab.http, &url, bearer, s.blob_bytes).await {
            Ok(t) => {
                if let (Some(p), Some(before)) = (srv.procs, cpu_before) {
                    let cpu = p.cpu_secs() - before;
                    results.add("cold miss CPU", "s/GiB", srv.column, cpu / gib);
                }
                results.add("cold miss", "s", srv.column, t.total.as_secs_f64());
                let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
                results.add("cold miss TTFB", "ms", srv.column, ms(t.first));
                results.add(
                    "cold miss last chunk wait",
                    "ms",
                    srv.column,
                    ms(t.last_gap),
                );
            }
            Err(e) => results.fail("cold miss", "s", srv.column, format!("{e:#}")),
        }
        lab.upstream.settle_log().await;
    }
    match cold_cpu_floor(s.blob_bytes).await {
        Ok(floor) => results.add(COLD_CPU_FLOOR, "s/GiB", REGCACHE, floor),
        Err(e) => results.fail(COLD_CPU_FLOOR, "s/GiB", REGCACHE, format!("{e:#}")),
    }
    lab.forget(&digest);
    Ok(digest)
}

/// For each herd size, `n` clients at once on one fresh blob per cache (each body's SHA-256
/// checked), then the same `n` clients again on the blob now cached (the floor of the first
/// run on this machine: the same bytes to the same clients, nothing fetched), deleted
/// afterwards. Returns (clients, column, digest) for counting the upstream GETs at the end,
/// once late fetches have finished.
pub async fn herds(
    results: &mut Results,
    s: &Settings,
    lab: &Lab,
    caches: &[Server],
) -> anyhow::Result<Vec<(usize, &'static str, String)>> {
    let mut fetched = Vec::new();
    for &n in &s.herd_clients {
        let row = format!("herd {n}");
        for srv in caches {
            let digest = lab.push_fresh_blob("bench/herd", s.blob_bytes).await?;
            let url = format!("{}/v2/bench/herd/blobs/{digest}", srv.url);
            match clients::herd(&lab.http, &url, n, &digest).await {
                Ok(t) => results.add(&row, "s", srv.column, t.as_secs_f64()),
                Err(e) => results.fail(&row, "s", srv.column, format!("{e:#}")),
            }
            let cached = format!("{row}, blob cached");
            match clients::herd(&lab.http, &url, n, &digest).await {
                Ok(t) => results.add(&cached, "s", srv.column, t.as_secs_f64()),
                Err(e) => results.fail(&cached, "s", srv.column, format!("{e:#}")),
            }
            results.reserve(&format!("{row} upstream GETs"), "count");
            lab.upstream.settle_log().await;
            lab.forget(&digest);
            fetched.push((n, srv.column, digest));
        }
    }
    Ok(fetched)
}

//! Owns the measurements of one round, each server in turn: cache-hit throughput (plain and
//! TLS) with CPU per GiB, manifest request rates, a cold miss, the thundering herd. A failed
//! measurement is recorded as such and the run goes on.

use crate::Settings;
use crate::clients;
use crate::lab::{Lab, Server};
use crate::report::{DIRECT, Results, hit_cpu_row, hit_row};
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

/// One fresh blob, fetched from the upstream directly (which also puts it in the page cache
/// for everyone) and then once through each cache: total time, time to first byte, and the
/// wait between the last two body chunks (regcache holds the last byte back until the
/// download is verified and committed). Every copy is deleted afterwards; returns the digest.
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
    for srv in std::iter::once(&direct).chain(caches) {
        let url = format!("{}/v2/bench/cold/blobs/{digest}", srv.url);
        let bearer = (srv.column == DIRECT).then_some(lab.pull.as_str());
        match clients::timed_get(&lab.http, &url, bearer, s.blob_bytes).await {
            Ok(t) => {
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

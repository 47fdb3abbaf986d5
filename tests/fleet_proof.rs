//! Owns the proof of fleet mode with real peers: three `regcache` replicas on one SeaweedFS
//! bucket in front of a real `docker-registry` (behind a counting, gated relay), on loopback.
//!
//! - 48 cold clients over 3 replicas: one upstream GET, every body right; then hits make no
//!   upstream and no store request, and a fourth, empty replica fills from the store alone.
//! - The leader SIGKILLed mid-fill (the upstream body held after K bytes): a follower takes
//!   over within `lease_ttl` + one renew period and resumes with `Range`; every client of
//!   the survivors gets the right body.
//! - The leader SIGSTOPped past `lease_ttl`, then SIGCONT: takeover, the old leader's renewal
//!   is refused, nothing corrupt anywhere.
//! - The store SIGKILLed: pulls go on (per-replica single flight), `/readyz` says degraded;
//!   the store back: one upstream GET per digest again.
//! - Tags fleet-wide: 24 clients over 3 replicas all past the tag TTL send one revalidation
//!   `HEAD` per TTL, and one `HEAD` finds a tag that moved.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::fleet::{
    Fleet, Lane, PullTask, Pulled, S3Server, assert_cache_verified, blob_of, wait_until,
};
use support::peers::require_peer;
use tokio::sync::Barrier;

const LEASE_TTL: Duration = Duration::from_millis(1500);
/// The SIGKILL proof's `lease_ttl`: its bound, `lease_ttl` + one renew period, leaves the
/// takeover's own requests (a lease read and swap, a tier-2 look, the upstream request) a
/// sixth of it beyond the worst expiry, half a second here.
const KILL_LEASE_TTL: Duration = Duration::from_secs(3);
const PULL_LIMIT: Duration = Duration::from_secs(60);

async fn fleet_of(n: usize) -> Result<Fleet, support::peers::Skip> {
    fleet_on(Lane::Seaweed, n).await
}

async fn fleet_on(lane: Lane, n: usize) -> Result<Fleet, support::peers::Skip> {
    fleet_with(lane, n, LEASE_TTL).await
}

async fn fleet_with(
    lane: Lane,
    n: usize,
    lease_ttl: Duration,
) -> Result<Fleet, support::peers::Skip> {
    let mut fleet = Fleet::start(lane, lease_ttl).await?;
    fleet.add_replicas(n).await.expect("replicas start");
    Ok(fleet)
}

/// Starts `per_replica` pulls of `digest` on each of the first `replicas` replicas, released
/// together.
fn herd(fleet: &Fleet, digest: &str, replicas: usize, per_replica: usize) -> Vec<PullTask> {
    let start = Arc::new(Barrier::new(replicas * per_replica));
    (0..replicas * per_replica)
        .map(|c| {
            let i = c % replicas;
            PullTask::spawn(fleet.blob_url(i, digest), i, Some(start.clone()))
        })
        .collect()
}

#[track_caller]
fn assert_right(pulled: &Pulled, digest: &str, len: usize, who: &str) {
    assert_eq!(
        (pulled.status, pulled.len, pulled.digest.as_str()),
        (200, len as u64, digest),
        "{who} got a wrong body"
    );
}

/// Waits until the fill of `digest` is committed fleet-wide: the blob is in tier 2 and its
/// lease is gone.
async fn wait_committed(fleet: &Fleet, digest: &str) {
    let done = wait_until(Duration::from_secs(30), || async {
        fleet.tier2_blob(digest).await.is_some() && fleet.lease(digest).await.is_none()
    })
    .await;
    assert!(
        done,
        "{digest}: tier-2 blob present {}, lease {:?}",
        fleet.tier2_blob(digest).await.is_some(),
        fleet.lease(digest).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_herd_one_upstream_get_then_hits_and_an_empty_replica_fill_from_the_store() {
    cold_herd_then_hits(Lane::Seaweed).await;
}

/// The same on the second lane: moto's S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_moto_s3_cold_herd_one_upstream_get_then_hits_and_an_empty_replica_fill_from_the_store()
{
    cold_herd_then_hits(Lane::Moto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_moto_s3_leader_sigkilled_mid_fill_a_follower_takes_over_and_resumes_with_range() {
    leader_sigkilled(Lane::Moto).await;
}

async fn cold_herd_then_hits(lane: Lane) {
    let mut fleet = require_peer!(fleet_on(lane, 3).await);
    let data = blob_of(4 << 20, 1);
    let digest = fleet
        .upstream
        .push_blob(support::fleet::REPO, data.clone())
        .await
        .unwrap();
    fleet.upstream.relay.clear();

    // 48 cold clients, 16 per replica, released together.
    let started = Instant::now();
    for (c, p) in herd(&fleet, &digest, 3, 16).into_iter().enumerate() {
        let r = p.replica;
        let pulled = p.finish(PULL_LIMIT).await.unwrap();
        assert_right(&pulled, &digest, data.len(), &format!("client {c} on r{r}"));
    }
    let gets = fleet.upstream.blob_gets(&digest);
    eprintln!(
        "48 clients over 3 replicas in {:?}: upstream blob GETs {}, upstream requests {:?}",
        started.elapsed(),
        gets.len(),
        fleet
            .upstream
            .relay
            .requests()
            .iter()
            .map(|s| format!("{} {} {}", s.method, s.path, s.status))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        gets.len(),
        1,
        "exactly one upstream GET of the blob fleet-wide"
    );
    assert_eq!(gets[0].bytes, data.len() as u64);
    wait_committed(&fleet, &digest).await;
    assert_eq!(
        fleet.tier2_blob(&digest).await.unwrap(),
        data,
        "tier 2 holds the verified bytes"
    );
    assert!(
        fleet
            .s3
            .open_uploads(&fleet.bucket)
            .await
            .unwrap()
            .is_empty()
    );
    let won = fleet
        .metric_total("regcache_fleet_leases_total", &[("result", "won")])
        .await;
    let followed = fleet
        .metric_total("regcache_fleet_leases_total", &[("result", "followed")])
        .await;
    let peer = fleet
        .metric_total(
            "regcache_fleet_peer_bytes_total",
            &[("direction", "received")],
        )
        .await;
    eprintln!(
        "leases won {won}, followed {followed}; peer bytes received {peer}; store {:?}",
        fleet.store_summary()
    );
    assert_eq!(won, 1.0, "one lease won fleet-wide");

    // Hits: every replica holds it locally now (followers staged what they streamed).
    for r in &fleet.replicas {
        assert_eq!(
            assert_cache_verified(&r.cache_dir()),
            1,
            "{} holds the blob",
            r.name
        );
    }
    fleet.store_relay.clear();
    fleet.upstream.relay.clear();
    let store_gets_before = fleet
        .metric_total("regcache_fleet_store_requests_total", &[("op", "get")])
        .await;
    let store_all_before = fleet
        .metric_total("regcache_fleet_store_requests_total", &[])
        .await;
    for p in herd(&fleet, &digest, 3, 4) {
        let r = p.replica;
        assert_right(
            &p.finish(PULL_LIMIT).await.unwrap(),
            &digest,
            data.len(),
            &format!("hit on r{r}"),
        );
    }
    let store_gets_after = fleet
        .metric_total("regcache_fleet_store_requests_total", &[("op", "get")])
        .await;
    let store_all_after = fleet
        .metric_total("regcache_fleet_store_requests_total", &[])
        .await;
    eprintln!(
        "12 hits: upstream requests {}, store requests seen {:?}, store GET metric {store_gets_before} -> {store_gets_after}, all ops {store_all_before} -> {store_all_after}",
        fleet.upstream.relay.requests().len(),
        fleet.store_summary()
    );
    assert_eq!(
        fleet.upstream.requests_for(&digest),
        0,
        "hits ask nothing upstream"
    );
    assert_eq!(
        fleet.store_count("GET", "blobs") + fleet.store_count("HEAD", "blobs"),
        0
    );
    assert_eq!(
        store_gets_after, store_gets_before,
        "the store-request metric saw no GET"
    );
    assert!(
        fleet
            .store_relay
            .requests()
            .iter()
            .all(|s| s.method != "GET" && s.method != "HEAD"),
        "no store read at all for local hits: {:?}",
        fleet.store_summary()
    );

    // A fourth replica with an empty disk: from tier 2, nothing upstream.
    let four = fleet.add_replica().await.unwrap();
    fleet.store_relay.clear();
    let pulled = PullTask::spawn(fleet.blob_url(four, &digest), four, None)
        .finish(PULL_LIMIT)
        .await
        .unwrap();
    assert_right(&pulled, &digest, data.len(), "the fourth replica");
    let tier2_reads = fleet.store_count("GET", "blobs");
    eprintln!(
        "fourth replica: upstream requests {}, store {:?}",
        fleet.upstream.requests_for(&digest),
        fleet.store_summary()
    );
    assert_eq!(
        fleet.upstream.requests_for(&digest),
        0,
        "the fourth replica never asked upstream"
    );
    assert_eq!(tier2_reads, 1, "one store read of the blob");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            assert_cache_verified(&fleet.replicas[four].cache_dir()) == 1
        })
        .await,
        "the fourth replica staged it to its own disk"
    );
    fleet.store_relay.clear();
    let again = PullTask::spawn(fleet.blob_url(four, &digest), four, None)
        .finish(PULL_LIMIT)
        .await
        .unwrap();
    assert_right(&again, &digest, data.len(), "the fourth replica's hit");
    assert_eq!(fleet.store_count("GET", "blobs"), 0, "then a local hit");
}

/// Holds the upstream body of `digest` after `k` bytes, starts 4 pulls per replica, and
/// returns them with the leader's index once the leader has passed `k` bytes to its
/// followers' clients.
async fn fill_held_mid_way(fleet: &mut Fleet, digest: &str, k: u64) -> (usize, Vec<PullTask>) {
    fleet.upstream.relay.hold_after(digest, k);
    let pulls = herd(fleet, digest, 3, 4);
    assert!(
        fleet
            .upstream
            .relay
            .wait_for(Duration::from_secs(30), |seen| seen
                .iter()
                .any(|s| s.path.contains(digest) && s.bytes >= k))
            .await,
        "the leader's upstream GET reached the gate: {:?}",
        fleet.upstream.relay.requests()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let lease = loop {
        if let Some(l) = fleet.lease(digest).await {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "a lease exists while the fill runs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let leader = fleet
        .holder(&lease)
        .unwrap_or_else(|| panic!("lease names a replica: {lease}"));
    eprintln!("lease while held: {lease}");
    // Followers stream while it downloads: their clients get (nearly) all K bytes.
    let slack = 512 << 10;
    let streamed = wait_until(Duration::from_secs(30), || {
        let ok = pulls
            .iter()
            .filter(|p| p.replica != leader)
            .all(|p| p.received() + slack >= k);
        async move { ok }
    })
    .await;
    let got: Vec<(usize, u64)> = pulls.iter().map(|p| (p.replica, p.received())).collect();
    assert!(
        streamed,
        "followers' clients stream the leader's first {k} bytes: {got:?}"
    );
    eprintln!("mid-fill, leader r{leader}; clients hold {got:?}");
    (leader, pulls)
}

/// Prints each replica's warnings and the lines that name `digest`, for a failure.
fn print_logs(fleet: &Fleet, digest: &str) {
    let hex = digest.trim_start_matches("sha256:");
    for r in &fleet.replicas {
        let lines: Vec<_> = r
            .output()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains(hex))
            .map(str::to_owned)
            .collect();
        eprintln!("{} log:\n{}", r.name, lines.join("\n"));
    }
    eprintln!("upstream: {:?}", fleet.upstream.blob_gets(digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_sigkilled_mid_fill_a_follower_takes_over_and_resumes_with_range() {
    leader_sigkilled(Lane::Seaweed).await;
}

async fn leader_sigkilled(lane: Lane) {
    let mut fleet = require_peer!(fleet_with(lane, 3, KILL_LEASE_TTL).await);
    // A layer's usual size. The upstream bytes counted include what the relay still writes
    // into the dead leader's socket once the gate opens (about 1 MiB on loopback) before
    // the kernel refuses it: a real upstream sends those too.
    let size = 64 << 20;
    let data = blob_of(size, 2);
    let digest = fleet
        .upstream
        .push_blob(support::fleet::REPO, data.clone())
        .await
        .unwrap();
    fleet.upstream.relay.clear();
    let k = 6 << 20;
    let (leader, pulls) = fill_held_mid_way(&mut fleet, &digest, k).await;

    let killed = Instant::now();
    fleet.replicas[leader].kill();
    fleet.upstream.relay.open_gate();
    for p in pulls {
        let r = p.replica;
        let result = p.finish(PULL_LIMIT).await;
        if r == leader {
            continue; // its clients lost their connection with it
        }
        let result = result.unwrap_or_else(|e| {
            print_logs(&fleet, &digest);
            panic!("a client of survivor r{r}: {e:#}")
        });
        assert_right(
            &result,
            &digest,
            size,
            &format!("a client of survivor r{r}"),
        );
    }
    let gets = fleet.upstream.blob_gets(&digest);
    let total: u64 = gets.iter().map(|g| g.bytes).sum();
    eprintln!(
        "upstream GETs after the kill: {:?}",
        gets.iter()
            .map(|g| (g.range.clone(), g.bytes, g.status))
            .collect::<Vec<_>>()
    );
    assert_eq!(gets.len(), 2, "the first fetch and one resumed range");
    assert_eq!(gets[0].range, None);
    let resumed_from: u64 = gets[1]
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the takeover resumes with Range: bytes=N-: {:?}", gets[1]));
    assert!(
        resumed_from > 0 && resumed_from <= k,
        "resumed from {resumed_from}"
    );
    assert!(
        total as f64 <= 1.05 * size as f64,
        "upstream bytes {total} ≤ 1.05 × {size}"
    );
    // Takeover counted until the resumed request reaches the upstream: the lease swapped,
    // tier 2 looked at, the upstream asked.
    let takeover = gets[1].at.saturating_duration_since(killed);
    let bound = KILL_LEASE_TTL + KILL_LEASE_TTL / 3;
    eprintln!(
        "takeover {takeover:?} after the SIGKILL (bound: lease_ttl {KILL_LEASE_TTL:?} + one renew period {:?} = {bound:?}); resumed from byte {resumed_from} of {size}; upstream bytes {total} = {:.3} × blob",
        KILL_LEASE_TTL / 3,
        total as f64 / size as f64
    );
    assert!(
        takeover <= bound,
        "takeover took {takeover:?}, over {bound:?}"
    );
    assert_eq!(
        fleet
            .metric_total("regcache_fleet_leases_total", &[("result", "taken_over")])
            .await,
        1.0
    );
    wait_committed(&fleet, &digest).await;
    assert_eq!(fleet.tier2_blob(&digest).await.unwrap(), data);
    for (i, r) in fleet.replicas.iter().enumerate() {
        if i != leader {
            assert_eq!(assert_cache_verified(&r.cache_dir()), 1, "{}", r.name);
        }
    }
    // The dead leader's disk holds no partial blob as committed, and after a restart it
    // serves the right bytes (from its peers' work: tier 2), with nothing more upstream.
    assert_cache_verified(&fleet.replicas[leader].cache_dir());
    fleet.replicas[leader].restart().await.unwrap();
    let pulled = PullTask::spawn(fleet.blob_url(leader, &digest), leader, None)
        .finish(PULL_LIMIT)
        .await
        .unwrap();
    assert_right(&pulled, &digest, size, "the restarted leader");
    assert_eq!(fleet.upstream.blob_gets(&digest).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_paused_past_lease_ttl_loses_the_lease_and_corrupts_nothing() {
    let mut fleet = require_peer!(fleet_of(3).await);
    let size = 12 << 20;
    let data = blob_of(size, 3);
    let digest = fleet
        .upstream
        .push_blob(support::fleet::REPO, data.clone())
        .await
        .unwrap();
    fleet.upstream.relay.clear();
    let k = 4 << 20;
    let (leader, pulls) = fill_held_mid_way(&mut fleet, &digest, k).await;
    let refused_before = fleet.replicas[leader]
        .metric(
            "regcache_fleet_leases_total",
            &[("result", "renewal_refused")],
        )
        .await
        .unwrap();

    let paused = Instant::now();
    fleet.replicas[leader].pause();
    fleet.upstream.relay.open_gate();
    let took_over = fleet
        .upstream
        .relay
        .wait_for(LEASE_TTL * 4, |seen| {
            seen.iter()
                .any(|s| s.path.contains(&digest) && s.range.is_some())
        })
        .await;
    let waited = paused.elapsed();
    assert!(
        took_over,
        "a follower resumed upstream while the leader was stopped"
    );
    let lease = fleet.lease(&digest).await;
    eprintln!("resumed upstream {waited:?} after SIGSTOP; lease now {lease:?}");
    if let Some(l) = &lease {
        assert_ne!(
            fleet.holder(l),
            Some(leader),
            "the lease moved away from the paused leader"
        );
    }
    // Keep it stopped until the survivors' clients are done, then wake it.
    let mut leader_pulls = Vec::new();
    for p in pulls {
        if p.replica == leader {
            leader_pulls.push(p);
            continue;
        }
        let r = p.replica;
        assert_right(
            &p.finish(PULL_LIMIT).await.unwrap(),
            &digest,
            size,
            &format!("a client of r{r}"),
        );
    }
    eprintln!("survivors served after {:?}; SIGCONT", paused.elapsed());
    fleet.replicas[leader].resume();
    let refused = wait_until(Duration::from_secs(10), || async {
        fleet.replicas[leader]
            .metric(
                "regcache_fleet_leases_total",
                &[("result", "renewal_refused")],
            )
            .await
            .unwrap_or(0.0)
            > refused_before
    })
    .await;
    if !refused {
        for l in fleet.replicas[leader].log_lines("") {
            eprintln!("the woken leader's log: {l}");
        }
    }
    assert!(
        refused,
        "the woken leader's renewal is refused; its log: {:?}",
        fleet.replicas[leader].log_lines("lease")
    );
    // Its own clients complete, and with the right bytes (or fail; never wrong bytes).
    for p in leader_pulls {
        match p.finish(PULL_LIMIT).await {
            Ok(pulled) if pulled.status == 200 && pulled.len == size as u64 => {
                assert_eq!(pulled.digest, digest, "the old leader served wrong bytes")
            }
            other => eprintln!("a client of the old leader ended with {other:?}"),
        }
    }
    wait_committed(&fleet, &digest).await;
    assert_eq!(
        fleet.tier2_blob(&digest).await.unwrap(),
        data,
        "tier 2 is right"
    );
    for r in &fleet.replicas {
        assert_cache_verified(&r.cache_dir());
    }
    assert!(
        fleet.replicas[leader].is_running(),
        "the old leader did not crash"
    );
    let gets = fleet.upstream.blob_gets(&digest);
    eprintln!(
        "upstream GETs: {:?}",
        gets.iter()
            .map(|g| (g.range.clone(), g.bytes))
            .collect::<Vec<_>>()
    );
    let mut leases = Vec::new();
    for r in &fleet.replicas {
        let mut by = Vec::new();
        for result in ["won", "followed", "taken_over", "renewal_refused"] {
            let n = r
                .metric("regcache_fleet_leases_total", &[("result", result)])
                .await
                .unwrap_or(-1.0);
            by.push(format!("{result}={n}"));
        }
        leases.push(format!("{}: {}", r.name, by.join(" ")));
    }
    eprintln!("leases per replica: {leases:?}");
    assert!(
        gets.len() <= 2,
        "one fetch and one resumed range: {:?}; leases {leases:?}",
        gets.iter()
            .map(|g| (g.range.clone(), g.bytes))
            .collect::<Vec<_>>()
    );
    // And the old leader serves the blob correctly afterwards.
    let pulled = PullTask::spawn(fleet.blob_url(leader, &digest), leader, None)
        .finish(PULL_LIMIT)
        .await
        .unwrap();
    assert_right(&pulled, &digest, size, "the old leader afterwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_down_pulls_go_on_degraded_then_the_fleet_resumes() {
    let mut fleet = require_peer!(fleet_of(3).await);
    let blobs: Vec<_> = (0..3).map(|i| blob_of(1 << 20, 10 + i)).collect();
    let mut digests = Vec::new();
    for b in &blobs {
        digests.push(
            fleet
                .upstream
                .push_blob(support::fleet::REPO, b.clone())
                .await
                .unwrap(),
        );
    }
    for r in &fleet.replicas {
        let (status, body) = r.readyz().await.unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("fleet: ok"), "{}: {body}", r.name);
    }

    // Store down.
    let S3Server::Seaweed(weed) = &mut fleet.store else {
        unreachable!("fleet_of uses SeaweedFS")
    };
    weed.kill();
    for p in herd(&fleet, &digests[0], 3, 4) {
        let r = p.replica;
        assert_right(
            &p.finish(PULL_LIMIT).await.unwrap(),
            &digests[0],
            1 << 20,
            &format!("r{r} with the store down"),
        );
    }
    let gets = fleet.upstream.blob_gets(&digests[0]).len();
    eprintln!("store down: upstream GETs of the blob {gets} (per-replica single flight)");
    assert!(
        (1..=3).contains(&gets),
        "at most one upstream GET per replica: {gets}"
    );
    for r in &fleet.replicas {
        let degraded = wait_until(Duration::from_secs(15), || async {
            r.readyz()
                .await
                .is_ok_and(|(s, b)| s == 200 && b.contains("degraded: object store unreachable"))
        })
        .await;
        let (status, body) = r.readyz().await.unwrap();
        eprintln!("{} /readyz with the store down: {status} {body:?}", r.name);
        assert!(degraded, "{} says degraded and stays ready", r.name);
        assert_eq!(r.metric("regcache_fleet_store_up", &[]).await.unwrap(), 0.0);
        assert!(
            r.metric("regcache_fleet_degraded_transitions_total", &[])
                .await
                .unwrap()
                >= 1.0
        );
    }

    // Store back.
    let S3Server::Seaweed(weed) = &mut fleet.store else {
        unreachable!()
    };
    weed.restart().await.unwrap();
    for r in &fleet.replicas {
        let ok = wait_until(Duration::from_secs(30), || async {
            r.readyz()
                .await
                .is_ok_and(|(s, b)| s == 200 && b.contains("fleet: ok"))
        })
        .await;
        assert!(ok, "{} back in fleet mode: {:?}", r.name, r.readyz().await);
        assert_eq!(r.metric("regcache_fleet_store_up", &[]).await.unwrap(), 1.0);
        let lines = r.log_lines("degraded: object store unreachable");
        eprintln!("{} degraded log lines: {}", r.name, lines.len());
        assert_eq!(lines.len(), 1, "logged once per transition: {lines:?}");
    }
    for p in herd(&fleet, &digests[1], 3, 4) {
        let r = p.replica;
        assert_right(
            &p.finish(PULL_LIMIT).await.unwrap(),
            &digests[1],
            1 << 20,
            &format!("r{r} after the store came back"),
        );
    }
    let gets = fleet.upstream.blob_gets(&digests[1]).len();
    if gets != 1 {
        eprintln!("upstream GETs: {:?}", fleet.upstream.blob_gets(&digests[1]));
        let hex = digests[1].trim_start_matches("sha256:");
        for r in &fleet.replicas {
            let lines: Vec<_> = r
                .output()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains(hex))
                .map(str::to_owned)
                .collect();
            eprintln!("{} log:\n{}", r.name, lines.join("\n"));
        }
    }
    assert_eq!(gets, 1, "fleet mode again: one upstream GET fleet-wide");
    wait_committed(&fleet, &digests[1]).await;
}

/// The tags' TTL in the tag test: the store dates objects to the second, so an answer can
/// look up to a second older than it is.
const TAG_TTL: Duration = Duration::from_secs(3);
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// `per_replica` concurrent `GET`s of `REPO:tag` on each replica, released together; returns
/// the `Docker-Content-Digest` each got (after checking the status is 200).
async fn tag_herd(fleet: &Fleet, tag: &str, per_replica: usize) -> Vec<(usize, String)> {
    let n = fleet.replicas.len() * per_replica;
    let start = Arc::new(Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|c| {
            let i = c % fleet.replicas.len();
            let url = format!(
                "{}/v2/{}/manifests/{tag}",
                fleet.replicas[i].url(),
                support::fleet::REPO
            );
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let (status, digest) = support::fleet::replica::get_manifest(&url, OCI_MANIFEST)
                    .await
                    .expect("the replica answers");
                assert_eq!(status, 200, "r{i}");
                (i, digest)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("client task"));
    }
    out
}

/// The fleet's shared answer for `REPO:tag` as stored (one accept key is used here).
async fn shared_tag(fleet: &Fleet, tag: &str) -> Option<serde_json::Value> {
    let prefix = fleet.key(&format!("tags/up/{}/{tag}/", support::fleet::REPO));
    let keys = fleet.s3.list(&fleet.bucket, &prefix).await.ok()?;
    let key = keys.first()?;
    let o = fleet.s3.get(&fleet.bucket, key).await.ok()?;
    serde_json::from_slice(&o.body).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_past_the_tag_ttl_together_send_one_head_per_ttl() {
    let mut fleet = require_peer!(Fleet::start(Lane::Seaweed, LEASE_TTL).await);
    let mut spec = fleet.spec();
    spec.extra = format!("[cache]\ntag_ttl = \"{}ms\"\n", TAG_TTL.as_millis());
    for _ in 0..3 {
        fleet.add_replica_with(&spec).await.expect("replicas start");
    }
    let repo = support::fleet::REPO;
    let config = bytes::Bytes::from_static(b"{}");
    let config_d = fleet.upstream.push_blob(repo, config).await.unwrap();
    let manifest = |n: u32| {
        bytes::Bytes::from(format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_d}","size":2}},"layers":[],"annotations":{{"round":"{n}"}}}}"#
        ))
    };
    let d1 = fleet
        .upstream
        .push_manifest(repo, "v1", OCI_MANIFEST, manifest(1))
        .await
        .unwrap();
    fleet.upstream.relay.clear();
    let heads = |f: &Fleet| f.upstream.relay.count("HEAD", "/manifests/v1");
    let gets = |f: &Fleet| f.upstream.relay.count("GET", "/manifests/");

    // Cold: r0 resolves the tag; once its answer is shared, r1 and r2 take it.
    let (s, _) = fleet.replicas[0]
        .get_manifest(repo, "v1", OCI_MANIFEST)
        .await
        .unwrap();
    assert_eq!(s, 200);
    let shared = wait_until(Duration::from_secs(10), || async {
        shared_tag(&fleet, "v1")
            .await
            .is_some_and(|v| v["digest"] == d1.as_str())
    })
    .await;
    assert!(
        shared,
        "the answer is shared: {:?}",
        shared_tag(&fleet, "v1").await
    );
    // And the manifest itself (a separate upload), for the other replicas to take.
    let manifest_key = fleet.key(&format!("manifests/sha256/{}", &d1[7..]));
    let stored = wait_until(Duration::from_secs(10), || async {
        fleet
            .s3
            .get(&fleet.bucket, &manifest_key)
            .await
            .is_ok_and(|o| o.status == 200)
    })
    .await;
    assert!(stored, "the manifest reaches the shared tier");
    let mut answered = Instant::now();
    for r in &fleet.replicas[1..] {
        let (s, d) = r.get_manifest(repo, "v1", OCI_MANIFEST).await.unwrap();
        assert_eq!((s, d.as_str()), (200, d1.as_str()), "{}", r.name);
    }
    assert_eq!(
        (heads(&fleet), gets(&fleet)),
        (0, 1),
        "one cold GET fleet-wide"
    );

    // Past the TTL on every replica at once, twice: one HEAD fleet-wide each time.
    for round in 1..=2 {
        tokio::time::sleep_until((answered + TAG_TTL + Duration::from_millis(200)).into()).await;
        let got = tag_herd(&fleet, "v1", 8).await;
        answered = Instant::now();
        assert!(got.iter().all(|(_, d)| *d == d1), "round {round}: {got:?}");
        let stored = shared_tag(&fleet, "v1").await;
        eprintln!(
            "round {round}: upstream HEADs {}, GETs {}; shared answer {stored:?}",
            heads(&fleet),
            gets(&fleet)
        );
        assert_eq!(heads(&fleet), round, "one revalidation HEAD per TTL");
        assert_eq!(gets(&fleet), 1, "no manifest GET for a confirmed tag");
        let stored = stored.expect("a shared answer");
        assert_eq!(stored["digest"], d1.as_str());
        assert!(
            stored.get("checking").is_none(),
            "the check is over: {stored}"
        );
    }

    // The tag moves upstream: one HEAD finds it, every replica answers the new digest.
    let d2 = fleet
        .upstream
        .push_manifest(repo, "v1", OCI_MANIFEST, manifest(2))
        .await
        .unwrap();
    tokio::time::sleep_until((answered + TAG_TTL + Duration::from_millis(200)).into()).await;
    let got = tag_herd(&fleet, "v1", 8).await;
    assert!(got.iter().all(|(_, d)| *d == d2), "moved: {got:?}");
    eprintln!(
        "moved: upstream HEADs {}, GETs {}",
        heads(&fleet),
        gets(&fleet)
    );
    assert_eq!(heads(&fleet), 3, "one HEAD found the move");
    // The checker publishes the new digest before the manifest reaches the shared tier, so
    // each replica may fetch it (and, rarely, a client arriving just after its replica's
    // fetch ended, once more).
    assert!(
        gets(&fleet) <= 1 + 2 * fleet.replicas.len(),
        "a few GETs of the moved tag per replica at most"
    );
}

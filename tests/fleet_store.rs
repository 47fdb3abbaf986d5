//! Owns the object-store checks of fleet mode: the stores the tests run against really make
//! a create-only `PUT` (`If-None-Match: *`) and a compare-and-swap `PUT` (`If-Match`) atomic
//! under a 12-writer race (SeaweedFS 4.48 and moto), and regcache in fleet mode refuses to
//! start on a store that lets two racing creates win, naming the store.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use support::fleet::{
    Cond, Fleet, HttpRelay, Lane, PREFIX, Replica, ReplicaSpec, S3Client, S3Server, unique_bucket,
};
use support::peers::require_peer;
use tokio::sync::Barrier;

const WRITERS: usize = 12;

/// `WRITERS` PUTs of `key` released together, each with its own body (`<tag> writer <w>`)
/// and `cond`; returns `(writer, status)` for each.
///
/// Every body differs from every earlier one: S3 ETags of single-part objects are the MD5 of
/// the content, so a swap that wrote the bytes already there would leave the ETag unchanged
/// and a second `If-Match` on it would rightly win too.
async fn race(s3: &S3Client, bucket: &str, key: &str, tag: &str, cond: Cond) -> Vec<(usize, u16)> {
    let barrier = Arc::new(Barrier::new(WRITERS));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (s3, bucket, key, tag, cond, barrier) = (
            s3.clone(),
            bucket.to_string(),
            key.to_string(),
            tag.to_string(),
            cond.clone(),
            barrier.clone(),
        );
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let body = Bytes::from(format!("{tag} writer {w}"));
            (w, s3.put(&bucket, &key, body, cond).await.unwrap())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn conditional_writes_are_atomic(lane: Lane) {
    let store = require_peer!(S3Server::start(lane).await);
    let s3 = S3Client::new(&store.url());
    let bucket = unique_bucket("race");
    s3.create_bucket(&bucket).await.unwrap();
    for round in 0..rounds() {
        let key = format!("leases/sha256/race-{round}");
        let results = race(&s3, &bucket, &key, "create", Cond::Create).await;
        let winners: Vec<usize> = results
            .iter()
            .filter(|(_, s)| *s == 200)
            .map(|(w, _)| *w)
            .collect();
        let refused = results.iter().filter(|(_, s)| *s == 412).count();
        eprintln!("{lane:?} create round {round}: {results:?}");
        assert_eq!(
            winners.len(),
            1,
            "{lane:?}: exactly one create wins: {results:?}"
        );
        assert_eq!(
            refused,
            WRITERS - 1,
            "{lane:?}: the rest get 412: {results:?}"
        );
        let stored = s3.get(&bucket, &key).await.unwrap();
        assert_eq!(
            stored.body,
            Bytes::from(format!("create writer {}", winners[0])),
            "{lane:?}: the key holds the winner's body"
        );

        // Compare-and-swap on the ETag just read: again exactly one writer wins.
        let etag = stored.etag.clone().expect("ETag on GET");
        let results = race(&s3, &bucket, &key, "swap", Cond::Match(etag.clone())).await;
        let winners: Vec<usize> = results
            .iter()
            .filter(|(_, s)| *s == 200)
            .map(|(w, _)| *w)
            .collect();
        eprintln!("{lane:?} swap round {round} on {etag}: {results:?}");
        assert_eq!(
            winners.len(),
            1,
            "{lane:?}: exactly one swap wins: {results:?}"
        );
        assert_eq!(
            results.iter().filter(|(_, s)| *s == 412).count(),
            WRITERS - 1,
            "{lane:?}: {results:?}"
        );
        let after = s3.get(&bucket, &key).await.unwrap();
        assert_eq!(
            after.body,
            Bytes::from(format!("swap writer {}", winners[0]))
        );
        assert_ne!(
            after.etag,
            Some(etag),
            "{lane:?}: the swap changed the ETag"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seaweedfs_conditional_create_and_swap_are_atomic() {
    conditional_writes_are_atomic(Lane::Seaweed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_conditional_create_and_swap_are_atomic() {
    conditional_writes_are_atomic(Lane::Moto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_refuses_a_store_whose_conditional_create_is_not_atomic() {
    let fleet = require_peer!(Fleet::start(Lane::Seaweed, Duration::from_millis(1500)).await);
    // The same SeaweedFS behind a relay that drops `If-None-Match`: every create wins.
    let lax = HttpRelay::start(fleet.store.addr()).await.unwrap();
    lax.strip_request_header("if-none-match");
    let mut settings = fleet.settings();
    settings.endpoint = lax.url();
    let spec = ReplicaSpec::new(&fleet.upstream.url(), Some(settings.clone()));
    let failure = Replica::start_failing(&spec).await;
    let t0 = lax.requests().first().map(|s| s.at);
    for s in lax.requests() {
        eprintln!(
            "lax store saw {} {} {:?} -> {} after {:?}",
            s.method,
            s.path,
            s.if_none_match,
            s.status,
            t0.map(|t| s.at - t)
        );
    }
    let failure = failure.unwrap();
    eprintln!("refused as expected: {failure}");
    assert_eq!(
        failure.status.and_then(|s| s.code()),
        Some(2),
        "a refused store exits 2 like other configuration errors: {failure}"
    );
    let store = format!("s3://{}/{PREFIX}", fleet.bucket);
    assert!(
        failure.output.contains(&store),
        "the error names the store {store}: {failure}"
    );
    let probes: Vec<_> = lax
        .requests()
        .into_iter()
        .filter(|s| s.method == "PUT" && s.path.contains(&format!("/{PREFIX}/probe/")))
        .collect();
    assert!(
        probes.len() >= 2
            && probes
                .iter()
                .all(|p| p.if_none_match.as_deref() == Some("*")),
        "regcache raced at least two create-only PUTs on a probe key: {probes:?}"
    );
    assert!(
        probes.iter().filter(|p| p.status == 200).count() >= 2,
        "and more than one won there: {probes:?}"
    );
    assert_eq!(
        fleet.upstream.relay.requests().len(),
        0,
        "nothing was fetched"
    );

    // The control: the same store with the condition intact is accepted.
    let ok = Replica::start("control", &fleet.spec()).await.unwrap();
    let (status, body) = ok.readyz().await.unwrap();
    assert_eq!(status, 200, "{body}");
    eprintln!("the atomic store is accepted: /readyz {status} {body:?}");
}

/// Race rounds per store: `REGCACHE_RACE_ROUNDS`, default 3.
fn rounds() -> usize {
    std::env::var("REGCACHE_RACE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

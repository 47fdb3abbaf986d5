//! Owns the checks of the fleet harness itself, so the fleet tests can trust it: the gated
//! upstream relay holds a blob after exactly K bytes and counts what passed, SeaweedFS comes
//! back with its data after a SIGKILL, nginx spreads requests round robin over replicas, and
//! a SIGSTOPped replica answers nothing until SIGCONT.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use support::fleet::{
    Balancer, Cond, REPO, Replica, ReplicaSpec, S3Client, Seaweed, Upstream, blob_of, client,
    sha256, unique_bucket, wait_until,
};
use support::peers::require_peer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gated_upstream_holds_a_blob_after_k_bytes_and_counts_it() {
    let up = require_peer!(Upstream::start().await);
    let data = blob_of(3 << 20, 7);
    let digest = up.push_blob(REPO, data.clone()).await.unwrap();
    assert_eq!(digest, sha256(&data));
    let k = 1_000_000u64;
    up.relay.hold_after(&digest, k);
    let url = format!("{}/v2/{REPO}/blobs/{digest}", up.url());
    let resp = client().get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut got = Vec::new();
    while (got.len() as u64) < k {
        got.extend_from_slice(&body.next().await.unwrap().unwrap());
    }
    assert_eq!(got.len() as u64, k, "exactly K bytes pass the gate");
    // Held: nothing more arrives while the gate is shut (bounded wait, then check).
    let more = tokio::time::timeout(Duration::from_millis(300), body.next()).await;
    assert!(more.is_err(), "the body is held at K bytes");
    assert_eq!(up.blob_gets(&digest)[0].bytes, k);
    up.relay.open_gate();
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(sha256(&got), digest);
    let gets = up.blob_gets(&digest);
    assert_eq!(gets.len(), 1);
    assert_eq!(gets[0].bytes, data.len() as u64);
    // A ranged request is recorded with its Range header.
    let r = client()
        .get(&url)
        .header("range", "bytes=100-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().len(), data.len() - 100);
    assert_eq!(
        up.blob_gets(&digest)[1].range.as_deref(),
        Some("bytes=100-")
    );
    eprintln!(
        "gate held at {k} bytes; upstream saw {:?}",
        up.blob_gets(&digest)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seaweed_comes_back_with_its_data_after_sigkill() {
    let started = Instant::now();
    let mut weed = require_peer!(Seaweed::start().await);
    eprintln!("{} ready after {:?}", weed.version, started.elapsed());
    let s3 = S3Client::new(&weed.url());
    let bucket = unique_bucket("harness");
    s3.create_bucket(&bucket).await.unwrap();
    assert_eq!(
        s3.put(&bucket, "a/b", "one".into(), Cond::Create)
            .await
            .unwrap(),
        200
    );
    weed.kill();
    assert!(s3.get(&bucket, "a/b").await.is_err(), "refused while down");
    let t = Instant::now();
    weed.restart().await.unwrap();
    eprintln!("restarted in {:?}", t.elapsed());
    let o = s3.get(&bucket, "a/b").await.unwrap();
    assert_eq!((o.status, &o.body[..]), (200, &b"one"[..]));
    assert_eq!(
        s3.list(&bucket, "a/").await.unwrap(),
        vec!["a/b".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_round_robins_over_replicas_and_sigstop_freezes_one() {
    let up = require_peer!(Upstream::start().await);
    let data = blob_of(64 << 10, 9);
    let digest = up.push_blob(REPO, data.clone()).await.unwrap();
    let spec = ReplicaSpec::new(&up.url(), None);
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(Replica::start(&format!("r{i}"), &spec).await.unwrap());
    }
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr()).collect();
    let lb = require_peer!(Balancer::start(&addrs).await);
    for _ in 0..9 {
        let body = client()
            .get(format!("{}/v2/{REPO}/blobs/{digest}", lb.url()))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(sha256(&body), digest);
    }
    assert!(
        wait_until(Duration::from_secs(5), || async {
            lb.spread("/blobs/").values().sum::<usize>() == 9
        })
        .await
    );
    let spread = lb.spread("/blobs/");
    eprintln!("balancer spread: {spread:?}");
    assert_eq!(spread.len(), 3, "every replica served: {spread:?}");
    assert!(spread.values().all(|n| *n == 3), "round robin: {spread:?}");

    // SIGSTOP: the replica accepts (the kernel does) but answers nothing until SIGCONT.
    let frozen = &replicas[1];
    frozen.pause();
    let stalled = tokio::time::timeout(Duration::from_millis(500), frozen.readyz()).await;
    assert!(stalled.is_err(), "a stopped replica does not answer");
    frozen.resume();
    let (status, _) = frozen.readyz().await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_relay_passes_racing_creates_like_the_store_itself() {
    let weed = require_peer!(Seaweed::start().await);
    let relay = support::fleet::HttpRelay::start(weed.addr()).await.unwrap();
    let bucket = unique_bucket("relay");
    S3Client::new(&weed.url())
        .create_bucket(&bucket)
        .await
        .unwrap();
    for (what, url) in [("direct", weed.url()), ("relay", relay.url())] {
        let s3 = S3Client::new(&url);
        let key = format!("k-{what}");
        let mut tasks = Vec::new();
        for w in 0..12 {
            let (s3, bucket, key) = (s3.clone(), bucket.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let status = s3
                    .put(&bucket, &key, format!("w{w}").into(), Cond::Create)
                    .await
                    .unwrap();
                (status, t.elapsed())
            }));
        }
        let mut took = Vec::new();
        for t in tasks {
            took.push(t.await.unwrap());
        }
        // SeaweedFS holds losing creates of a contended key for 1-5 s before their 412
        // (measured here, directly and through the relay alike): printed, not asserted.
        eprintln!("{what}: (status, time) {took:?}");
        assert_eq!(took.iter().filter(|(s, _)| *s == 200).count(), 1, "{what}");
        assert_eq!(took.iter().filter(|(s, _)| *s == 412).count(), 11, "{what}");
    }
}

//! The fleet's protocol on an in-memory store with paused time: the start-up check, leases
//! (create, renew by compare-and-swap, expiry on the follower's clock, takeover, refusal of
//! a stale leader), the choice of byte source, tier-2 writes, degraded mode and the
//! fleet-wide tag check (one replica asks, the others take its answer).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use super::lease::{self, Acquired, Keeper, Watched};
use super::peer::Peers;
use super::stats::{LeaseResult, Op};
use super::store::StoreError;
use super::*;
use crate::cache::source::fake::{Fake, Fault};
use crate::cache::source::{ByteSource, SourceError};
use crate::cache::store::FsStore;

const TTL: Duration = Duration::from_millis(1500);

/// A store with switches: down (every request fails as a connection would), racy (create-
/// only writes overwrite, as a store without atomic conditional writes), lost answers
/// (conditional writes land, and are answered as a client's retry of them would be: the
/// precondition failed), and an object put just before the next create-only write (another
/// replica finishing meanwhile).
#[derive(Debug, Default)]
struct Switched {
    inner: InMemory,
    down: AtomicBool,
    racy: AtomicBool,
    lost_answers: AtomicBool,
    before_create: std::sync::Mutex<Option<(Path, Vec<u8>)>>,
}

impl std::fmt::Display for Switched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Switched")
    }
}

fn refused() -> object_store::Error {
    object_store::Error::Generic {
        store: "test",
        source: "connection refused".into(),
    }
}

impl Switched {
    fn check(&self) -> object_store::Result<()> {
        if self.down.load(Ordering::Relaxed) {
            return Err(refused());
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl ObjectStore for Switched {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.check()?;
        let earlier = match opts.mode {
            PutMode::Create => self.before_create.lock().unwrap().take(),
            _ => None,
        };
        if let Some((key, body)) = earlier {
            self.inner.put(&key, PutPayload::from(body)).await?;
        }
        if self.racy.load(Ordering::Relaxed) && opts.mode == PutMode::Create {
            opts.mode = PutMode::Overwrite;
        }
        let conditional = opts.mode != PutMode::Overwrite;
        let put = self.inner.put_opts(location, payload, opts).await?;
        if conditional && self.lost_answers.load(Ordering::Relaxed) {
            return Err(object_store::Error::Precondition {
                path: location.to_string(),
                source: "the retry of a write that landed".into(),
            });
        }
        Ok(put)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.check()?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.check()?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        if self.down.load(Ordering::Relaxed) {
            return futures_util::stream::once(async { Err(refused()) }).boxed();
        }
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.check()?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, o: CopyOptions) -> object_store::Result<()> {
        self.check()?;
        self.inner.copy_opts(from, to, o).await
    }
}

fn config(advertise: &str) -> FleetConfig {
    FleetConfig {
        store: "s3://bucket/fleet".parse().unwrap(),
        advertise: advertise.parse().unwrap(),
        peer_token_file: "/nonexistent".into(),
        lease_ttl: crate::units::HumanDuration(TTL),
    }
}

/// Other replicas, by advertised URL, as in-memory sources.
#[derive(Default)]
struct FakePeers(std::sync::Mutex<HashMap<String, Arc<dyn ByteSource>>>);

impl Peers for FakePeers {
    fn source(&self, advertise: &str) -> Arc<dyn ByteSource> {
        let mut m = self.0.lock().unwrap();
        m.entry(advertise.to_owned())
            .or_insert_with(|| {
                let mut gone = Fake::new(Bytes::new());
                gone.fault = Fault::Refuse(SourceError::Unreachable("connection refused".into()));
                Arc::new(gone)
            })
            .clone()
    }
}

/// A replica's fleet on `store`, checked as at start.
async fn replica(store: Arc<Switched>, advertise: &str, peers: Arc<FakePeers>) -> Arc<Fleet> {
    let f = Fleet::with_store(
        store,
        &config(advertise),
        "token",
        Some(peers),
        Duration::from_secs(5),
    )
    .unwrap();
    f.check().await.unwrap();
    f
}

fn blob(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

async fn read(s: crate::cache::source::SourceBytes) -> (Vec<u8>, Option<SourceError>) {
    let mut s = s;
    let mut out = Vec::new();
    while let Some(r) = s.next().await {
        match r {
            Ok(b) => out.extend_from_slice(&b),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

async fn local_store() -> (tempfile::TempDir, Arc<dyn crate::cache::store::BlobStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FsStore::open(dir.path()).await.unwrap());
    (dir, store)
}

#[tokio::test(start_paused = true)]
async fn the_start_up_check_passes_an_atomic_store_and_refuses_a_racy_one() {
    let store = Arc::new(Switched::default());
    let f = replica(store.clone(), "http://127.0.0.1:1", Arc::default()).await;
    assert!(f.active());
    assert_eq!(f.summary(), "fleet: ok");
    let s = f.stats();
    assert_eq!(s.requests(Op::PutCreate), probe::RACERS as u64);
    assert_eq!(
        s.requests(Op::PutUpdate),
        2,
        "one swap that must win, one that must lose"
    );
    // The probe key is gone afterwards.
    let left: Vec<_> = store.inner.list(None).collect().await;
    assert!(left.is_empty(), "{left:?}");

    store.racy.store(true, Ordering::Relaxed);
    let f = Fleet::with_store(
        store.clone(),
        &config("http://127.0.0.1:1"),
        "t",
        Some(Arc::new(FakePeers::default())),
        Duration::from_secs(5),
    )
    .unwrap();
    let e = f.check().await.unwrap_err().to_string();
    println!("refused: {e}");
    assert!(e.contains("s3://bucket/fleet"), "names the store: {e}");
    assert!(e.contains("12 of 12 racing create-only writes"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_store_at_start_is_degraded_not_refused_and_the_fleet_resumes() {
    let store = Arc::new(Switched::default());
    store.down.store(true, Ordering::Relaxed);
    let f = replica(store.clone(), "http://127.0.0.1:1", Arc::default()).await;
    assert!(!f.active());
    assert_eq!(f.summary(), "degraded: object store unreachable");
    assert_eq!(f.stats().degraded_transitions(), 1);
    assert!(!f.stats().store_up());

    // Downloads go to the upstream alone, without a lease.
    let data = blob(5000);
    let d = Digest::sha256(&data);
    let upstream = Arc::new(Fake::new(data.clone()));
    let (_dir, local) = local_store().await;
    let src = f.blob_source(&d, upstream.clone(), local.clone());
    let opened = src.open(&d, 0).await.unwrap();
    assert_eq!(read(opened.bytes).await, (data.clone(), None));
    assert_eq!(upstream.opened(), vec![0]);
    assert_eq!(f.stats().leases(LeaseResult::Won), 0);

    // The store comes back: the background check finds it and runs the start-up check.
    store.down.store(false, Ordering::Relaxed);
    for _ in 0..10 {
        if f.active() {
            break;
        }
        tokio::time::sleep(TTL).await;
    }
    assert!(f.active(), "fleet mode resumes");
    assert_eq!(f.summary(), "fleet: ok");
    assert_eq!(
        f.stats().degraded_transitions(),
        1,
        "one transition, counted once"
    );

    // The store stops while the replica runs: the next download finds it down and goes to
    // the upstream alone; the store back, the fleet resumes.
    store.down.store(true, Ordering::Relaxed);
    let upstream = Arc::new(Fake::new(data.clone()));
    let src = f.blob_source(&d, upstream.clone(), local.clone());
    let opened = src.open(&d, 0).await.unwrap();
    assert_eq!(read(opened.bytes).await, (data.clone(), None));
    assert_eq!(upstream.opened(), vec![0]);
    assert!(!f.active());
    assert_eq!(f.summary(), "degraded: object store unreachable");
    assert_eq!(f.stats().degraded_transitions(), 2);
    store.down.store(false, Ordering::Relaxed);
    for _ in 0..10 {
        if f.active() {
            break;
        }
        tokio::time::sleep(TTL).await;
    }
    assert!(f.active(), "fleet mode resumes again");
    assert_eq!(f.stats().leases(LeaseResult::Won), 0);
}

#[tokio::test(start_paused = true)]
async fn one_lease_wins_renewals_swap_it_and_a_stale_leader_is_refused() {
    let store = Arc::new(Switched::default());
    let a = replica(store.clone(), "http://a:5000", Arc::default()).await;
    let b = replica(store.clone(), "http://b:5000", Arc::default()).await;
    let d = Digest::sha256(b"blob");
    let Acquired::Won(held) = lease::acquire(&a.store, &d, &a.me).await.unwrap() else {
        panic!("the first create wins")
    };
    let Acquired::Taken(seen) = lease::acquire(&b.store, &d, &b.me).await.unwrap() else {
        panic!("the second create loses")
    };
    assert_eq!(seen.lease.advertise, "http://a:5000");
    assert_eq!(seen.lease.generation, 1);
    assert_eq!(a.stats().leases(LeaseResult::Won), 1);
    assert_eq!(b.stats().leases(LeaseResult::Followed), 1);

    // A renews every third of the TTL: B sees the lease change, so A lives.
    let keeper = Keeper::start(
        a.store.clone(),
        d.clone(),
        held,
        a.renew_every(),
        Arc::default(),
    );
    let watched = lease::watch(&b.store, &d, seen, TTL).await.unwrap();
    let Watched::Changed(renewed) = watched else {
        panic!("a renewed lease is seen as changed: {watched:?}")
    };
    assert_eq!(renewed.lease.renewals, 1);
    let before = a.stats().requests(Op::PutUpdate);

    // A pauses (its renewals stop): B judges it by its own clock, a full TTL unchanged.
    let paused_at = tokio::time::Instant::now();
    let held_by_a = keeper.held();
    drop(keeper);
    let current = lease::read(&b.store, &d).await.unwrap().unwrap();
    assert_eq!(current.version, held_by_a.version);
    let Watched::Expired(stale) = lease::watch(&b.store, &d, current, TTL).await.unwrap() else {
        panic!("an unrenewed lease expires")
    };
    let waited = paused_at.elapsed();
    assert!(
        waited >= TTL && waited < TTL + a.renew_every(),
        "{waited:?}"
    );
    let taken = lease::take_over(&b.store, &d, &stale, &b.me, 4000)
        .await
        .unwrap();
    let taken = taken.expect("the first swap of a stale lease wins");
    assert_eq!(taken.lease.generation, 2);
    assert_eq!(taken.lease.offset_hint, 4000);
    assert_eq!(b.stats().leases(LeaseResult::TakenOver), 1);
    // A second replica swapping the same stale version loses.
    let c = replica(store.clone(), "http://c:5000", Arc::default()).await;
    assert!(
        lease::take_over(&c.store, &d, &stale, &c.me, 0)
            .await
            .unwrap()
            .is_none()
    );

    // A wakes and renews with its old version: refused; it stops and never deletes B's lease.
    let zombie = Keeper::start(
        a.store.clone(),
        d.clone(),
        held_by_a,
        a.renew_every(),
        Arc::default(),
    );
    tokio::time::sleep(a.renew_every() * 2).await;
    assert!(zombie.lost());
    assert_eq!(a.stats().leases(LeaseResult::RenewalRefused), 1);
    assert_eq!(
        a.stats().requests(Op::PutUpdate),
        before + 1,
        "stops after the refusal"
    );
    zombie.release().await;
    let now = lease::read(&a.store, &d).await.unwrap().unwrap();
    assert_eq!(now.lease.advertise, "http://b:5000");
    assert_eq!(now.lease.generation, 2);
}

#[tokio::test(start_paused = true)]
async fn a_miss_leads_a_second_replica_follows_and_takes_over_a_dead_leader() {
    let store = Arc::new(Switched::default());
    let peers = Arc::new(FakePeers::default());
    let data = blob(10_000);
    let d = Digest::sha256(&data);
    let a = replica(store.clone(), "http://a:5000", peers.clone()).await;
    let b = replica(store.clone(), "http://b:5000", peers.clone()).await;
    // A's peer endpoint streams 4000 bytes, then A dies.
    let mut dying = Fake::new(data.clone());
    dying.fault = Fault::FailAt(4000);
    peers
        .0
        .lock()
        .unwrap()
        .insert("http://a:5000".into(), Arc::new(dying));

    let (_da, local_a) = local_store().await;
    let up_a = Arc::new(Fake::new(data.clone()));
    let src_a = a.blob_source(&d, up_a.clone(), local_a);
    let _leading = src_a.open(&d, 0).await.unwrap();
    assert_eq!(up_a.opened(), vec![0], "the leader reads the upstream");
    assert_eq!(a.stats().leases(LeaseResult::Won), 1);

    let (_db, local_b) = local_store().await;
    let up_b = Arc::new(Fake::new(data.clone()));
    let src_b = b.blob_source(&d, up_b.clone(), local_b.clone());
    let opened = src_b.open(&d, 0).await.unwrap();
    assert_eq!(b.stats().leases(LeaseResult::Followed), 1);
    let (first, error) = read(opened.bytes).await;
    assert_eq!(first.len(), 4000);
    assert!(
        up_b.opened().is_empty(),
        "a follower does not touch the upstream"
    );

    // A is killed: its renewals stop (its lease stays). B takes over within a TTL and a
    // renewal period, and resumes the upstream from the bytes it has.
    let killed = tokio::time::Instant::now();
    drop(src_a);
    let next = src_b
        .successor(4000, &error.unwrap())
        .await
        .expect("a successor");
    let took = killed.elapsed();
    assert!(took <= TTL + b.renew_every(), "took over after {took:?}");
    assert_eq!(b.stats().leases(LeaseResult::TakenOver), 1);
    let rest = next.open(&d, 4000).await.unwrap();
    assert_eq!(rest.offset, 4000);
    let (second, error) = read(rest.bytes).await;
    assert!(error.is_none());
    assert_eq!(
        up_b.opened(),
        vec![4000],
        "resumed with Range from the staged prefix"
    );
    assert_eq!([first, second].concat(), data);
    println!(
        "takeover after {took:?}; upstream asked from {:?}",
        up_b.opened()
    );

    // B commits locally, then stores the blob in tier 2 and deletes the lease.
    let staged = local_b.staging_path("t");
    std::fs::write(&staged, &data).unwrap();
    local_b.commit_blob(&d, &staged).await.unwrap();
    src_b.ended(Ok(data.len() as u64));
    for _ in 0..100 {
        if store.inner.head(&b.store.lease_key(&d)).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stored = store.inner.get(&b.store.blob_key(&d)).await.unwrap();
    assert_eq!(stored.bytes().await.unwrap(), Bytes::from(data.clone()));
    assert!(
        store.inner.head(&b.store.lease_key(&d)).await.is_err(),
        "the lease is deleted after the commit"
    );
    assert!(
        b.stats().requests(Op::Multipart) >= 3,
        "create, part, complete"
    );
}

#[tokio::test(start_paused = true)]
async fn a_tier_two_hit_streams_from_the_store_without_a_lease() {
    let store = Arc::new(Switched::default());
    let data = blob(3000);
    let d = Digest::sha256(&data);
    let f = replica(store.clone(), "http://a:5000", Arc::default()).await;
    store
        .inner
        .put(&f.store.blob_key(&d), PutPayload::from(data.clone()))
        .await
        .unwrap();
    let (_dir, local) = local_store().await;
    let up = Arc::new(Fake::new(data.clone()));
    let creates = f.stats().requests(Op::PutCreate);
    let src = f.blob_source(&d, up.clone(), local);
    let opened = src.open(&d, 1000).await.unwrap();
    assert_eq!(opened.total_len, Some(3000));
    assert_eq!(read(opened.bytes).await, (data[1000..].to_vec(), None));
    assert!(up.opened().is_empty(), "no upstream request");
    assert_eq!(f.stats().requests(Op::PutCreate), creates, "no lease");
    assert_eq!(f.stats().store_bytes().0, 2000);
}

#[tokio::test(start_paused = true)]
async fn a_lease_won_after_the_last_leader_stored_the_blob_reads_the_store() {
    let store = Arc::new(Switched::default());
    let data = blob(3000);
    let d = Digest::sha256(&data);
    let f = replica(store.clone(), "http://a:5000", Arc::default()).await;
    // The blob is not in tier 2 at the first look; its leader stores it and deletes its
    // lease just before this replica's create-only write of the lease.
    *store.before_create.lock().unwrap() = Some((f.store.blob_key(&d), data.clone()));
    let (_dir, local) = local_store().await;
    let up = Arc::new(Fake::new(data.clone()));
    let src = f.blob_source(&d, up.clone(), local);
    let opened = src.open(&d, 0).await.unwrap();
    assert_eq!(read(opened.bytes).await, (data.clone(), None));
    assert!(up.opened().is_empty(), "no second upstream fetch");
    let lease = f.store.head(&f.store.lease_key(&d)).await;
    assert_eq!(lease.err(), Some(StoreError::NotFound), "the lease let go");
}

#[tokio::test]
async fn tier_two_writes_complete_only_on_a_digest_match() {
    let store = Arc::new(Switched::default());
    let f = Fleet::with_store(
        store.clone(),
        &config("http://a:5000"),
        "t",
        Some(Arc::new(FakePeers::default())),
        Duration::from_secs(5),
    )
    .unwrap();
    let data = blob(upload::PART + 1000);
    let d = Digest::sha256(&data);
    let key = f.store.blob_key(&d);
    let mut wrong = data.clone();
    wrong[upload::PART + 10] ^= 1;
    let chunks = |v: Vec<u8>| {
        futures_util::stream::iter(
            v.chunks(100_000)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        )
    };
    let e = upload::put_stream(&f.store, &key, &d, chunks(wrong))
        .await
        .unwrap_err();
    assert!(matches!(e, upload::UploadError::Mismatch(_)), "{e}");
    assert!(
        store.inner.head(&key).await.is_err(),
        "nothing under the key"
    );
    let n = upload::put_stream(&f.store, &key, &d, chunks(data.clone()))
        .await
        .unwrap();
    assert_eq!(n, data.len() as u64);
    let got = store.inner.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.len(), data.len());
    assert_eq!(Digest::sha256(&got), d);
}

#[tokio::test(start_paused = true)]
async fn manifests_by_digest_are_shared_verified_with_their_media_type() {
    let store = Arc::new(Switched::default());
    let a = replica(store.clone(), "http://a:5000", Arc::default()).await;
    let b = replica(store.clone(), "http://b:5000", Arc::default()).await;
    let body = Bytes::from_static(
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
    );
    let d = Digest::sha256(&body);
    assert_eq!(b.manifest(&d).await, None);
    a.put_manifest(
        &d,
        "application/vnd.oci.image.manifest.v1+json",
        body.clone(),
    );
    let mut got = None;
    for _ in 0..100 {
        got = b.manifest(&d).await;
        if got.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        got,
        Some((
            "application/vnd.oci.image.manifest.v1+json".to_owned(),
            body
        ))
    );
    // Bytes of another digest under the key are never served.
    let other = Digest::sha256(b"other");
    store
        .inner
        .put(
            &a.store.manifest_key(&other),
            PutPayload::from_static(b"tampered"),
        )
        .await
        .unwrap();
    assert_eq!(b.manifest(&other).await, None);
}

#[tokio::test(start_paused = true)]
async fn a_lease_left_by_an_earlier_run_of_this_replica_is_taken_over_at_once() {
    let store = Arc::new(Switched::default());
    let data = blob(2000);
    let d = Digest::sha256(&data);
    let before = replica(store.clone(), "http://a:5000", Arc::default()).await;
    let Acquired::Won(_) = lease::acquire(&before.store, &d, &before.me).await.unwrap() else {
        panic!("first lease")
    };
    // The process restarts on the same address; its old lease still stands.
    let after = replica(store.clone(), "http://a:5000", Arc::default()).await;
    let (_dir, local) = local_store().await;
    let up = Arc::new(Fake::new(data.clone()));
    let started = tokio::time::Instant::now();
    let src = after.blob_source(&d, up.clone(), local);
    let opened = src.open(&d, 0).await.unwrap();
    assert_eq!(read(opened.bytes).await, (data, None));
    assert_eq!(up.opened(), vec![0]);
    assert_eq!(after.stats().leases(LeaseResult::TakenOver), 1);
    assert!(started.elapsed() < TTL, "not waited out");
    let now = lease::read(&after.store, &d).await.unwrap().unwrap();
    assert_eq!(
        (now.lease.replica, now.lease.generation),
        (after.me.replica.clone(), 2)
    );
}

#[tokio::test(start_paused = true)]
async fn lease_writes_whose_answers_were_lost_still_count_as_this_replicas() {
    let store = Arc::new(Switched::default());
    let a = replica(store.clone(), "http://a:5000", Arc::default()).await;
    let b = replica(store.clone(), "http://b:5000", Arc::default()).await;
    let d = Digest::sha256(b"blob");
    store.lost_answers.store(true, Ordering::Relaxed);
    // A create that landed: won, not a lease of its own to follow.
    let Acquired::Won(held) = lease::acquire(&a.store, &d, &a.me).await.unwrap() else {
        panic!("a create that landed is won")
    };
    let now = lease::read(&a.store, &d).await.unwrap().unwrap();
    assert_eq!(held.version, now.version);
    // Renewals that landed: the lease stays held and goes on being renewed.
    let keeper = Keeper::start(
        a.store.clone(),
        d.clone(),
        held,
        a.renew_every(),
        Arc::default(),
    );
    tokio::time::sleep(a.renew_every() * 3 + a.renew_every() / 2).await;
    assert!(!keeper.lost(), "a renewal that landed is no refusal");
    assert_eq!(a.stats().leases(LeaseResult::RenewalRefused), 0);
    let now = lease::read(&a.store, &d).await.unwrap().unwrap();
    assert_eq!(now.lease.renewals, 3);
    assert_eq!(keeper.held().version, now.version);
    // A takeover that landed: this replica leads.
    let stale = now;
    drop(keeper);
    let taken = lease::take_over(&b.store, &d, &stale, &b.me, 100)
        .await
        .unwrap()
        .expect("a takeover that landed is held");
    assert_eq!(
        (taken.lease.replica.as_str(), taken.lease.generation),
        (b.me.replica.as_str(), 2)
    );
    assert_eq!(b.stats().leases(LeaseResult::TakenOver), 1);
    // A's old version is refused for real.
    store.lost_answers.store(false, Ordering::Relaxed);
    let zombie = Keeper::start(
        a.store.clone(),
        d.clone(),
        lease::Held {
            lease: stale.lease.clone(),
            version: stale.version.clone(),
        },
        a.renew_every(),
        Arc::default(),
    );
    tokio::time::sleep(a.renew_every() * 2).await;
    assert!(zombie.lost());
}

#[tokio::test(start_paused = true)]
async fn a_lease_of_this_replica_nobody_renews_is_led_not_followed() {
    // A lease this replica holds, left by an earlier download here (or a takeover whose
    // answer was lost): following it would stream from itself, bytes nobody fetches.
    let store = Arc::new(Switched::default());
    let data = blob(2000);
    let d = Digest::sha256(&data);
    let a = replica(store.clone(), "http://a:5000", Arc::default()).await;
    let b = replica(store.clone(), "http://b:5000", Arc::default()).await;
    let Acquired::Won(_) = lease::acquire(&b.store, &d, &b.me).await.unwrap() else {
        panic!("first lease")
    };
    let seen = lease::read(&a.store, &d).await.unwrap().unwrap();
    lease::take_over(&a.store, &d, &seen, &a.me, 0)
        .await
        .unwrap()
        .expect("a holds generation 2");
    let (_dir, local) = local_store().await;
    let up = Arc::new(Fake::new(data.clone()));
    let started = tokio::time::Instant::now();
    let src = a.blob_source(&d, up.clone(), local);
    let opened = src.open(&d, 0).await.unwrap();
    assert_eq!(read(opened.bytes).await, (data, None));
    assert_eq!(
        up.opened(),
        vec![0],
        "read from the upstream, not from itself"
    );
    assert!(started.elapsed() < TTL, "not waited out");
    let now = lease::read(&a.store, &d).await.unwrap().unwrap();
    assert_eq!(
        (now.lease.replica, now.lease.generation),
        (a.me.replica.clone(), 3)
    );
}

#[tokio::test(start_paused = true)]
async fn a_replaced_leader_stops_reading_the_upstream_and_follows_the_new_one() {
    let store = Arc::new(Switched::default());
    let peers = Arc::new(FakePeers::default());
    let data = blob(10_000);
    let d = Digest::sha256(&data);
    let a = replica(store.clone(), "http://a:5000", peers.clone()).await;
    let b = replica(store.clone(), "http://b:5000", peers.clone()).await;
    // B serves the blob from its peer endpoint once it leads.
    peers
        .0
        .lock()
        .unwrap()
        .insert("http://b:5000".into(), Arc::new(Fake::new(data.clone())));

    let (_da, local_a) = local_store().await;
    let up_a = Arc::new(Fake::new(data.clone()));
    let src_a = a.blob_source(&d, up_a.clone(), local_a);
    let mut leading = src_a.open(&d, 0).await.unwrap().bytes;
    let first = leading.next().await.unwrap().unwrap();
    assert_eq!(first.len(), 1000);

    // B swaps A's lease (as after A was paused past its life); A's next renewal is refused.
    let seen = lease::read(&b.store, &d).await.unwrap().unwrap();
    assert!(
        lease::take_over(&b.store, &d, &seen, &b.me, 0)
            .await
            .unwrap()
            .is_some()
    );
    tokio::time::sleep(a.renew_every() * 2).await;
    assert_eq!(a.stats().leases(LeaseResult::RenewalRefused), 1);

    // A passes on no further upstream byte: its stream ends with an error ...
    let error = match leading.next().await {
        Some(Err(e)) => e,
        other => panic!("a replaced leader's stream goes on: {other:?}"),
    };
    assert!(leading.next().await.is_none());
    // ... and its download goes on from B, from the bytes it has.
    let next = src_a
        .successor(1000, &error)
        .await
        .expect("follows the new leader");
    let rest = next.open(&d, 1000).await.unwrap();
    let (rest, error) = read(rest.bytes).await;
    assert!(error.is_none());
    assert_eq!([first.to_vec(), rest].concat(), data);
    assert_eq!(up_a.opened(), vec![0], "the upstream was read once, by A");
    assert_eq!(
        a.stats().leases(LeaseResult::RenewalRefused),
        1,
        "counted once"
    );
}

#[tokio::test(start_paused = true)]
async fn a_leader_without_a_renewal_for_a_lease_life_reads_who_leads_before_going_on() {
    let store = Arc::new(Switched::default());
    let peers = Arc::new(FakePeers::default());
    let d = Digest::sha256(b"fenced");
    let a = replica(store.clone(), "http://a:5000", peers.clone()).await;
    let b = replica(store.clone(), "http://b:5000", peers).await;
    let Acquired::Won(held) = lease::acquire(&a.store, &d, &a.me).await.unwrap() else {
        panic!("A leads");
    };
    // No renewal in the meantime (a paused process renews nothing).
    let keeper = Keeper::start(
        a.store.clone(),
        d.clone(),
        held,
        Duration::from_secs(3600),
        Arc::default(),
    );
    let fence = keeper.fence();
    assert!(fence.holds(TTL).await, "fresh: no store request");
    let gets = a.stats().requests(Op::Get);
    tokio::time::sleep(TTL * 2).await;
    assert!(fence.holds(TTL).await, "stale but still A's");
    assert!(a.stats().requests(Op::Get) > gets, "the lease was read");

    let seen = lease::read(&b.store, &d).await.unwrap().unwrap();
    lease::take_over(&b.store, &d, &seen, &b.me, 0)
        .await
        .unwrap()
        .expect("B swaps the stale lease");
    assert!(!fence.holds(TTL).await, "B leads now");
    assert!(keeper.lost());
    assert_eq!(a.stats().leases(LeaseResult::RenewalRefused), 1);
    // Releasing never deletes B's lease.
    keeper.release().await;
    let now = lease::read(&a.store, &d).await.unwrap().unwrap();
    assert_eq!(now.lease.advertise, "http://b:5000");
}

fn tag_key() -> crate::cache::store::TagKey {
    crate::cache::store::TagKey {
        upstream: "up".into(),
        repository: "library/app".parse().unwrap(),
        tag: "v1".parse().unwrap(),
        accept: 3,
    }
}

/// An upstream check that counts its calls and names `digest`.
fn counted(
    calls: &Arc<std::sync::atomic::AtomicUsize>,
    digest: &Digest,
) -> impl FnOnce() -> futures_util::future::Ready<Result<Option<Digest>, String>> {
    let (calls, digest) = (calls.clone(), digest.clone());
    move || {
        calls.fetch_add(1, Ordering::SeqCst);
        futures_util::future::ready(Ok(Some(digest)))
    }
}

/// A check of the tag by `f`, spawned, whose upstream answer is `answer` held back until
/// the returned sender fires; returns once the upstream has been asked (counted in `calls`).
async fn held_check(
    f: &Arc<Fleet>,
    ttl: Duration,
    cached: &crate::cache::store::TagRecord,
    calls: &Arc<std::sync::atomic::AtomicUsize>,
    answer: Result<Option<Digest>, String>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<super::tags::TagCheck, String>>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (f, cached, counter) = (f.clone(), cached.clone(), calls.clone());
    let check = tokio::spawn(async move {
        f.check_tag(&tag_key(), ttl, &cached, move || async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = rx.await;
            answer
        })
        .await
    });
    while calls.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    (tx, check)
}

/// Two replicas on one store, and a tag answer (the manifest `body`'s digest) both hold.
async fn tag_replicas(
    body: &[u8],
) -> (
    Arc<Fleet>,
    Arc<Fleet>,
    Digest,
    crate::cache::store::TagRecord,
) {
    let store = Arc::new(Switched::default());
    let a = replica(store.clone(), "http://a:5000", Arc::default()).await;
    let b = replica(store, "http://b:5000", Arc::default()).await;
    let d = Digest::sha256(body);
    let cached = crate::cache::store::TagRecord {
        digest: d.clone(),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
    };
    (a, b, d, cached)
}

#[tokio::test(start_paused = true)]
async fn a_tag_is_checked_by_one_replica_and_the_others_take_its_answer() {
    use super::tags::TagCheck;
    let (a, b, d, cached) = tag_replicas(b"manifest").await;
    let ttl = Duration::from_secs(300);
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    // `a` claims the check; while its upstream answer is on the way, `b` waits for it.
    let (tx, first) = held_check(&a, ttl, &cached, &calls, Ok(Some(d.clone()))).await;
    let second = tokio::spawn({
        let (b, cached, calls) = (b.clone(), cached.clone(), calls.clone());
        let d = d.clone();
        async move {
            b.check_tag(&tag_key(), ttl, &cached, counted(&calls, &d))
                .await
        }
    });
    tokio::time::sleep(TTL / 2).await;
    tx.send(()).unwrap();
    assert!(matches!(first.await.unwrap(), Ok(TagCheck::Asked(Some(x))) if x == d));
    match second.await.unwrap() {
        Ok(TagCheck::Shared(s)) => assert_eq!(s.record, cached),
        other => panic!("the second replica takes the first one's answer: {other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one upstream check");
    // Within the TTL, no replica asks again.
    let third = b
        .check_tag(&tag_key(), ttl, &cached, counted(&calls, &d))
        .await;
    assert!(matches!(third, Ok(TagCheck::Shared(_))), "{third:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let shared = b.tag(&tag_key()).await.expect("a confirmed answer");
    assert_eq!(shared.record, cached);
}

#[tokio::test(start_paused = true)]
async fn a_tag_check_abandoned_mid_way_is_taken_over_after_a_lease_life() {
    use super::tags::TagCheck;
    let (a, b, d, cached) = tag_replicas(b"manifest").await;
    let ttl = Duration::from_secs(300);
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // `a` claims the check and dies before it answers.
    let (_never, dead) = held_check(&a, ttl, &cached, &calls, Ok(Some(d.clone()))).await;
    dead.abort();
    assert!(a.tag(&tag_key()).await.is_none(), "a claim is no answer");
    let started = tokio::time::Instant::now();
    let taken = b
        .check_tag(&tag_key(), ttl, &cached, counted(&calls, &d))
        .await;
    let waited = started.elapsed();
    assert!(matches!(taken, Ok(TagCheck::Asked(Some(_)))), "{taken:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(
        waited >= TTL && waited <= TTL + TTL / 3,
        "waited {waited:?} for a claim unchanged for lease_ttl"
    );
    assert_eq!(b.tag(&tag_key()).await.map(|s| s.record), Some(cached));
}

#[tokio::test(start_paused = true)]
async fn a_failed_tag_check_leaves_no_answer_and_the_next_replica_asks() {
    use super::tags::TagCheck;
    let (a, b, d, cached) = tag_replicas(b"manifest").await;
    let ttl = Duration::from_secs(300);
    let failed = a
        .check_tag(&tag_key(), ttl, &cached, || async {
            Err::<Option<Digest>, _>("503".to_owned())
        })
        .await;
    assert_eq!(failed.err().as_deref(), Some("503"));
    assert!(a.tag(&tag_key()).await.is_none(), "nothing confirmed");
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = tokio::time::Instant::now();
    let next = b
        .check_tag(&tag_key(), ttl, &cached, counted(&calls, &d))
        .await;
    assert!(matches!(next, Ok(TagCheck::Asked(Some(_)))), "{next:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(started.elapsed() < TTL / 3, "no wait after a failed check");
}

#[tokio::test(start_paused = true)]
async fn replicas_waiting_on_a_failed_tag_check_do_not_ask_again() {
    use super::tags::TagCheck;
    let (a, b, d, cached) = tag_replicas(b"manifest").await;
    let ttl = Duration::from_secs(300);
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (tx, first) = held_check(&a, ttl, &cached, &calls, Err("503".to_owned())).await;
    let second = tokio::spawn({
        let (b, cached, calls, d) = (b.clone(), cached.clone(), calls.clone(), d.clone());
        async move {
            b.check_tag(&tag_key(), ttl, &cached, counted(&calls, &d))
                .await
        }
    });
    tokio::time::sleep(TTL / 4).await;
    tx.send(()).unwrap();
    assert_eq!(first.await.unwrap().err().as_deref(), Some("503"));
    let waited = second.await.unwrap();
    assert!(matches!(waited, Ok(TagCheck::Unconfirmed)), "{waited:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "nobody asked again");
}

#[tokio::test(start_paused = true)]
async fn a_tag_check_that_outlived_its_claim_does_not_overwrite_the_newer_answer() {
    use super::tags::TagCheck;
    let (a, b, old, cached) = tag_replicas(b"old").await;
    let new = Digest::sha256(b"new");
    let ttl = Duration::from_secs(300);
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // `a` asks, and its answer (the old digest) takes longer than a lease life.
    let (tx, slow) = held_check(&a, ttl, &cached, &calls, Ok(Some(old.clone()))).await;
    // `b` takes the claim over after a lease life and finds the tag moved.
    let taken = b
        .check_tag(&tag_key(), ttl, &cached, counted(&calls, &new))
        .await;
    assert!(
        matches!(taken, Ok(TagCheck::Asked(Some(ref x))) if *x == new),
        "{taken:?}"
    );
    tx.send(()).unwrap();
    assert!(matches!(slow.await.unwrap(), Ok(TagCheck::Asked(Some(ref x))) if *x == old));
    let stands = a.tag(&tag_key()).await.expect("an answer");
    assert_eq!(stands.record.digest, new, "the newer check's answer stands");
}

//! A fleet of replicas in one process: each replica a real regcache app on its own loopback
//! port with its own disk, all sharing one in-memory object store, streaming from each
//! other over the real peer endpoint, in front of the counting fake upstream. It shows the
//! whole path a multi-process fleet takes (tier 2, leases, peers, shared tags) without an
//! S3 server; the multi-process scenarios on a real one live in the other fleet tests.

mod fake;
mod support;

use std::sync::Arc;
use std::time::Duration;

use fake::*;
use futures_util::StreamExt;
use object_store::memory::InMemory;
use object_store::{ObjectStore, ObjectStoreExt};
use regcache::app::App;
use regcache::cache::store::FsStore;
use regcache::config::FleetConfig;
use regcache::fleet::Fleet;
use regcache::fleet::stats::{LeaseResult, Op};
use tokio::net::TcpListener;

const TOKEN: &str = "fleet-smoke-token";

struct Replica {
    addr: std::net::SocketAddr,
    app: Arc<App>,
    fleet: Arc<Fleet>,
    _dir: tempfile::TempDir,
}

impl Replica {
    async fn start(upstream: &str, store: Arc<dyn ObjectStore>) -> Self {
        Self::start_with(config_for(upstream), store).await
    }

    async fn start_with(mut config: regcache::config::Config, store: Arc<dyn ObjectStore>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        config.cache_dir = dir.path().join("cache");
        let fleet_config = FleetConfig {
            store: "s3://smoke/fleet".parse().unwrap(),
            advertise: format!("http://{addr}").parse().unwrap(),
            peer_token_file: token_file,
            lease_ttl: regcache::units::HumanDuration(Duration::from_millis(1500)),
        };
        config.fleet = Some(fleet_config.clone());
        let config = config.validate().unwrap();
        let fleet =
            Fleet::with_store(store, &fleet_config, TOKEN, None, Duration::from_secs(5)).unwrap();
        fleet.check().await.unwrap();
        let local = Arc::new(FsStore::open(&config.cache_dir).await.unwrap());
        let app = App::with_fleet(config, local, Some(fleet.clone())).unwrap();
        let a = app.clone();
        tokio::spawn(async move {
            regcache::server::serve(
                listener,
                a,
                None,
                Duration::from_secs(1),
                std::future::pending(),
            )
            .await
            .unwrap();
        });
        Replica {
            addr,
            app,
            fleet,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_fetch_a_cold_blob_once_and_a_fourth_reads_the_store() {
    let up = FakeUpstream::start().await;
    let data = blob_of(3 << 20, 7);
    let d = up.add_blob(data.clone());
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Replica::start(&up.url(), store.clone()).await);
    }
    // The upstream holds the body until every client has asked.
    let gate = up.gate();
    let c = client();
    let mut gets = Vec::new();
    for i in 0..24 {
        let url = replicas[i % 3].url(&format!("/v2/library/app/blobs/{d}"));
        let c = c.clone();
        gets.push(tokio::spawn(async move { c.get(url).send().await }));
    }
    // Every replica has joined the download (its lease won or followed) before bytes flow.
    until(|| {
        replicas
            .iter()
            .map(|r| {
                let s = r.fleet.stats();
                s.leases(LeaseResult::Won) + s.leases(LeaseResult::Followed)
            })
            .sum::<u64>()
            == 3
    })
    .await;
    up.ungate();
    drop(gate);
    for g in gets {
        let resp = g.await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
        same(&body_of(resp).await.unwrap(), &data);
    }
    assert_eq!(up.blob_gets(&d), 1, "one upstream GET for the whole fleet");
    let won: u64 = replicas
        .iter()
        .map(|r| r.fleet.stats().leases(LeaseResult::Won))
        .sum();
    let followed: u64 = replicas
        .iter()
        .map(|r| r.fleet.stats().leases(LeaseResult::Followed))
        .sum();
    let streamed: u64 = replicas
        .iter()
        .map(|r| r.fleet.stats().peer_bytes().1)
        .sum();
    println!("leases won {won}, followed {followed}; peer bytes received {streamed}");
    assert_eq!((won, followed), (1, 2));
    assert_eq!(
        streamed,
        2 * data.len() as u64,
        "the followers streamed from the leader"
    );

    // The leader stores the blob in tier 2 and deletes the lease.
    let hex = &d[7..];
    let blob_key = object_store::path::Path::from(format!("fleet/blobs/sha256/{hex}"));
    let lease_key = object_store::path::Path::from(format!("fleet/leases/sha256/{hex}"));
    for _ in 0..400 {
        if store.head(&blob_key).await.is_ok() && store.head(&lease_key).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(store.head(&blob_key).await.is_ok(), "blob in tier 2");
    assert!(
        store.head(&lease_key).await.is_err(),
        "lease deleted after the commit"
    );

    // Hits on a replica that has it make no store request.
    for r in &replicas {
        r.app.downloads_settled().await;
    }
    let before: Vec<u64> = replicas
        .iter()
        .map(|r| r.fleet.stats().requests_total())
        .collect();
    for r in &replicas {
        let resp = c
            .get(r.url(&format!("/v2/library/app/blobs/{d}")))
            .send()
            .await
            .unwrap();
        same(&body_of(resp).await.unwrap(), &data);
    }
    let after: Vec<u64> = replicas
        .iter()
        .map(|r| r.fleet.stats().requests_total())
        .collect();
    assert_eq!(before, after, "local hits make zero store requests");

    // A fourth replica with an empty disk gets it from the store, not the upstream: a HEAD
    // first, then the GET.
    let fourth = Replica::start(&up.url(), store.clone()).await;
    let head = c
        .head(fourth.url(&format!("/v2/library/app/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"],
        data.len().to_string().as_str()
    );
    assert_eq!(
        up.count("HEAD", "/blobs/"),
        0,
        "the HEAD was answered from the store"
    );
    let resp = c
        .get(fourth.url(&format!("/v2/library/app/blobs/{d}")))
        .send()
        .await
        .unwrap();
    same(&body_of(resp).await.unwrap(), &data);
    assert_eq!(up.blob_gets(&d), 1, "still one upstream GET");
    let s = fourth.fleet.stats();
    assert_eq!(s.store_bytes().0, data.len() as u64);
    assert_eq!(
        s.leases(LeaseResult::Won) + s.leases(LeaseResult::Followed),
        0
    );
    println!(
        "fourth replica: store GETs {}, HEADs {}, bytes read {}",
        s.requests(Op::Get),
        s.requests(Op::Head),
        s.store_bytes().0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_resolved_on_one_replica_is_answered_by_another_without_the_upstream() {
    let up = FakeUpstream::start().await;
    let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    let d = up.add_manifest(
        "library/app",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        body,
    );
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let a = Replica::start(&up.url(), store.clone()).await;
    let b = Replica::start(&up.url(), store.clone()).await;
    let c = client();
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let resp = c
        .get(a.url("/v2/library/app/manifests/v1"))
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["docker-content-digest"], d.as_str());
    let upstream_requests = up.count("GET", "/manifests/") + up.count("HEAD", "/manifests/");
    assert_eq!(upstream_requests, 1);
    // The shared manifest and tag answer land in the background.
    let hex = &d[7..];
    let manifest_key = object_store::path::Path::from(format!("fleet/manifests/sha256/{hex}"));
    until_async(|| async { store.head(&manifest_key).await.is_ok() }).await;
    until_async(|| async {
        store
            .list_with_delimiter(Some(&object_store::path::Path::from(
                "fleet/tags/up/library/app/v1",
            )))
            .await
            .is_ok_and(|l| !l.objects.is_empty())
    })
    .await;

    for path in [
        "/v2/library/app/manifests/v1",
        &format!("/v2/library/app/manifests/{d}"),
    ] {
        let resp = c
            .get(b.url(path))
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["docker-content-digest"], d.as_str());
        assert_eq!(body_of(resp).await.unwrap().as_ref(), &body[..]);
    }
    let after = up.count("GET", "/manifests/") + up.count("HEAD", "/manifests/");
    assert_eq!(
        after, 1,
        "the second replica asked the store, not the upstream"
    );
}

async fn until_async<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..400 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("condition not reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_started_on_one_replica_continues_on_the_others() {
    use support::registry::{Registry, RegistryAuth};
    let registry = match Registry::start(RegistryAuth::None).await {
        Ok(r) => r,
        Err(e) => {
            println!("SKIPPED: docker-registry cannot start here: {e}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!("ci:{}\n", bcrypt::hash("ci-pass", 4).unwrap()),
    )
    .unwrap();
    let mut config = config_for(&registry.url());
    config.auth.htpasswd = Some(htpasswd);
    config.auth.push = true;
    config.auth.anonymous_pull = true;
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Replica::start_with(config.clone(), store.clone()).await);
    }
    let data = blob_of(300_000, 3);
    let d = sha(&data);
    let c = client();
    let started = c
        .post(replicas[0].url("/v2/team/app/blobs/uploads/"))
        .basic_auth("ci", Some("ci-pass"))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let mut location = started.headers()["location"].to_str().unwrap().to_owned();
    // Round robin: each step on the next replica.
    for (i, part) in [&data[..100_000], &data[100_000..]].into_iter().enumerate() {
        let start = if i == 0 { 0 } else { 100_000 };
        let r = &replicas[(i + 1) % 3];
        let resp = c
            .patch(r.url(&location))
            .basic_auth("ci", Some("ci-pass"))
            .header("content-type", "application/octet-stream")
            .header(
                "content-range",
                format!("{start}-{}", start + part.len() - 1),
            )
            .body(part.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "PATCH {i} on replica {}", (i + 1) % 3);
        location = resp.headers()["location"].to_str().unwrap().to_owned();
    }
    let resp = c
        .put(replicas[0].url(&format!("{location}?digest={d}")))
        .basic_auth("ci", Some("ci-pass"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "closing PUT on replica 0");
    // The upstream has the blob, whole.
    let got = c
        .get(format!("{}/v2/team/app/blobs/{d}", registry.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    same(&body_of(got).await.unwrap(), &data);
    // The shared state is gone with the upload.
    let left: Vec<_> = store
        .list(Some(&object_store::path::Path::from("fleet/uploads")))
        .collect::<Vec<_>>()
        .await;
    assert!(left.is_empty(), "{left:?}");
}

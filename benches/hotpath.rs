//! Criterion benches for the hot paths behind a request: digest verification over 1 MiB
//! chunks, the fill path (write + hash + fan-out of one download to N followers following
//! it from memory and the growing file), and cached manifest answers by digest and by tag through `App::handle`.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use futures_util::StreamExt;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Empty};
use regcache::app::App;
use regcache::cache::fill::Writer;
use regcache::cache::hasher::Hasher;
use regcache::cache::inflight::{InFlight, Join};
use regcache::cache::store::{BlobStore, FsStore, StoredManifest, TagKey, TagRecord};
use regcache::cache::tail::Tail;
use regcache::config::Config;
use regcache::media::{Accept, OCI_MANIFEST};
use regcache::reference::{Algorithm, Digest};

const MIB: usize = 1 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn verification(c: &mut Criterion) {
    let chunk = vec![0xa5u8; MIB];
    let mut g = c.benchmark_group("verify");
    g.throughput(Throughput::Bytes(64 * MIB as u64));
    g.bench_function("sha256_64MiB_in_1MiB_chunks", |b| {
        b.iter(|| {
            let mut h = Hasher::new(Algorithm::Sha256);
            for _ in 0..64 {
                h.update(black_box(&chunk));
            }
            h.finish()
        })
    });
    g.finish();
}

/// One download of `data` handed to the download's writer in 1 MiB batches (written,
/// published, hashed on its own threads) while `followers` tail readers stream it to the end;
/// then verified and committed.
async fn one_fill(
    store: &Arc<FsStore>,
    inflight: &Arc<InFlight>,
    data: &Bytes,
    digest: &Digest,
    followers: usize,
) {
    let Join::Leader(guard) = inflight.join(digest, || store.staging_path("bench")) else {
        panic!("a previous fill is still under way");
    };
    let fill = guard.fill().clone();
    let readers: Vec<_> = (0..followers)
        .map(|_| {
            let s = Tail::new(fill.clone(), store.clone(), 0, None).into_stream();
            tokio::spawn(async move {
                let mut n = 0usize;
                let mut s = std::pin::pin!(s);
                while let Some(b) = s.next().await {
                    n += b.expect("read").len();
                }
                n
            })
        })
        .collect();
    let file = std::fs::File::create(&fill.staged).expect("stage");
    let len = data.len() as u64;
    let mut writer =
        Writer::start(file, digest.algorithm(), guard.streaming(Some(len))).expect("threads");
    for at in (0..data.len()).step_by(MIB) {
        let batch = vec![data.slice(at..(at + MIB).min(data.len()))];
        writer.write(Arc::new(batch)).await.expect("write");
    }
    let written = writer.finish().await.expect("finish");
    assert_eq!(&written.digest, digest);
    guard.verified(written.len);
    drop(written.file);
    store
        .commit_blob(digest, &fill.staged)
        .await
        .expect("commit");
    guard.complete(len);
    for r in readers {
        assert_eq!(r.await.expect("reader"), data.len());
    }
    std::fs::remove_file(store.blob_path(digest)).expect("uncommit");
}

fn fill_path(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(rt.block_on(FsStore::open(dir.path())).expect("store"));
    let inflight = Arc::new(InFlight::default());
    let data = Bytes::from(
        (0..16 * MIB)
            .map(|i| (i * 31 % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let digest = Digest::sha256(&data);
    let mut g = c.benchmark_group("fill_16MiB");
    g.sample_size(10);
    for followers in [1usize, 8, 32] {
        g.throughput(Throughput::Bytes((data.len() * followers) as u64));
        g.bench_with_input(
            BenchmarkId::new("followers", followers),
            &followers,
            |b, &n| b.iter(|| rt.block_on(one_fill(&store, &inflight, &data, &digest, n))),
        );
    }
    g.finish();
}

fn lookups(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config {
        cache_dir: dir.path().to_owned(),
        offline: true,
        ..Config::default()
    };
    config.upstreams[0].offline = true;
    let config = config.validate().expect("config");
    let (app, digest) = rt.block_on(async {
        let store = Arc::new(FsStore::open(dir.path()).await.expect("store"));
        let body = Bytes::from(format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[]}}"#,
            Digest::sha256(b"{}")
        ));
        let digest = Digest::sha256(&body);
        let m = StoredManifest {
            media_type: OCI_MANIFEST.into(),
            body,
        };
        store.put_manifest(&digest, &m).await.expect("manifest");
        let mut accept_headers = http::HeaderMap::new();
        accept_headers.insert(header::ACCEPT, OCI_MANIFEST.parse().expect("accept"));
        store
            .put_tag(
                &TagKey {
                    upstream: "docker.io".into(),
                    repository: "library/alpine".parse().expect("repo"),
                    tag: "3.20".parse().expect("tag"),
                    accept: Accept::from_headers(&accept_headers).key(),
                },
                &TagRecord {
                    digest: digest.clone(),
                    media_type: OCI_MANIFEST.into(),
                },
            )
            .await
            .expect("tag");
        (App::with_store(config, store).expect("app"), digest)
    });
    let request = |method: Method, reference: &str| {
        Request::builder()
            .method(method)
            .uri(format!("/v2/library/alpine/manifests/{reference}"))
            .header(header::ACCEPT, OCI_MANIFEST)
            .body(Empty::<Bytes>::new())
            .expect("request")
    };
    let answer = |method: Method, reference: String| {
        let app = app.clone();
        async move {
            let r = app.handle(request(method, &reference)).await;
            assert_eq!(r.status(), 200);
            r.into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
                .len()
        }
    };
    let mut g = c.benchmark_group("cached_manifest");
    g.bench_function("get_by_digest", |b| {
        b.iter(|| rt.block_on(answer(Method::GET, digest.to_string())))
    });
    g.bench_function("get_by_tag", |b| {
        b.iter(|| rt.block_on(answer(Method::GET, "3.20".into())))
    });
    g.bench_function("head_by_tag", |b| {
        b.iter(|| rt.block_on(answer(Method::HEAD, "3.20".into())))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = verification, fill_path, lookups
}
criterion_main!(benches);

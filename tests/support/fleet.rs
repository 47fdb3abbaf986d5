//! Owns the fleet test harness: object stores (SeaweedFS `weed mini`, moto's S3), a counting
//! relay in front of the store, the real registry behind a counting, gated relay, nginx
//! round-robin in front of N real `regcache` replicas sharing one bucket, and the helpers the
//! fleet tests and the fleet bench share.
//!
//! - [`s3`]: [`Seaweed`], [`S3Server`] (either store), [`S3Client`] (SigV4, path style).
//! - [`relay`]: [`HttpRelay`], counting every request, optionally stripping request headers
//!   and holding response bodies after K bytes.
//! - [`replica`]: [`Replica`] (the binary with `[fleet]`), [`Upstream`] (registry + relay),
//!   [`Balancer`] (nginx).
//! - [`Fleet`]: all of it wired together for one test: one bucket, one prefix, one peer
//!   token, replicas added one by one.
//!
//! Where a peer cannot start here, constructors return [`Skip`] so the test prints the loud
//! `SKIPPED:` line and returns.

pub mod relay;
pub mod replica;
pub mod s3;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

// Re-exported for the test files; not every test binary uses every one.
#[allow(unused_imports)]
pub use relay::{HttpRelay, Seen};
#[allow(unused_imports)]
pub use replica::{Balancer, FleetSettings, Replica, ReplicaSpec, StartFailure, Upstream};
#[allow(unused_imports)]
pub use s3::{Cond, Lane, S3Client, S3Server, Seaweed, unique_bucket};

use super::peers::Skip;

/// The static access key the replicas and the test client sign with.
pub const ACCESS_KEY_ID: &str = "AKIAREGCACHEFLEET001";
/// The static secret key the replicas and the test client sign with.
pub const SECRET_ACCESS_KEY: &str = "regcache-fleet-test-secret";
/// The region every fleet test uses.
pub const REGION: &str = "us-east-1";
/// The key prefix inside the bucket (`store = "s3://<bucket>/<PREFIX>"`).
pub const PREFIX: &str = "regcache";
/// The repository the tests pull blobs from.
pub const REPO: &str = "team/app";

/// A reqwest client that never uses a proxy and keeps no idle connections.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .expect("reqwest client")
}

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `len` pseudo-random bytes from `seed` (xorshift64*), the same for the same arguments.
pub fn blob_of(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// Polls `cond` every 20 ms until it returns true or `limit` passes; returns whether it held.
pub async fn wait_until<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every committed blob under `cache_dir/blobs/<alg>/<2 hex>/<hex>` hashes to its name;
/// returns how many there are.
#[track_caller]
pub fn assert_cache_verified(cache_dir: &std::path::Path) -> usize {
    let mut n = 0;
    let walk = |d: &std::path::Path| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .map(|e| e.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    for alg in walk(&cache_dir.join("blobs")) {
        for prefix in walk(&alg) {
            for blob in walk(&prefix) {
                let data = std::fs::read(&blob).unwrap_or_default();
                let name = blob.file_name().unwrap_or_default().to_string_lossy();
                assert_eq!(
                    sha256(&data),
                    format!("sha256:{name}"),
                    "{} is not what its name says",
                    blob.display()
                );
                n += 1;
            }
        }
    }
    n
}

/// What one client pull got: status, body length and the body's digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// HTTP status.
    pub status: u16,
    /// Body bytes received.
    pub len: u64,
    /// `sha256:<hex>` of the body.
    pub digest: String,
}

/// A client pull in the background; [`PullTask::received`] counts bytes as they arrive.
pub struct PullTask {
    /// Which replica it asked.
    pub replica: usize,
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<anyhow::Result<Pulled>>,
}

impl PullTask {
    /// Starts `GET url` (after `start` is released, when given), hashing the body as it
    /// streams.
    pub fn spawn(
        url: String,
        replica: usize,
        start: Option<std::sync::Arc<tokio::sync::Barrier>>,
    ) -> PullTask {
        use futures_util::StreamExt;
        let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = received.clone();
        let task = tokio::spawn(async move {
            if let Some(b) = start {
                b.wait().await;
            }
            let resp = client().get(&url).send().await?;
            let status = resp.status().as_u16();
            let mut body = resp.bytes_stream();
            let mut h = Sha256::new();
            let mut len = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                h.update(&chunk);
                len += chunk.len() as u64;
                counter.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(Pulled {
                status,
                len,
                digest: format!("sha256:{}", hex::encode(h.finalize())),
            })
        });
        PullTask {
            replica,
            received,
            task,
        }
    }

    /// Body bytes received so far.
    pub fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits (≤ `limit`) for the pull to end.
    pub async fn finish(self, limit: Duration) -> anyhow::Result<Pulled> {
        match tokio::time::timeout(limit, self.task).await {
            Ok(joined) => joined?,
            Err(_) => anyhow::bail!(
                "pull from replica {} still going after {limit:?}",
                self.replica
            ),
        }
    }
}

/// Sum of metric `name` with `labels` over `replicas` (those that answer).
pub async fn metric_total_of(replicas: &[Replica], name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for r in replicas {
        sum += r.metric(name, labels).await.unwrap_or(0.0);
    }
    sum
}

/// One fleet on loopback: a store (with a fresh bucket), a counting relay the replicas reach
/// the store through, a counting, gated upstream, a peer token and the replicas.
pub struct Fleet {
    /// The S3 server.
    pub store: S3Server,
    /// A client straight to the store (not counted by [`Fleet::store_relay`]).
    pub s3: S3Client,
    /// This test's bucket.
    pub bucket: String,
    /// What the replicas send to the store passes here.
    pub store_relay: HttpRelay,
    /// The upstream registry behind its relay.
    pub upstream: Upstream,
    /// The replicas, in the order they were added.
    pub replicas: Vec<Replica>,
    /// `lease_ttl` of every replica.
    pub lease_ttl: Duration,
    dir: tempfile::TempDir,
}

impl Fleet {
    /// Starts the store of `lane` with a fresh bucket, the store relay, the upstream and the
    /// peer token; no replica yet (see [`Fleet::add_replica`]).
    pub async fn start(lane: Lane, lease_ttl: Duration) -> Result<Fleet, Skip> {
        let store = S3Server::start(lane).await?;
        let s3 = S3Client::new(&store.url());
        let bucket = unique_bucket("t");
        s3.create_bucket(&bucket)
            .await
            .map_err(|e| Skip::new(format!("create bucket: {e:#}")))?;
        let store_relay = HttpRelay::start(store.addr())
            .await
            .map_err(|e| Skip::new(format!("store relay: {e:#}")))?;
        let upstream = Upstream::start().await?;
        let dir = tempfile::Builder::new()
            .prefix("regcache-fleet-")
            .tempdir()
            .map_err(|e| Skip::new(e.to_string()))?;
        let token = blob_of(24, rand::random());
        std::fs::write(
            dir.path().join("peer-token"),
            format!("{}\n", hex::encode(token)),
        )
        .map_err(|e| Skip::new(e.to_string()))?;
        Ok(Fleet {
            store,
            s3,
            bucket,
            store_relay,
            upstream,
            replicas: Vec::new(),
            lease_ttl,
            dir,
        })
    }

    /// The peer token file every replica names.
    pub fn peer_token_file(&self) -> PathBuf {
        self.dir.path().join("peer-token")
    }

    /// The peer token itself.
    pub fn peer_token(&self) -> String {
        std::fs::read_to_string(self.peer_token_file())
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// The `[fleet]` table of the replicas (store reached through the relay).
    pub fn settings(&self) -> FleetSettings {
        FleetSettings {
            store: format!("s3://{}/{PREFIX}", self.bucket),
            endpoint: self.store_relay.url(),
            peer_token_file: self.peer_token_file(),
            lease_ttl: format!("{}ms", self.lease_ttl.as_millis()),
        }
    }

    /// The spec of a replica of this fleet.
    pub fn spec(&self) -> ReplicaSpec {
        ReplicaSpec::new(&self.upstream.url(), Some(self.settings()))
    }

    /// Starts `n` replicas with [`Fleet::spec`].
    pub async fn add_replicas(&mut self, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            self.add_replica().await?;
        }
        Ok(())
    }

    /// `http://<replica i>/v2/<REPO>/blobs/<digest>`
    pub fn blob_url(&self, i: usize, digest: &str) -> String {
        format!("{}/v2/{REPO}/blobs/{digest}", self.replicas[i].url())
    }

    /// Sum of metric `name` with `labels` over every replica still running.
    pub async fn metric_total(&mut self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut sum = 0.0;
        for r in self.replicas.iter_mut() {
            if r.is_running() {
                sum += r.metric(name, labels).await.unwrap_or(0.0);
            }
        }
        sum
    }

    /// Starts one more replica with [`Fleet::spec`]; returns its index.
    pub async fn add_replica(&mut self) -> anyhow::Result<usize> {
        let spec = self.spec();
        self.add_replica_with(&spec).await
    }

    /// Starts one more replica with `spec`; returns its index.
    pub async fn add_replica_with(&mut self, spec: &ReplicaSpec) -> anyhow::Result<usize> {
        let i = self.replicas.len();
        let r = Replica::start(&format!("r{i}"), spec).await?;
        self.replicas.push(r);
        Ok(i)
    }

    /// The bucket key of `<class>/<rest>` under the prefix.
    pub fn key(&self, rest: &str) -> String {
        format!("{PREFIX}/{rest}")
    }

    /// Requests the replicas made to the store with `method` on keys of `class` (`blobs`,
    /// `leases`, `manifests`, `tags`, `uploads`, `probe`), through the relay.
    pub fn store_requests(&self, method: &str, class: &str) -> Vec<Seen> {
        let part = format!("/{}/{PREFIX}/{class}/", self.bucket);
        self.store_relay
            .requests()
            .into_iter()
            .filter(|s| s.method == method && s.path.starts_with(&part))
            .collect()
    }

    /// [`Fleet::store_requests`], counted.
    pub fn store_count(&self, method: &str, class: &str) -> usize {
        self.store_requests(method, class).len()
    }

    /// Every store request of the replicas so far, `method class` → count.
    pub fn store_summary(&self) -> std::collections::BTreeMap<String, usize> {
        let head = format!("/{}/{PREFIX}/", self.bucket);
        let mut out = std::collections::BTreeMap::new();
        for s in self.store_relay.requests() {
            let class = s
                .path
                .strip_prefix(&head)
                .and_then(|r| r.split('/').next())
                .unwrap_or("(bucket)");
            *out.entry(format!("{} {class}", s.method)).or_insert(0) += 1;
        }
        out
    }

    /// The lease object of `digest` (`leases/sha256/<hex>`), if one exists now.
    pub async fn lease(&self, digest: &str) -> Option<serde_json::Value> {
        let hex = digest.strip_prefix("sha256:")?;
        let o = self
            .s3
            .get(&self.bucket, &self.key(&format!("leases/sha256/{hex}")))
            .await
            .ok()?;
        (o.status == 200)
            .then(|| serde_json::from_slice(&o.body).ok())
            .flatten()
    }

    /// The index of the replica whose `advertise` URL `lease` names.
    pub fn holder(&self, lease: &serde_json::Value) -> Option<usize> {
        let url = lease["advertise"].as_str()?.trim_end_matches('/');
        self.replicas.iter().position(|r| r.url() == url)
    }

    /// The verified blob in tier 2 (`blobs/sha256/<hex>`), if it is there.
    pub async fn tier2_blob(&self, digest: &str) -> Option<Bytes> {
        let hex = digest.strip_prefix("sha256:")?;
        let o = self
            .s3
            .get(&self.bucket, &self.key(&format!("blobs/sha256/{hex}")))
            .await
            .ok()?;
        (o.status == 200).then_some(o.body)
    }
}

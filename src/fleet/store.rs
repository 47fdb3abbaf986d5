//! The object-store client of the fleet: built from the `store` URL (S3, GCS or Azure, with
//! settings from the environment), every request counted by operation, its keys under the
//! configured prefix, and the store's reachability followed from each answer (a change is
//! logged once).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, ObjectMeta, ObjectStore, PutMode, PutOptions, PutPayload, PutResult,
    RetryConfig, UpdateVersion,
};
use url::Url;

use super::stats::{FleetStats, Op};
use crate::reference::Digest;

/// Why a store request gave no answer the fleet can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No object at the key.
    #[error("no such object")]
    NotFound,
    /// A condition failed: a create-only PUT found an object, a compare-and-swap found
    /// another version.
    #[error("condition not met")]
    Conflict,
    /// The store does not offer the operation (conditional writes turned off).
    #[error("the store does not support this: {0}")]
    Unsupported(String),
    /// The store could not be reached, failed, or refused the credentials.
    #[error("object store unreachable: {0}")]
    Unreachable(String),
}

impl From<object_store::Error> for StoreError {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound,
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. }
            | object_store::Error::NotModified { .. } => StoreError::Conflict,
            object_store::Error::NotSupported { .. }
            | object_store::Error::NotImplemented { .. } => StoreError::Unsupported(e.to_string()),
            other => StoreError::Unreachable(other.to_string()),
        }
    }
}

/// The store, counted: every method is one request (a multipart upload counts each of its
/// requests), and each answer tells whether the store is up.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: String,
    /// The configured URL, for logs and errors (it holds no secret: settings come from the
    /// environment).
    url: String,
    stats: Arc<FleetStats>,
    // Bounds each small request (leases, probes, HEADs) and the wait for a GET's headers.
    op_timeout: Duration,
}

// Conditional writes wait longer than other small requests: a store may hold the losers of
// a race for seconds (SeaweedFS 4.48: 1 to 6 s), and a loser timed out would count the
// store as down and send its replica to the upstream alone.
const CONDITIONAL_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds the object-store client for `url` with settings from the environment. Retries are
/// few and short: a store that does not answer puts the fleet in degraded mode quickly
/// rather than holding requests.
pub fn connect(url: &Url) -> Result<Arc<dyn ObjectStore>, StoreError> {
    use object_store::ClientConfigKey::{ConnectTimeout, Timeout};
    // Set key by key on top of the environment's settings: replacing the client options
    // would drop those the environment gave (AWS_ALLOW_HTTP among them).
    let connect = "3s";
    // Blob bodies may take long; a stalled one is caught by the download's idle timeout.
    let whole = "1d";
    let retry = RetryConfig {
        max_retries: 2,
        retry_timeout: Duration::from_secs(10),
        ..RetryConfig::default()
    };
    let bad = |e: object_store::Error| StoreError::Unsupported(e.to_string());
    let store: Arc<dyn ObjectStore> = match url.scheme() {
        "s3" => {
            use object_store::aws::AmazonS3ConfigKey::Client;
            Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url.as_str())
                    .with_config(Client(ConnectTimeout), connect)
                    .with_config(Client(Timeout), whole)
                    .with_retry(retry)
                    .build()
                    .map_err(bad)?,
            )
        }
        "gs" => {
            use object_store::gcp::GoogleConfigKey::Client;
            Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url.as_str())
                    .with_config(Client(ConnectTimeout), connect)
                    .with_config(Client(Timeout), whole)
                    .with_retry(retry)
                    .build()
                    .map_err(bad)?,
            )
        }
        "az" => {
            use object_store::azure::AzureConfigKey::Client;
            Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url.as_str())
                    .with_config(Client(ConnectTimeout), connect)
                    .with_config(Client(Timeout), whole)
                    .with_retry(retry)
                    .build()
                    .map_err(bad)?,
            )
        }
        other => {
            return Err(StoreError::Unsupported(format!(
                "no object store for {other}://"
            )));
        }
    };
    Ok(store)
}

/// A GET's answer: the object's size and its bytes from the offset asked for.
pub struct Got {
    /// The whole object's size.
    pub size: u64,
    /// The object's metadata (ETag, version).
    pub meta: ObjectMeta,
    /// Its attributes (content type).
    pub attributes: object_store::Attributes,
    /// The bytes, counted as they are read.
    pub bytes: futures_util::stream::BoxStream<'static, Result<Bytes, StoreError>>,
}

impl Store {
    /// The store `inner` under `prefix`, shown in logs as `url`.
    pub fn new(
        inner: Arc<dyn ObjectStore>,
        prefix: &str,
        url: &str,
        stats: Arc<FleetStats>,
        op_timeout: Duration,
    ) -> Self {
        Store {
            inner,
            prefix: prefix.trim_matches('/').to_owned(),
            url: url.to_owned(),
            stats,
            op_timeout,
        }
    }

    /// The configured URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The figures this store counts into.
    pub fn stats(&self) -> &Arc<FleetStats> {
        &self.stats
    }

    /// The key `rest` under the prefix.
    pub fn key(&self, rest: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rest)
        } else {
            Path::from(format!("{}/{rest}", self.prefix))
        }
    }

    /// `blobs/<algorithm>/<hex>`: a verified blob.
    pub fn blob_key(&self, d: &Digest) -> Path {
        self.key(&format!("blobs/{}/{}", d.algorithm().as_str(), d.hex()))
    }

    /// `manifests/<algorithm>/<hex>`: a verified manifest.
    pub fn manifest_key(&self, d: &Digest) -> Path {
        self.key(&format!("manifests/{}/{}", d.algorithm().as_str(), d.hex()))
    }

    /// `leases/<algorithm>/<hex>`: who is downloading a blob.
    pub fn lease_key(&self, d: &Digest) -> Path {
        self.key(&format!("leases/{}/{}", d.algorithm().as_str(), d.hex()))
    }

    // Notes the store's health from a request's result and passes the result on.
    fn seen<T>(&self, r: Result<T, object_store::Error>) -> Result<T, StoreError> {
        let r = r.map_err(StoreError::from);
        self.note(&r);
        r
    }

    /// Notes the store's health from a result: any answer means up; no answer means down.
    pub fn note<T>(&self, r: &Result<T, StoreError>) {
        match r {
            Err(StoreError::Unreachable(why)) => self.set_up(false, Some(why)),
            _ => self.set_up(true, None),
        }
    }

    fn set_up(&self, up: bool, why: Option<&str>) {
        if self.stats.set_store_up(up) {
            // Logged once per transition.
            if up {
                tracing::info!(store = %self.url, "object store reachable: fleet mode");
            } else {
                tracing::warn!(
                    store = %self.url,
                    error = why.unwrap_or(""),
                    "degraded: object store unreachable; serving the local tier with per-replica single flight"
                );
            }
        }
    }

    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, object_store::Error>>,
    ) -> Result<T, StoreError> {
        self.timed_for(self.op_timeout, f).await
    }

    async fn timed_for<T>(
        &self,
        limit: Duration,
        f: impl std::future::Future<Output = Result<T, object_store::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(limit, f).await {
            Ok(r) => self.seen(r),
            Err(_) => {
                let r = Err(StoreError::Unreachable(format!(
                    "no answer within {}",
                    crate::units::HumanDuration(limit)
                )));
                self.note(&r);
                r
            }
        }
    }

    /// `GET key` from byte `from` on.
    pub async fn get(&self, key: &Path, from: u64) -> Result<Got, StoreError> {
        self.stats.request(Op::Get);
        let opts = GetOptions {
            range: (from > 0).then_some(GetRange::Offset(from)),
            ..GetOptions::default()
        };
        let got = self.timed(self.inner.get_opts(key, opts)).await?;
        let stats = self.stats.clone();
        let size = got.meta.size;
        let meta = got.meta.clone();
        let attributes = got.attributes.clone();
        let bytes = got
            .into_stream()
            .map(move |r| match r {
                Ok(b) => {
                    stats.store_read(b.len() as u64);
                    Ok(b)
                }
                Err(e) => Err(StoreError::Unreachable(e.to_string())),
            })
            .boxed();
        Ok(Got {
            size,
            meta,
            attributes,
            bytes,
        })
    }

    /// `GET key`, the whole (small) object with its metadata.
    pub async fn get_small(&self, key: &Path) -> Result<(Bytes, ObjectMeta), StoreError> {
        self.get_small_with(key).await.map(|(b, m, _)| (b, m))
    }

    /// `GET key`, the whole (small) object with its metadata and attributes.
    pub async fn get_small_with(
        &self,
        key: &Path,
    ) -> Result<(Bytes, ObjectMeta, object_store::Attributes), StoreError> {
        let got = self.get(key, 0).await?;
        let mut out = Vec::with_capacity(got.size.min(1 << 20) as usize);
        let mut bytes = got.bytes;
        let read = async {
            while let Some(b) = bytes.next().await {
                out.extend_from_slice(&b?);
            }
            Ok::<_, StoreError>(())
        };
        match tokio::time::timeout(self.op_timeout, read).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(StoreError::Unreachable(
                    "an object's body stalled".to_owned(),
                ));
            }
        }
        Ok((Bytes::from(out), got.meta, got.attributes))
    }

    /// `HEAD key`.
    pub async fn head(&self, key: &Path) -> Result<ObjectMeta, StoreError> {
        self.stats.request(Op::Head);
        self.timed(self.inner.head(key)).await
    }

    /// `PUT key` with `mode`: unconditional, create-only or compare-and-swap.
    pub async fn put(
        &self,
        key: &Path,
        body: Bytes,
        mode: PutMode,
        attributes: object_store::Attributes,
    ) -> Result<PutResult, StoreError> {
        self.stats.request(match mode {
            PutMode::Overwrite => Op::Put,
            PutMode::Create => Op::PutCreate,
            PutMode::Update(_) => Op::PutUpdate,
        });
        let n = body.len() as u64;
        let limit = match mode {
            PutMode::Overwrite => self.op_timeout,
            PutMode::Create | PutMode::Update(_) => self.op_timeout.max(CONDITIONAL_TIMEOUT),
        };
        let opts = PutOptions {
            mode,
            attributes,
            ..PutOptions::default()
        };
        let r = self
            .timed_for(
                limit,
                self.inner.put_opts(key, PutPayload::from(body), opts),
            )
            .await;
        if r.is_ok() {
            self.stats.store_written(n);
        }
        r
    }

    /// Creates `key` only if it does not exist: `Conflict` when it does.
    pub async fn create(&self, key: &Path, body: Bytes) -> Result<PutResult, StoreError> {
        self.put(key, body, PutMode::Create, Default::default())
            .await
    }

    /// Replaces `key` only if it is still at `version`: `Conflict` when it is not.
    pub async fn swap(
        &self,
        key: &Path,
        body: Bytes,
        version: UpdateVersion,
    ) -> Result<PutResult, StoreError> {
        self.put(key, body, PutMode::Update(version), Default::default())
            .await
    }

    /// `DELETE key` (deleting a missing key is no error).
    pub async fn delete(&self, key: &Path) -> Result<(), StoreError> {
        self.stats.request(Op::Delete);
        match self.timed(self.inner.delete(key)).await {
            Err(StoreError::NotFound) => Ok(()),
            r => r,
        }
    }

    /// Starts a multipart upload to `key` (one request).
    pub async fn multipart(
        &self,
        key: &Path,
        attributes: object_store::Attributes,
    ) -> Result<Multipart, StoreError> {
        self.stats.request(Op::Multipart);
        let opts = object_store::PutMultipartOptions {
            attributes,
            ..Default::default()
        };
        let upload = self.timed(self.inner.put_multipart_opts(key, opts)).await?;
        Ok(Multipart {
            upload,
            store: self.clone(),
        })
    }
}

/// A multipart upload under way: each part, the completion and the abort are counted.
pub struct Multipart {
    upload: Box<dyn object_store::MultipartUpload>,
    store: Store,
}

impl Multipart {
    /// Uploads the next part.
    pub async fn part(&mut self, data: Bytes) -> Result<(), StoreError> {
        self.store.stats.request(Op::Multipart);
        let n = data.len() as u64;
        let r = self
            .store
            .seen(self.upload.put_part(PutPayload::from(data)).await);
        if r.is_ok() {
            self.store.stats.store_written(n);
        }
        r
    }

    /// Completes the upload: the object appears whole under its key.
    pub async fn complete(mut self) -> Result<PutResult, StoreError> {
        self.store.stats.request(Op::Multipart);
        let r = self.upload.complete().await;
        self.store.seen(r)
    }

    /// Abandons the upload: its parts are dropped and the key is untouched.
    pub async fn abort(mut self) -> Result<(), StoreError> {
        self.store.stats.request(Op::Multipart);
        let r = self.upload.abort().await;
        self.store.seen(r)
    }
}

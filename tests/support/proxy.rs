//! Owns regcache itself in end-to-end tests: an in-process regcache on a loopback port ([`Proxy`]), a Docker-Hub-like upstream ([`Hub`]: real registry + token server) and a request-recording TCP tap ([`Tap`]).
//!
//! - [`Proxy`] runs `regcache::server::serve` on `127.0.0.1:0` with a temp cache dir; its
//!   upstream `hub` (Docker Hub naming rules) is the default one. Stopped on drop.
//! - [`Hub`] is a real `docker-registry` with Docker-Hub-style bearer-token auth, plus helpers
//!   to push OCI layouts into it and count what it served.
//! - [`Tap`] is a transparent TCP relay in front of a server that records the request line
//!   and headers of every HTTP/1 request passing through, so a test can see exactly what a
//!   client sent to regcache (query strings such as containerd's `?ns=docker.io` included).
//!
//! Set `RUST_LOG` (e.g. `RUST_LOG=regcache=debug`) to see regcache's own logs; see
//! [`init_tracing`].

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use anyhow::Context;
use regcache::app::App;
use regcache::config::{Config, UpstreamConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::image::{self, OciLayout};
use super::registry::Registry;
use super::token::TokenServer;

/// Name of the Docker-Hub-style upstream every [`Proxy::start`] configures.
pub const HUB: &str = "hub";

/// Installs a `tracing_subscriber` fmt subscriber (test writer) when `RUST_LOG` is set, once
/// per process; otherwise does nothing, so regcache stays quiet.
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

/// The configuration [`Proxy::start`] uses: one upstream [`HUB`] at `upstream_url` with
/// Docker Hub naming, as the default upstream, caching under `cache_dir`.
pub fn hub_config(upstream_url: &str, cache_dir: &Path) -> Config {
    let mut up = UpstreamConfig::new(HUB, upstream_url.parse().expect("upstream URL"));
    up.docker_hub = Some(true);
    Config {
        cache_dir: cache_dir.to_owned(),
        upstreams: vec![up],
        default_upstream: HUB.into(),
        ..Config::default()
    }
}

/// regcache served in-process on a free loopback port; shut down on [`Proxy::stop`] or drop.
pub struct Proxy {
    /// The application (counters: `upstream(HUB).token_fetches()`, `downloads_in_flight()`).
    pub app: Arc<App>,
    addr: SocketAddr,
    cache: PathBuf,
    cache_guard: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Proxy {
    /// Starts regcache with [`hub_config`] and a fresh temp cache dir.
    pub async fn start(upstream_url: &str) -> anyhow::Result<Proxy> {
        let dir = tempfile::Builder::new()
            .prefix("regcache-cache-")
            .tempdir()
            .context("tempdir")?;
        let cfg = hub_config(upstream_url, dir.path());
        let mut proxy = Proxy::start_with(cfg).await?;
        proxy.cache_guard = Some(dir);
        Ok(proxy)
    }

    /// Starts regcache with `cfg` (validated here) on `127.0.0.1:0`. The caller keeps
    /// `cfg.cache_dir` alive.
    pub async fn start_with(cfg: Config) -> anyhow::Result<Proxy> {
        init_tracing();
        let cfg = cfg.validate().context("validate regcache config")?;
        let cache = cfg.cache_dir.clone();
        let app = App::new(cfg).await.context("start regcache App")?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(regcache::server::serve(
            listener,
            app.clone(),
            None,
            Duration::from_secs(5),
            async move {
                let _ = stop_rx.await;
            },
        ));
        Ok(Proxy {
            app,
            addr,
            cache,
            cache_guard: None,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// `127.0.0.1:PORT`, the registry part of image references through the proxy.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The listening address (to put a [`Tap`] in front of it).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    /// Token requests regcache made for upstream [`HUB`].
    pub fn token_fetches(&self) -> u64 {
        self.app
            .upstream(HUB)
            .expect("upstream hub configured")
            .token_fetches()
    }

    /// Digests (`sha256:<hex>`) of the blobs committed to the cache dir
    /// (`<cache>/blobs/<alg>/<2 hex>/<hex>`).
    pub fn cached_blobs(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let Ok(algs) = fs::read_dir(self.cache.join("blobs")) else {
            return out;
        };
        for alg in algs.flatten() {
            let alg_name = alg.file_name().to_string_lossy().into_owned();
            for prefix in fs::read_dir(alg.path()).into_iter().flatten().flatten() {
                for blob in fs::read_dir(prefix.path()).into_iter().flatten().flatten() {
                    if blob.path().is_file() {
                        out.insert(format!("{alg_name}:{}", blob.file_name().to_string_lossy()));
                    }
                }
            }
        }
        out
    }

    /// Waits (≤ 10 s, polling) until no blob download is in flight; false on time-out.
    pub async fn wait_idle(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.app.downloads_in_flight() > 0 {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stops accepting, lets open requests finish (≤ 5 s grace) and waits for the server.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A Docker-Hub-like upstream: a real registry with bearer-token auth from an in-process
/// token server that grants whatever is asked (anonymous tokens).
pub struct Hub {
    /// The token server (counts token requests per scope).
    pub token: TokenServer,
    /// The registry (access-log counters).
    pub registry: Registry,
}

impl Hub {
    /// Starts the token server and the registry trusting it.
    pub async fn start() -> anyhow::Result<Hub> {
        let token = TokenServer::start().await.context("token server")?;
        let registry = Registry::start(token.registry_auth())
            .await
            .context("registry in token mode")?;
        Ok(Hub { token, registry })
    }

    /// `http://127.0.0.1:PORT` of the registry (regcache's upstream URL).
    pub fn url(&self) -> String {
        self.registry.url()
    }

    /// Pushes `layout` directly to the registry as `name_tag` (`library/hello:1`); returns
    /// the pushed digest (asserted equal to the layout's).
    pub async fn push(&self, layout: &OciLayout, name_tag: &str) -> anyhow::Result<String> {
        let dest = format!("{}/{name_tag}", self.registry.host());
        let digest = image::push(layout, &dest, None).await?;
        anyhow::ensure!(
            digest == layout.digest(),
            "pushed {name_tag}: skopeo reports {digest}, layout has {}",
            layout.digest()
        );
        Ok(digest)
    }

    /// Digest the registry itself serves for `name_ref` (`library/hello:1`), via
    /// `skopeo inspect --raw` straight at the registry.
    pub async fn inspect_digest(&self, name_ref: &str) -> anyhow::Result<String> {
        image::skopeo_inspect_digest(&format!("{}/{name_ref}", self.registry.host()), &[]).await
    }

    /// After [`Registry::settle_log`]: how often each blob digest was fetched
    /// (`GET /v2/…/blobs/<digest>` with 200/206/307), over the whole access log.
    pub async fn blob_gets(&self) -> BTreeMap<String, usize> {
        self.registry.settle_log().await;
        let mut out = BTreeMap::new();
        for e in self.registry.access_log() {
            if e.method == "GET" && matches!(e.status, 200 | 206 | 307) {
                if let Some((_, digest)) = e.path.rsplit_once("/blobs/") {
                    *out.entry(digest.to_string()).or_insert(0) += 1;
                }
            }
        }
        out
    }
}

/// One HTTP/1 request seen by a [`Tap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TappedRequest {
    /// e.g. `GET`
    pub method: String,
    /// Request target as sent: path plus `?query` if any.
    pub target: String,
    /// Header lines in order, names lowercased (repeated names stay separate).
    pub headers: Vec<(String, String)>,
}

impl TappedRequest {
    /// The path without the query string.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// The query string without `?`, if any.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// Every value of header `name` (lowercase).
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A transparent TCP relay on `127.0.0.1:0` in front of `target` that records every HTTP/1
/// request head flowing client → server. Bodies are skipped by `Content-Length`; pull clients
/// send none. Non-HTTP bytes (a TLS ClientHello from a client probing HTTPS first) are
/// relayed but recorded as nothing. The accept loop is aborted on drop.
pub struct Tap {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<TappedRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Tap {
    /// Starts relaying to `target` (`127.0.0.1:PORT`).
    pub async fn start(target: SocketAddr) -> anyhow::Result<Tap> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                conns.spawn(relay(client, target, seen2.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Tap { addr, seen, task })
    }

    /// `127.0.0.1:PORT` of the tap (give this to clients instead of the proxy's).
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Everything recorded so far, in order of arrival per connection.
    pub fn requests(&self) -> Vec<TappedRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// Forgets what was recorded.
    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, target: SocketAddr, seen: Arc<Mutex<Vec<TappedRequest>>>) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let upward = async move {
        let mut parser = HeadParser::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for req in parser.feed(&buf[..n]) {
                seen.lock().unwrap().push(req);
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    };
    let downward = async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    tokio::join!(upward, downward);
}

/// Incremental parser of HTTP/1 request heads in a client → server byte stream.
#[derive(Default)]
struct HeadParser {
    buf: Vec<u8>,
    skip_body: usize,
    broken: bool,
}

impl HeadParser {
    fn feed(&mut self, data: &[u8]) -> Vec<TappedRequest> {
        let mut out = Vec::new();
        if self.broken {
            return out;
        }
        let mut data = data;
        if self.skip_body > 0 {
            let n = self.skip_body.min(data.len());
            self.skip_body -= n;
            data = &data[n..];
        }
        self.buf.extend_from_slice(data);
        loop {
            if self.skip_body > 0 {
                let n = self.skip_body.min(self.buf.len());
                self.skip_body -= n;
                self.buf.drain(..n);
                if self.skip_body > 0 {
                    break;
                }
            }
            let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                if self.buf.len() > 256 * 1024 || !looks_like_http(&self.buf) {
                    self.broken = true;
                    self.buf.clear();
                }
                break;
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
            self.buf.drain(..end + 4);
            let mut lines = head.split("\r\n");
            let mut request_line = lines.next().unwrap_or("").split(' ');
            let (Some(method), Some(target)) = (request_line.next(), request_line.next()) else {
                self.broken = true;
                break;
            };
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            self.skip_body = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            out.push(TappedRequest {
                method: method.to_string(),
                target: target.to_string(),
                headers,
            });
        }
        out
    }
}

/// True while `buf` can still be the start of an HTTP/1 request (an upper-case method).
fn looks_like_http(buf: &[u8]) -> bool {
    buf.iter()
        .take_while(|b| **b != b' ')
        .all(|b| b.is_ascii_uppercase())
}

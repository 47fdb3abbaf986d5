//! Owns the set-up of a comparison: the upstream (a real registry behind a token server and a
//! login), the image pushed to it, every server under test started on loopback and warmed
//! with that image. Everything lives in one temp dir and stops when the [`Lab`] drops.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use rand::RngCore;

use crate::clients;
use crate::report::{
    DISTRIBUTION, NGINX_PROXY, NGINX_STATIC, REGCACHE, REGCACHE_MAX_SIZE, REGCACHE_UNBOUNDED,
};
use crate::servers::{self, Nginx, Procs, Regcache};
use crate::support::registry::{ProxyUpstream, Registry, RegistryOptions};
use crate::support::token::{TokenServer, TokenServerConfig};

/// The upstream login every cache uses (and the bench, for its tokens).
pub const LOGIN: (&str, &str) = ("bench", "bench-secret");
/// The image manifest type every bench image uses.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A server under test as its clients reach it, and its processes (none for the upstream).
#[derive(Debug, Clone)]
pub struct Server {
    /// Its column in the table.
    pub column: &'static str,
    /// `http://127.0.0.1:PORT` or `https://…`.
    pub url: String,
    /// Its processes, for CPU and memory.
    pub procs: Option<Procs>,
}

/// The image every cache serves warm: one blob of the bench size, its config and manifest.
#[derive(Debug)]
pub struct Image {
    /// Digest of the big blob.
    pub blob: String,
    /// Its size in bytes.
    pub size: u64,
    /// Digest of the manifest, also tagged `latest`.
    pub manifest: String,
}

/// Everything a run measures, started and warm. Field order is drop order: the servers
/// stop before the upstream, the temp dir goes last.
pub struct Lab {
    /// The servers that cache (regcache, distribution, nginx `proxy_cache`).
    pub caches: Vec<Server>,
    /// The caches plus nginx static, over plain HTTP.
    pub plain: Vec<Server>,
    /// regcache and nginx static over TLS.
    pub tls: Vec<Server>,
    /// regcache without `cache.max_size`, for the manifest rows.
    pub unbounded: Server,
    /// The certificate HTTPS clients trust.
    pub cert: PathBuf,
    /// The image in every cache.
    pub image: Image,
    /// Client for pushes, cold misses and the herd (HTTP/1.1, no proxy).
    pub http: reqwest::Client,
    /// Token with push rights on the bench repositories.
    pub push: String,
    /// Token with pull rights, as nginx sends it.
    pub pull: String,
    _regcache: Regcache,
    _regcache_tls: Regcache,
    _regcache_unbounded: Regcache,
    _distribution: Registry,
    _nginx_proxy: Nginx,
    _nginx_static: Nginx,
    /// The upstream registry (access log: upstream GETs per digest).
    pub upstream: Registry,
    _tokens: TokenServer,
    _dir: tempfile::TempDir,
}

/// `size` random bytes.
pub fn random_blob(size: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    rand::rng().fill_bytes(&mut v);
    v
}

impl Lab {
    /// Starts the upstream, pushes the image of `blob_bytes`, starts every server in front
    /// of it and fetches the image through each once. Any failure here is a component that
    /// did not start.
    pub async fn start(blob_bytes: u64) -> anyhow::Result<Lab> {
        let dir = tempfile::Builder::new()
            .prefix("regcache-compare-")
            .tempdir()?;
        let d = dir.path();
        let http = reqwest::Client::builder()
            .no_proxy()
            .http1_only()
            .timeout(Duration::from_secs(900))
            .build()?;

        // The upstream: Docker-Hub-style bearer tokens, handed out only for the login.
        let tokens = TokenServer::start_with(TokenServerConfig {
            credentials: Some((LOGIN.0.into(), LOGIN.1.into())),
            expires_in: 3600,
            ..TokenServerConfig::default()
        })
        .await
        .context("token server")?;
        let upstream = Registry::start(tokens.registry_auth())
            .await
            .context("upstream docker-registry")?;
        let repos: Vec<&str> = ["bench/hit", "bench/cold", "bench/herd"]
            .into_iter()
            .chain(crate::layers::REPOS.map(|(_, repo)| repo))
            .collect();
        let token = |actions: &'static str| {
            let scopes: Vec<String> = repos
                .iter()
                .map(|r| format!("repository:{r}:{actions}"))
                .collect();
            let (http, realm, service) = (http.clone(), tokens.realm(), tokens.service());
            async move {
                let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
                clients::token(&http, &realm, service, &scopes, LOGIN).await
            }
        };
        let push = token("pull,push").await.context("push token")?;
        let pull = token("pull").await.context("pull token")?;
        let root = d.join("static");
        let image = push_image(&http, &upstream.url(), &push, blob_bytes, &root)
            .await
            .context("push the image to the upstream")?;
        let (cert, key) = servers::self_signed_cert(d)?;

        let bin = Path::new(env!("CARGO_BIN_EXE_regcache"));
        let max = Some(REGCACHE_MAX_SIZE);
        let regcache = Regcache::start(bin, &d.join("regcache"), &upstream.url(), LOGIN, max, None)
            .context("regcache")?;
        let regcache_tls = Regcache::start(
            bin,
            &d.join("regcache-tls"),
            &upstream.url(),
            LOGIN,
            max,
            Some((&cert, &key)),
        )
        .context("regcache with TLS")?;
        let regcache_unbounded = Regcache::start(
            bin,
            &d.join("regcache-unbounded"),
            &upstream.url(),
            LOGIN,
            None,
            None,
        )
        .context("regcache without max_size")?;
        let distribution = Registry::start_with(RegistryOptions {
            proxy: Some(ProxyUpstream {
                remote_url: upstream.url(),
                username: Some(LOGIN.0.into()),
                password: Some(LOGIN.1.into()),
            }),
            ..RegistryOptions::default()
        })
        .await
        .context("docker-registry in proxy mode")?;
        let distribution_pid =
            servers::pid_by_cmdline(&distribution.config_path().to_string_lossy())
                .context("docker-registry proxy process id")?;
        let nginx_proxy = Nginx::start_proxy(&d.join("nginx-proxy"), upstream.port(), &pull)
            .context("nginx proxy_cache")?;
        let nginx_static =
            Nginx::start_static(&d.join("nginx-static"), &root, (&cert, &key), OCI_MANIFEST)
                .context("nginx static")?;

        let caches = vec![
            Server {
                column: REGCACHE,
                url: regcache.url.clone(),
                procs: Some(regcache.procs),
            },
            Server {
                column: DISTRIBUTION,
                url: distribution.url(),
                procs: Some(Procs::One(distribution_pid)),
            },
            Server {
                column: NGINX_PROXY,
                url: format!("http://127.0.0.1:{}", nginx_proxy.port),
                procs: Some(nginx_proxy.procs),
            },
        ];
        let mut plain = caches.clone();
        plain.push(Server {
            column: NGINX_STATIC,
            url: format!("http://127.0.0.1:{}", nginx_static.port),
            procs: Some(nginx_static.procs),
        });
        let tls_port = nginx_static.tls_port.context("nginx TLS port")?;
        let tls = vec![
            Server {
                column: REGCACHE,
                url: regcache_tls.url.clone(),
                procs: Some(regcache_tls.procs),
            },
            Server {
                column: NGINX_STATIC,
                url: format!("https://127.0.0.1:{tls_port}"),
                procs: Some(nginx_static.procs),
            },
        ];

        let unbounded = Server {
            column: REGCACHE_UNBOUNDED,
            url: regcache_unbounded.url.clone(),
            procs: Some(regcache_unbounded.procs),
        };

        // Fill every cache with the image and check what each serves.
        for srv in plain.iter().chain([&unbounded]) {
            warm(&http, srv, &image)
                .await
                .with_context(|| format!("{} does not serve the image", srv.column))?;
        }
        for srv in &tls {
            let url = format!("{}/v2/bench/hit/blobs/{}", srv.url, image.blob);
            clients::curl_parallel(&url, 1, image.size, Some(&cert))
                .await
                .with_context(|| format!("{} over TLS", srv.column))?;
        }
        Ok(Lab {
            caches,
            plain,
            tls,
            unbounded,
            cert,
            image,
            http,
            push,
            pull,
            _regcache: regcache,
            _regcache_tls: regcache_tls,
            _regcache_unbounded: regcache_unbounded,
            _distribution: distribution,
            _nginx_proxy: nginx_proxy,
            _nginx_static: nginx_static,
            upstream,
            _tokens: tokens,
            _dir: dir,
        })
    }

    /// Deletes every stored copy of a blob that one measurement needed: in the upstream's and
    /// distribution's storage, regcache's caches and nginx's cache (whose files begin with a
    /// `KEY:` line naming the URI). A run then needs disk for a few blobs at a time, not for
    /// every blob of every round. Anything already gone, or held open, is left alone.
    pub fn forget(&self, digest: &str) {
        self.forget_all(&[digest.to_owned()]);
    }

    /// [`Lab::forget`] for many digests at once, in one walk of each store.
    pub fn forget_all(&self, digests: &[String]) {
        let hexes: Vec<&str> = digests
            .iter()
            .map(|d| d.trim_start_matches("sha256:"))
            .collect();
        for root in [
            self.upstream.storage_dir(),
            self._distribution.storage_dir(),
            self._dir.path(),
        ] {
            remove_copies(root, &hexes);
        }
    }

    /// The temp dir everything lives in (for clients' scratch space).
    pub fn scratch(&self) -> &Path {
        self._dir.path()
    }

    /// Empties the per-request logs of regcache and nginx (hundreds of MiB per round at full
    /// size). The registries' logs stay: the upstream's access log counts the herd's GETs.
    pub fn truncate_logs(&self) {
        let d = self._dir.path();
        for log in [
            "regcache/regcache.log",
            "regcache-tls/regcache.log",
            "regcache-unbounded/regcache.log",
            "nginx-proxy/access.log",
            "nginx-static/access.log",
        ] {
            if let Ok(f) = fs::OpenOptions::new().write(true).open(d.join(log)) {
                let _ = f.set_len(0);
            }
        }
    }

    /// Pushes `size` fresh random bytes as a blob of `repo`; returns its digest.
    pub async fn push_fresh_blob(&self, repo: &str, size: u64) -> anyhow::Result<String> {
        let url = self.upstream.url();
        clients::push_blob(&self.http, &url, &self.push, repo, random_blob(size)).await
    }
}

fn remove_copies(dir: &Path, hexes: &[&str]) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            remove_copies(&path, hexes);
        } else if hexes.iter().any(|h| path.to_string_lossy().contains(h))
            || nginx_entry_names(&path, hexes)
        {
            let _ = fs::remove_file(&path);
        }
    }
}

/// True when `path` is an nginx cache file (32 hex digits) whose header names one of `hexes`.
fn nginx_entry_names(path: &Path, hexes: &[&str]) -> bool {
    use std::io::Read;
    let is_cache_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()));
    let mut head = [0u8; 1024];
    is_cache_name
        && fs::File::open(path)
            .and_then(|mut f| f.read(&mut head))
            .is_ok_and(|n| {
                let head = String::from_utf8_lossy(&head[..n]);
                hexes.iter().any(|h| head.contains(h))
            })
}

/// Pushes the image `bench/hit:latest` and lays the blob and manifest out as files under
/// `root` at their registry paths, for nginx static.
async fn push_image(
    http: &reqwest::Client,
    registry: &str,
    token: &str,
    size: u64,
    root: &Path,
) -> anyhow::Result<Image> {
    let data = random_blob(size);
    let digest = clients::sha256(&data);
    let dir = root.join("v2/bench/hit");
    fs::create_dir_all(dir.join("blobs"))?;
    fs::create_dir_all(dir.join("manifests"))?;
    fs::write(dir.join("blobs").join(&digest), &data)?;
    let blob = clients::push_blob(http, registry, token, "bench/hit", data).await?;
    ensure!(blob == digest, "upstream stored {blob}, want {digest}");
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [blob]},
    }))?;
    let config_len = config.len();
    let config_digest = clients::push_blob(http, registry, token, "bench/hit", config).await?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_len},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": blob, "size": size}],
    }))?;
    let manifest_digest = clients::sha256(&manifest);
    fs::write(dir.join("manifests/latest"), &manifest)?;
    fs::write(dir.join("manifests").join(&manifest_digest), &manifest)?;
    clients::push_manifest(
        http,
        registry,
        token,
        "bench/hit",
        "latest",
        OCI_MANIFEST,
        manifest,
    )
    .await?;
    Ok(Image {
        blob,
        size,
        manifest: manifest_digest,
    })
}

/// Fetches the image through `srv` once (filling a cache) and checks what it served.
async fn warm(http: &reqwest::Client, srv: &Server, image: &Image) -> anyhow::Result<()> {
    let blob_url = format!("{}/v2/bench/hit/blobs/{}", srv.url, image.blob);
    clients::herd(http, &blob_url, 1, &image.blob).await?;
    for reference in ["latest", image.manifest.as_str()] {
        let url = format!("{}/v2/bench/hit/manifests/{reference}", srv.url);
        let r = http
            .get(&url)
            .header("accept", clients::DOCKER_ACCEPT)
            .send()
            .await?;
        ensure!(r.status() == 200, "GET {url}: {}", r.status());
        let body = r.bytes().await?;
        ensure!(
            clients::sha256(&body) == image.manifest,
            "GET {url}: wrong manifest"
        );
        let r = http
            .head(&url)
            .header("accept", clients::DOCKER_ACCEPT)
            .send()
            .await?;
        ensure!(r.status() == 200, "HEAD {url}: {}", r.status());
    }
    Ok(())
}

//! Owns the processes of a fleet test besides the store: real `regcache` replicas (the
//! binary, each with its own cache dir and `[fleet]` table, S3 settings from the
//! environment), the upstream (a real `docker-registry` behind a counting, gated relay) and
//! an nginx round-robin balancer in front of the replicas.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;

use super::super::peers::{ProcessGuard, Skip, free_port, is_root, require_binaries, tail_file};
use super::super::registry::{Registry, RegistryAuth};
use super::relay::HttpRelay;
use super::{ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, client};

/// The `[fleet]` table of a replica, and the S3 endpoint its environment names.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// `store`, e.g. `s3://bucket/prefix`.
    pub store: String,
    /// `AWS_ENDPOINT_URL` (the store, or a relay in front of it).
    pub endpoint: String,
    /// File holding the peer token.
    pub peer_token_file: PathBuf,
    /// `lease_ttl`, e.g. `1500ms`.
    pub lease_ttl: String,
}

/// How to start one replica.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    /// `[[upstream]] url` of the upstream named `up` (the default upstream).
    pub upstream: String,
    /// The `[fleet]` table; `None` runs a plain single-node regcache.
    pub fleet: Option<FleetSettings>,
    /// More top-level TOML (tables such as `[auth]`) appended to the file.
    pub extra: String,
    /// `RUST_LOG` for the replica.
    pub log_level: String,
}

impl ReplicaSpec {
    /// A replica of upstream `upstream` in fleet `fleet`.
    pub fn new(upstream: &str, fleet: Option<FleetSettings>) -> ReplicaSpec {
        ReplicaSpec {
            upstream: upstream.to_string(),
            fleet,
            extra: String::new(),
            log_level: std::env::var("REGCACHE_TEST_LOG").unwrap_or_else(|_| "info".into()),
        }
    }
}

/// One `regcache` process. Its JSON log lines (stdout) and stderr are kept in memory.
/// SIGKILLed on drop (after a SIGCONT, in case it was stopped).
pub struct Replica {
    child: Option<Child>,
    pid: u32,
    port: u16,
    dir: Arc<tempfile::TempDir>,
    spec: ReplicaSpec,
    lines: Arc<Mutex<Vec<String>>>,
    /// A short name for messages: `r0`, `r1`, ...
    pub name: String,
}

/// Why a replica did not start.
#[derive(Debug)]
pub struct StartFailure {
    /// Exit status, when it exited.
    pub status: Option<ExitStatus>,
    /// Everything it wrote (stdout JSON lines and stderr).
    pub output: String,
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "regcache did not start ({:?}):\n{}",
            self.status, self.output
        )
    }
}

impl std::error::Error for StartFailure {}

impl Replica {
    /// Starts a replica on a free loopback port (its `advertise` URL) and waits (≤ 30 s) for
    /// "regcache ready". A port lost to another process is retried with a new one.
    pub async fn start(name: &str, spec: &ReplicaSpec) -> anyhow::Result<Replica> {
        let dir = Arc::new(
            tempfile::Builder::new()
                .prefix("regcache-replica-")
                .tempdir()
                .context("tempdir")?,
        );
        for _ in 0..3 {
            match Replica::launch(name, spec, dir.clone(), free_port()).await {
                Ok(r) => return Ok(r),
                Err(failure) if failure.output.contains("cannot listen") => continue,
                Err(failure) => return Err(failure.into()),
            }
        }
        bail!("{name}: no free port after 3 attempts")
    }

    /// Starts a replica that is expected to refuse to start; returns how it ended.
    pub async fn start_failing(spec: &ReplicaSpec) -> anyhow::Result<StartFailure> {
        let dir = Arc::new(
            tempfile::Builder::new()
                .prefix("regcache-replica-")
                .tempdir()?,
        );
        match Replica::launch("refused", spec, dir, free_port()).await {
            Ok(mut r) => {
                let out = r.output();
                r.kill();
                bail!("regcache started although it should have refused; its log:\n{out}")
            }
            Err(failure) => Ok(failure),
        }
    }

    /// Starts this replica again (after [`Replica::kill`]) on the same cache dir and port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let fresh = Replica::launch(&self.name, &self.spec, self.dir.clone(), self.port).await?;
        *self = fresh;
        Ok(())
    }

    async fn launch(
        name: &str,
        spec: &ReplicaSpec,
        dir: Arc<tempfile::TempDir>,
        port: u16,
    ) -> Result<Replica, StartFailure> {
        let fail = |output: String| StartFailure {
            status: None,
            output,
        };
        let cache = dir.path().join("cache");
        let config = dir.path().join("regcache.toml");
        let mut toml = format!(
            "listen = \"127.0.0.1:{port}\"\ncache_dir = \"{}\"\ndefault_upstream = \"up\"\n\n\
             [[upstream]]\nname = \"up\"\nurl = \"{}\"\n\n{}\n",
            cache.display(),
            spec.upstream,
            spec.extra
        );
        if let Some(f) = &spec.fleet {
            toml.push_str(&format!(
                "\n[fleet]\nstore = \"{}\"\nadvertise = \"http://127.0.0.1:{port}\"\n\
                 peer_token_file = \"{}\"\nlease_ttl = \"{}\"\n",
                f.store,
                f.peer_token_file.display(),
                f.lease_ttl
            ));
        }
        fs::write(&config, &toml).map_err(|e| fail(format!("write config: {e}")))?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regcache"));
        cmd.arg("--config")
            .arg(&config)
            .args(["--log-format", "json"])
            .env("RUST_LOG", &spec.log_level)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        hermetic_aws_env(&mut cmd, spec.fleet.as_ref().map(|f| f.endpoint.as_str()));
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(format!("spawn regcache: {e}")))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let out_lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("\"regcache ready\"") {
                    let _ = ready_tx.send(());
                }
                out_lines.lock().unwrap().push(line);
            }
        });
        let err_lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                err_lines.lock().unwrap().push(format!("stderr: {line}"));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if ready_rx.try_recv().is_ok() {
                return Ok(Replica {
                    pid: child.id(),
                    child: Some(child),
                    port,
                    dir,
                    spec: spec.clone(),
                    lines,
                    name: name.to_string(),
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Let the reader threads take the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let output = lines.lock().unwrap().join("\n");
                return Err(StartFailure {
                    status: Some(status),
                    output,
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let output = lines.lock().unwrap().join("\n");
                return Err(fail(format!("not ready within 30 s:\n{output}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:PORT` (also its `advertise` URL).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// Everything it logged so far.
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Log lines containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(self.pid, "CONT");
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// True until [`Replica::kill`] or an exit.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGSTOP: the process freezes (its sockets stay open, nothing answers).
    pub fn pause(&self) {
        signal(self.pid, "STOP");
    }

    /// SIGCONT after [`Replica::pause`].
    pub fn resume(&self) {
        signal(self.pid, "CONT");
    }

    /// `GET /readyz`: status and body.
    pub async fn readyz(&self) -> anyhow::Result<(u16, String)> {
        let r = client()
            .get(format!("{}/readyz", self.url()))
            .send()
            .await?;
        Ok((r.status().as_u16(), r.text().await?))
    }

    /// The `/metrics` text.
    pub async fn metrics_text(&self) -> anyhow::Result<String> {
        let r = client()
            .get(format!("{}/metrics", self.url()))
            .send()
            .await?;
        Ok(r.text().await?)
    }

    /// Sum of the samples of metric `name` whose labels include every `labels` pair
    /// (0 when there is none).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        Ok(metric_sum(&self.metrics_text().await?, name, labels))
    }

    /// `GET /v2/<repo>/blobs/<digest>` on this replica: status and body.
    pub async fn get_blob(&self, repo: &str, digest: &str) -> anyhow::Result<(u16, Bytes)> {
        let r = client()
            .get(format!("{}/v2/{repo}/blobs/{digest}", self.url()))
            .send()
            .await?;
        Ok((r.status().as_u16(), r.bytes().await?))
    }

    /// `GET /v2/<repo>/manifests/<reference>` accepting `accept`: the status and the
    /// `Docker-Content-Digest` answered.
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
        accept: &str,
    ) -> anyhow::Result<(u16, String)> {
        get_manifest(
            &format!("{}/v2/{repo}/manifests/{reference}", self.url()),
            accept,
        )
        .await
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET url` (a manifest) accepting `accept`: the status and the `Docker-Content-Digest`
/// answered.
pub async fn get_manifest(url: &str, accept: &str) -> anyhow::Result<(u16, String)> {
    let r = client().get(url).header("accept", accept).send().await?;
    let digest = r
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Ok((r.status().as_u16(), digest))
}

/// Sum of the samples of `name` in Prometheus text `text` with every `labels` pair.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let have = labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            have.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Sends `kill -<sig> <pid>` (rustix's process feature is not enabled in this crate).
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The S3 environment of a replica: static keys, region, plain HTTP to `endpoint`, no
/// instance metadata, no profile files and nothing else that could send a request elsewhere.
pub fn hermetic_aws_env(cmd: &mut Command, endpoint: Option<&str>) {
    for k in [
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_CA_BUNDLE",
    ] {
        cmd.env_remove(k);
    }
    cmd.env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
        .env("AWS_REGION", REGION)
        .env("AWS_DEFAULT_REGION", REGION)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/regcache-test/aws-config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/regcache-test/aws-credentials",
        );
    if let Some(e) = endpoint {
        cmd.env("AWS_ENDPOINT_URL", e);
    }
}

/// The upstream of a fleet test: a real `docker-registry` (no auth) behind an
/// [`HttpRelay`] that counts what regcache asked of it and can hold a blob mid-body.
pub struct Upstream {
    /// The registry.
    pub registry: Registry,
    /// The counting, gated relay regcache talks to.
    pub relay: HttpRelay,
}

impl Upstream {
    /// Starts the registry and the relay.
    pub async fn start() -> Result<Upstream, Skip> {
        require_binaries(&["docker-registry"])?;
        let registry = Registry::start(RegistryAuth::None)
            .await
            .map_err(|e| Skip::new(format!("docker-registry: {e:#}")))?;
        let relay = HttpRelay::start(SocketAddr::from(([127, 0, 0, 1], registry.port())))
            .await
            .map_err(|e| Skip::new(format!("relay: {e:#}")))?;
        Ok(Upstream { registry, relay })
    }

    /// The URL regcache is given: the relay's.
    pub fn url(&self) -> String {
        self.relay.url()
    }

    /// Uploads `data` as a blob of `repo` straight to the registry (monolithic upload);
    /// returns its digest.
    pub async fn push_blob(&self, repo: &str, data: Bytes) -> anyhow::Result<String> {
        push_blob(&self.registry.url(), repo, data).await
    }

    /// `PUT`s a manifest `body` of `media_type` as `repo:reference` straight to the registry;
    /// returns its digest.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> anyhow::Result<String> {
        let digest = super::sha256(&body);
        let r = client()
            .put(format!(
                "{}/v2/{repo}/manifests/{reference}",
                self.registry.url()
            ))
            .header("content-type", media_type)
            .body(body)
            .send()
            .await?;
        if r.status().as_u16() != 201 {
            bail!("manifest put: {} {}", r.status(), r.text().await?);
        }
        Ok(digest)
    }

    /// Upstream `GET`s of blob `digest` that got a body (200/206), through the relay.
    pub fn blob_gets(&self, digest: &str) -> Vec<super::relay::Seen> {
        self.relay
            .matching("GET", &format!("/blobs/{digest}"))
            .into_iter()
            .filter(|s| matches!(s.status, 200 | 206))
            .collect()
    }

    /// Every upstream request for `digest` (any method, any status), through the relay.
    pub fn requests_for(&self, digest: &str) -> usize {
        self.relay
            .requests()
            .iter()
            .filter(|s| s.path.contains(digest))
            .count()
    }
}

/// Uploads `data` as a blob of `repo` to the registry at `base` (POST, then PUT ?digest=).
pub async fn push_blob(base: &str, repo: &str, data: Bytes) -> anyhow::Result<String> {
    let digest = super::sha256(&data);
    let c = client();
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await?;
    if r.status().as_u16() != 202 {
        bail!("start upload: {} {}", r.status(), r.text().await?);
    }
    let location = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .context("upload Location")?
        .to_string();
    let location = if location.starts_with("http") {
        location
    } else {
        format!("{base}{location}")
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{location}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(data)
        .send()
        .await?;
    if r.status().as_u16() != 201 {
        bail!("finish upload: {} {}", r.status(), r.text().await?);
    }
    Ok(digest)
}

/// nginx as a round-robin load balancer in front of replicas; its access log records which
/// backend served each request. Stopped (SIGTERM, then SIGKILL) on drop.
pub struct Balancer {
    guard: ProcessGuard,
    port: u16,
    dir: tempfile::TempDir,
}

impl Balancer {
    /// Starts nginx on a free port balancing over `backends` (round robin, HTTP/1.1,
    /// request and response bodies streamed, no size limit) and waits (≤ 10 s) until it
    /// answers.
    pub async fn start(backends: &[SocketAddr]) -> Result<Balancer, Skip> {
        require_binaries(&["nginx"])?;
        let dir = tempfile::Builder::new()
            .prefix("regcache-nginx-")
            .tempdir()
            .map_err(|e| Skip::new(e.to_string()))?;
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let conf = nginx_conf(dir.path(), port, backends);
            let file = dir.path().join("nginx.conf");
            fs::write(&file, conf).map_err(|e| Skip::new(e.to_string()))?;
            let mut cmd = Command::new("nginx");
            cmd.arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&file)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut guard = ProcessGuard::spawn("nginx", &mut cmd)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if guard.exited().is_some() {
                    last = tail_file(&dir.path().join("error.log"), 10);
                    break;
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return Ok(Balancer { guard, port, dir });
                }
                if Instant::now() > deadline {
                    last = "nginx did not listen within 10 s".into();
                    guard.terminate(Duration::from_secs(2));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Err(Skip::new(format!("nginx did not start: {last}")))
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// `method path backend status` for every request logged so far.
    pub fn log(&self) -> Vec<(String, String, String, u16)> {
        fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                Some((
                    f.next()?.to_string(),
                    f.next()?.to_string(),
                    f.next()?.to_string(),
                    f.next()?.parse().ok()?,
                ))
            })
            .collect()
    }

    /// How many requests whose path contains `part` each backend served.
    pub fn spread(&self, part: &str) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (_, path, backend, _) in self.log() {
            if path.contains(part) && backend != "-" {
                *out.entry(backend).or_insert(0) += 1;
            }
        }
        out
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.guard.terminate(Duration::from_secs(5));
    }
}

fn nginx_conf(dir: &Path, port: u16, backends: &[SocketAddr]) -> String {
    let d = dir.display();
    let user = if is_root() { "user root root;\n" } else { "" };
    let servers: String = backends
        .iter()
        .map(|b| format!("    server {b} max_fails=0;\n"))
        .collect();
    format!(
        "{user}daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
         http {{\n  log_format fleet '$request_method $uri $upstream_addr $status';\n  \
         access_log {d}/access.log fleet;\n  \
         client_body_temp_path {d}/client_body;\n  proxy_temp_path {d}/proxy_temp;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         upstream fleet {{\n{servers}    keepalive 16;\n  }}\n  \
         server {{\n    listen 127.0.0.1:{port};\n    client_max_body_size 0;\n    \
         proxy_http_version 1.1;\n    proxy_request_buffering off;\n    proxy_buffering off;\n    \
         proxy_read_timeout 300s;\n    \
         location / {{\n      proxy_pass http://fleet;\n      proxy_set_header Host $http_host;\n      \
         proxy_set_header Connection \"\";\n      proxy_next_upstream off;\n    }}\n  }}\n}}\n"
    )
}

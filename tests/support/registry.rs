//! Owns the real upstream registry peer: `docker-registry serve` (distribution 2.8) on a free loopback port, with access-log counters.
//!
//! The registry keeps its filesystem storage, config and logs in a temp dir. Its access log
//! (combined format) goes to **stdout** in distribution 2.8 (its own logrus lines go to
//! stderr); both are captured to files, see [`Registry::access_log_path`] and
//! [`Registry::log_path`]. A request's access-log line is written just after its response,
//! so call [`Registry::settle_log`] before counting right after a client finished.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::peers::{ProcessGuard, free_port, run_ok, tail_file};

/// How the registry authenticates clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryAuth {
    /// Anonymous pull and push.
    None,
    /// `auth: htpasswd:` with a bcrypt file made by `htpasswd -nbB user password`.
    Htpasswd {
        /// The only user.
        user: String,
        /// Its password.
        password: String,
    },
    /// `auth: token:` (Docker-Hub-style bearer tokens), e.g. from
    /// [`super::token::TokenServer::registry_auth`].
    Token {
        /// Token endpoint URL announced in `WWW-Authenticate` (`http://127.0.0.1:P/token`).
        realm: String,
        /// `service` in the challenge; tokens must carry it as `aud`.
        service: String,
        /// Expected `iss` of tokens.
        issuer: String,
        /// PEM bundle holding the token signer's certificate.
        root_cert_bundle: PathBuf,
    },
}

/// Pull-through (proxy) mode of the registry itself, the baseline most users run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyUpstream {
    /// `proxy.remoteurl`, e.g. another [`Registry::url`].
    pub remote_url: String,
    /// Optional `proxy.username`.
    pub username: Option<String>,
    /// Optional `proxy.password`.
    pub password: Option<String>,
}

/// Everything [`Registry::start_with`] can vary.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Client authentication.
    pub auth: RegistryAuth,
    /// Run as a pull-through cache of another registry.
    pub proxy: Option<ProxyUpstream>,
    /// Listen on this port instead of a free OS-chosen one.
    pub port: Option<u16>,
    /// Use this storage root instead of a fresh one in the registry's temp dir.
    pub storage_dir: Option<PathBuf>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            auth: RegistryAuth::None,
            proxy: None,
            port: None,
            storage_dir: None,
        }
    }
}

/// One parsed access-log line (combined log format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    /// Authenticated user field (`-` when none).
    pub user: String,
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Request path without the query string.
    pub path: String,
    /// Query string without `?`, if any.
    pub query: Option<String>,
    /// Response status.
    pub status: u16,
    /// Response body bytes written.
    pub bytes: u64,
    /// `User-Agent` header.
    pub user_agent: String,
}

/// Parses one combined-format line:
/// `127.0.0.1 - user [date] "GET /v2/ HTTP/1.1" 200 2 "referer" "agent"`.
pub fn parse_access_line(line: &str) -> Option<AccessLogEntry> {
    let (head, rest) = line.split_once("] \"")?;
    let user = head.split_whitespace().nth(2).unwrap_or("-").to_string();
    let (request, rest) = rest.split_once('"')?;
    let mut req = request.split(' ');
    let method = req.next()?.to_string();
    let uri = req.next()?;
    let (path, query) = match uri.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (uri.to_string(), None),
    };
    let mut fields = rest.split_whitespace();
    let status = fields.next()?.parse().ok()?;
    let bytes = fields.next().and_then(|b| b.parse().ok()).unwrap_or(0);
    let user_agent = rest
        .rsplit_once('"')
        .and_then(|(before, _)| before.rsplit_once('"'))
        .map(|(_, ua)| ua.to_string())
        .unwrap_or_default();
    Some(AccessLogEntry {
        user,
        method,
        path,
        query,
        status,
        bytes,
        user_agent,
    })
}

fn yaml_str(s: &str) -> String {
    // A JSON string literal is a valid YAML double-quoted scalar.
    serde_json::to_string(s).expect("string to JSON")
}

/// A running `docker-registry serve CONFIG.yml`; killed by PID on [`Registry::stop`] and drop.
#[derive(Debug)]
pub struct Registry {
    process: Option<ProcessGuard>,
    dir: tempfile::TempDir,
    port: u16,
    storage: PathBuf,
    config: PathBuf,
    access_log: PathBuf,
    log: PathBuf,
    options: RegistryOptions,
}

impl Registry {
    /// Starts a registry with the given auth on a free loopback port, fresh storage, and waits
    /// until `GET /v2/` answers.
    pub async fn start(auth: RegistryAuth) -> anyhow::Result<Registry> {
        Registry::start_with(RegistryOptions {
            auth,
            ..RegistryOptions::default()
        })
        .await
    }

    /// Starts a registry as described by `options` and waits until `GET /v2/` answers
    /// (≤ 10 s). A port lost to a race with another test is retried with a new one.
    pub async fn start_with(options: RegistryOptions) -> anyhow::Result<Registry> {
        let dir = tempfile::Builder::new()
            .prefix("regcache-registry-")
            .tempdir()
            .context("tempdir")?;
        let storage = options
            .storage_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("storage"));
        fs::create_dir_all(&storage)?;
        let mut reg = Registry {
            process: None,
            port: options.port.unwrap_or_else(free_port),
            storage,
            config: dir.path().join("config.yml"),
            access_log: dir.path().join("access.log"),
            log: dir.path().join("registry.log"),
            dir,
            options,
        };
        reg.write_config().await?;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match reg.launch().await {
                Ok(()) => return Ok(reg),
                Err(err) => {
                    let lost_port = tail_file(&reg.log, 5).contains("address already in use");
                    if lost_port && reg.options.port.is_none() && attempts < 4 {
                        reg.port = free_port();
                        reg.write_config().await?;
                        continue;
                    }
                    return Err(err);
                }
            }
        }
    }

    async fn write_config(&self) -> anyhow::Result<()> {
        let mut yaml = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: regcache-e2e-secret\n\
             health:\n  storagedriver:\n    enabled: false\n",
            storage = yaml_str(&self.storage.to_string_lossy()),
            port = self.port,
        );
        match &self.options.auth {
            RegistryAuth::None => {}
            RegistryAuth::Htpasswd { user, password } => {
                let line = run_ok(
                    tokio::process::Command::new("htpasswd").args(["-nbB", user, password]),
                    Duration::from_secs(30),
                )
                .await
                .context("htpasswd -nbB (package apache2-utils)")?;
                let file = self.dir.path().join("htpasswd");
                fs::write(&file, format!("{}\n", line.trim()))?;
                yaml.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: regcache-e2e\n    path: {}\n",
                    yaml_str(&file.to_string_lossy())
                ));
            }
            RegistryAuth::Token {
                realm,
                service,
                issuer,
                root_cert_bundle,
            } => {
                yaml.push_str(&format!(
                    "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    yaml_str(realm),
                    yaml_str(service),
                    yaml_str(issuer),
                    yaml_str(&root_cert_bundle.to_string_lossy()),
                ));
            }
        }
        if let Some(proxy) = &self.options.proxy {
            yaml.push_str(&format!(
                "proxy:\n  remoteurl: {}\n",
                yaml_str(&proxy.remote_url)
            ));
            if let Some(u) = &proxy.username {
                yaml.push_str(&format!("  username: {}\n", yaml_str(u)));
            }
            if let Some(p) = &proxy.password {
                yaml.push_str(&format!("  password: {}\n", yaml_str(p)));
            }
        }
        fs::write(&self.config, yaml).with_context(|| format!("write {}", self.config.display()))
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let stdout = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.access_log)?;
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve")
            .arg(&self.config)
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        let mut process = ProcessGuard::spawn("docker-registry", &mut cmd)
            .context("start docker-registry (Debian package docker-registry)")?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()?;
        let ping = format!("{}/v2/", self.url());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = process.exited() {
                bail!(
                    "docker-registry exited ({status}) on port {}; log tail:\n{}",
                    self.port,
                    tail_file(&self.log, 10)
                );
            }
            if let Ok(resp) = client.get(&ping).send().await {
                let s = resp.status().as_u16();
                if s == 200 || s == 401 {
                    self.process = Some(process);
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                process.kill();
                bail!(
                    "docker-registry did not answer GET /v2/ on port {} within 10 s; log tail:\n{}",
                    self.port,
                    tail_file(&self.log, 10)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`, the registry part of image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The auth mode it was started with.
    pub fn auth(&self) -> &RegistryAuth {
        &self.options.auth
    }

    /// The filesystem storage root (pass it as `storage_dir` to share storage).
    pub fn storage_dir(&self) -> &Path {
        &self.storage
    }

    /// The generated `config.yml`.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The access log (the registry's stdout, combined format).
    pub fn access_log_path(&self) -> &Path {
        &self.access_log
    }

    /// The registry's own log (its stderr, logrus lines).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match self.process.as_mut() {
            Some(p) => p.exited().is_none(),
            None => false,
        }
    }

    /// Kills the registry (SIGKILL by PID) and reaps it; storage and logs stay.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Starts it again on the same port with the same config and storage (after [`stop`]
    /// or to simulate an upstream restart); the access log keeps accumulating.
    ///
    /// [`stop`]: Registry::stop
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.launch().await
    }

    /// Waits (≤ 2 s) until the access log stopped growing for two consecutive 30 ms polls,
    /// so lines of requests that just completed are in the file.
    pub async fn settle_log(&self) {
        let size = || fs::metadata(&self.access_log).map(|m| m.len()).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut last = size();
        let mut stable = 0;
        while stable < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let now = size();
            if now == last {
                stable += 1;
            } else {
                stable = 0;
                last = now;
            }
        }
    }

    /// All parsed access-log lines so far.
    pub fn access_log(&self) -> Vec<AccessLogEntry> {
        fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter_map(parse_access_line)
            .collect()
    }

    /// Number of requests with this method (case-insensitive) whose path contains
    /// `path_contains`, any status.
    pub fn count_requests(&self, method: &str, path_contains: &str) -> usize {
        self.access_log()
            .iter()
            .filter(|e| e.method.eq_ignore_ascii_case(method) && e.path.contains(path_contains))
            .count()
    }

    /// Number of `GET /v2/<any name>/blobs/<digest>` that transferred the blob (status 200,
    /// 206 or 307), i.e. how often the blob was fetched from this registry.
    pub fn blob_get_count(&self, digest: &str) -> usize {
        let suffix = format!("/blobs/{digest}");
        self.access_log()
            .iter()
            .filter(|e| {
                e.method == "GET"
                    && e.path.starts_with("/v2/")
                    && e.path.ends_with(&suffix)
                    && matches!(e.status, 200 | 206 | 307)
            })
            .count()
    }

    /// Number of `GET /v2/<any name>/manifests/<reference>` (tag or digest) answered 200.
    pub fn manifest_get_count(&self, reference: &str) -> usize {
        let suffix = format!("/manifests/{reference}");
        self.access_log()
            .iter()
            .filter(|e| {
                e.method == "GET"
                    && e.path.starts_with("/v2/")
                    && e.path.ends_with(&suffix)
                    && e.status == 200
            })
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

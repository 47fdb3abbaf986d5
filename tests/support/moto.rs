//! Owns the AWS side of the ECR tests: a hermetic AWS environment, a `moto` server (the ECR
//! and STS APIs, from PyPI) on a free loopback port, relays on ports reserved for the
//! endpoint environment variables, a server that answers every AWS call with a chosen error,
//! and a capture of every log line so a test can show no secret is in them.
//!
//! # Hermetic AWS environment
//!
//! The AWS SDK reads its credentials and endpoints from the process environment. ECR tests are
//! plain `#[test]` functions that go through [`run`], which calls [`hermetic_env`] before it
//! builds the test's tokio runtime: the environment is written once per test process, under a
//! `Once`, before any thread of any runtime can read it. It sets static credentials, a region,
//! `AWS_EC2_METADATA_DISABLED=true`, nonexistent profile files, and removes every variable
//! that could send the SDK elsewhere (profiles, web identity, container credentials, endpoint
//! overrides). Two endpoint variables point at loopback ports reserved here and served by a
//! [`Relay`] only in the test that asks for them:
//! - `AWS_ENDPOINT_URL_STS` (the STS endpoint used to assume `role_arn`),
//! - `AWS_ENDPOINT_URL_ECR` (shows the SDK honours it when `ecr.api_endpoint` is not set).
//!
//! Every other ECR client in the tests gets its endpoint from the configuration.

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::peers::{ProcessGuard, free_port, tail_file};

/// The account every ECR test uses (moto's default account).
pub const ACCOUNT: &str = "123456789012";
/// The region every ECR test uses.
pub const REGION: &str = "us-east-1";
/// The static access key id the tests give the SDK.
pub const ACCESS_KEY_ID: &str = "AKIAREGCACHETESTKEY1";
/// The static secret key the tests give the SDK (must never appear in a log).
pub const SECRET_ACCESS_KEY: &str = "regcache-test-secret-access-key";
/// The registry password moto's GetAuthorizationToken decodes to: `AWS:<account>-auth-token`.
pub const MOTO_PASSWORD: &str = "123456789012-auth-token";
/// moto's `authorizationToken` as sent (base64 of `AWS:` + [`MOTO_PASSWORD`]).
pub const MOTO_TOKEN: &str = "QVdTOjEyMzQ1Njc4OTAxMi1hdXRoLXRva2Vu";

/// A loopback port reserved for one endpoint environment variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    /// `AWS_ENDPOINT_URL_STS`.
    Sts,
    /// `AWS_ENDPOINT_URL_ECR`.
    EcrEnv,
}

static ENV: Once = Once::new();
static RESERVED: Mutex<Vec<(Reserved, StdListener)>> = Mutex::new(Vec::new());
static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

/// Writes the hermetic AWS environment and installs the log capture, once per process.
/// Must run before any thread that could read the environment exists: call it (through
/// [`run`]) first thing in a `#[test]` function, never from inside a runtime.
pub fn hermetic_env() {
    ENV.call_once(|| {
        let mut reserved = RESERVED.lock().unwrap();
        let mut endpoint = |which: Reserved| {
            let l = StdListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
            let url = format!("http://{}", l.local_addr().unwrap());
            reserved.push((which, l));
            url
        };
        let sts = endpoint(Reserved::Sts);
        let ecr = endpoint(Reserved::EcrEnv);
        let set = [
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_owned()),
            ("AWS_REGION", REGION.to_owned()),
            (
                "AWS_CONFIG_FILE",
                "/nonexistent/regcache-test/aws-config".to_owned(),
            ),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/regcache-test/aws-credentials".to_owned(),
            ),
            ("AWS_ENDPOINT_URL_STS", sts),
            ("AWS_ENDPOINT_URL_ECR", ecr),
        ];
        let unset = [
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
            "AWS_DEFAULT_REGION",
            "AWS_SESSION_TOKEN",
            "AWS_ROLE_ARN",
            "AWS_ROLE_SESSION_NAME",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN",
            "AWS_ENDPOINT_URL",
            "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
        ];
        // SAFETY: runs once, under `ENV`, before this process has any thread other than
        // libtest's: every ECR test calls this first, before it builds its runtime, and a
        // test thread that gets here while another writes waits on the `Once` without
        // reading the environment.
        unsafe {
            for (k, v) in set {
                std::env::set_var(k, v);
            }
            for k in unset {
                std::env::remove_var(k);
            }
        }
        install_log_capture();
    });
}

/// Runs `test` on a fresh two-worker runtime after [`hermetic_env`].
pub fn run<F: Future>(test: F) -> F::Output {
    hermetic_env();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(test)
}

/// Writes every event into [`LOGS`] (and to stderr when `RUST_LOG` is set).
#[derive(Clone)]
struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    echo: bool,
}

impl Write for Capture {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.lock().unwrap().extend_from_slice(data);
        if self.echo {
            eprint!("{}", String::from_utf8_lossy(data));
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A global subscriber at `debug` for regcache and the AWS SDK (and `info` for the HTTP
/// stack), writing into a buffer that [`captured_logs`] returns.
fn install_log_capture() {
    let buf = LOGS.get_or_init(Arc::default).clone();
    let capture = Capture {
        buf,
        echo: std::env::var_os("RUST_LOG").is_some(),
    };
    let filter = tracing_subscriber::EnvFilter::new(
        "debug,hyper=info,hyper_util=info,h2=info,rustls=info,tower=info",
    );
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(move || capture.clone())
        .try_init();
}

/// Everything logged in this process so far.
pub fn captured_logs() -> String {
    LOGS.get()
        .map(|b| String::from_utf8_lossy(&b.lock().unwrap()).into_owned())
        .unwrap_or_default()
}

/// Panics, without quoting the secret, when `text` holds a token, password or secret key
/// the tests use. `what` names the text in the message.
#[track_caller]
pub fn assert_no_secret(text: &str, what: &str) {
    for (name, secret) in [
        ("the registry password", MOTO_PASSWORD),
        ("the base64 ECR token", MOTO_TOKEN),
        ("the AWS secret key", SECRET_ACCESS_KEY),
    ] {
        assert!(!text.contains(secret), "{what} contains {name}");
    }
}

/// The path of the real Python interpreter that can import `moto.server` (through a pyenv
/// shim, `sys.executable` names the interpreter itself, so its PID is the server's).
fn python_with_moto() -> anyhow::Result<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import sys, moto.server; print(sys.executable)"])
        .stdin(Stdio::null())
        .output()
        .context("run python3")?;
    if !out.status.success() {
        bail!(
            "python3 cannot import moto.server (pip install 'moto[server]'; .ci/test does): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// A `python -m moto.server` on a free loopback port; killed by PID on drop.
pub struct Moto {
    process: Option<ProcessGuard>,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Starts moto and waits (≤ 30 s) until it answers HTTP.
    pub async fn start() -> anyhow::Result<Moto> {
        let python = python_with_moto()?;
        let dir = tempfile::Builder::new()
            .prefix("regcache-moto-")
            .tempdir()?;
        let log = dir.path().join("moto.log");
        for _ in 0..3 {
            let port = free_port();
            let out = std::fs::File::create(&log)?;
            let mut cmd = Command::new(&python);
            cmd.args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
            let mut process = ProcessGuard::spawn("moto", &mut cmd)?;
            if wait_http(port, &mut process, Duration::from_secs(30)).await {
                return Ok(Moto {
                    process: Some(process),
                    port,
                    log,
                    _dir: dir,
                });
            }
            if !tail_file(&log, 20).contains("Address already in use") {
                bail!(
                    "moto did not start on port {port}:\n{}",
                    tail_file(&log, 20)
                );
            }
        }
        bail!("moto could not get a free port:\n{}", tail_file(&log, 20))
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The last lines of moto's own log (its request log included).
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.log, lines)
    }

    /// Kills moto (by PID) now; later calls fail to connect.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// True once `GET /` on the port gets any HTTP answer; false when the process exits or time
/// runs out.
async fn wait_http(port: u16, process: &mut ProcessGuard, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if process.exited().is_some() {
            return false;
        }
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await {
            let _ = s
                .write_all(b"GET / HTTP/1.1\r\nHost: moto\r\nConnection: close\r\n\r\n")
                .await;
            let mut head = [0u8; 12];
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), s.read(&mut head)).await
            {
                if n >= 5 && head.starts_with(b"HTTP/") {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A TCP relay on a port [`hermetic_env`] reserved, to `target`, that keeps every byte sent
/// towards `target` so a test can see which AWS calls went through. Stops on drop.
pub struct Relay {
    seen: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts relaying the reserved port of `which` to `target`. Each reserved port can be
    /// taken once per process.
    pub fn start(which: Reserved, target: SocketAddr) -> anyhow::Result<Relay> {
        let std_listener = {
            let mut reserved = RESERVED.lock().unwrap();
            let i = reserved
                .iter()
                .position(|(w, _)| *w == which)
                .with_context(|| format!("{which:?} port not reserved or already taken"))?;
            reserved.remove(i).1
        };
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                conns.spawn(relay(client, target, seen2.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Relay { seen, task })
    }

    /// Everything sent towards the target so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    /// How often `needle` occurs (ASCII case-insensitively) in [`Relay::text`].
    pub fn count(&self, needle: &str) -> usize {
        self.text()
            .to_ascii_lowercase()
            .matches(&needle.to_ascii_lowercase())
            .count()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, target: SocketAddr, seen: Arc<Mutex<Vec<u8>>>) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let upward = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            seen.lock().unwrap().extend_from_slice(&buf[..n]);
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

/// An AWS JSON-protocol endpoint that answers every call with one error, as the real API
/// does: status, `x-amzn-ErrorType` and a `{"__type", "message"}` body. Stops on drop.
pub struct AwsErrorServer {
    addr: SocketAddr,
    calls: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl AwsErrorServer {
    /// Answers every request `status` with error `code` and `message`.
    pub async fn start(status: u16, code: &str, message: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let calls = Arc::new(AtomicU64::new(0));
        let body = Bytes::from(serde_json::json!({"__type": code, "message": message}).to_string());
        let (status, code) = (StatusCode::from_u16(status)?, code.to_owned());
        let counter = calls.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (body, code, counter) = (body.clone(), code.clone(), counter.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let mut r = Response::new(Full::new(body.clone()));
                        *r.status_mut() = status;
                        let h = r.headers_mut();
                        h.insert(
                            "content-type",
                            "application/x-amz-json-1.1".parse().unwrap(),
                        );
                        h.insert("x-amzn-errortype", code.parse().unwrap());
                        h.insert("x-amzn-requestid", "regcache-test".parse().unwrap());
                        async move { Ok::<_, Infallible>(r) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(AwsErrorServer { addr, calls, task })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests answered so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for AwsErrorServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

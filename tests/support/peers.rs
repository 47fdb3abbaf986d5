//! Owns the real container-engine peers for end-to-end tests (`dockerd`, `containerd`), the `Skip` mechanism, ports, process guards and command helpers.
//!
//! # Keeping traffic on this machine
//!
//! The test machine has no route out (loopback only), and tests always point clients at
//! mirrors on `127.0.0.1`. On top of that, every client process started from here (`dockerd`,
//! `ctr`, `skopeo`) gets [`no_egress_env`]: `HTTP_PROXY`/`HTTPS_PROXY` point at a dead loopback
//! port. Docker's fallback from a failing mirror to `registry-1.docker.io` therefore becomes a
//! `proxyconnect tcp: dial tcp 127.0.0.1:<dead>: connection refused` without even a DNS lookup
//! of the remote name (measured here with dockerd 20.10), while loopback destinations are
//! never proxied by Go's `ProxyFromEnvironment`. `/etc/hosts` is never touched.
//! containerd's fallback is the `server = "http://127.0.0.1:<dead port>"` line written by
//! [`write_hosts_toml`].

use std::fmt;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a test cannot run its peer here; the test prints `SKIPPED: <test>: <reason>` and returns.
#[derive(Debug, Clone)]
pub struct Skip {
    /// Human-readable reason, e.g. the missing binary or the peer's last log lines.
    pub reason: String,
}

impl Skip {
    /// A skip with the given reason.
    pub fn new(reason: impl Into<String>) -> Skip {
        Skip {
            reason: reason.into(),
        }
    }

    /// Prints `SKIPPED: <current test>: <reason>` to stderr (test name from the libtest thread).
    pub fn report(&self) {
        self.report_for(&current_test_name());
    }

    /// Prints `SKIPPED: <test>: <reason>` to stderr. Written with `std::io::stderr()` directly
    /// (not `eprintln!`), so libtest's output capture does not swallow it.
    pub fn report_for(&self, test: &str) {
        use std::io::Write;
        let line = "=".repeat(72);
        let _ = writeln!(
            std::io::stderr(),
            "\n{line}\nSKIPPED: {test}: {}\n{line}",
            self.reason
        );
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "skipped: {}", self.reason)
    }
}

impl From<anyhow::Error> for Skip {
    fn from(err: anyhow::Error) -> Skip {
        Skip::new(format!("{err:#}"))
    }
}

/// Name of the running test: libtest names each test's thread after the test (and
/// `#[tokio::test]` runs the body on that thread).
pub fn current_test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unknown test>")
        .to_string()
}

/// Unwraps `Ok(v)` or, on `Err(skip)`, prints the loud `SKIPPED:` line and returns from the
/// enclosing test (which must return `()`).
///
/// `let docker = require_peer!(Dockerd::start(&[..], &[..]).await);` or, with an explicit
/// test name, `require_peer!(expr, "my_test")`. Any error convertible into [`Skip`] works.
#[allow(unused_macros)]
macro_rules! require_peer {
    ($result:expr) => {
        match $result {
            Ok(value) => value,
            Err(err) => {
                let skip: $crate::support::peers::Skip = err.into();
                skip.report();
                return;
            }
        }
    };
    ($result:expr, $test:expr) => {
        match $result {
            Ok(value) => value,
            Err(err) => {
                let skip: $crate::support::peers::Skip = err.into();
                skip.report_for($test);
                return;
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use require_peer;

/// Full path of `bin` found on `PATH`, if it is an executable file.
pub fn which(bin: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if bin.contains('/') {
        let p = PathBuf::from(bin);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(bin))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// `Err(Skip)` naming the first binary of `bins` not found on `PATH`.
pub fn require_binaries(bins: &[&str]) -> Result<(), Skip> {
    for bin in bins {
        if which(bin).is_none() {
            return Err(Skip::new(format!("binary `{bin}` not found on PATH")));
        }
    }
    Ok(())
}

/// True when the effective user is root (read from `/proc/self/status`).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// `Err(Skip)` unless running as root.
pub fn require_root() -> Result<(), Skip> {
    if is_root() {
        Ok(())
    } else {
        Err(Skip::new("needs root"))
    }
}

/// A currently free loopback TCP port (bind `127.0.0.1:0`, read the port, drop the listener).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A loopback port nothing listens on (bound and dropped): connecting to it is refused.
/// Used as the unreachable fallback for clients (containerd `server =`, proxy env).
pub fn dead_port() -> u16 {
    free_port()
}

/// Environment that keeps a Go client's non-loopback HTTP(S) traffic on this machine:
/// `HTTP_PROXY`/`HTTPS_PROXY` (both cases) = `http://127.0.0.1:<dead port>`, and
/// `NO_PROXY=127.0.0.1,localhost,::1` so loopback peers are reached directly.
pub fn no_egress_env() -> Vec<(&'static str, String)> {
    let proxy = format!("http://127.0.0.1:{}", dead_port());
    let no_proxy = "127.0.0.1,localhost,::1".to_string();
    vec![
        ("HTTP_PROXY", proxy.clone()),
        ("HTTPS_PROXY", proxy.clone()),
        ("http_proxy", proxy.clone()),
        ("https_proxy", proxy),
        ("NO_PROXY", no_proxy.clone()),
        ("no_proxy", no_proxy),
    ]
}

/// Last `max_lines` lines of a (log) file, or a note when it cannot be read.
pub fn tail_file(path: &Path, max_lines: usize) -> String {
    let mut file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("<cannot read {}: {e}>", path.display()),
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    let mut buf = Vec::new();
    let _ = file.seek(SeekFrom::Start(start));
    let _ = file.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

/// Runs `cmd` to completion with a time limit, capturing stdout/stderr; the child is killed
/// when the limit passes. Does not check the exit status (see [`run_ok`]).
pub async fn run(cmd: &mut tokio::process::Command, limit: Duration) -> anyhow::Result<Output> {
    let shown = format!("{:?}", cmd.as_std());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().with_context(|| format!("spawn {shown}"))?;
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => out.with_context(|| format!("wait for {shown}")),
        Err(_) => bail!("{shown} did not finish within {limit:?}"),
    }
}

/// Like [`run`], but fails unless the command exits 0; returns its stdout as a string.
pub async fn run_ok(cmd: &mut tokio::process::Command, limit: Duration) -> anyhow::Result<String> {
    let shown = format!("{:?}", cmd.as_std());
    let out = run(cmd, limit).await?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A spawned peer process that is stopped by PID when dropped.
#[derive(Debug)]
pub struct ProcessGuard {
    name: String,
    child: Option<Child>,
}

impl ProcessGuard {
    /// Spawns `cmd` (stdin null; stdout/stderr as configured by the caller).
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<ProcessGuard> {
        cmd.stdin(Stdio::null());
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {name}: {cmd:?}"))?;
        Ok(ProcessGuard {
            name: name.to_string(),
            child: Some(child),
        })
    }

    /// The process id, while it has not been stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `Some(status)` when the process has already exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, wait up to `grace` for the process to exit, then SIGKILL; reaps it.
    pub fn terminate(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            eprintln!("{}: did not stop within {grace:?}, killing", self.name);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills the process whose PID is written in `pidfile`, if any (used for daemons' children).
fn kill_pidfile(pidfile: &Path) {
    if let Ok(text) = fs::read_to_string(pidfile) {
        if let Ok(pid) = text.trim().parse::<u32>() {
            if pid > 1 {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// Lazily unmounts every mount point under `dir`, deepest first, and returns the mount
/// points still there afterwards (never remove a directory while this is not empty: a
/// recursive delete would walk into what is mounted).
pub fn unmount_under(dir: &Path) -> Vec<String> {
    let mounts = || -> Vec<String> {
        let prefix = format!("{}/", dir.display());
        let mut found: Vec<String> = fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&prefix))
            .map(str::to_string)
            .collect();
        found.sort_by_key(|m| std::cmp::Reverse(m.len()));
        found
    };
    for mount in mounts() {
        let _ = Command::new("umount")
            .args(["--lazy", &mount])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    mounts()
}

/// Sends `GET /_ping` over a unix socket; true when the answer is `200 OK`.
async fn unix_ping(socket: &Path) -> bool {
    let Ok(mut stream) = tokio::net::UnixStream::connect(socket).await else {
        return false;
    };
    if stream
        .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut buf)).await;
    matches!(read, Ok(Ok(_)))
        && buf.len() >= 12
        && buf.starts_with(b"HTTP/1.")
        && &buf[8..12] == b" 200"
}

fn mirror_url(m: &str) -> String {
    if m.starts_with("http://") || m.starts_with("https://") {
        m.trim_end_matches('/').to_string()
    } else {
        format!("http://{}", m.trim_end_matches('/'))
    }
}

fn host_port(m: &str) -> String {
    m.trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string()
}

/// The Docker CLI to use: Debian's `/usr/bin/docker` (matches dockerd 20.10) or `docker` on PATH.
pub fn docker_cli() -> PathBuf {
    let debian = PathBuf::from("/usr/bin/docker");
    if debian.is_file() {
        debian
    } else {
        which("docker").unwrap_or_else(|| PathBuf::from("docker"))
    }
}

/// A running `dockerd` (vfs storage, no bridge, no iptables) with its own data-root,
/// exec-root, pidfile and unix socket in a temp dir; stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Dockerd {
    process: ProcessGuard,
    dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
    config_dir: PathBuf,
    exec_root: PathBuf,
}

impl Dockerd {
    /// Starts dockerd with `registry-mirrors` (`127.0.0.1:PORT` or `http://127.0.0.1:PORT`)
    /// and `insecure-registries` (`127.0.0.1:PORT`), waits until `/_ping` answers (≤ 30 s).
    /// `Err(Skip)` when the binary is missing, we are not root, or it does not come up.
    pub async fn start(mirrors: &[&str], insecure_registries: &[&str]) -> Result<Dockerd, Skip> {
        require_binaries(&["dockerd"])?;
        require_root()?;
        let dir = tempfile::Builder::new()
            .prefix("regcache-dockerd-")
            .tempdir()
            .map_err(|e| Skip::new(format!("tempdir: {e}")))?;
        let root = dir.path();
        let socket = root.join("docker.sock");
        let log = root.join("dockerd.log");
        let config_dir = root.join("client-config");
        let exec_root = root.join("exec");
        fs::create_dir_all(&config_dir).map_err(|e| Skip::new(e.to_string()))?;
        fs::write(config_dir.join("config.json"), "{}").map_err(|e| Skip::new(e.to_string()))?;
        let config = serde_json::json!({
            "storage-driver": "vfs",
            "bridge": "none",
            "iptables": false,
            "ip6tables": false,
            "ip-forward": false,
            "ip-masq": false,
            "userland-proxy": false,
            "data-root": root.join("data"),
            "exec-root": exec_root,
            "pidfile": root.join("docker.pid"),
            "hosts": [format!("unix://{}", socket.display())],
            "registry-mirrors": mirrors.iter().map(|m| mirror_url(m)).collect::<Vec<_>>(),
            "insecure-registries": insecure_registries.iter().map(|m| host_port(m)).collect::<Vec<_>>(),
            "log-level": "debug",
        });
        let config_file = root.join("daemon.json");
        fs::write(&config_file, serde_json::to_vec_pretty(&config).unwrap())
            .map_err(|e| Skip::new(e.to_string()))?;
        let log_file = fs::File::create(&log).map_err(|e| Skip::new(e.to_string()))?;
        let mut cmd = Command::new("dockerd");
        cmd.arg("--config-file")
            .arg(&config_file)
            .envs(no_egress_env())
            .stdout(log_file.try_clone().map_err(|e| Skip::new(e.to_string()))?)
            .stderr(log_file);
        let process = ProcessGuard::spawn("dockerd", &mut cmd)?;
        let mut d = Dockerd {
            process,
            dir,
            socket,
            log,
            config_dir,
            exec_root,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = d.process.exited() {
                return Err(Skip::new(format!(
                    "dockerd exited ({status}) during start-up; log tail:\n{}",
                    tail_file(&d.log, 20)
                )));
            }
            if unix_ping(&d.socket).await {
                return Ok(d);
            }
            if Instant::now() > deadline {
                let tail = tail_file(&d.log, 20);
                d.stop();
                return Err(Skip::new(format!(
                    "dockerd did not answer /_ping within 30 s; log tail:\n{tail}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `unix:///…/docker.sock`, the value for `DOCKER_HOST`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Path of the daemon's unix socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Path of the daemon's combined stdout/stderr log (debug level).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The temp dir holding everything of this daemon.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A blocking `docker` CLI command bound to this daemon (for `Drop` clean-ups, where
    /// nothing can be awaited).
    pub fn docker_blocking_cmd(&self) -> Command {
        let mut cmd = Command::new(docker_cli());
        cmd.env("DOCKER_HOST", self.host())
            .env("DOCKER_CONFIG", &self.config_dir)
            .envs(no_egress_env());
        cmd
    }

    /// A `docker` CLI command bound to this daemon (`DOCKER_HOST`, private `DOCKER_CONFIG`).
    pub fn docker_cmd(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(docker_cli());
        cmd.env("DOCKER_HOST", self.host())
            .env("DOCKER_CONFIG", &self.config_dir)
            .envs(no_egress_env());
        cmd
    }

    /// Runs `docker ARGS` against this daemon (≤ 120 s) and returns the raw output.
    pub async fn docker(&self, args: &[&str]) -> anyhow::Result<Output> {
        run(self.docker_cmd().args(args), Duration::from_secs(120)).await
    }

    /// Runs `docker ARGS` (≤ 120 s); fails with stderr unless it exits 0; returns stdout.
    pub async fn docker_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        run_ok(self.docker_cmd().args(args), Duration::from_secs(120)).await
    }

    /// Stops the daemon: SIGTERM, up to 15 s grace, then SIGKILL (also of its containerd).
    /// Then unmounts what it left under its temp dir (dockerd 20.10 leaves the
    /// `exec/netns/default` namespace mounted), so the temp dir and its image store can be
    /// removed.
    pub fn stop(&mut self) {
        if self.process.pid().is_none() {
            return;
        }
        self.process.terminate(Duration::from_secs(15));
        kill_pidfile(&self.exec_root.join("containerd").join("containerd.pid"));
        let left = unmount_under(self.dir.path());
        if !left.is_empty() {
            eprintln!("dockerd: still mounted after stop: {left:?}");
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running `containerd` (CRI plugin disabled) with its own root, state, grpc address and
/// `/opt` directory in a temp dir; stopped on drop. Use the `native` snapshotter with it.
#[derive(Debug)]
pub struct Containerd {
    process: ProcessGuard,
    dir: tempfile::TempDir,
    address: PathBuf,
    log: PathBuf,
}

impl Containerd {
    /// Starts containerd and waits until `ctr version` answers (≤ 30 s).
    /// `Err(Skip)` when `containerd`/`ctr` are missing, we are not root, or it does not come up.
    pub async fn start() -> Result<Containerd, Skip> {
        require_binaries(&["containerd", "ctr"])?;
        require_root()?;
        let dir = tempfile::Builder::new()
            .prefix("regcache-containerd-")
            .tempdir()
            .map_err(|e| Skip::new(format!("tempdir: {e}")))?;
        let root = dir.path();
        let address = root.join("containerd.sock");
        let log = root.join("containerd.log");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = root.join("root").display(),
            state = root.join("state").display(),
            address = address.display(),
            opt = root.join("opt").display(),
        );
        let config_file = root.join("config.toml");
        fs::write(&config_file, config).map_err(|e| Skip::new(e.to_string()))?;
        let log_file = fs::File::create(&log).map_err(|e| Skip::new(e.to_string()))?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(&config_file)
            .envs(no_egress_env())
            .stdout(log_file.try_clone().map_err(|e| Skip::new(e.to_string()))?)
            .stderr(log_file);
        let process = ProcessGuard::spawn("containerd", &mut cmd)?;
        let mut c = Containerd {
            process,
            dir,
            address,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = c.process.exited() {
                return Err(Skip::new(format!(
                    "containerd exited ({status}) during start-up; log tail:\n{}",
                    tail_file(&c.log, 20)
                )));
            }
            if c.address.exists() {
                if let Ok(out) = c.ctr(&["version"]).await {
                    if out.status.success() {
                        return Ok(c);
                    }
                }
            }
            if Instant::now() > deadline {
                let tail = tail_file(&c.log, 20);
                c.stop();
                return Err(Skip::new(format!(
                    "containerd did not answer `ctr version` within 30 s; log tail:\n{tail}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The grpc socket path (for `ctr --address`).
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// Path of the daemon's combined stdout/stderr log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The temp dir holding everything of this daemon.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A `ctr --address SOCK` command (with [`no_egress_env`]).
    pub fn ctr_cmd(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.address)
            .envs(no_egress_env());
        cmd
    }

    /// Runs `ctr --address SOCK ARGS` (≤ 120 s) and returns the raw output.
    pub async fn ctr(&self, args: &[&str]) -> anyhow::Result<Output> {
        run(self.ctr_cmd().args(args), Duration::from_secs(120)).await
    }

    /// Runs `ctr --address SOCK ARGS` (≤ 120 s); fails with stderr unless it exits 0.
    pub async fn ctr_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        run_ok(self.ctr_cmd().args(args), Duration::from_secs(120)).await
    }

    /// `ctr image pull --hosts-dir HOSTS_DIR --snapshotter native REFERENCE` (e.g.
    /// `docker.io/library/x:1`); fails unless it exits 0; returns stdout.
    pub async fn pull(&self, reference: &str, hosts_dir: &Path) -> anyhow::Result<String> {
        let hosts = hosts_dir.to_string_lossy().into_owned();
        self.ctr_ok(&[
            "image",
            "pull",
            "--hosts-dir",
            &hosts,
            "--snapshotter",
            "native",
            reference,
        ])
        .await
    }

    /// Stops the daemon: SIGTERM, up to 10 s grace, then SIGKILL.
    pub fn stop(&mut self) {
        self.process.terminate(Duration::from_secs(10));
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes `HOSTS_DIR/<registry>/hosts.toml` for containerd: `server` is a dead loopback port
/// (so the fallback cannot leave the machine) and `mirror` (`127.0.0.1:PORT` or
/// `http://127.0.0.1:PORT`) gets `capabilities = ["pull", "resolve"]`. Returns the file path.
pub fn write_hosts_toml(hosts_dir: &Path, registry: &str, mirror: &str) -> anyhow::Result<PathBuf> {
    let dir = hosts_dir.join(registry);
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("hosts.toml");
    let text = format!(
        "server = \"http://127.0.0.1:{dead}\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        dead = dead_port(),
        mirror = mirror_url(mirror),
    );
    fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

//! Owns the servers under comparison that the test support does not start: regcache (the
//! binary cargo built for this bench) and nginx (as `proxy_cache` in front of the upstream and
//! as a static file server), plus the `/proc` readings of their CPU time and peak memory.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::support::peers::{ProcessGuard, free_port, is_root, tail_file};

/// The processes whose CPU time and memory count as one server.
#[derive(Debug, Clone, Copy)]
pub enum Procs {
    /// One process (threads included): regcache, docker-registry.
    One(u32),
    /// A master process and all its children: nginx and its workers.
    Tree(u32),
}

impl Procs {
    /// The process ids, read now (nginx may restart a worker).
    pub fn pids(self) -> Vec<u32> {
        match self {
            Procs::One(pid) => vec![pid],
            Procs::Tree(pid) => {
                let mut pids = vec![pid];
                pids.extend(children(pid));
                pids
            }
        }
    }

    /// User plus system CPU seconds used so far (`/proc/<pid>/stat` utime + stime).
    pub fn cpu_secs(self) -> f64 {
        let ticks = clock_ticks();
        self.pids()
            .into_iter()
            .filter_map(stat_fields)
            .map(|f| {
                let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                // Fields after `(comm)`: 0 = state, 1 = ppid, 11 = utime, 12 = stime.
                (t(11) + t(12)) as f64 / ticks
            })
            .sum()
    }

    /// Peak resident memory in MiB (`VmHWM`), summed over the processes (for nginx an upper
    /// bound: pages its workers share are counted once per worker).
    pub fn peak_rss_mib(self) -> f64 {
        self.pids()
            .into_iter()
            .filter_map(|pid| status_kib(pid, "VmHWM:"))
            .sum::<u64>() as f64
            / 1024.0
    }
}

impl Procs {
    /// Resident memory now in MiB (`VmRSS`), summed over the processes.
    pub fn rss_mib(self) -> f64 {
        self.pids()
            .into_iter()
            .filter_map(|pid| status_kib(pid, "VmRSS:"))
            .sum::<u64>() as f64
            / 1024.0
    }
}

/// The soft limit on open files of this process and its children (`/proc/self/limits`),
/// raised to the hard limit first when it is below `needed` (with `prlimit`, from
/// util-linux). Servers and clients started afterwards inherit it.
pub fn raise_open_files(needed: u64) -> u64 {
    let read = || -> Option<(u64, Option<u64>)> {
        let limits = fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        let mut f = line["Max open files".len()..].split_whitespace();
        let soft = f.next()?.parse().ok()?;
        Some((soft, f.next()?.parse().ok()))
    };
    let Some((soft, hard)) = read() else {
        return 0;
    };
    if soft >= needed {
        return soft;
    }
    // `unlimited` hard: ask for what is needed with room to spare.
    let target = hard.unwrap_or(needed * 2);
    let _ = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!(
            "--nofile={target}:{}",
            hard.map_or("unlimited".into(), |h| h.to_string())
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    read().map_or(soft, |(soft, _)| soft)
}

/// Fields of `/proc/<pid>/stat` after the `(comm)` field, which may contain spaces.
/// CPU seconds (user + system) of this process's children that have exited and been waited
/// for (`cutime` + `cstime` of `/proc/self/stat`): the difference around a run of short-lived
/// clients is what those clients used.
pub fn finished_children_cpu_secs() -> f64 {
    stat_fields(std::process::id()).map_or(0.0, |f| {
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // Fields after `(comm)`: 13 = cutime, 14 = cstime.
        (t(13) + t(14)) as f64 / clock_ticks()
    })
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn children(parent: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&pid| {
            stat_fields(pid).and_then(|f| f.get(1).and_then(|p| p.parse::<u32>().ok()))
                == Some(parent)
        })
        .collect()
}

/// The process whose command line contains `needle` (e.g. a config file path only it uses).
pub fn pid_by_cmdline(needle: &str) -> Option<u32> {
    let me = std::process::id();
    all_pids().into_iter().find(|&pid| {
        pid != me
            && fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(needle)
                })
                .unwrap_or(false)
    })
}

/// A self-signed certificate for `127.0.0.1` (RSA 2048), as `(cert, key)` PEM paths; clients
/// trust the certificate itself.
pub fn self_signed_cert(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("tls-cert.pem"), dir.join("tls-key.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("run openssl")?;
    if !out.status.success() {
        bail!("openssl req: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((cert, key))
}

/// regcache as a child process, logging JSON to a file; killed by PID on drop.
pub struct Regcache {
    _guard: ProcessGuard,
    /// Its process.
    pub procs: Procs,
    /// `http://127.0.0.1:PORT` or `https://…` with TLS.
    pub url: String,
}

impl Regcache {
    /// Starts `binary` with its own cache dir under `dir`, one upstream `up` (the default)
    /// with the given credentials, `cache.max_size` when given (as deployed: a bounded cache
    /// tracks every use), and TLS when `tls` names a certificate and key. Waits (≤ 30 s) for
    /// its `regcache ready` line.
    pub fn start(
        binary: &Path,
        dir: &Path,
        upstream: &str,
        credentials: (&str, &str),
        max_size: Option<&str>,
        tls: Option<(&Path, &Path)>,
    ) -> anyhow::Result<Regcache> {
        fs::create_dir_all(dir)?;
        let mut cfg = format!(
            "listen = \"127.0.0.1:0\"\ncache_dir = {:?}\ndefault_upstream = \"up\"\n",
            dir.join("cache")
        );
        // Every bench client comes from 127.0.0.1: the per-address download limit would
        // turn the herd into 429s.
        let _ = write!(cfg, "[limits]\ndownloads_per_client = 10000\n");
        if let Some(max) = max_size {
            let _ = write!(cfg, "[cache]\nmax_size = {max:?}\n");
        }
        if let Some((cert, key)) = tls {
            let _ = write!(cfg, "[tls]\ncert = {cert:?}\nkey = {key:?}\n");
        }
        let _ = write!(
            cfg,
            "[[upstream]]\nname = \"up\"\nurl = \"{upstream}\"\nusername = {:?}\npassword = {:?}\n",
            credentials.0, credentials.1
        );
        let config = dir.join("regcache.toml");
        fs::write(&config, cfg)?;
        let log = dir.join("regcache.log");
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(&config)
            .args(["--log-format", "json"])
            // regcache's default level: one access line per request, like the other servers.
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(fs::File::create(&log)?))
            .stderr(Stdio::from(fs::File::create(dir.join("stderr.log"))?));
        let mut guard = ProcessGuard::spawn("regcache", &mut cmd)?;
        let pid = guard.pid().context("regcache pid")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let listen = loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let ready = text.lines().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                (v["message"] == "regcache ready").then(|| v["listen"].as_str().map(str::to_owned))
            });
            if let Some(listen) = ready {
                break listen.context("`listen` field in the ready line")?;
            }
            if let Some(status) = guard.exited() {
                bail!(
                    "regcache exited ({status}):\n{}\n{}",
                    tail_file(&log, 10),
                    tail_file(&dir.join("stderr.log"), 10)
                );
            }
            if Instant::now() > deadline {
                bail!("regcache not ready within 30 s:\n{}", tail_file(&log, 10));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        Ok(Regcache {
            _guard: guard,
            procs: Procs::One(pid),
            url: format!("{scheme}://{listen}"),
        })
    }
}

/// A running nginx (master in the foreground, its workers as children); stopped with
/// SIGTERM on drop, which makes the master stop its workers.
pub struct Nginx {
    guard: ProcessGuard,
    /// Master and workers.
    pub procs: Procs,
    /// Plain HTTP port.
    pub port: u16,
    /// HTTPS port, when configured.
    pub tls_port: Option<u16>,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.guard.terminate(Duration::from_secs(5));
    }
}

/// The common head of both nginx configurations: one worker per core, logs in `dir`, every
/// temp path in `dir`, sendfile, and an access log line per request like the other servers.
/// Each worker may hold all the connections of the many-clients run (and its upstream ones).
fn nginx_head(dir: &Path) -> String {
    const NGINX_CONNECTIONS: usize = 12_288;
    const NGINX_FILES: usize = 2 * NGINX_CONNECTIONS;
    let d = dir.display();
    let user = if is_root() { "user root root;\n" } else { "" };
    format!(
        "{user}daemon off;\nmaster_process on;\nworker_processes auto;\npid {d}/nginx.pid;\n\
         worker_rlimit_nofile {NGINX_FILES};\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections {NGINX_CONNECTIONS}; }}\n\
         http {{\n  access_log {d}/access.log;\n  sendfile on;\n  tcp_nopush on;\n  \
         keepalive_requests 1000000;\n  types {{ }}\n  default_type application/octet-stream;\n  \
         client_body_temp_path {d}/client_body;\n  proxy_temp_path {d}/proxy_temp;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n"
    )
}

impl Nginx {
    /// nginx `proxy_cache` in front of `upstream_port`, every request carrying
    /// `Authorization: Bearer <token>`. Blobs and manifests by digest are cached for a day;
    /// tag answers for 5 minutes (regcache's default `tag_ttl`), then refreshed in the
    /// background while the cached one is served. `proxy_cache_lock` lets one request fill
    /// an entry while the others wait for it.
    pub fn start_proxy(dir: &Path, upstream_port: u16, token: &str) -> anyhow::Result<Nginx> {
        let d = dir.display();
        let common = format!(
            "proxy_pass http://registry;\n    proxy_http_version 1.1;\n    \
             proxy_set_header Connection \"\";\n    \
             proxy_set_header Authorization \"Bearer {token}\";\n    proxy_cache reg;\n    \
             proxy_ignore_headers Cache-Control Expires Set-Cookie;\n    \
             proxy_cache_use_stale updating error timeout;\n    proxy_cache_background_update on;\n    \
             proxy_cache_lock on;\n    proxy_cache_lock_timeout 10m;\n    proxy_cache_lock_age 10m;\n    \
             proxy_read_timeout 10m;\n"
        );
        Nginx::start(dir, false, |port, _| {
            format!(
                "{}  proxy_cache_path {d}/cache levels=1:2 keys_zone=reg:16m max_size=200g \
                 inactive=1d use_temp_path=off;\n  \
                 upstream registry {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}\n  \
                 server {{\n    listen 127.0.0.1:{port};\n    \
                 location ~ ^/v2/.+/blobs/sha256: {{\n    {common}    proxy_cache_key $uri;\n    \
                 proxy_cache_valid 200 1d;\n    }}\n    \
                 location ~ ^/v2/.+/manifests/sha256: {{\n    {common}    \
                 proxy_cache_key $uri|$http_accept;\n    proxy_cache_valid 200 1d;\n    }}\n    \
                 location /v2/ {{\n    {common}    proxy_cache_key $uri|$http_accept;\n    \
                 proxy_cache_valid 200 5m;\n    }}\n  }}\n}}\n",
                nginx_head(dir)
            )
        })
    }

    /// nginx serving the files under `root` (the blob and manifests laid out as registry
    /// paths) over HTTP and, with the certificate and key, HTTPS.
    pub fn start_static(
        dir: &Path,
        root: &Path,
        tls: (&Path, &Path),
        manifest_type: &str,
    ) -> anyhow::Result<Nginx> {
        let (cert, key) = (tls.0.display(), tls.1.display());
        let root = root.display();
        Nginx::start(dir, true, |port, tls_port| {
            let locations = format!(
                "root {root};\n    location ~ /manifests/ {{ default_type {manifest_type}; }}\n"
            );
            format!(
                "{}  server {{\n    listen 127.0.0.1:{port};\n    {locations}  }}\n  \
                 server {{\n    listen 127.0.0.1:{tls_port} ssl;\n    ssl_certificate {cert};\n    \
                 ssl_certificate_key {key};\n    {locations}  }}\n}}\n",
                nginx_head(dir)
            )
        })
    }

    /// Writes the configuration made by `conf(port, tls_port)` on fresh OS-chosen ports,
    /// starts nginx and waits (≤ 10 s) until the ports accept; retries when a port was taken
    /// in between.
    fn start(
        dir: &Path,
        with_tls: bool,
        conf: impl Fn(u16, u16) -> String,
    ) -> anyhow::Result<Nginx> {
        fs::create_dir_all(dir)?;
        let config = dir.join("nginx.conf");
        let error_log = dir.join("error.log");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (port, tls_port) = (free_port(), free_port());
            fs::write(&config, conf(port, tls_port))?;
            let _ = fs::remove_file(&error_log);
            let mut cmd = Command::new("nginx");
            cmd.arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(&config)
                .arg("-e")
                .arg(&error_log)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut guard = ProcessGuard::spawn("nginx", &mut cmd)?;
            let master = guard.pid().context("nginx pid")?;
            let mut ports = vec![port];
            if with_tls {
                ports.push(tls_port);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(status) = guard.exited() {
                    let log = tail_file(&error_log, 10);
                    if log.contains("Address already in use") && attempt < 4 {
                        break;
                    }
                    bail!("nginx exited ({status}):\n{log}");
                }
                let up = ports
                    .iter()
                    .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok());
                if up {
                    return Ok(Nginx {
                        guard,
                        procs: Procs::Tree(master),
                        port,
                        tls_port: with_tls.then_some(tls_port),
                    });
                }
                if Instant::now() > deadline {
                    guard.terminate(Duration::from_secs(2));
                    bail!(
                        "nginx did not listen within 10 s:\n{}",
                        tail_file(&error_log, 10)
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

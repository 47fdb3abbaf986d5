//! Owns the tests of `regcache healthcheck` against a real regcache process: healthy while it
//! serves (on `listen`, on `admin_listen`, over TLS, with the port from the file or from
//! REGCACHE_LISTEN), unhealthy with a one-line reason and exit code 1 once it is stopped,
//! when the certificate is not the configured one, or when the port speaks something else.

mod fake;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use fake::certificates;

const BIN: &str = env!("CARGO_BIN_EXE_regcache");

/// A free loopback port (bound, then released for the process under test).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a configuration: a cache in `dir`, then `extra` (top-level keys, then tables), then
/// one upstream (never contacted).
fn config(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "cache_dir = \"{}\"\ndefault_upstream = \"u\"\n{extra}\n\n[[upstream]]\nname = \"u\"\nurl = \"http://127.0.0.1:9\"\n",
            dir.join("cache").display()
        ),
    )
    .unwrap();
    path
}

/// regcache serving `config`, killed on drop.
struct Server(Child);

impl Server {
    /// Starts it and waits (≤ 30 s) until `port` accepts connections.
    fn start(config: &Path, port: u16) -> Server {
        let child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .env_remove("REGCACHE_LISTEN")
            .env_remove("REGCACHE_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut server = Server(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                server.0.try_wait().unwrap().is_none(),
                "regcache exited at start-up"
            );
            assert!(Instant::now() < deadline, "port {port} never opened");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn stop(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `regcache [--config FILE] healthcheck` with `env`.
fn healthcheck(config: Option<&Path>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("REGCACHE_LISTEN")
        .env_remove("REGCACHE_CONFIG");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(["healthcheck", "--timeout", "5s"])
        .envs(env.iter().copied());
    cmd.output().unwrap()
}

/// Exit code 0 and the one healthy line on stdout.
fn assert_healthy(out: &Output, url: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout, format!("healthy: {url} answered 200\n"));
}

/// Exit code 1 and one line on stderr saying why, containing `why`.
fn assert_unhealthy(out: &Output, why: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(why), "{why:?} not in {stderr}");
}

#[test]
fn healthy_while_serving_and_unhealthy_once_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let file = config(
        dir.path(),
        "c.toml",
        &format!("listen = \"0.0.0.0:{port}\""),
    );
    let server = Server::start(&file, port);
    let url = format!("http://127.0.0.1:{port}/healthz");
    // The port from the file, the file from --config or from REGCACHE_CONFIG.
    assert_healthy(&healthcheck(Some(&file), &[]), &url);
    assert_healthy(
        &healthcheck(None, &[("REGCACHE_CONFIG", file.to_str().unwrap())]),
        &url,
    );
    // REGCACHE_LISTEN overrides the file, as it does for the server.
    let elsewhere = free_port();
    assert_unhealthy(
        &healthcheck(
            Some(&file),
            &[("REGCACHE_LISTEN", &format!("127.0.0.1:{elsewhere}"))],
        ),
        &format!("cannot connect to 127.0.0.1:{elsewhere} (listen)"),
    );
    server.stop();
    assert_unhealthy(
        &healthcheck(Some(&file), &[]),
        &format!("unhealthy: {url}: cannot connect to 127.0.0.1:{port} (listen)"),
    );
    // A configuration that does not load is unhealthy too (exit 1, not 2).
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = \"nowhere\"\n").unwrap();
    assert_unhealthy(
        &healthcheck(Some(&bad), &[]),
        "unhealthy: regcache: invalid config file",
    );
}

#[test]
fn admin_listen_is_probed_when_set() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let file = config(
        dir.path(),
        "c.toml",
        &format!("listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\""),
    );
    let server = Server::start(&file, admin);
    // The registry listener answers /healthz 404 when admin_listen is set: only a probe of
    // the admin listener can be healthy.
    assert_healthy(
        &healthcheck(Some(&file), &[]),
        &format!("http://127.0.0.1:{admin}/healthz"),
    );
    let registry_only = config(
        dir.path(),
        "r.toml",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    assert_unhealthy(
        &healthcheck(Some(&registry_only), &[]),
        &format!("http://127.0.0.1:{port}/healthz answered 404"),
    );
    server.stop();
    assert_unhealthy(
        &healthcheck(Some(&file), &[]),
        &format!("cannot connect to 127.0.0.1:{admin} (admin_listen)"),
    );
}

#[test]
fn tls_listener_is_probed_over_tls_with_the_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path(), &["server", "other"]);
    let port = free_port();
    let tls = |name: &str| {
        format!(
            "listen = \"127.0.0.1:{port}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            dir.path().join(format!("{name}.pem")).display(),
            dir.path().join(format!("{name}.key")).display()
        )
    };
    let file = config(dir.path(), "c.toml", &tls("server"));
    let server = Server::start(&file, port);
    assert_healthy(
        &healthcheck(Some(&file), &[]),
        &format!("https://127.0.0.1:{port}/healthz"),
    );
    // Another certificate in the probe's configuration: the server is not the one configured.
    let other = config(dir.path(), "o.toml", &tls("other"));
    assert_unhealthy(&healthcheck(Some(&other), &[]), "not the one in tls.cert");
    // Plain HTTP to a TLS listener gets no HTTP answer.
    let plain = config(
        dir.path(),
        "p.toml",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    let out = healthcheck(Some(&plain), &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    server.stop();
}

#[test]
fn a_port_that_is_not_http_is_unhealthy() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let speaker = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 512];
        let _ = conn.read(&mut buf);
        conn.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let file = config(
        dir.path(),
        "c.toml",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    assert_unhealthy(&healthcheck(Some(&file), &[]), "the answer is not HTTP");
    speaker.join().unwrap();
}

//! Owns the tests of commands beside a running server: `prefetch` and `import` refuse a
//! cache folder a server holds (an advisory lock the kernel drops when the server dies, even
//! by SIGKILL), `gc` still runs, and `prefetch --server` warms a running regcache through
//! its registry API.

mod fake;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use fake::*;
use regcache::media::OCI_MANIFEST;

fn regcache() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_regcache"));
    for var in [
        "REGCACHE_CONFIG",
        "REGCACHE_LISTEN",
        "REGCACHE_CACHE_DIR",
        "REGCACHE_LOG_FORMAT",
        "REGCACHE_OFFLINE",
        "RUST_LOG",
    ] {
        c.env_remove(var);
    }
    c
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn command(config: &Path, cache: &Path, args: &[&str]) -> Output {
    regcache()
        .args(args)
        .arg("--config")
        .arg(config)
        .arg("--cache-dir")
        .arg(cache)
        .output()
        .unwrap()
}

#[test]
fn prefetch_and_import_refuse_a_served_cache_until_the_server_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "default_upstream = \"up\"\n[retry]\nbackoff = \"10ms\"\n\
             [[upstream]]\nname = \"up\"\nurl = \"http://{dead}\"\n"
        ),
    )
    .unwrap();
    let mut server = regcache()
        .args(["--config", config.to_str().unwrap()])
        .arg("--cache-dir")
        .arg(&cache)
        .env("REGCACHE_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("exited before ready").unwrap();
        if line.contains("regcache ready") {
            break;
        }
    }

    let out = command(&config, &cache, &["prefetch", "team/app:1"]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("a regcache server is using the cache folder") && err.contains("--server"),
        "{err}"
    );
    let out = command(&config, &cache, &["import", "/nonexistent/layout"]);
    let (_, err) = text(&out);
    assert!(!out.status.success());
    assert!(err.contains("fetches from upstreams"), "{err}");
    // gc is safe beside a server.
    let out = command(&config, &cache, &["gc"]);
    assert!(out.status.success(), "{}", text(&out).1);

    // SIGKILL: no clean-up runs, yet the kernel has dropped the lock.
    server.kill().unwrap();
    server.wait().unwrap();
    let out = command(&config, &cache, &["prefetch", "team/app:1"]);
    let (_, err) = text(&out);
    assert!(!err.contains("is using the cache folder"), "{err}");
    // It got as far as the (dead) upstream, and says so.
    assert!(
        err.contains("team/app:1: failed:") && err.contains("up: connection refused"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_with_server_warms_a_running_regcache_through_its_api() {
    let up = FakeUpstream::start().await;
    let proxy = Proxy::start(config_for(&up.url())).await;
    let layers = [blob_of(300_000, 1), blob_of(1000, 2)];
    let image = push_image(&up, "team/app", "1", &layers, OCI_MANIFEST);
    let server = proxy.url("");
    let out = tokio::task::spawn_blocking(move || {
        regcache()
            .args(["prefetch", "--server", &server, "team/app:1", "--jobs", "2"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!(
            "team/app:1: {} (1 manifest, 3 blobs read through the server;",
            image.manifest_digest
        )),
        "{stdout}"
    );
    proxy.committed().await;
    for d in image.layers.iter().chain([&image.config]) {
        assert_eq!(up.blob_gets(d), 1, "{d} fetched once");
        assert!(proxy.blob_path(d).exists(), "{d} cached by the server");
    }
    // A name regcache cannot route is the server's answer, not a crash.
    let server = proxy.url("");
    let out = tokio::task::spawn_blocking(move || {
        regcache()
            .args(["prefetch", "--server", &server, "ghcr.io/x/y:1"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("ghcr.io/x/y:1: failed: manifest 1: 404"),
        "{stderr}"
    );
}

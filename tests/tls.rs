//! TLS on both sides: regcache serving HTTPS (checked with curl), and an upstream reached over
//! HTTPS whose certificate is trusted only through the upstream's `ca_file`.

mod fake;

use std::path::{Path, PathBuf};
use std::time::Duration;

use fake::*;
use regcache::config::TlsConfig;
use tokio::net::TcpListener;

/// A private CA and a server certificate for 127.0.0.1 signed by it. Returns (CA cert,
/// server cert, server key).
fn private_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca = certificates(dir, &["server"]);
    (ca, dir.join("server.pem"), dir.join("server.key"))
}

/// Starts regcache over TLS in front of `upstream_url`; returns its port.
async fn tls_proxy(upstream_url: &str, cert: &Path, key: &Path, dir: &Path) -> u16 {
    let mut cfg = config_for(upstream_url);
    cfg.cache_dir = dir.join("cache-a");
    cfg.tls = Some(TlsConfig {
        cert: cert.to_owned(),
        key: key.to_owned(),
    });
    let cfg = cfg.validate().unwrap();
    let tls = regcache::server::Tls::load(cert, key).unwrap();
    let app = regcache::app::App::new(cfg).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(regcache::server::serve(
        listener,
        app,
        Some(tls),
        Duration::from_secs(1),
        std::future::pending(),
    ));
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_https_and_trusts_an_upstream_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca(dir.path());
    let up = FakeUpstream::start().await;
    let data = blob_of(200_000, 3);
    let d = up.add_blob(data.clone());
    let port = tls_proxy(&up.url(), &cert, &key, dir.path()).await;

    // A real TLS client against regcache's HTTPS listener.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&ca)
        .args(["-o", "/dev/null", "-w", "%{http_code} %{ssl_verify_result}"])
        .arg(format!("https://127.0.0.1:{port}/v2/"))
        .output()
        .await
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200 0",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A second regcache whose upstream is the HTTPS one: trusted only with ca_file.
    let https = format!("https://127.0.0.1:{port}");
    let untrusting = Proxy::start(config_for(&https)).await;
    let r = client()
        .get(untrusting.url(&format!("/v2/lib/x/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502, "an unknown CA must not be trusted");

    let mut cfg = config_for(&https);
    cfg.upstreams[0].ca_file = Some(ca.clone());
    let trusting = Proxy::start(cfg).await;
    let r = client()
        .get(trusting.url(&format!("/v2/lib/x/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    same(&r.bytes().await.unwrap(), &data);
    assert_eq!(up.blob_gets(&d), 1);
}

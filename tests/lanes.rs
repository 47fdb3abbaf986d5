//! Serving in connection lanes (one single-threaded runtime per core, as the binary serves):
//! every lane serves, a herd across lanes still makes one upstream fetch, a connection
//! handed to hyper is served there, and the lanes end with the server.

mod fake;

use std::time::Duration;

use fake::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The threads of this process whose name starts with `prefix`: (name, CPU ticks used).
fn threads(prefix: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(name) = std::fs::read_to_string(task.path().join("comm")) else {
            continue;
        };
        let name = name.trim().to_owned();
        if !name.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        out.push((
            name,
            f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0),
        ));
    }
    out.sort();
    out
}

/// `n` requests for the manifest by tag on one keep-alive connection; every answer a 200.
async fn heads(addr: std::net::SocketAddr, n: usize) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..n {
        s.write_all(b"HEAD /v2/lib/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nAccept: application/vnd.docker.distribution.manifest.v2+json\r\n\r\n")
            .await
            .unwrap();
        buf.clear();
        while !buf.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 512];
            let got = s.read(&mut byte).await.unwrap();
            assert!(got > 0, "connection closed mid-answer");
            buf.extend_from_slice(&byte[..got]);
        }
        assert!(
            buf.starts_with(b"HTTP/1.1 200 "),
            "{}",
            String::from_utf8_lossy(&buf)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_serve_share_one_fetch_and_end_with_the_server() {
    let up = FakeUpstream::start().await;
    let data = blob_of(3 << 20, 7);
    let d = up.add_blob(data.clone());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{MANIFEST}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","size":{},"digest":"{d}"}},"layers":[]}}"#,
        data.len()
    );
    up.add_manifest("lib/app", "v1", MANIFEST, manifest.as_bytes());

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config_for(&up.url());
    cfg.cache_dir = dir.path().to_owned();
    let app = regcache::app::App::new(cfg.validate().unwrap())
        .await
        .unwrap();
    let lanes = regcache::server::Lanes::start(2).unwrap();
    // Each thread names itself once it runs.
    until(|| {
        let names: Vec<String> = threads("regcache-lane-").into_iter().map(|t| t.0).collect();
        names == ["regcache-lane-0", "regcache-lane-1"]
    })
    .await;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(regcache::server::serve_in_lanes(
        listener,
        app,
        None,
        Duration::from_secs(5),
        async {
            let _ = stopped.await;
        },
        lanes,
    ));
    let url = format!("http://{addr}/v2/lib/app/blobs/{d}");

    // A herd of 12 connections, dealt to both lanes: one upstream fetch, every body whole.
    let herd: Vec<_> = (0..12)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { client().get(url).send().await.unwrap().bytes().await })
        })
        .collect();
    for h in herd {
        same(&h.await.unwrap().unwrap(), &data);
    }
    assert_eq!(
        up.blob_gets(&d),
        1,
        "one fetch for a herd spread over lanes"
    );

    // Eight keep-alive connections of manifest hits: both lanes do the serving.
    let before = threads("regcache-lane-");
    let conns: Vec<_> = (0..8).map(|_| tokio::spawn(heads(addr, 1500))).collect();
    for c in conns {
        c.await.unwrap();
    }
    let after = threads("regcache-lane-");
    for ((name, was), (_, now)) in before.iter().zip(&after) {
        assert!(now > was, "{name} served nothing: {before:?} -> {after:?}");
    }

    // HTTP/1.0 is hyper's: the connection is handed over on its lane and answered there.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.0 200 "), "{answer}");

    // Shutdown: the server returns, and with it the lanes' threads end.
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    until(|| threads("regcache-lane-").is_empty()).await;
}

//! Crash safety: the real binary is killed with SIGKILL mid-download, around a commit and
//! while it evicts; after a restart the cache holds only complete, verified blobs and every
//! body served is correct.

mod fake;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use fake::*;
use futures_util::StreamExt;

/// The regcache binary on `cache`, in front of `upstream`; returns it and its address.
fn start(cache: &Path, upstream: &str) -> (Child, String) {
    start_with(cache, upstream, "")
}

/// As [`start`], with `extra` TOML (a `[cache]` table) appended to the config.
fn start_with(cache: &Path, upstream: &str, extra: &str) -> (Child, String) {
    let cfg = cache.with_extension("toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ncache_dir = \"{}\"\ndefault_upstream = \"up\"\n[[upstream]]\nname = \"up\"\nurl = \"{upstream}\"\n{extra}",
            cache.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["--config", cfg.to_str().unwrap(), "--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("regcache exited before it was ready")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "regcache ready" {
            break v["listen"].as_str().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines.by_ref() {});
    (child, addr)
}

/// Every committed blob hashes to its file name.
fn assert_cache_verified(cache: &Path) {
    for f in files_under(&cache.join("blobs")) {
        let data = std::fs::read(&f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            sha(&data),
            format!("sha256:{name}"),
            "{} is not what it claims",
            f.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_download_and_around_commits_leaves_only_verified_blobs() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let big = blob_of(64 * CHUNK, 30);
    let d = up.add_blob(big.clone());
    let gate = up.gate();
    gate.add_permits(8);

    // 1. Killed mid-download: a partial staged file exists, no blob.
    let (mut child, addr) = start(&cache, &up.url());
    let r = client()
        .get(format!("http://{addr}/v2/lib/app/blobs/{d}"))
        .send()
        .await
        .unwrap();
    let mut s = r.bytes_stream();
    let mut got = 0;
    while got < 4 * CHUNK {
        got += s.next().await.unwrap().unwrap().len();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    drop(s);
    assert!(
        !files_under(&cache.join("tmp")).is_empty(),
        "the download was under way"
    );
    assert!(files_under(&cache.join("blobs")).is_empty());

    // Restart: the partial file is gone and the blob comes back whole.
    up.ungate();
    let (mut child, mut addr) = start(&cache, &up.url());
    assert!(
        files_under(&cache.join("tmp")).is_empty(),
        "stale temp files cleared at start-up"
    );
    let body = client()
        .get(format!("http://{addr}/v2/lib/app/blobs/{d}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    same(&body, &big);
    assert_cache_verified(&cache);

    // 2. Killed around commits: start downloads of several blobs and kill the process as
    // they finish, at a different point each time; after each restart the cache holds only
    // verified blobs and serves every one correctly.
    let blobs: Vec<(String, bytes::Bytes)> = (0..6u8)
        .map(|i| {
            let b = blob_of((i as usize + 1) * 3 * CHUNK, 40 + i);
            (up.add_blob(b.clone()), b)
        })
        .collect();
    for (round, (digest, _)) in blobs.iter().enumerate() {
        let c = client();
        let url = format!("http://{addr}/v2/lib/app/blobs/{digest}");
        let r = c.get(&url).send().await.unwrap();
        let mut s = r.bytes_stream();
        // Read `round` chunks (0: none), then kill: from early in the body to its end.
        for _ in 0..round {
            if s.next().await.is_none() {
                break;
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert_cache_verified(&cache);
        (child, addr) = start(&cache, &up.url());
        assert!(files_under(&cache.join("tmp")).is_empty());
        assert_cache_verified(&cache);
        for (d2, data) in blobs.iter().take(round + 1) {
            let body = client()
                .get(format!("http://{addr}/v2/lib/app/blobs/{d2}"))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            same(&body, data);
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_cache_verified(&cache);

    // 3. Killed while evicting: restarted with a limit far below what the cache holds, the
    // start-up count evicts at once, and pulls evict more; killed at a different moment each
    // round. Whole files only ever disappear, so every restart serves correct bodies, and
    // in the end the cache is within its limit.
    let bounded = "[cache]\nmax_size = \"1MiB\"\n";
    let everything: Vec<(String, bytes::Bytes)> = std::iter::once((d.clone(), big.clone()))
        .chain(blobs.iter().cloned())
        .collect();
    for round in 0..4usize {
        let (mut child, addr) = start_with(&cache, &up.url(), bounded);
        let mut pulls = Vec::new();
        for (digest, data) in everything.iter().rev().take(round * 2) {
            let url = format!("http://{addr}/v2/lib/app/blobs/{digest}");
            let data = data.clone();
            pulls.push(tokio::spawn(async move {
                if let Ok(r) = client().get(&url).send().await
                    && let Ok(body) = r.bytes().await
                    && body.len() == data.len()
                {
                    same(&body, &data);
                }
            }));
        }
        if round % 2 == 1 {
            for p in pulls.drain(..) {
                p.await.unwrap();
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        for p in pulls {
            p.await.unwrap();
        }
        assert_cache_verified(&cache);
    }
    let (mut child, addr) = start_with(&cache, &up.url(), bounded);
    for (digest, data) in &everything {
        let body = client()
            .get(format!("http://{addr}/v2/lib/app/blobs/{digest}"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        same(&body, data);
    }
    let held: u64 = files_under(&cache.join("blobs"))
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(held <= 1 << 20, "{held} bytes kept under a 1 MiB limit");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_cache_verified(&cache);
}

//! Disk trouble: when the cache cannot store a blob (the disk fills up mid-download, or the
//! blob is larger than `max_size`), every client still gets the whole, correct body straight
//! from the upstream, nothing partial is left or served, and a corrupt upstream body is still
//! never delivered complete.

mod fake;

use std::path::PathBuf;
use std::sync::Arc;

use fake::*;
use regcache::units::ByteSize;

const MIB: usize = 1 << 20;

/// A small tmpfs mounted for one test, unmounted on drop.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Result<SmallDisk, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(SmallDisk { path, _dir: dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

async fn get_all(proxy: &Proxy, d: &str, clients: usize) -> Vec<Result<bytes::Bytes, String>> {
    let barrier = Arc::new(tokio::sync::Barrier::new(clients));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (b, url) = (
            barrier.clone(),
            proxy.url(&format!("/v2/lib/app/blobs/{d}")),
        );
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            let r = client().get(url).send().await.map_err(|e| e.to_string())?;
            if r.status() != 200 {
                return Err(format!("status {}", r.status()));
            }
            r.bytes().await.map_err(|e| e.to_string())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_mid_download_still_serves_every_client_whole_bodies() {
    let disk = match SmallDisk::mount("4m") {
        Ok(d) => d,
        Err(why) => {
            eprintln!(
                "SKIPPED a_full_disk_mid_download_...: cannot mount a small tmpfs ({why}); the injected-failure tests below still run"
            );
            return;
        }
    };
    let up = FakeUpstream::start().await;
    let mut cfg = config_for(&up.url());
    cfg.cache_dir = disk.path.clone();
    let proxy = Proxy::start(cfg).await;
    // 10 MiB does not fit on the 4 MiB disk: the staged write fails part-way.
    let big = blob_of(10 * MIB, 3);
    let d = up.add_blob(big.clone());
    for got in get_all(&proxy, &d, 4).await {
        same(&got.expect("client got an error"), &big);
    }
    // Nothing of it is in the cache, and no staged part is left behind.
    let left: Vec<PathBuf> = files_under(&disk.path.join("blobs"))
        .into_iter()
        .chain(files_under(&disk.path.join("tmp")))
        .collect();
    assert!(left.is_empty(), "left on disk: {left:?}");
    // A range on it is served too.
    let r = client()
        .get(proxy.url(&format!("/v2/lib/app/blobs/{d}")))
        .header("range", "bytes=5000000-5000099")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    same(&r.bytes().await.unwrap(), &big[5_000_000..5_000_100]);
    // With the space freed again a blob that fits is cached as usual.
    let small = blob_of(MIB, 4);
    let sd = up.add_blob(small.clone());
    for got in get_all(&proxy, &sd, 2).await {
        same(&got.unwrap(), &small);
    }
    proxy.committed().await;
    assert_eq!(up.blob_gets(&sd), 1);
    assert_eq!(files_under(&disk.path.join("blobs")).len(), 1);
    proxy.stop().await;
}

fn tiny(url: &str) -> regcache::config::Config {
    let mut c = config_for(url);
    c.cache.max_size = Some(ByteSize(2 * MIB as u64));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_larger_than_the_cache_is_streamed_without_caching() {
    let up = FakeUpstream::start().await;
    let proxy = Proxy::start(tiny(&up.url())).await;
    let big = blob_of(5 * MIB + 3, 5);
    let d = up.add_blob(big.clone());
    for got in get_all(&proxy, &d, 3).await {
        same(&got.expect("client got an error"), &big);
    }
    let root = proxy.dir.path();
    assert!(files_under(&root.join("blobs")).is_empty());
    assert!(files_under(&root.join("tmp")).is_empty());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_body_served_past_the_cache_is_never_delivered_complete() {
    let up = FakeUpstream::start().await;
    let proxy = Proxy::start(tiny(&up.url())).await;
    let big = blob_of(3 * MIB, 6);
    let d = up.add_blob(big.clone());
    up.set_corrupt(true);
    let delivered: Vec<usize> = get_all(&proxy, &d, 2)
        .await
        .into_iter()
        .flatten()
        .map(|b| b.len())
        .collect();
    assert!(
        delivered.is_empty(),
        "corrupt bodies delivered as complete: {delivered:?} bytes"
    );
    proxy.stop().await;
}

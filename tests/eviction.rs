//! A cache bounded by `cache.max_size`: it stays under the limit while pulls go beyond it,
//! keeps the images still pulled, and never cuts short a client reading an evicted blob.

mod fake;

use std::path::Path;

use fake::*;
use futures_util::StreamExt;
use regcache::media::OCI_MANIFEST;
use regcache::units::ByteSize;

const MIB: usize = 1 << 20;

fn bounded(url: &str, max: usize) -> regcache::config::Config {
    let mut c = config_for(url);
    c.cache.max_size = Some(ByteSize(max as u64));
    c.cache.high_watermark = 0.9;
    c.cache.low_watermark = 0.7;
    c
}

/// Bytes of committed blobs and manifests, read off the disk.
fn disk_use(root: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(p) else {
            return 0;
        };
        entries
            .map(|e| {
                let e = e.unwrap();
                let m = e.metadata().unwrap();
                if m.is_dir() { walk(&e.path()) } else { m.len() }
            })
            .sum()
    }
    walk(&root.join("blobs")) + walk(&root.join("manifests"))
}

fn cached(root: &Path, d: &str) -> bool {
    let hex = d.trim_start_matches("sha256:");
    root.join("blobs/sha256").join(&hex[..2]).join(hex).exists()
}

async fn counted(proxy: &Proxy) {
    let app = proxy.app.clone();
    until(move || app.cache_usage().is_some_and(|u| u.ready)).await;
}

async fn pull(proxy: &Proxy, repo: &str, tag: &str, image: &Image) {
    let r = client()
        .get(proxy.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    same(&r.bytes().await.unwrap(), &image.manifest);
    for d in std::iter::once(&image.config).chain(&image.layers) {
        let r = client()
            .get(proxy.url(&format!("/v2/{repo}/blobs/{d}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(sha(&r.bytes().await.unwrap()), *d);
    }
    proxy.committed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_beyond_the_limit_stay_under_it_and_keep_the_images_still_pulled() {
    let up = FakeUpstream::start().await;
    let limit = 4 * MIB;
    let proxy = Proxy::start(bounded(&up.url(), limit)).await;
    counted(&proxy).await;
    let root = proxy.dir.path().to_owned();
    // Ten images of two 300 KiB layers: 6 MiB in all, half again the limit.
    let images: Vec<Image> = (0..10u8)
        .map(|i| {
            let layers = [blob_of(300 * 1024, 2 * i), blob_of(300 * 1024, 2 * i + 1)];
            push_image(&up, "lib/app", &format!("v{i}"), &layers, OCI_MANIFEST)
        })
        .collect();
    pull(&proxy, "lib/app", "v0", &images[0]).await;
    for (i, image) in images.iter().enumerate().skip(1) {
        pull(&proxy, "lib/app", &format!("v{i}"), image).await;
        // Image 0 is still in use: its clients ask for the manifest and, having the layers,
        // nothing else.
        let r = client()
            .get(proxy.url("/v2/lib/app/manifests/v0"))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let used = disk_use(&root);
        assert!(
            used <= limit as u64,
            "cache holds {used} bytes, over its {limit} limit"
        );
    }
    let usage = proxy.app.cache_usage().unwrap();
    assert!(usage.evictions > 0, "{usage:?}");
    assert_eq!(
        usage.bytes,
        disk_use(&root),
        "the index counts what is on disk"
    );
    // Image 0 kept its config and layers; the oldest image not pulled since went first.
    for d in std::iter::once(&images[0].config).chain(&images[0].layers) {
        assert!(
            cached(&root, d),
            "blob {d} of the image still pulled was evicted"
        );
    }
    for d in &images[1].layers {
        assert!(
            !cached(&root, d),
            "layer {d} of a cold image should have gone first"
        );
    }
    for d in &images[9].layers {
        assert!(
            cached(&root, d),
            "layer {d} of the newest image should be there"
        );
    }
    // Pulling image 0 in full again costs no upstream GET; image 1 is fetched again.
    let before: Vec<usize> = images[0].layers.iter().map(|d| up.blob_gets(d)).collect();
    pull(&proxy, "lib/app", "v0", &images[0]).await;
    let after: Vec<usize> = images[0].layers.iter().map(|d| up.blob_gets(d)).collect();
    assert_eq!(before, after);
    pull(&proxy, "lib/app", "v1", &images[1]).await;
    assert_eq!(up.blob_gets(&images[1].layers[0]), 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reading_a_blob_while_it_is_evicted_gets_the_whole_body() {
    let up = FakeUpstream::start().await;
    let limit = 24 * MIB;
    let proxy = Proxy::start(bounded(&up.url(), limit)).await;
    counted(&proxy).await;
    let root = proxy.dir.path().to_owned();
    let big = blob_of(12 * MIB, 7);
    let d = up.add_blob(big.clone());
    // Cache it.
    let r = client()
        .get(proxy.url(&format!("/v2/lib/app/blobs/{d}")))
        .send()
        .await
        .unwrap();
    same(&r.bytes().await.unwrap(), &big);
    proxy.committed().await;
    assert!(cached(&root, &d));
    // A slow client starts reading it from the cache and stops after the first chunk.
    let r = client()
        .get(proxy.url(&format!("/v2/lib/app/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut got = stream.next().await.unwrap().unwrap().to_vec();
    assert!(got.len() < big.len());
    // Other pulls push it out of the cache while that client is still reading.
    for seed in 0..3u8 {
        let other = blob_of(6 * MIB, 100 + seed);
        let od = up.add_blob(other.clone());
        let r = client()
            .get(proxy.url(&format!("/v2/lib/app/blobs/{od}")))
            .send()
            .await
            .unwrap();
        same(&r.bytes().await.unwrap(), &other);
    }
    assert!(!cached(&root, &d), "the big blob should have been evicted");
    assert!(disk_use(&root) <= limit as u64);
    while let Some(c) = stream.next().await {
        got.extend_from_slice(&c.unwrap());
    }
    same(&got, &big);
    proxy.stop().await;
}

//! Eviction cost: what a bounded cache pays per committed entry and per cache hit, at growing
//! cache sizes, and how long the background count of the cache takes at start-up. Neither the
//! per-commit nor the per-hit cost may grow with the number of entries. `cargo bench --bench
//! eviction` runs up to 100,000 entries on disk (1,000,000 in memory); under `cargo test
//! --benches` a smoke size.

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use regcache::cache::budget::{Budget, EntryKind, Key, Limits};
use regcache::cache::store::{BlobStore, FsStore};
use regcache::reference::Digest;

fn digest(i: u64) -> Digest {
    Digest::sha256(&i.to_le_bytes())
}

/// Nanoseconds per `admit` (each evicting as needed) plus one `touch`, in memory only.
fn in_memory(entries: u64, ops: u64) -> f64 {
    let b = Budget::new(Some(Limits {
        max: entries,
        high: entries,
        low: entries - entries / 100,
    }));
    b.load(Vec::new());
    for i in 0..entries {
        b.admit((EntryKind::Blob, digest(i)), 1, None);
    }
    let keys: Vec<Digest> = (entries..entries + ops).map(digest).collect();
    let started = Instant::now();
    for (n, d) in keys.iter().enumerate() {
        std::hint::black_box(b.admit((EntryKind::Blob, d.clone()), 1, None));
        b.touch(&keys[n / 2]);
    }
    started.elapsed().as_nanos() as f64 / ops as f64
}

/// Images the hit rows cycle through, and the layers of each.
const HOT_IMAGES: u64 = 64;
const LAYERS: u64 = 10;

/// Nanoseconds per cache hit as the request path records it (`touch`), with `entries` blobs
/// in the index, from `threads` threads at once, each hit on another image than the one
/// before: `manifests` true touches one of 64 manifests (each one a use of its ten layers
/// too), false one of 640 blobs spread over the index. As the store runs it, a thread of the
/// budget's own applies the batches of uses. Per thread: wall time / its hits.
fn hits(entries: u64, threads: usize, per_thread: u64, manifests: bool) -> f64 {
    let b = Arc::new(Budget::new(Some(Limits {
        max: u64::MAX,
        high: u64::MAX,
        low: u64::MAX / 2,
    })));
    b.load(Vec::new());
    for i in 0..entries {
        b.admit((EntryKind::Blob, digest(i)), 1, None);
    }
    let spread = (entries / (HOT_IMAGES * LAYERS)).max(1);
    let layer = |image: u64, l: u64| digest(((image * LAYERS + l) * spread) % entries);
    let hot: Vec<Digest> = if manifests {
        (0..HOT_IMAGES)
            .map(|m| {
                let refs: Arc<[Key]> = (0..LAYERS)
                    .map(|l| (EntryKind::Blob, layer(m, l)))
                    .collect();
                let d = digest(u64::MAX - m);
                b.admit((EntryKind::Manifest, d.clone()), 1, Some(refs));
                d
            })
            .collect()
    } else {
        (0..HOT_IMAGES * LAYERS)
            .map(|i| layer(i / LAYERS, i % LAYERS))
            .collect()
    };
    let _drainer = b.drain_in_background().expect("the budget's thread");
    let start = Barrier::new(threads + 1);
    let started = std::thread::scope(|s| {
        for t in 0..threads {
            let (b, hot, start) = (&b, &hot, &start);
            s.spawn(move || {
                start.wait();
                for n in 0..per_thread {
                    let i = (n as usize * 7 + t * 13) % hot.len();
                    std::hint::black_box(b.touch(&hot[i]));
                }
            });
        }
        start.wait();
        Instant::now()
    });
    // The scope has joined every thread: this is until the last one finished.
    started.elapsed().as_nanos() as f64 / per_thread as f64
}

fn fill_dir(root: &Path, entries: u64) {
    for i in 0..entries {
        let d = digest(i);
        let dir = root.join("blobs/sha256").join(&d.hex()[..2]);
        if i < 256 || !dir.exists() {
            std::fs::create_dir_all(&dir).expect("mkdir");
        }
        std::fs::write(dir.join(d.hex()), b"x").expect("write");
    }
}

/// (count time, microseconds per commit) on a store holding `entries` one-byte blobs and
/// limited to exactly that, so commits evict in batches of 1% between the watermarks.
fn on_disk(rt: &tokio::runtime::Runtime, entries: u64, commits: u64) -> (Duration, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    fill_dir(dir.path(), entries);
    rt.block_on(async {
        let limits = Limits {
            max: entries,
            high: entries,
            low: entries - entries / 100,
        };
        let started = Instant::now();
        let store = FsStore::open_limited(dir.path(), Some(limits))
            .await
            .expect("open");
        store.counted().await;
        let counted = started.elapsed();
        let staged: Vec<_> = (0..commits)
            .map(|i| {
                let p = store.staging_path(&format!("b{i}"));
                std::fs::write(&p, b"y").expect("stage");
                (digest(entries + i), p)
            })
            .collect();
        let started = Instant::now();
        for (d, p) in &staged {
            store.commit_blob(d, p).await.expect("commit");
        }
        let per = started.elapsed().as_secs_f64() * 1e6 / commits as f64;
        let usage = store.usage().expect("usage");
        assert!(usage.bytes <= entries, "over the limit: {usage:?}");
        assert!(usage.evictions >= commits, "{usage:?}");
        (counted, per)
    })
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let memory_sizes: &[u64] = if full {
        &[1_000, 10_000, 100_000, 1_000_000]
    } else {
        &[1_000, 10_000]
    };
    for &n in memory_sizes {
        println!(
            "eviction: in memory, {n:>9} entries: {:.0} ns per admit+touch",
            in_memory(n, 200_000.min(n * 10))
        );
    }
    let hit_ops = if full { 2_000_000 } else { 20_000 };
    for &n in memory_sizes {
        for manifests in [true, false] {
            let what = if manifests {
                "manifest hit (+10 layers)"
            } else {
                "blob hit"
            };
            let one = hits(n, 1, hit_ops, manifests);
            let two = hits(n, 2, hit_ops / 2, manifests);
            println!(
                "eviction: hits, {n:>9} entries: {one:.0} ns per {what}, 1 thread; {two:.0} ns, 2 threads at once"
            );
        }
    }
    let disk_sizes: &[u64] = if full {
        &[1_000, 10_000, 100_000]
    } else {
        &[1_000]
    };
    for &n in disk_sizes {
        let (counted, per) = on_disk(&rt, n, 2_000.min(n));
        println!(
            "eviction: on disk, {n:>7} entries: counted in {:.0} ms at start-up, {per:.1} us per commit (with its share of evictions)",
            counted.as_secs_f64() * 1e3
        );
    }
}

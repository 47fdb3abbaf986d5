//! The disk budget of the filesystem store: an in-memory least-recently-used index of the
//! committed blobs and manifests with their sizes, and the watermark rule that picks what to
//! evict when a new entry is admitted.
//!
//! Every operation is O(1) or O(entries evicted): the index is a hash map threaded by a list
//! in use order, so admitting a blob never walks the cache. The order survives restarts
//! through file modification times, which the store updates at most hourly per digest; the
//! index itself is rebuilt from a directory scan in the background at start-up, and nothing
//! is evicted until that scan has finished (the size is not known before).
//!
//! Policy: using a manifest also counts as a use of everything it references (config and
//! layers, or the per-platform manifests of an index). A client that already has a layer does
//! not download it again, so without this the layers of an image pulled every day would look
//! unused. Whole images therefore age together, and the least recently pulled image goes
//! before any layer of one that is still pulled; a layer shared by several images lives as
//! long as the most recently pulled of them.

use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::config::CacheConfig;
use crate::flight::lock;
use crate::reference::Digest;

/// Which file a digest names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// `blobs/...`
    Blob,
    /// `manifests/...`
    Manifest,
}

/// One cached file.
pub type Key = (EntryKind, Digest);

/// Size limit and watermarks in bytes: once the cache would grow past `high`, the least
/// recently used entries are evicted until it is at or under `low`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Configured maximum.
    pub max: u64,
    /// Eviction starts above this.
    pub high: u64,
    /// Eviction stops at this.
    pub low: u64,
}

impl Limits {
    /// The limits `[cache]` configures, when `max_size` bounds the cache.
    pub fn from_config(cache: &CacheConfig) -> Option<Self> {
        cache
            .max_size
            .map(|m| Limits::new(m.0, cache.high_watermark, cache.low_watermark))
    }

    /// Limits for `max` bytes with watermarks given as fractions of it (`0 < low < high ≤ 1`).
    pub fn new(max: u64, high: f64, low: f64) -> Self {
        let frac = |f: f64| ((max as f64) * f).floor() as u64;
        Limits {
            max,
            high: frac(high).min(max),
            low: frac(low).min(frac(high)),
        }
    }
}

/// What the budget holds, for metrics and the status page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of committed blobs and manifests.
    pub bytes: u64,
    /// Number of committed blobs and manifests.
    pub entries: u64,
    /// Entries evicted since start.
    pub evictions: u64,
    /// Bytes evicted since start.
    pub evicted_bytes: u64,
    /// The configured maximum, if any.
    pub limit: Option<u64>,
    /// False until the start-up scan has counted what is on disk.
    pub ready: bool,
}

struct Entry {
    size: u64,
    // Digests a manifest references, learnt the first time it is read or stored.
    refs: Option<Arc<[Digest]>>,
}

struct Index {
    lru: LruCache<Key, Entry>,
    bytes: u64,
    ready: bool,
    evictions: u64,
    evicted_bytes: u64,
}

impl Index {
    // Over the high watermark: evicts least recently used entries down to the low one,
    // always keeping the `keep` most recent (an entry just admitted).
    fn shrink(&mut self, limits: Limits, keep: usize) -> Vec<(Key, u64)> {
        let mut victims = Vec::new();
        if self.bytes <= limits.high {
            return victims;
        }
        while self.bytes > limits.low && self.lru.len() > keep {
            let Some((k, e)) = self.lru.pop_lru() else {
                break;
            };
            self.bytes -= e.size;
            self.evictions += 1;
            self.evicted_bytes += e.size;
            victims.push((k, e.size));
        }
        victims
    }
}

/// The index and the rule. Shared by the store's request path and its background scan.
pub struct Budget {
    limits: Option<Limits>,
    // Held only for in-memory updates, never across an `.await` or a file operation.
    index: Mutex<Index>,
}

impl Budget {
    /// An empty, not yet ready index; `limits: None` tracks use without evicting.
    pub fn new(limits: Option<Limits>) -> Self {
        Budget {
            limits,
            index: Mutex::new(Index {
                lru: LruCache::unbounded(),
                bytes: 0,
                ready: false,
                evictions: 0,
                evicted_bytes: 0,
            }),
        }
    }

    /// Whether an entry of `size` bytes may be cached at all (it must fit under the high
    /// watermark on its own).
    pub fn admits(&self, size: u64) -> bool {
        self.limits.is_none_or(|l| size <= l.high)
    }

    /// Records a new entry as the most recently used and returns what must be evicted to
    /// keep the total within the limits. The caller removes the victims' files; an entry
    /// just admitted is never among them.
    pub fn admit(&self, key: Key, size: u64, refs: Option<Arc<[Digest]>>) -> Vec<(Key, u64)> {
        let mut ix = lock(&self.index);
        let refs = match ix.lru.pop(&key) {
            Some(old) => {
                ix.bytes -= old.size;
                refs.or(old.refs)
            }
            None => refs,
        };
        ix.bytes += size;
        ix.lru.push(key, Entry { size, refs });
        match self.limits {
            Some(limits) if ix.ready => ix.shrink(limits, 1),
            _ => Vec::new(),
        }
    }

    /// Marks `digest` (as a blob and/or manifest) used now, and everything a manifest of that
    /// digest references. Returns the referenced digests when it was a manifest.
    pub fn touch(&self, digest: &Digest) -> Option<Arc<[Digest]>> {
        let mut ix = lock(&self.index);
        ix.lru.promote(&(EntryKind::Blob, digest.clone()));
        let manifest = (EntryKind::Manifest, digest.clone());
        let refs = ix.lru.get(&manifest).and_then(|e| e.refs.clone())?;
        // The manifest stays the most recent, so its content goes before it if ever.
        for r in refs.iter() {
            ix.lru.promote(&(EntryKind::Blob, r.clone()));
            ix.lru.promote(&(EntryKind::Manifest, r.clone()));
        }
        ix.lru.promote(&manifest);
        Some(refs)
    }

    /// Whether the references of manifest `digest` are still to be learnt.
    pub fn wants_refs(&self, digest: &Digest) -> bool {
        lock(&self.index)
            .lru
            .peek(&(EntryKind::Manifest, digest.clone()))
            .is_some_and(|e| e.refs.is_none())
    }

    /// Records what manifest `digest` references.
    pub fn set_refs(&self, digest: &Digest, refs: Arc<[Digest]>) {
        if let Some(e) = lock(&self.index)
            .lru
            .peek_mut(&(EntryKind::Manifest, digest.clone()))
        {
            e.refs = Some(refs);
        }
    }

    /// Forgets an entry whose file was removed by someone else (garbage collection).
    pub fn forget(&self, key: &Key) {
        let mut ix = lock(&self.index);
        if let Some(e) = ix.lru.pop(key) {
            ix.bytes -= e.size;
        }
    }

    /// Merges the start-up scan, `(key, size)` oldest first, under what was admitted since
    /// start, and enables eviction. Returns what must be evicted now.
    pub fn load(&self, scanned: Vec<(Key, u64)>) -> Vec<(Key, u64)> {
        // Newest first, each pushed and then demoted to the cold end: the oldest ends last
        // in line, and entries admitted while the scan ran stay the most recent.
        for chunk in scanned.rchunks(4096).map(|c| c.iter().rev()) {
            let mut ix = lock(&self.index);
            for (k, size) in chunk {
                if ix.lru.contains(k) {
                    continue;
                }
                ix.lru.push(
                    k.clone(),
                    Entry {
                        size: *size,
                        refs: None,
                    },
                );
                ix.lru.demote(k);
                ix.bytes += size;
            }
        }
        let mut ix = lock(&self.index);
        ix.ready = true;
        match self.limits {
            Some(limits) => ix.shrink(limits, 0),
            None => Vec::new(),
        }
    }

    /// Current figures.
    pub fn usage(&self) -> Usage {
        let ix = lock(&self.index);
        Usage {
            bytes: ix.bytes,
            entries: ix.lru.len() as u64,
            evictions: ix.evictions,
            evicted_bytes: ix.evicted_bytes,
            limit: self.limits.map(|l| l.max),
            ready: ix.ready,
        }
    }
}

/// The digests a manifest or index references (config, layers, child manifests); empty for
/// anything that does not parse.
pub fn references(body: &[u8]) -> Vec<Digest> {
    #[derive(serde::Deserialize)]
    struct Descriptor {
        digest: String,
    }
    #[derive(serde::Deserialize)]
    struct Refs {
        config: Option<Descriptor>,
        #[serde(default)]
        layers: Vec<Descriptor>,
        #[serde(default)]
        manifests: Vec<Descriptor>,
    }
    let Ok(r) = serde_json::from_slice::<Refs>(body) else {
        return Vec::new();
    };
    r.config
        .into_iter()
        .chain(r.layers)
        .chain(r.manifests)
        .filter_map(|d| d.digest.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::sha256(&[n])
    }

    fn blob(n: u8) -> Key {
        (EntryKind::Blob, d(n))
    }

    fn ready(limits: Limits) -> Budget {
        let b = Budget::new(Some(limits));
        assert!(b.load(Vec::new()).is_empty());
        b
    }

    #[test]
    fn watermarks_are_fractions_of_the_limit() {
        assert_eq!(
            Limits::new(1000, 0.9, 0.8),
            Limits {
                max: 1000,
                high: 900,
                low: 800
            }
        );
        let mut cache = CacheConfig::default();
        assert_eq!(Limits::from_config(&cache), None);
        cache.max_size = Some(crate::units::ByteSize(1000));
        assert_eq!(
            Limits::from_config(&cache),
            Some(Limits::new(1000, cache.high_watermark, cache.low_watermark))
        );
    }

    #[test]
    fn evicts_least_recently_used_down_to_the_low_watermark() {
        let b = ready(Limits::new(100, 0.9, 0.5));
        for n in 0..9 {
            assert!(b.admit(blob(n), 10, None).is_empty());
        }
        // 0 is used again: 1 becomes the oldest.
        b.touch(&d(0));
        let victims = b.admit(blob(9), 10, None);
        let gone: Vec<Key> = victims.into_iter().map(|(k, _)| k).collect();
        assert_eq!(gone, vec![blob(1), blob(2), blob(3), blob(4), blob(5)]);
        let u = b.usage();
        assert_eq!((u.bytes, u.entries, u.evictions), (50, 5, 5));
    }

    #[test]
    fn nothing_is_evicted_before_the_scan_is_loaded() {
        let b = Budget::new(Some(Limits::new(100, 0.9, 0.5)));
        for n in 0..20 {
            assert!(b.admit(blob(n), 10, None).is_empty());
        }
        // The scan finds older entries too; all of those go first, then the oldest admitted.
        let victims = b.load(vec![(blob(100), 10), (blob(101), 10)]);
        let gone: Vec<Key> = victims.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(gone[..3], [blob(100), blob(101), blob(0)]);
        assert_eq!(b.usage().bytes, 50);
    }

    #[test]
    fn a_used_manifest_keeps_its_layers_and_whole_images_go_first() {
        let b = ready(Limits {
            max: 100,
            high: 90,
            low: 61,
        });
        let image = |m: u8, layers: &[u8]| {
            for l in layers {
                b.admit(blob(*l), 10, None);
            }
            let refs: Arc<[Digest]> = layers.iter().map(|l| d(*l)).collect();
            b.admit((EntryKind::Manifest, d(m)), 1, Some(refs));
        };
        image(100, &[1, 2, 3]); // old image, pulled again below
        image(101, &[4, 5, 6]); // pulled once
        // Image 100 is pulled again: the client already has the layers, it only asks for the
        // manifest.
        b.touch(&d(100));
        let victims = b.admit(blob(7), 30, None);
        let gone: Vec<Key> = victims.into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            gone,
            vec![blob(4), blob(5), blob(6), (EntryKind::Manifest, d(101))]
        );
    }

    #[test]
    fn oversized_entries_are_not_admitted_and_unlimited_never_evicts() {
        let b = ready(Limits::new(100, 0.9, 0.5));
        assert!(b.admits(90));
        assert!(!b.admits(91));
        let u = Budget::new(None);
        u.load(Vec::new());
        for n in 0..100 {
            assert!(u.admit(blob(n), 1 << 30, None).is_empty());
        }
        assert!(u.admits(u64::MAX));
    }

    #[test]
    fn references_of_manifests_and_indexes() {
        let m = format!(
            r#"{{"config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}}]}}"#,
            d(1),
            d(2)
        );
        assert_eq!(references(m.as_bytes()), vec![d(1), d(2)]);
        let i = format!(r#"{{"manifests":[{{"digest":"{}"}}]}}"#, d(3));
        assert_eq!(references(i.as_bytes()), vec![d(3)]);
        assert!(references(b"not json").is_empty());
    }
}

//! The disk budget of the filesystem store: an in-memory least-recently-used index of the
//! committed blobs and manifests with their sizes, and the watermark rule that picks what to
//! evict when a new entry is admitted.
//!
//! Every operation is O(1) or O(entries evicted): the index is a hash map threaded by a list
//! in use order, so admitting a blob never walks the cache. The order survives restarts
//! through file modification times, which the store updates at most hourly per entry; the
//! index itself is rebuilt from a directory scan in the background at start-up, and nothing
//! is evicted until that scan has finished (the size is not known before).
//!
//! Policy: using a manifest also counts as a use of everything it references (config and
//! layers, or the per-platform manifests of an index). A client that already has a layer does
//! not download it again, so without this the layers of an image pulled every day would look
//! unused. Whole images therefore age together, and the least recently pulled image goes
//! before any layer of one that is still pulled; a layer shared by several images lives as
//! long as the most recently pulled of them.
//!
//! Uses reach the order in batches, so a cache hit never waits for the index. A hit appends
//! its digest to one of [`STRIPES`] small buffers of pending uses (chosen by thread, each
//! behind a mutex of its own that only that push and a batch swap take). Once a buffer holds
//! [`BATCH`] uses, the hit that filled it wakes the thread that applies every buffer to the
//! order ([`Budget::drain_in_background`], as the store runs it), so the hit path's cost does
//! not grow with the index; without that thread, it applies them itself if the index is
//! free. At [`MAX_PENDING`] it waits for the index. Admitting an entry, loading the scan and
//! [`Budget::flush`] apply every pending use first, so eviction never picks an entry whose
//! use is still pending.
//!
//! Applying a use moves the entry (and a manifest's references) in the order: one lookup
//! each in an index that, at a million entries, no longer fits in the CPU's caches. A digest
//! already moved in the current window is not moved again: a small set of the digests moved
//! in it answers instead, so a hot image costs the index one move per window, not one per
//! pull, however large the index. A window ends after [`RECENT_WINDOW`] hits, at the minute,
//! and when an entry is admitted: what was moved before an admission is behind the new
//! entry, and its next use moves it again, so an image still pulled never ages behind one
//! admitted since (the windows only save work between admissions, when nothing is evicted).
//!
//! The bound this gives: within one batch, uses from different threads may be applied out of
//! order; a batch cannot span more than `2 × STRIPES × MAX_PENDING` hits; and an entry's place
//! may lag its last use by one recent window. So of two entries whose last uses lie further
//! apart than [`ORDER_WINDOW`] hits, the one used earlier is always evicted first. Lock
//! order: the index, then a stripe; a hit never holds a stripe while it takes the index.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, TryLockError, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use lru::LruCache;

use crate::config::CacheConfig;
use crate::flight::lock;
use crate::reference::Digest;

/// Buffers of pending uses; a thread always uses the same one.
pub const STRIPES: usize = 16;
/// Uses in one buffer after which the hit that recorded the last one applies them all, when
/// the index is free.
pub const BATCH: usize = 64;
/// Uses in one buffer at which the hit that recorded the last one waits for the index.
pub const MAX_PENDING: usize = 256;
/// Hits (counted as their batches are applied) within which a digest already moved in the
/// order is not moved again; a new window also starts each minute and at each admission.
pub const RECENT_WINDOW: usize = 16 * 1024;
/// Hits between two uses beyond which they are always applied in order: one batch fills at
/// most `STRIPES × MAX_PENDING` buffered uses, as many more can arrive while it is being
/// applied, and a use inside the recent window of an earlier one does not move its entry.
pub const ORDER_WINDOW: usize = 2 * STRIPES * MAX_PENDING + RECENT_WINDOW;

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
    // What a manifest references, learnt the first time it is read or stored, by kind
    // ([`reference_keys`]), so a use looks them up as they are.
    refs: Option<Arc<[Key]>>,
    // The hour (of `Budget::epoch`, counted from 1) whose first use was handed out to be
    // noted on disk; 0: none since start.
    stamped: u32,
}

struct Index {
    lru: LruCache<Key, Entry>,
    bytes: u64,
    ready: bool,
    evictions: u64,
    evicted_bytes: u64,
    // Entries used in an hour in which their use was not yet noted on disk, for the next
    // `touch` that applies a batch (or `flush`) to hand out.
    unstamped: Vec<Key>,
    // An empty buffer swapped into a stripe while its uses are applied, so that steady
    // batching allocates nothing.
    spare: Vec<Digest>,
    recent: Recent,
}

/// The digests moved in the order in the current window: it ends after [`RECENT_WINDOW`]
/// hits, at the minute, and when an entry is admitted. It holds at most one digest per hit
/// of the window plus a batch: about half a MiB of table at the most, kept once grown.
#[derive(Default)]
struct Recent {
    // By [`fingerprint`]: no allocation per digest, and a small table that stays in cache.
    moved: HashSet<u128>,
    // Hits of the batches applied in this window.
    hits: usize,
    // The minute (of `Budget::epoch`) the window is in.
    minute: u64,
}

impl Recent {
    // Counts a batch of `hits` about to be applied in `minute`; starts a new window, with
    // this batch as its first, when that would overrun the current one.
    fn enter(&mut self, hits: usize, minute: u64) {
        if self.hits + hits > RECENT_WINDOW || minute != self.minute {
            self.restart();
            self.minute = minute;
        }
        self.hits += hits;
    }

    // Ends the window (at its bound, or because an entry was admitted ahead of everything
    // moved in it).
    fn restart(&mut self) {
        if !self.moved.is_empty() {
            self.moved.clear();
        }
        self.hits = 0;
    }

    // Whether `digest` is to be moved: the first time in a window.
    fn first(&mut self, digest: &Digest) -> bool {
        self.moved.insert(fingerprint(digest))
    }
}

/// A digest's first 16 hex digits: 64 bits of a uniform hash. Two digests that share them
/// are not told apart in a window, which costs one of them a single move there.
fn fingerprint(digest: &Digest) -> u128 {
    u128::from_le_bytes(leading_hex(digest))
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

    // Makes `key` the most recently used, if cached.
    fn promote(&mut self, key: &Key, hour: u32) {
        if let Some(e) = self.lru.get_mut(key) {
            if e.stamped != hour {
                e.stamped = hour;
                self.unstamped.push(key.clone());
            }
        }
    }

    // One use of `digest` (as a blob and/or manifest) and of everything a manifest of that
    // digest references, unless the current window moved them already.
    fn used(&mut self, digest: &Digest, hour: u32) {
        if !self.recent.first(digest) {
            return;
        }
        let mut key = (EntryKind::Blob, digest.clone());
        self.promote(&key, hour);
        key.0 = EntryKind::Manifest;
        let Some(refs) = self.lru.peek(&key).map(|e| e.refs.clone()) else {
            return;
        };
        // The manifest ends the most recent, so its content goes before it if ever.
        for r in refs.iter().flat_map(|r| r.iter()) {
            self.promote(r, hour);
        }
        self.promote(&key, hour);
    }
}

/// Slots of the table in which a stripe finds a digest already pending.
const SLOTS: usize = 512;

/// Uses recorded by the threads of one stripe and not yet applied to the order.
struct Pending {
    // Digests in order of their first use in this batch; a use of a digest already pending
    // is not appended again (within a batch the order is approximate anyway), so a batch
    // costs the index one update per distinct digest, however hot.
    used: Vec<Digest>,
    // Uses recorded since the last batch, repeats included.
    count: usize,
    // Per slot (by the digest's leading hex digits): 1 + the position in `used` of the last
    // digest that took it; 0 for none. A digest that finds another in its slot is appended.
    slots: Box<[u16]>,
}

impl Default for Pending {
    fn default() -> Self {
        Pending {
            used: Vec::new(),
            count: 0,
            slots: vec![0; SLOTS].into_boxed_slice(),
        }
    }
}

impl Pending {
    fn push(&mut self, digest: &Digest) {
        self.count += 1;
        let slot = slot_of(digest);
        let at = usize::from(self.slots[slot]);
        if at == 0 || self.used.get(at - 1) != Some(digest) {
            self.used.push(digest.clone());
            self.slots[slot] = u16::try_from(self.used.len()).unwrap_or(0);
        }
    }
}

/// A digest's slot: its leading hex digits (uniform already), mixed.
fn slot_of(digest: &Digest) -> usize {
    let mixed = u64::from_le_bytes(leading_hex(digest)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> 32) as usize % SLOTS
}

/// A digest's first `N` hex digits as they are spelt, without decoding (a digest has 64 or
/// 128, so none are missing; zeros would stand for any that were).
fn leading_hex<const N: usize>(digest: &Digest) -> [u8; N] {
    let mut lead = [0u8; N];
    let hex = digest.hex().as_bytes();
    let n = hex.len().min(N);
    lead[..n].copy_from_slice(&hex[..n]);
    lead
}

// Own cache lines, so that threads on different stripes do not contend for one.
#[repr(align(128))]
#[derive(Default)]
struct Stripe(Mutex<Pending>);

/// The stripe of the calling thread: threads are dealt stripes in turn on first use.
fn this_threads_stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

/// The wake-up of the thread that applies batches of uses.
#[derive(Default)]
struct Drain {
    state: Mutex<DrainState>,
    wake: Condvar,
    // The thread runs (set before it starts, cleared by its guard to end it): a hit that
    // fills a stripe wakes it instead of applying the batch.
    running: AtomicBool,
}

#[derive(Default)]
struct DrainState {
    // A stripe filled a batch since the thread last looked.
    requested: bool,
    // The thread waits on `wake`.
    sleeping: bool,
}

impl Drain {
    fn request(&self) {
        let mut st = lock(&self.state);
        st.requested = true;
        let sleeping = st.sleeping;
        drop(st);
        if sleeping {
            self.wake.notify_one();
        }
    }
}

/// The thread started by [`Budget::drain_in_background`]; dropping this ends it.
pub struct Drainer {
    drain: Arc<Drain>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Drainer {
    fn drop(&mut self) {
        self.drain.running.store(false, Ordering::Release);
        // Taken once, so the thread is either before its check (and sees the flag) or
        // waiting (and is woken).
        drop(lock(&self.drain.state));
        self.drain.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The applying thread: waits for a full stripe, applies every stripe, again.
fn drain_loop(drain: &Drain, budget: &Weak<Budget>) {
    loop {
        {
            let mut st = lock(&drain.state);
            while !st.requested && drain.running.load(Ordering::Acquire) {
                st.sleeping = true;
                st = drain.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                st.sleeping = false;
            }
            if !drain.running.load(Ordering::Acquire) {
                return;
            }
            st.requested = false;
        }
        let Some(b) = budget.upgrade() else {
            return;
        };
        let mut ix = lock(&b.index);
        b.apply(&mut ix);
        if !ix.unstamped.is_empty() {
            // Handed to the next hit, which notes them on disk as it would its own.
            b.stamps_waiting.store(true, Ordering::Release);
        }
    }
}

/// The index and the rule. Shared by the store's request path and its background scan.
pub struct Budget {
    limits: Option<Limits>,
    // Held only for in-memory updates, never across an `.await` or a file operation. Taken
    // before a stripe, never after one.
    index: Mutex<Index>,
    // Pending uses; each mutex is held for one push or one swap, never while taking `index`.
    stripes: [Stripe; STRIPES],
    // Start of the hours in which a use is noted on disk once.
    epoch: Instant,
    // The thread of its own that applies batches, when one runs (`drain_in_background`).
    drain: Arc<Drain>,
    // That thread applied first uses in an hour that are still to be noted on disk.
    stamps_waiting: AtomicBool,
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
                unstamped: Vec::new(),
                spare: Vec::new(),
                recent: Recent::default(),
            }),
            stripes: Default::default(),
            epoch: Instant::now(),
            drain: Arc::default(),
            stamps_waiting: AtomicBool::new(false),
        }
    }

    /// Starts a thread of its own (`regcache-lru`) that applies batches of uses, so that a
    /// hit only records its use (and, once in a batch, wakes it). Ends when the returned
    /// guard is dropped.
    pub fn drain_in_background(self: &Arc<Self>) -> std::io::Result<Drainer> {
        let (drain, budget) = (self.drain.clone(), Arc::downgrade(self));
        self.drain.running.store(true, Ordering::Release);
        let thread = std::thread::Builder::new()
            .name("regcache-lru".into())
            .spawn(move || drain_loop(&drain, &budget))
            .inspect_err(|_| self.drain.running.store(false, Ordering::Release))?;
        Ok(Drainer {
            drain: self.drain.clone(),
            thread: Some(thread),
        })
    }

    // Applies every pending use to the order, stripe after stripe.
    fn apply(&self, ix: &mut Index) {
        let secs = self.epoch.elapsed().as_secs();
        // Hours count from 1: 0 is "none since start" in `Entry::stamped`. A window never
        // spans two hours (it ends with its minute), so the use that moved an entry in the
        // window also handed out its first use in the hour.
        let hour = u32::try_from(secs / 3600 + 1).unwrap_or(u32::MAX);
        for stripe in &self.stripes {
            let mut batch = std::mem::take(&mut ix.spare);
            let hits = {
                let mut p = lock(&stripe.0);
                if !p.used.is_empty() {
                    p.slots.fill(0);
                }
                std::mem::swap(&mut p.used, &mut batch);
                std::mem::take(&mut p.count)
            };
            ix.recent.enter(hits, secs / 60);
            for d in &batch {
                ix.used(d, hour);
            }
            batch.clear();
            ix.spare = batch;
        }
    }

    /// Whether an entry of `size` bytes may be cached at all (it must fit under the high
    /// watermark on its own).
    pub fn admits(&self, size: u64) -> bool {
        self.limits.is_none_or(|l| size <= l.high)
    }

    /// Records a new entry as the most recently used and returns what must be evicted to
    /// keep the total within the limits. The caller removes the victims' files; an entry
    /// just admitted is never among them, nor one whose use is pending.
    pub fn admit(&self, key: Key, size: u64, refs: Option<Arc<[Key]>>) -> Vec<(Key, u64)> {
        let mut ix = lock(&self.index);
        self.apply(&mut ix);
        // Everything moved so far is behind this entry now: the next use of any of them
        // must move it again, or an image still pulled would age behind newer ones.
        ix.recent.restart();
        let refs = match ix.lru.pop(&key) {
            Some(old) => {
                ix.bytes -= old.size;
                refs.or(old.refs)
            }
            None => refs,
        };
        ix.bytes += size;
        // Its first use writes its time again: the file's own time need not be now (a
        // commit can rename a file staged earlier).
        ix.lru.push(
            key,
            Entry {
                size,
                refs,
                stamped: 0,
            },
        );
        match self.limits {
            Some(limits) if ix.ready => ix.shrink(limits, 1),
            _ => Vec::new(),
        }
    }

    /// Records a use of `digest` (as a blob and/or manifest, and of everything a manifest of
    /// that digest references) without waiting for the index; see the module doc for when it
    /// reaches the order. Returns the entries whose first use in this hour this call applied,
    /// or the applying thread applied since (usually none), for the caller to note on disk.
    pub fn touch(&self, digest: &Digest) -> Vec<Key> {
        self.touch_in(this_threads_stripe(), digest)
    }

    fn touch_in(&self, stripe: usize, digest: &Digest) -> Vec<Key> {
        let pending = {
            let mut p = lock(&self.stripes[stripe].0);
            p.push(digest);
            p.count
        };
        let drained = self.drain.running.load(Ordering::Acquire);
        if drained && pending == BATCH {
            self.drain.request();
        }
        if self.stamps_waiting.load(Ordering::Acquire)
            && let Ok(mut ix) = self.index.try_lock()
        {
            self.stamps_waiting.store(false, Ordering::Relaxed);
            return std::mem::take(&mut ix.unstamped);
        }
        if pending < BATCH || (drained && pending < MAX_PENDING) {
            return Vec::new();
        }
        let mut ix = match self.index.try_lock() {
            Ok(ix) => ix,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            // Busy (another batch, a commit): the next use on this stripe tries again.
            Err(TryLockError::WouldBlock) if pending < MAX_PENDING => return Vec::new(),
            Err(TryLockError::WouldBlock) => lock(&self.index),
        };
        self.apply(&mut ix);
        std::mem::take(&mut ix.unstamped)
    }

    /// Applies every pending use now; returns the entries to note on disk, as [`touch`]
    /// does. For garbage collection, which goes by the times on disk.
    ///
    /// [`touch`]: Budget::touch
    pub fn flush(&self) -> Vec<Key> {
        let mut ix = lock(&self.index);
        self.apply(&mut ix);
        std::mem::take(&mut ix.unstamped)
    }

    /// Whether the references of manifest `digest` are still to be learnt.
    pub fn wants_refs(&self, digest: &Digest) -> bool {
        lock(&self.index)
            .lru
            .peek(&(EntryKind::Manifest, digest.clone()))
            .is_some_and(|e| e.refs.is_none())
    }

    /// Records what manifest `digest` references.
    pub fn set_refs(&self, digest: &Digest, refs: Arc<[Key]>) {
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
                        stamped: 0,
                    },
                );
                ix.lru.demote(k);
                ix.bytes += size;
            }
        }
        let mut ix = lock(&self.index);
        self.apply(&mut ix);
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

/// What a manifest or index references: its config and layers (blobs), an index's child
/// manifests; both empty for anything that does not parse.
fn parse_references(body: &[u8]) -> (Vec<Digest>, Vec<Digest>) {
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
        return (Vec::new(), Vec::new());
    };
    let parse = |d: Descriptor| d.digest.parse().ok();
    let blobs = r.config.into_iter().chain(r.layers).filter_map(parse);
    (
        blobs.collect(),
        r.manifests.into_iter().filter_map(parse).collect(),
    )
}

/// The digests a manifest or index references (config, layers, child manifests); empty for
/// anything that does not parse.
pub fn references(body: &[u8]) -> Vec<Digest> {
    let (mut blobs, manifests) = parse_references(body);
    blobs.extend(manifests);
    blobs
}

/// The entries a use of a manifest also promotes: its config and layers as blobs, an index's
/// children as manifests (one lookup each, not one per kind).
pub fn reference_keys(body: &[u8]) -> Arc<[Key]> {
    let (blobs, manifests) = parse_references(body);
    let blobs = blobs.into_iter().map(|d| (EntryKind::Blob, d));
    blobs
        .chain(manifests.into_iter().map(|d| (EntryKind::Manifest, d)))
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
            let refs: Arc<[Key]> = layers.iter().map(|l| blob(*l)).collect();
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
    fn a_used_index_keeps_its_child_manifests() {
        let b = ready(Limits {
            max: 100,
            high: 90,
            low: 61,
        });
        let child = (EntryKind::Manifest, d(50));
        b.admit(child.clone(), 10, None);
        b.admit(blob(1), 20, None);
        let body = format!(r#"{{"manifests":[{{"digest":"{}"}}]}}"#, d(50));
        b.admit(
            (EntryKind::Manifest, d(60)),
            10,
            Some(reference_keys(body.as_bytes())),
        );
        b.admit(blob(2), 20, None);
        // The index is pulled again: its child goes up with it, past blobs 1 and 2.
        b.touch(&d(60));
        let gone: Vec<Key> = b
            .admit(blob(3), 35, None)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(gone, vec![blob(1), blob(2)]);
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

    fn keys(victims: Vec<(Key, u64)>) -> Vec<Key> {
        victims.into_iter().map(|(k, _)| k).collect()
    }

    // The least recently used entry the index holds now (pending uses not applied).
    fn coldest(b: &Budget) -> Option<Key> {
        lock(&b.index).lru.peek_lru().map(|(k, _)| k.clone())
    }

    // The index's order now, coldest first (pending uses not applied).
    fn order(b: &Budget) -> Vec<Key> {
        lock(&b.index)
            .lru
            .iter()
            .rev()
            .map(|(k, _)| k.clone())
            .collect()
    }

    #[test]
    fn pending_uses_count_before_anything_is_evicted() {
        let b = ready(Limits::new(100, 0.9, 0.5));
        for n in 0..9 {
            b.admit(blob(n), 10, None);
        }
        // Two uses on two stripes, far fewer than a batch: still pending.
        assert!(b.touch_in(3, &d(0)).is_empty());
        assert!(b.touch_in(7, &d(1)).is_empty());
        assert_eq!(coldest(&b), Some(blob(0)));
        let gone = keys(b.admit(blob(9), 10, None));
        assert_eq!(gone, vec![blob(2), blob(3), blob(4), blob(5), blob(6)]);
    }

    #[test]
    fn the_hit_that_fills_a_stripe_applies_every_stripe() {
        let b = ready(Limits::new(1000, 0.9, 0.5));
        for n in 0..4 {
            b.admit(blob(n), 10, None);
        }
        // 0 is used on another stripe, then 1 on stripe 0 until it holds a batch.
        b.touch_in(5, &d(0));
        for _ in 1..BATCH {
            b.touch_in(0, &d(1));
        }
        assert_eq!(
            coldest(&b),
            Some(blob(0)),
            "applied before the batch was full"
        );
        b.touch_in(0, &d(1));
        assert_eq!(coldest(&b), Some(blob(2)));
        // Stripes are applied in turn: within one batch, 0 (stripe 5) lands after 1 (stripe
        // 0) although it was used first. This is the swap the window bounds.
        assert_eq!(order(&b), vec![blob(2), blob(3), blob(1), blob(0)]);
    }

    #[test]
    fn a_use_already_pending_in_the_stripe_is_not_queued_again() {
        let b = ready(Limits::new(1000, 0.9, 0.5));
        for n in 0..4 {
            b.admit(blob(n), 10, None);
        }
        for n in [1, 2, 1, 1, 2, 3, 1] {
            b.touch_in(0, &d(n));
        }
        let p = lock(&b.stripes[0].0);
        assert_eq!(p.used, vec![d(1), d(2), d(3)]);
        assert_eq!(p.count, 7, "every use counts towards the batch");
        drop(p);
        // Applied in order of first use: 0 stays the coldest, then 1, 2, 3.
        b.flush();
        assert_eq!(order(&b), vec![blob(0), blob(1), blob(2), blob(3)]);
        // The next batch starts empty: 1 is queued again.
        b.touch_in(0, &d(1));
        assert_eq!(lock(&b.stripes[0].0).used, vec![d(1)]);
    }

    #[test]
    fn a_digest_moved_in_the_recent_window_is_not_moved_again() {
        let b = ready(Limits::new(1000, 0.9, 0.5));
        let layers: Arc<[Key]> = vec![blob(1)].into();
        for n in 0..4 {
            b.admit(blob(n), 10, None);
        }
        b.admit((EntryKind::Manifest, d(9)), 10, Some(layers));
        let manifest = (EntryKind::Manifest, d(9));
        // One use of each of `digests`, applied at once.
        let used = |digests: &[u8]| {
            for &n in digests {
                b.touch(&d(n));
            }
            b.flush();
        };
        used(&[9, 2]);
        assert_eq!(
            order(&b),
            vec![blob(0), blob(3), blob(1), manifest.clone(), blob(2)]
        );
        // Used again in the same window: neither the manifest nor its layer moves.
        used(&[9]);
        assert_eq!(
            order(&b),
            vec![blob(0), blob(3), blob(1), manifest.clone(), blob(2)]
        );
        assert!(lock(&b.index).recent.moved.contains(&fingerprint(&d(9))));
        // Hits of other digests fill the window (a stripe applies its own batches); the
        // first use after it moves the image again.
        for _ in 0..RECENT_WINDOW {
            b.touch_in(0, &d(3));
        }
        used(&[9]);
        assert_eq!(
            order(&b),
            vec![blob(0), blob(2), blob(3), blob(1), manifest.clone()]
        );
        // So does the first use in a new minute.
        used(&[2]);
        used(&[9]);
        assert_eq!(
            order(&b),
            vec![blob(0), blob(3), blob(1), manifest.clone(), blob(2)]
        );
        lock(&b.index).recent.minute = u64::MAX;
        used(&[9]);
        assert_eq!(
            order(&b),
            vec![blob(0), blob(3), blob(2), blob(1), manifest.clone()]
        );
        // And the first use after an admission: the image still pulled goes back ahead of
        // the entry admitted since.
        used(&[9]);
        b.admit(blob(5), 10, None);
        used(&[9]);
        assert_eq!(
            order(&b),
            vec![blob(0), blob(3), blob(2), blob(5), blob(1), manifest]
        );
    }

    #[test]
    fn with_a_drainer_the_hit_that_fills_a_stripe_only_wakes_it() {
        let b = Arc::new(ready(Limits::new(1000, 0.9, 0.5)));
        for n in 0..4 {
            b.admit(blob(n), 10, None);
        }
        let drainer = b.drain_in_background().expect("thread");
        // The index is held here, as a long batch or a commit would hold it: a hit that
        // applied batches itself would now wait, and one that fills a stripe must not.
        let held = lock(&b.index);
        b.touch_in(5, &d(0));
        for _ in 0..BATCH {
            assert!(b.touch_in(0, &d(1)).is_empty());
        }
        drop(held);
        // The thread applies both stripes (bounded so that a broken thread fails the test).
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while coldest(&b) != Some(blob(2)) {
            assert!(
                Instant::now() < deadline,
                "the drainer never applied the batch"
            );
            std::thread::yield_now();
        }
        // The first uses in this hour it applied go to the next hit, to be noted on disk.
        let stamped = b.touch_in(9, &d(3));
        assert_eq!(stamped.len(), 2, "{stamped:?}");
        assert!(stamped.contains(&blob(0)) && stamped.contains(&blob(1)));
        assert!(b.touch_in(9, &d(3)).is_empty());
        drop(drainer);
        assert_eq!(Arc::strong_count(&b), 1, "its thread has ended");
        // Without it, the hit that fills a stripe applies the batch itself again: 2 and 3
        // become the newest, after 1 and 0 that the thread applied.
        for _ in 0..BATCH {
            b.touch_in(0, &d(2));
        }
        assert_eq!(coldest(&b), Some(blob(1)));
    }

    #[test]
    fn with_a_drainer_a_stripe_at_the_bound_is_applied_by_its_hit() {
        let b = ready(Limits::new(1000, 0.9, 0.5));
        for n in 0..4 {
            b.admit(blob(n), 10, None);
        }
        // As if a drainer ran but never got to this stripe.
        b.drain.running.store(true, Ordering::Release);
        for _ in 0..MAX_PENDING - 1 {
            assert!(b.touch_in(0, &d(1)).is_empty());
        }
        assert_eq!(coldest(&b), Some(blob(0)), "applied below the bound");
        b.touch_in(0, &d(1));
        let newest = lock(&b.index).lru.peek_mru().map(|(k, _)| k.clone());
        assert_eq!(
            newest,
            Some(blob(1)),
            "the hit at the bound applied the batch"
        );
    }

    #[test]
    fn eviction_order_is_exact_beyond_the_window_of_one_batch() {
        // 2,000 entries of 10 bytes under a limit that holds them; 200,000 uses from 16
        // stripes (the last one seldom, so its uses wait long for a batch) with an admission
        // every 100 uses, every other one evicting two entries. After each admission no entry kept may have been last used more
        // than ORDER_WINDOW uses before an entry just evicted.
        const ENTRIES: u64 = 2_000;
        let b = ready(Limits {
            max: ENTRIES * 10,
            high: ENTRIES * 10,
            low: ENTRIES * 10 - 10,
        });
        let mut clock = 0usize;
        let mut last: std::collections::HashMap<Digest, usize> = Default::default();
        let mut present: Vec<Digest> = Vec::new();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut admitted = 0u64;
        let mut admit = |b: &Budget,
                         present: &mut Vec<Digest>,
                         last: &mut std::collections::HashMap<Digest, usize>,
                         clock: usize| {
            let dg = Digest::sha256(&admitted.to_le_bytes());
            admitted += 1;
            last.insert(dg.clone(), clock);
            present.push(dg.clone());
            keys(b.admit((EntryKind::Blob, dg), 10, None))
        };
        for _ in 0..ENTRIES {
            clock += 1;
            assert!(admit(&b, &mut present, &mut last, clock).is_empty());
        }
        let mut checked = 0;
        for _ in 0..200_000 {
            clock += 1;
            let r = next();
            let stripe = if r % 997 == 0 {
                STRIPES - 1
            } else {
                (r % (STRIPES as u64 - 1)) as usize
            };
            // Skewed: the newer half of the entries is used three times as often.
            let half = present.len() / 2;
            let i = if (r >> 20) % 4 == 0 {
                (r >> 32) as usize % half
            } else {
                half + (r >> 32) as usize % (present.len() - half)
            };
            let dg = present[i].clone();
            last.insert(dg.clone(), clock);
            b.touch_in(stripe, &dg);
            if clock % 100 == 0 {
                let gone = admit(&b, &mut present, &mut last, clock);
                if gone.is_empty() {
                    continue;
                }
                let gone_set: std::collections::HashSet<&Digest> =
                    gone.iter().map(|(_, g)| g).collect();
                present.retain(|p| !gone_set.contains(p));
                let newest_gone = gone.iter().map(|(_, g)| last[g]).max().unwrap();
                let oldest_kept = present.iter().map(|p| last[p]).min().unwrap();
                assert!(
                    oldest_kept + ORDER_WINDOW >= newest_gone,
                    "kept an entry last used at {oldest_kept}, evicted one used at {newest_gone}"
                );
                checked += 1;
            }
        }
        assert!(checked > 500, "only {checked} admissions evicted anything");
        let u = b.usage();
        assert!(
            u.bytes <= ENTRIES * 10 && u.entries == present.len() as u64,
            "{u:?}"
        );
    }

    #[test]
    fn concurrent_hits_never_take_the_cache_over_its_limit() {
        let limits = Limits::new(10_000, 0.9, 0.8);
        let b = Arc::new(ready(limits));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hitters: Vec<_> = (0..3u64)
            .map(|t| {
                let (b, stop) = (b.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = t;
                    while !stop.load(Ordering::Relaxed) {
                        n = n
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        b.touch(&Digest::sha256(&((n >> 40) & 0x3ff).to_le_bytes()));
                    }
                })
            })
            .collect();
        let mut held = std::collections::HashMap::new();
        for i in 0..5_000u64 {
            let size = 1 + i % 97;
            let key = (EntryKind::Blob, Digest::sha256(&(i & 0x3ff).to_le_bytes()));
            held.insert(key.clone(), size);
            for (gone, _) in b.admit(key, size, None) {
                held.remove(&gone)
                    .expect("evicted an entry it did not hold");
            }
            let u = b.usage();
            assert!(u.bytes <= limits.high, "{u:?} over {limits:?}");
            assert_eq!(u.bytes, held.values().sum::<u64>());
        }
        stop.store(true, Ordering::Relaxed);
        for h in hitters {
            h.join().unwrap();
        }
        assert!(b.usage().evictions > 0);
    }

    #[test]
    fn a_use_is_handed_out_for_the_disk_once_an_hour() {
        let b = Budget::new(Some(Limits::new(1000, 0.9, 0.5)));
        let layers: Arc<[Key]> = vec![blob(2), blob(3)].into();
        // Found by the scan: their times on disk are from some earlier hour.
        b.load(vec![(blob(1), 10), (blob(2), 10), (blob(3), 10)]);
        b.admit((EntryKind::Manifest, d(4)), 10, Some(layers));
        b.touch(&d(1));
        assert_eq!(b.flush(), vec![blob(1)]);
        b.touch(&d(1));
        assert!(b.flush().is_empty(), "noted twice in one hour");
        b.touch(&d(4));
        assert_eq!(
            b.flush(),
            vec![blob(2), blob(3), (EntryKind::Manifest, d(4))]
        );
        // As if the hour had turned since blob 1 was noted: its stamp is from an earlier
        // hour, and the window of moved digests is a new one.
        let mut ix = lock(&b.index);
        ix.lru.peek_mut(&blob(1)).unwrap().stamped = 0;
        ix.recent.minute = u64::MAX;
        drop(ix);
        b.touch(&d(1));
        assert_eq!(b.flush(), vec![blob(1)]);
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
        assert_eq!(&*reference_keys(m.as_bytes()), &[blob(1), blob(2)]);
        assert_eq!(
            &*reference_keys(i.as_bytes()),
            &[(EntryKind::Manifest, d(3))]
        );
        assert!(reference_keys(b"not json").is_empty());
    }
}

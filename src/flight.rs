//! Request coalescing for small values (tokens, manifests): one fetch per key at a time, every
//! concurrent caller shares its result, and fresh results are kept until their expiry.
//!
//! Blobs do not use this: they stream through `cache::inflight`, which never holds a body in
//! memory.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use tokio::time::Instant;

/// An error a coalesced fetch can end in when it panics or its task is cancelled.
pub trait FlightError: Clone + Send + Sync + 'static {
    /// The error for a fetch that ended without an answer.
    fn aborted() -> Self;
}

impl FlightError for String {
    fn aborted() -> Self {
        "fetch aborted".to_owned()
    }
}

type Answer<V, E> = Result<(V, Option<Instant>), E>;
type Pending<V, E> = Shared<BoxFuture<'static, Answer<V, E>>>;

struct Slot<V, E> {
    value: Option<(V, Instant)>,
    pending: Option<(u64, Pending<V, E>)>,
}

type Slots<K, V, E> = Arc<Mutex<HashMap<K, Slot<V, E>>>>;

/// A keyed single-flight with an optional per-value expiry.
pub struct Flight<K, V, E> {
    // Protects the slot table only; never held across an `.await` (the shared future is
    // cloned out and awaited after the guard is dropped).
    slots: Slots<K, V, E>,
    next_id: AtomicU64,
}

impl<K, V, E> Default for Flight<K, V, E> {
    fn default() -> Self {
        Flight {
            slots: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(0),
        }
    }
}

impl<K, V, E> Flight<K, V, E>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
    E: FlightError,
{
    /// Returns the fresh cached value for `key`, joins the fetch under way, or starts `fetch`.
    /// `fetch` yields the value and when it stops being fresh (`None`: do not keep it).
    ///
    /// The fetch runs on its own task: callers going away neither cancel nor pause it, and its
    /// answer is recorded even if nobody waits for it any more. A panicking fetch ends as
    /// `E::aborted()` and leaves the key usable.
    pub async fn get<F, Fut>(&self, key: K, fetch: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Answer<V, E>> + Send + 'static,
    {
        let fut = {
            let mut slots = lock(&self.slots);
            let slot = slots.entry(key.clone()).or_insert(Slot {
                value: None,
                pending: None,
            });
            if let Some((v, until)) = &slot.value {
                if Instant::now() < *until {
                    return Ok(v.clone());
                }
            }
            match &slot.pending {
                Some((_, p)) => p.clone(),
                None => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let task = tokio::spawn(settle(self.slots.clone(), key, id, fetch()));
                    let p = async move { task.await.unwrap_or_else(|_| Err(E::aborted())) }
                        .boxed()
                        .shared();
                    slot.pending = Some((id, p.clone()));
                    p
                }
            }
        };
        fut.await.map(|(v, _)| v)
    }

    /// Callers waiting on fetches under way, over every key.
    pub fn waiting(&self) -> usize {
        lock(&self.slots)
            .values()
            .filter_map(|s| s.pending.as_ref())
            // Each waiting caller holds a clone of the shared future; the slot holds one more.
            .filter_map(|(_, p)| p.strong_count())
            .map(|n| n.saturating_sub(1))
            .sum()
    }

    /// Forgets the cached value for `key` if `rejected` says it is the one that was refused,
    /// so the next `get` fetches anew (a value already replaced is kept).
    pub fn invalidate(&self, key: &K, rejected: impl Fn(&V) -> bool) {
        let mut slots = lock(&self.slots);
        if let Some(slot) = slots.get_mut(key) {
            if slot.value.as_ref().is_some_and(|(v, _)| rejected(v)) {
                slot.value = None;
            }
        }
    }
}

/// Runs one fetch and records its answer in the table, whoever is still waiting.
async fn settle<K, V, E>(
    slots: Slots<K, V, E>,
    key: K,
    id: u64,
    fetch: impl Future<Output = Answer<V, E>>,
) -> Answer<V, E>
where
    K: Hash + Eq,
    V: Clone,
    E: FlightError,
{
    let answer = AssertUnwindSafe(fetch)
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(E::aborted()));
    let mut slots = lock(&slots);
    if let Some(slot) = slots.get_mut(&key) {
        if slot.pending.as_ref().is_some_and(|(i, _)| *i == id) {
            slot.pending = None;
            if let Ok((v, Some(until))) = &answer {
                slot.value = Some((v.clone(), *until));
            }
            if slot.value.is_none() {
                slots.remove(&key);
            }
        }
    }
    answer
}

/// Locks a mutex, recovering from poisoning. Every mutex in regcache guards plain tables
/// that a panicking holder cannot leave half-updated, so the data is still good.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn one_fetch_for_concurrent_callers_and_reuse_until_expiry() {
        let flight: Arc<Flight<&str, u32, String>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (f, c) = (flight.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                f.get("k", || async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok((7, Some(Instant::now() + Duration::from_secs(60))))
                })
                .await
            }));
        }
        // The fetch sleeps, so every caller has joined it before it ends.
        while flight.waiting() < 20 {
            tokio::task::yield_now().await;
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(7));
        }
        assert_eq!(flight.waiting(), 0);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(59)).await;
        let c = calls.clone();
        let v = flight
            .get("k", || async move {
                c.fetch_add(1, Ordering::SeqCst);
                Ok((8, None))
            })
            .await;
        assert_eq!(v, Ok(7));
        tokio::time::advance(Duration::from_secs(2)).await;
        let c = calls.clone();
        let v = flight
            .get("k", || async move {
                c.fetch_add(1, Ordering::SeqCst);
                Ok((9, None))
            })
            .await;
        assert_eq!(v, Ok(9));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn errors_are_shared_and_not_kept() {
        let flight: Flight<u8, u8, String> = Flight::default();
        assert_eq!(
            flight.get(1, || async { Err("no".to_string()) }).await,
            Err("no".to_string())
        );
        assert_eq!(flight.get(1, || async { Ok((2, None)) }).await, Ok(2));
    }

    #[tokio::test]
    async fn invalidate_drops_only_the_rejected_value() {
        let flight: Flight<u8, u8, String> = Flight::default();
        let far = Instant::now() + Duration::from_secs(3600);
        flight
            .get(1, || async move { Ok((5, Some(far))) })
            .await
            .unwrap();
        flight.invalidate(&1, |v| *v == 4);
        assert_eq!(flight.get(1, || async { Ok((6, None)) }).await, Ok(5));
        flight.invalidate(&1, |v| *v == 5);
        assert_eq!(flight.get(1, || async { Ok((6, None)) }).await, Ok(6));
    }

    #[tokio::test]
    async fn an_abandoned_fetch_finishes_and_is_shared_with_later_callers() {
        let flight: Arc<Flight<u8, u8, String>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let c = calls.clone();
        let first = flight.get(1, || async move {
            c.fetch_add(1, Ordering::SeqCst);
            let _ = rx.await;
            Ok((3, None))
        });
        // Poll once so the fetch starts, then drop the caller.
        assert!(futures_util::poll!(Box::pin(first)).is_pending());
        let (f, c) = (flight.clone(), calls.clone());
        let second = tokio::spawn(async move {
            f.get(1, || async move {
                c.fetch_add(1, Ordering::SeqCst);
                Ok((4, None))
            })
            .await
        });
        tokio::task::yield_now().await;
        tx.send(()).unwrap();
        assert_eq!(second.await.unwrap(), Ok(3));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_panicking_fetch_is_an_error_and_the_key_stays_usable() {
        let flight: Flight<u8, u8, String> = Flight::default();
        let r = flight
            .get(1, || async {
                if true {
                    panic!("hostile input");
                }
                Ok((1, None))
            })
            .await;
        assert_eq!(r, Err("fetch aborted".to_string()));
        assert_eq!(flight.get(1, || async { Ok((2, None)) }).await, Ok(2));
    }
}

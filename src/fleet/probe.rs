//! The start-up check of the store's conditional writes: several create-only PUTs race on
//! one new key (exactly one may win), then a compare-and-swap with the current version must
//! succeed and one with a stale version must be refused. A store that fails it would let two
//! replicas lead one download, so fleet mode refuses it.

use bytes::Bytes;
use object_store::UpdateVersion;

use super::store::{Store, StoreError};

/// Creates raced on the probe key.
pub const RACERS: usize = 12;

/// Why the store is unfit for the fleet, or could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// More (or fewer) than one of the racing creates succeeded.
    #[error("{winners} of {racers} racing create-only writes succeeded (exactly one must)")]
    NotAtomic {
        /// Creates that succeeded.
        winners: usize,
        /// Creates raced.
        racers: usize,
    },
    /// Compare-and-swap does not hold.
    #[error("compare-and-swap is not enforced: {0}")]
    NoSwap(&'static str),
    /// The store failed or could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ProbeError {
    /// True when the store answered and is unfit; false when it could not be asked.
    pub fn is_unfit(&self) -> bool {
        match self {
            ProbeError::NotAtomic { .. } | ProbeError::NoSwap(_) => true,
            ProbeError::Store(StoreError::Unsupported(_)) => true,
            ProbeError::Store(_) => false,
        }
    }
}

/// Runs the check on a new `probe/<random>` key, removed afterwards.
pub async fn conditional_writes(store: &Store, racers: usize) -> Result<(), ProbeError> {
    let key = store.key(&format!("probe/{:016x}", rand::random::<u64>()));
    let results = futures_util::future::join_all(
        (0..racers).map(|i| store.create(&key, Bytes::from(format!("racer {i}")))),
    )
    .await;
    let mut winners = Vec::new();
    for r in results {
        match r {
            Ok(put) => winners.push(UpdateVersion::from(put)),
            Err(StoreError::Conflict) => {}
            Err(e) => {
                let _ = store.delete(&key).await;
                return Err(e.into());
            }
        }
    }
    let outcome = check_swap(store, &key, &winners, racers).await;
    let _ = store.delete(&key).await;
    outcome
}

async fn check_swap(
    store: &Store,
    key: &object_store::path::Path,
    winners: &[UpdateVersion],
    racers: usize,
) -> Result<(), ProbeError> {
    let [won] = winners else {
        return Err(ProbeError::NotAtomic {
            winners: winners.len(),
            racers,
        });
    };
    match store
        .swap(key, Bytes::from_static(b"swapped"), won.clone())
        .await
    {
        Ok(_) => {}
        Err(StoreError::Conflict) => {
            return Err(ProbeError::NoSwap(
                "a swap with the current version was refused",
            ));
        }
        Err(e) => return Err(e.into()),
    };
    match store
        .swap(key, Bytes::from_static(b"stale"), won.clone())
        .await
    {
        Err(StoreError::Conflict) => {}
        Ok(_) => {
            return Err(ProbeError::NoSwap("a swap with a stale version succeeded"));
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

//! The streams a download reads through in fleet mode: a leader's upstream bytes fenced by
//! its lease, and a follower's peer bytes watched against the lease.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;

use crate::cache::source::{SourceBytes, SourceError};
use crate::fleet::lease::{self, Seen};
use crate::fleet::store::Store;
use crate::flight::lock;
use crate::reference::Digest;

/// A leader's upstream `bytes`, ending with an error before the first chunk it receives
/// after another replica took its lease over (it was paused, or cut off, for `ttl`).
pub(super) fn fenced(bytes: SourceBytes, fence: lease::Fence, ttl: Duration) -> SourceBytes {
    Box::pin(futures_util::stream::unfold(
        (bytes, fence, false),
        move |(mut bytes, fence, done)| async move {
            if done {
                return None;
            }
            let item = bytes.next().await?;
            if item.is_ok() && !fence.holds(ttl).await {
                let e = SourceError::Unreachable(
                    "another replica took this download's lease over".into(),
                );
                return Some((Err(e), (bytes, fence, true)));
            }
            Some((item, (bytes, fence, false)))
        },
    ))
}

/// The peer's `bytes`, failing with a timeout once the lease `seen` has stayed unchanged for
/// `ttl` while no byte came: a paused or partitioned leader stops renewing, and this
/// replica may take over. The lease is read only while the stream is stalled.
pub(super) fn watched(
    bytes: SourceBytes,
    store: Store,
    digest: Digest,
    seen: Seen,
    ttl: Duration,
    latest: Arc<std::sync::Mutex<Option<Seen>>>,
) -> SourceBytes {
    let check = lease::poll_every(ttl);
    Box::pin(futures_util::stream::unfold(
        (bytes, seen, false),
        move |(mut bytes, mut seen, done)| {
            let store = store.clone();
            let digest = digest.clone();
            let latest = latest.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    match tokio::time::timeout(check, bytes.next()).await {
                        Ok(Some(item)) => return Some((item, (bytes, seen, false))),
                        Ok(None) => return None,
                        Err(_) => {}
                    }
                    match lease::read(&store, &digest).await {
                        // Another replica leads now (it took over from this stream's
                        // leader): this stream will bring nothing more; attach to it.
                        Ok(Some(now)) if now.lease.replica != seen.lease.replica => {
                            *lock(&latest) = Some(now.clone());
                            let e = SourceError::Timeout(format!(
                                "the download's leader {} was replaced by {}",
                                seen.lease.advertise, now.lease.advertise
                            ));
                            return Some((Err(e), (bytes, now, true)));
                        }
                        Ok(Some(now)) if !now.same_version(&seen) => {
                            *lock(&latest) = Some(now.clone());
                            seen = now;
                        }
                        Ok(Some(_)) if Instant::now() >= seen.since + ttl => {
                            *lock(&latest) = Some(seen.clone());
                            let e = SourceError::Timeout(format!(
                                "the download's leader {} stopped renewing its lease",
                                seen.lease.advertise
                            ));
                            return Some((Err(e), (bytes, seen, true)));
                        }
                        // Renewing, gone (finishing) or unreadable: keep waiting.
                        _ => {}
                    }
                }
            }
        },
    ))
}

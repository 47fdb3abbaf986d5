//! Tag answers in memory: what a tag resolved to and when the upstream last confirmed it.

use std::time::Duration;

use tokio::time::Instant;

use super::store::TagRecord;

/// A tag answer.
#[derive(Debug, Clone)]
pub struct TagEntry {
    /// Digest and media type.
    pub record: TagRecord,
    /// When the upstream last confirmed it; `None` for answers read back from disk after a
    /// restart, which are revalidated before use.
    pub checked: Option<Instant>,
}

impl TagEntry {
    /// A just-confirmed answer.
    pub fn confirmed(record: TagRecord) -> Self {
        TagEntry {
            record,
            checked: Some(Instant::now()),
        }
    }

    /// Whether the answer may be served without asking the upstream.
    pub fn is_fresh(&self, ttl: Duration) -> bool {
        self.checked.is_some_and(|c| c.elapsed() < ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn freshness_follows_the_ttl() {
        let rec = TagRecord {
            digest: crate::reference::Digest::sha256(b"m"),
            media_type: "x".into(),
        };
        let e = TagEntry::confirmed(rec.clone());
        assert!(e.is_fresh(Duration::from_secs(300)));
        tokio::time::advance(Duration::from_secs(299)).await;
        assert!(e.is_fresh(Duration::from_secs(300)));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!e.is_fresh(Duration::from_secs(300)));
        let from_disk = TagEntry {
            record: rec,
            checked: None,
        };
        assert!(!from_disk.is_fresh(Duration::from_secs(300)));
    }
}

//! Tag records left pointing at nothing: after garbage collection (or eviction) removed a
//! manifest, its tags would still be listed by `regcache ls` and looked up by the server.
//! Removing them makes the next pull of the tag ask the upstream again. Referrer markers
//! whose manifest is gone go the same way.

use std::io;

use super::layout::{Area, Item, Layout};
use super::store::parse_tag_record;

/// Removes every tag record whose manifest is not in the cache; damaged records are left
/// for the server's own handling. Returns how many were removed.
pub fn remove_dangling_tags(layout: &Layout) -> io::Result<u64> {
    let mut records = Vec::new();
    layout.walk(&[Area::Tags], &mut |e| {
        if let Item::Tag(_) = e.item {
            records.push(e.path);
        }
    })?;
    let mut removed = 0;
    for path in records {
        // A record written while this runs is complete (written whole, then renamed).
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Some(record) = parse_tag_record(&text) else {
            continue;
        };
        if !layout.manifest(&record.digest).exists() {
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// Removes every referrer marker whose manifest is not in the cache; returns how many.
pub fn remove_dangling_referrers(layout: &Layout) -> io::Result<u64> {
    let mut removed = 0;
    for (path, referrer) in layout.referrer_markers()? {
        if !layout.manifest(&referrer).exists() {
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

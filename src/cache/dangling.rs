//! Tag records left pointing at nothing: after garbage collection (or eviction) removed a
//! manifest, its tags would still be listed by `regcache ls` and looked up by the server.
//! Removing them makes the next pull of the tag ask the upstream again.

use std::io;
use std::path::Path;

use super::store::{content_path, parse_tag_record};

/// Removes every tag record under `root/tags` whose manifest is not in `root/manifests`;
/// damaged records are left for the server's own handling. Returns how many were removed.
pub fn remove_dangling_tags(root: &Path) -> io::Result<u64> {
    let mut removed = 0;
    walk(root, &root.join("tags"), &mut removed)?;
    Ok(removed)
}

fn walk(root: &Path, dir: &Path, removed: &mut u64) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(root, &path, removed)?;
            continue;
        }
        // A record written while this runs is complete (written whole, then renamed).
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Some(record) = parse_tag_record(&text) else {
            continue;
        };
        if !content_path(root, "manifests", &record.digest).exists() {
            match std::fs::remove_file(&path) {
                Ok(()) => *removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

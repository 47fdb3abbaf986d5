//! `regcache ls` and `regcache stats`: what a cache folder holds, read straight from disk
//! without a running server through the cache's one layout walk (directory listings, inode
//! metadata, tag records and manifests; blobs are never read).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::cache::budget::{EntryKind, references};
use crate::cache::layout::{Area, Item, Layout};
use crate::cache::store::{FsStore, TagRecord, parse_tag_record};
use crate::reference::Digest;
use crate::units::{HumanDuration, count, human_bytes};

/// One cached tag of one repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TagRow {
    /// Upstream name.
    pub upstream: String,
    /// Repository at the upstream.
    pub repository: String,
    /// Tag.
    pub tag: String,
    /// Manifest (or index) digest the tag resolved to.
    pub digest: String,
    /// Manifest media type.
    pub media_type: String,
    /// Bytes on disk for this image: manifests and the blobs they reference that are cached.
    pub size: u64,
    /// Blobs and child manifests referenced but not cached (0: the image is complete).
    pub missing: u64,
    /// Last use of the manifest or any of its content, seconds since the Unix epoch.
    pub last_use: u64,
}

/// Totals of a cache folder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Committed blobs.
    pub blobs: u64,
    /// Their bytes.
    pub blob_bytes: u64,
    /// Committed manifests.
    pub manifests: u64,
    /// Their bytes.
    pub manifest_bytes: u64,
    /// Tag records (one per tag and set of accepted manifest types).
    pub tag_records: u64,
    /// Repositories with at least one tag record.
    pub repositories: u64,
    /// Unfinished downloads in `tmp/`.
    pub in_progress: u64,
    /// Their bytes so far.
    pub in_progress_bytes: u64,
    /// The configured `cache.max_size`, if any.
    pub limit: Option<u64>,
    /// Files in the cache folder that are not cache entries (ignored by regcache).
    pub stray: u64,
    /// Oldest last use of a blob or manifest, seconds since the Unix epoch.
    pub oldest_use: Option<u64>,
    /// Newest last use.
    pub newest_use: Option<u64>,
}

struct Meta {
    size: u64,
    used: u64,
}

fn epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn check_root(root: &Path) -> io::Result<()> {
    FsStore::open_shared(root).map(drop)
}

fn meta(path: &Path) -> Option<Meta> {
    let m = std::fs::metadata(path).ok()?;
    Some(Meta {
        size: m.len(),
        used: m.modified().map(epoch).unwrap_or(0),
    })
}

// Adds a manifest's own file and everything it references (one level of index children).
fn image_size(layout: &Layout, digest: &Digest, row: &mut TagRow, seen: &mut BTreeSet<Digest>) {
    if !seen.insert(digest.clone()) {
        return;
    }
    let path = layout.manifest(digest);
    let Some(m) = meta(&path) else {
        row.missing += 1;
        return;
    };
    row.size += m.size;
    row.last_use = row.last_use.max(m.used);
    let body = std::fs::read(&path).unwrap_or_default();
    let body = match body.iter().position(|b| *b == b'\n') {
        Some(nl) => &body[nl + 1..],
        None => &body[..],
    };
    for r in references(body) {
        if let Some(b) = meta(&layout.blob(&r)) {
            if seen.insert(r.clone()) {
                row.size += b.size;
                row.last_use = row.last_use.max(b.used);
            }
        } else if layout.manifest(&r).exists() {
            image_size(layout, &r, row, seen);
        } else if seen.insert(r) {
            row.missing += 1;
        }
    }
}

/// Every cached tag, sorted by upstream, repository and tag.
pub fn list(root: &Path) -> io::Result<Vec<TagRow>> {
    check_root(root)?;
    let layout = Layout::new(root);
    let mut records = Vec::new();
    layout.walk(&[Area::Tags], &mut |e| {
        if let Item::Tag(key) = e.item {
            records.push((key, e.path));
        }
    })?;
    let mut rows: BTreeMap<(String, String, String, String), TagRow> = BTreeMap::new();
    for (key, path) in records {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Some(TagRecord { digest, media_type }) = parse_tag_record(&text) else {
            continue;
        };
        let mut row = TagRow {
            upstream: key.upstream,
            repository: key.repository.to_string(),
            tag: key.tag.to_string(),
            digest: digest.to_string(),
            media_type,
            size: 0,
            missing: 0,
            last_use: 0,
        };
        image_size(&layout, &digest, &mut row, &mut BTreeSet::new());
        let key = (
            row.upstream.clone(),
            row.repository.clone(),
            row.tag.clone(),
            row.digest.clone(),
        );
        rows.insert(key, row);
    }
    Ok(rows.into_values().collect())
}

/// Totals of the cache folder.
pub fn stats(root: &Path, limit: Option<u64>) -> io::Result<Stats> {
    check_root(root)?;
    let mut s = Stats {
        limit,
        ..Stats::default()
    };
    let mut repos = BTreeSet::new();
    let areas = [Area::Content, Area::Tags, Area::Staging];
    Layout::new(root).walk(&areas, &mut |e| match e.item {
        Item::Content((kind, _)) => {
            let (count, bytes) = match kind {
                EntryKind::Blob => (&mut s.blobs, &mut s.blob_bytes),
                EntryKind::Manifest => (&mut s.manifests, &mut s.manifest_bytes),
            };
            *count += 1;
            *bytes += e.len;
            let used = epoch(e.modified);
            s.oldest_use = Some(s.oldest_use.map_or(used, |o| o.min(used)));
            s.newest_use = Some(s.newest_use.map_or(used, |o| o.max(used)));
        }
        Item::Tag(key) => {
            s.tag_records += 1;
            repos.insert((key.upstream, key.repository));
        }
        Item::Staged => {
            s.in_progress += 1;
            s.in_progress_bytes += e.len;
        }
        Item::Stray { .. } => s.stray += 1,
    })?;
    s.repositories = repos.len() as u64;
    Ok(s)
}

fn ago(then: u64, now: u64) -> String {
    if then == 0 {
        return "-".into();
    }
    let secs = now.saturating_sub(then);
    // Coarse units read best in a table.
    let d = match secs {
        s if s < 60 => Duration::from_secs(s),
        s if s < 3600 => Duration::from_secs(s / 60 * 60),
        s if s < 86400 => Duration::from_secs(s / 3600 * 3600),
        s => Duration::from_secs(s / 86400 * 86400),
    };
    format!("{} ago", HumanDuration(d))
}

/// The `ls` table.
pub fn render_list(rows: &[TagRow], now: SystemTime) -> String {
    let now = epoch(now);
    let mut table = vec![[
        "REPOSITORY".to_owned(),
        "TAG".to_owned(),
        "DIGEST".to_owned(),
        "SIZE".to_owned(),
        "LAST USE".to_owned(),
    ]];
    for r in rows {
        let short = r.digest.get(..19).unwrap_or(&r.digest);
        let size = if r.missing > 0 {
            format!("{} ({} missing)", human_bytes(r.size), r.missing)
        } else {
            human_bytes(r.size)
        };
        table.push([
            format!("{}/{}", r.upstream, r.repository),
            r.tag.clone(),
            short.to_owned(),
            size,
            ago(r.last_use, now),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| {
            table
                .iter()
                .map(|row| row[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The `stats` text.
pub fn render_stats(s: &Stats, now: SystemTime) -> String {
    let now = epoch(now);
    let total = s.blob_bytes + s.manifest_bytes;
    let limit = match s.limit {
        Some(l) if l > 0 => format!(
            "{} of {} ({:.1}%)",
            human_bytes(total),
            human_bytes(l),
            total as f64 * 100.0 / l as f64
        ),
        _ => format!("{} (no limit)", human_bytes(total)),
    };
    let stray = match s.stray {
        0 => String::new(),
        n => format!("stray files:   {n} (not cache entries; ignored)\n"),
    };
    format!(
        "cache size:    {limit}\n\
         blobs:         {} ({})\n\
         manifests:     {} ({})\n\
         tags:          {} in {}\n\
         in progress:   {} ({})\n\
         last use:      newest {}, oldest {}\n{stray}",
        s.blobs,
        human_bytes(s.blob_bytes),
        s.manifests,
        human_bytes(s.manifest_bytes),
        count(s.tag_records, "record"),
        count(s.repositories, "repository"),
        count(s.in_progress, "download"),
        human_bytes(s.in_progress_bytes),
        ago(s.newest_use.unwrap_or(0), now),
        ago(s.oldest_use.unwrap_or(0), now),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::store::{BlobStore, FsStore, StoredManifest, TagKey, TagRecord};
    use bytes::Bytes;

    async fn blob(s: &FsStore, data: &[u8]) -> Digest {
        let d = Digest::sha256(data);
        let p = s.staging_path("t");
        std::fs::write(&p, data).unwrap();
        s.commit_blob(&d, &p).await.unwrap();
        d
    }

    #[tokio::test]
    async fn lists_tags_with_image_sizes_and_counts_totals() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStore::open(dir.path()).await.unwrap();
        let config = blob(&s, b"{}").await;
        let layer = blob(&s, &[7u8; 1000]).await;
        let absent = Digest::sha256(b"never fetched");
        let body = format!(
            r#"{{"config":{{"digest":"{config}"}},"layers":[{{"digest":"{layer}"}},{{"digest":"{absent}"}}]}}"#
        );
        let m = StoredManifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            body: Bytes::from(body.clone()),
        };
        let md = Digest::sha256(body.as_bytes());
        s.put_manifest(&md, &m).await.unwrap();
        for accept in [0x1f, 0x03] {
            s.put_tag(
                &TagKey {
                    upstream: "docker.io".into(),
                    repository: "library/alpine".parse().unwrap(),
                    tag: "3.20".parse().unwrap(),
                    accept,
                },
                &TagRecord {
                    digest: md.clone(),
                    media_type: m.media_type.clone(),
                },
            )
            .await
            .unwrap();
        }
        let rows = list(dir.path()).unwrap();
        assert_eq!(rows.len(), 1, "one row per tag and digest: {rows:?}");
        let r = &rows[0];
        assert_eq!(
            (r.upstream.as_str(), r.repository.as_str(), r.tag.as_str()),
            ("docker.io", "library/alpine", "3.20")
        );
        let manifest_file = (m.media_type.len() + 1 + body.len()) as u64;
        assert_eq!(r.size, manifest_file + 2 + 1000);
        assert_eq!(r.missing, 1);
        assert!(r.last_use > 0);
        let text = render_list(&rows, SystemTime::now());
        assert!(text.starts_with("REPOSITORY"), "{text}");
        assert!(text.contains("docker.io/library/alpine  3.20"), "{text}");
        assert!(text.contains("(1 missing)"), "{text}");

        std::fs::write(dir.path().join("tmp/x.part"), b"half").unwrap();
        // Junk is counted apart, never as an entry, and does not stop the listing.
        std::fs::write(dir.path().join("blobs/notes.txt"), b"junk").unwrap();
        std::fs::write(
            dir.path().join("tags/docker.io/library/alpine/_tags/x"),
            b"junk",
        )
        .unwrap();
        assert_eq!(list(dir.path()).unwrap(), rows);
        let st = stats(dir.path(), Some(1 << 20)).unwrap();
        assert_eq!((st.blobs, st.blob_bytes), (2, 1002));
        assert_eq!((st.manifests, st.manifest_bytes), (1, manifest_file));
        assert_eq!((st.tag_records, st.repositories), (2, 1));
        assert_eq!((st.in_progress, st.in_progress_bytes), (1, 4));
        assert_eq!(st.stray, 2);
        let text = render_stats(&st, SystemTime::now());
        assert!(text.contains("of 1.0 MiB"), "{text}");
        assert!(text.contains("blobs:         2 (1002 B)"), "{text}");
        assert!(text.contains("2 records in 1 repository"), "{text}");
        assert!(text.contains("1 download (4 B)"), "{text}");
        assert!(text.contains("stray files:   2"), "{text}");
    }

    #[test]
    fn a_folder_that_is_not_a_cache_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(list(dir.path()).is_err());
        assert!(stats(dir.path(), None).is_err());
    }
}

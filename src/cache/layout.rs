//! The on-disk layout of a cache folder, known here and nowhere else: where committed blobs and
//! manifests, tag records and staged downloads live, and the one directory walk that lists
//! what a folder holds. The store's start-up count, garbage collection and `regcache ls/stats`
//! all read the folder through [`Layout::walk`].
//!
//! ```text
//! <root>/blobs/<algorithm>/<first 2 hex>/<hex>        committed blob
//! <root>/manifests/<algorithm>/<first 2 hex>/<hex>    committed manifest (first line: media type)
//! <root>/tags/<upstream>/<repository...>/_tags/<tag>@<accept key, 2 hex>   tag record
//! <root>/referrers/<algorithm>/<subject hex>/<algorithm>-<hex>   referrer marker (empty)
//! <root>/tmp/...                                      staged downloads, never verified
//! ```
//!
//! A referrer marker says that the committed manifest it names has a `subject` field naming
//! the subject digest of its folder: an index on disk, so the referrers of a manifest are
//! known without a running server's memory (offline serving after `regcache import`). It
//! holds nothing; a marker whose manifest is gone is ignored and removed by `regcache gc`.
//!
//! Anything else found there (a stray name, a digest of the wrong length, a file where a
//! folder belongs, a symbolic link) is reported as [`Item::Stray`], never followed and never
//! mistaken for an entry.

use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::budget::{EntryKind, Key};
use crate::reference::{Digest, Repository, Tag};

const BLOBS: &str = "blobs";
const MANIFESTS: &str = "manifests";
const TAGS: &str = "tags";
const TMP: &str = "tmp";
const REFERRERS: &str = "referrers";
/// The folder that holds a repository's tag records, below its path components (a repository
/// component cannot start with `_`, so it never clashes with one).
const TAG_DIR: &str = "_tags";

/// Which tag answer: a tag of a repository at an upstream, for one set of accepted types.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TagKey {
    /// Upstream name.
    pub upstream: String,
    /// Repository at the upstream.
    pub repository: Repository,
    /// The tag.
    pub tag: Tag,
    /// `media::Accept::key()` of the clients this answer is for.
    pub accept: u8,
}

/// The parts of a cache folder a walk visits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    /// `blobs/` and `manifests/`.
    Content,
    /// `tags/`.
    Tags,
    /// `tmp/`.
    Staging,
}

/// What a walked path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A committed blob or manifest.
    Content(Key),
    /// A tag record.
    Tag(TagKey),
    /// A file under `tmp/`: a download or write in progress, or left by a crash.
    Staged,
    /// Something the layout does not have; `dir` when it is a folder (not descended into).
    Stray {
        /// It is a folder.
        dir: bool,
    },
}

/// One path found by a walk, with its inode metadata (contents are never read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What it is.
    pub item: Item,
    /// Where it is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub len: u64,
    /// Its modification time: for content, its last use.
    pub modified: SystemTime,
}

/// The paths of one cache folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout of the cache folder `root`.
    pub fn new(root: &Path) -> Self {
        Layout {
            root: root.to_owned(),
        }
    }

    /// The cache folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether `root` holds a cache (its content folder exists).
    pub fn exists(&self) -> bool {
        self.root.join(BLOBS).is_dir()
    }

    /// The folders a cache needs, to create at start-up.
    pub fn folders(&self) -> [PathBuf; 4] {
        [BLOBS, MANIFESTS, TAGS, TMP].map(|d| self.root.join(d))
    }

    /// Where downloads and writes are staged before they are renamed into place.
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join(TMP)
    }

    /// Where a committed blob or manifest of `digest` lives (whether or not it exists).
    pub fn content(&self, kind: EntryKind, digest: &Digest) -> PathBuf {
        self.root
            .join(kind_dir(kind))
            .join(digest.algorithm().as_str())
            .join(&digest.hex()[..2])
            .join(digest.hex())
    }

    /// Where a committed blob lives.
    pub fn blob(&self, digest: &Digest) -> PathBuf {
        self.content(EntryKind::Blob, digest)
    }

    /// Where a committed manifest lives.
    pub fn manifest(&self, digest: &Digest) -> PathBuf {
        self.content(EntryKind::Manifest, digest)
    }

    /// The folder of the markers of `subject`'s referrers.
    pub fn referrers_dir(&self, subject: &Digest) -> PathBuf {
        self.root
            .join(REFERRERS)
            .join(subject.algorithm().as_str())
            .join(subject.hex())
    }

    /// The marker saying that manifest `referrer` refers to `subject`.
    pub fn referrer_marker(&self, subject: &Digest, referrer: &Digest) -> PathBuf {
        self.referrers_dir(subject).join(format!(
            "{}-{}",
            referrer.algorithm().as_str(),
            referrer.hex()
        ))
    }

    /// Every referrer marker: `(path, referrer)`, damaged names left out.
    pub fn referrer_markers(&self) -> io::Result<Vec<(PathBuf, Digest)>> {
        let mut out = Vec::new();
        for alg in listing(&self.root.join(REFERRERS))? {
            for subject in listing(&alg.path)?.into_iter().filter(|s| s.is_dir) {
                for m in listing(&subject.path)? {
                    if let Some(d) = m.name.to_str().and_then(parse_marker_name) {
                        out.push((m.path, d));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The folder of a repository's tag records at an upstream.
    pub fn tag_dir(&self, upstream: &str, repository: &Repository) -> PathBuf {
        let mut p = self.root.join(TAGS).join(upstream);
        for c in repository.components() {
            p.push(c);
        }
        p.join(TAG_DIR)
    }

    /// Where a tag record lives.
    pub fn tag(&self, key: &TagKey) -> PathBuf {
        self.tag_dir(&key.upstream, &key.repository)
            .join(format!("{}@{:02x}", key.tag, key.accept))
    }

    /// Visits every path of `areas`, in directory order. Entries that vanish while it walks
    /// (evicted, collected, renamed into place) are skipped; other I/O errors end the walk.
    pub fn walk(&self, areas: &[Area], visit: &mut dyn FnMut(Entry)) -> io::Result<()> {
        for area in areas {
            match area {
                Area::Content => {
                    self.walk_content(EntryKind::Blob, visit)?;
                    self.walk_content(EntryKind::Manifest, visit)?;
                }
                Area::Tags => {
                    for up in listing(&self.root.join(TAGS))? {
                        match up.name.to_str() {
                            Some(name) if up.is_dir => {
                                walk_tags(name, &mut Vec::new(), &up.path, visit)?
                            }
                            _ => visit(up.stray()),
                        }
                    }
                }
                Area::Staging => walk_staging(&self.staging_dir(), visit)?,
            }
        }
        Ok(())
    }

    // `<kind>/<algorithm>/<fan>/<hex>`: exactly three levels, anything else is stray.
    fn walk_content(&self, kind: EntryKind, visit: &mut dyn FnMut(Entry)) -> io::Result<()> {
        for alg in listing(&self.root.join(kind_dir(kind)))? {
            if !alg.is_dir {
                visit(alg.stray());
                continue;
            }
            for fan in listing(&alg.path)? {
                if !fan.is_dir {
                    visit(fan.stray());
                    continue;
                }
                for file in listing(&fan.path)? {
                    match file.is_file.then(|| digest_of(&alg, &fan, &file)).flatten() {
                        Some(d) => visit(file.into_entry(Item::Content((kind, d)))),
                        None => visit(file.stray()),
                    }
                }
            }
        }
        Ok(())
    }
}

fn kind_dir(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::Blob => BLOBS,
        EntryKind::Manifest => MANIFESTS,
    }
}

/// The digest a content file's names spell, when they agree: `<algorithm>/<fan>/<hex>` with
/// a valid digest whose hex starts with `fan`.
fn digest_of(alg: &Found, fan: &Found, file: &Found) -> Option<Digest> {
    let (alg, fan, hex) = (alg.name.to_str()?, fan.name.to_str()?, file.name.to_str()?);
    let d: Digest = format!("{alg}:{hex}").parse().ok()?;
    (d.algorithm().as_str() == alg && d.hex().get(..2) == Some(fan)).then_some(d)
}

// Below `tags/<upstream>`: repository components down to a `_tags` folder, whose files are
// the records.
fn walk_tags(
    upstream: &str,
    components: &mut Vec<String>,
    dir: &Path,
    visit: &mut dyn FnMut(Entry),
) -> io::Result<()> {
    for e in listing(dir)? {
        let name = e.name.to_str().map(str::to_owned);
        match name {
            Some(n) if e.is_dir && n == TAG_DIR && !components.is_empty() => {
                let repository = components.join("/").parse::<Repository>().ok();
                for rec in listing(&e.path)? {
                    let key = repository
                        .as_ref()
                        .filter(|_| rec.is_file)
                        .and_then(|r| tag_key(upstream, r, &rec));
                    match key {
                        Some(k) => visit(rec.into_entry(Item::Tag(k))),
                        None => visit(rec.stray()),
                    }
                }
            }
            // A repository name is at most 255 bytes, so this recursion is bounded.
            Some(n) if e.is_dir && components.len() < 128 => {
                components.push(n);
                walk_tags(upstream, components, &e.path, visit)?;
                components.pop();
            }
            _ => visit(e.stray()),
        }
    }
    Ok(())
}

fn tag_key(upstream: &str, repository: &Repository, rec: &Found) -> Option<TagKey> {
    let (tag, accept) = parse_tag_file_name(rec.name.to_str()?)?;
    Some(TagKey {
        upstream: upstream.to_owned(),
        repository: repository.clone(),
        tag,
        accept,
    })
}

/// The tag and accept key a record's file name spells (`<tag>@<2 hex>`).
pub fn parse_tag_file_name(name: &str) -> Option<(Tag, u8)> {
    let (tag, accept) = name.rsplit_once('@')?;
    if accept.len() != 2 {
        return None;
    }
    Some((tag.parse().ok()?, u8::from_str_radix(accept, 16).ok()?))
}

/// The referrer a marker's file name spells (`<algorithm>-<hex>`).
pub fn parse_marker_name(name: &str) -> Option<Digest> {
    let (alg, hex) = name.split_once('-')?;
    format!("{alg}:{hex}").parse().ok()
}

// Every file below `tmp/`, folders included (an import may stage a tree).
fn walk_staging(dir: &Path, visit: &mut dyn FnMut(Entry)) -> io::Result<()> {
    for e in listing(dir)? {
        if e.is_dir {
            walk_staging(&e.path, visit)?;
        } else {
            visit(e.into_entry(Item::Staged));
        }
    }
    Ok(())
}

/// A directory entry with the metadata of the entry itself (symbolic links not followed).
struct Found {
    name: std::ffi::OsString,
    path: PathBuf,
    is_dir: bool,
    is_file: bool,
    len: u64,
    modified: SystemTime,
}

impl Found {
    fn into_entry(self, item: Item) -> Entry {
        Entry {
            item,
            path: self.path,
            len: self.len,
            modified: self.modified,
        }
    }

    fn stray(self) -> Entry {
        let dir = self.is_dir;
        self.into_entry(Item::Stray { dir })
    }
}

/// The entries of `dir`; none when it does not exist (or is not a folder), and entries that
/// vanish between listing and `lstat` are left out.
fn listing(dir: &Path) -> io::Result<Vec<Found>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if gone(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e?;
        // `DirEntry::metadata` does not follow symbolic links.
        let meta = match e.metadata() {
            Ok(m) => m,
            Err(err) if gone(&err) => continue,
            Err(err) => return Err(err),
        };
        out.push(Found {
            name: e.file_name(),
            path: e.path(),
            is_dir: meta.is_dir(),
            is_file: meta.is_file(),
            len: meta.len(),
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        });
    }
    Ok(out)
}

fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk_all(l: &Layout) -> Vec<Entry> {
        let mut found = Vec::new();
        l.walk(&[Area::Content, Area::Tags, Area::Staging], &mut |e| {
            found.push(e)
        })
        .unwrap();
        found
    }

    fn write(path: &Path, data: &[u8]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }

    #[test]
    fn paths_follow_the_layout() {
        let l = Layout::new(Path::new("/c"));
        let d = Digest::sha256(b"x");
        let hex = d.hex().to_owned();
        assert_eq!(
            l.blob(&d),
            PathBuf::from(format!("/c/blobs/sha256/{}/{hex}", &hex[..2]))
        );
        assert_eq!(
            l.manifest(&d),
            PathBuf::from(format!("/c/manifests/sha256/{}/{hex}", &hex[..2]))
        );
        let key = TagKey {
            upstream: "docker.io".into(),
            repository: "library/alpine".parse().unwrap(),
            tag: "3.20".parse().unwrap(),
            accept: 0x1f,
        };
        assert_eq!(
            l.tag(&key),
            PathBuf::from("/c/tags/docker.io/library/alpine/_tags/3.20@1f")
        );
        assert_eq!(
            parse_tag_file_name("3.20@1f"),
            Some(("3.20".parse().unwrap(), 0x1f))
        );
        assert_eq!(parse_tag_file_name("3.20"), None);
        let r = Digest::sha256(b"sbom");
        let marker = l.referrer_marker(&d, &r);
        assert_eq!(
            marker,
            PathBuf::from(format!("/c/referrers/sha256/{hex}/sha256-{}", r.hex()))
        );
        let name = marker.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_marker_name(name), Some(r));
        assert_eq!(parse_marker_name("sha256:00"), None);
        assert_eq!(parse_marker_name("md5-abc"), None);
        assert_eq!(parse_tag_file_name("3.20@1"), None);
        assert_eq!(parse_tag_file_name("-bad@1f"), None);
    }

    /// Every entry the layout has is found with its kind, digest or tag and size; every piece
    /// of junk is reported as stray, never as an entry and never an error.
    #[test]
    fn walk_finds_entries_and_reports_junk() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path());
        for f in l.folders() {
            std::fs::create_dir_all(f).unwrap();
        }
        let blob = Digest::sha256(b"blob");
        let manifest = Digest::sha256(b"manifest");
        write(&l.blob(&blob), b"blob");
        write(&l.manifest(&manifest), b"t\n{}");
        let key = TagKey {
            upstream: "docker.io".into(),
            repository: "library/alpine".parse().unwrap(),
            tag: "3.20".parse().unwrap(),
            accept: 3,
        };
        write(&l.tag(&key), b"record");
        write(&l.staging_dir().join("x.1.0.part"), b"half");
        write(&l.staging_dir().join("import/deep.part"), b"hal");

        let hex = blob.hex();
        let fan = dir.path().join("blobs/sha256").join(&hex[..2]);
        let junk = [
            // Stray names at each level.
            dir.path().join("blobs/README"),
            dir.path().join("blobs/sha256/notes.txt"),
            fan.join("notes.txt"),
            // A partial staged file left beside the entry.
            fan.join(format!("{hex}.part")),
            // Wrong digest lengths, a digest in the wrong fan folder, upper-case hex.
            fan.join(&hex[..63]),
            fan.join(format!("{hex}0")),
            dir.path().join("blobs/sha256/zz").join(hex),
            fan.join(hex.to_uppercase()),
            // An unknown algorithm.
            dir.path().join("manifests/md5/ab/abcdef"),
            // Tag records with bad names or in the wrong place.
            dir.path().join("tags/docker.io/library/alpine/_tags/3.20"),
            dir.path().join("tags/docker.io/library/alpine/_tags/-x@03"),
            dir.path().join("tags/docker.io/library/alpine/_tags/x@zz"),
            dir.path().join("tags/docker.io/library/alpine/stray"),
            dir.path().join("tags/docker.io/Bad/_tags/x@03"),
            dir.path().join("tags/docker.io/_tags/x@03"),
            dir.path().join("tags/top-level-file"),
        ];
        for j in &junk {
            write(j, b"junk");
        }
        // A folder where a content file belongs, and a symbolic link to the root.
        let fake = Digest::sha256(b"fake");
        std::fs::create_dir_all(l.blob(&fake)).unwrap();
        std::os::unix::fs::symlink(dir.path(), fan.join("loop")).unwrap();

        let found = walk_all(&l);
        let items: Vec<&Item> = found.iter().map(|e| &e.item).collect();
        assert!(items.contains(&&Item::Content((EntryKind::Blob, blob.clone()))));
        assert!(items.contains(&&Item::Content((EntryKind::Manifest, manifest))));
        assert!(items.contains(&&Item::Tag(key)));
        let content: Vec<&Entry> = found
            .iter()
            .filter(|e| matches!(e.item, Item::Content(_)))
            .collect();
        assert_eq!(content.len(), 2, "{content:?}");
        let b = content
            .iter()
            .find(|e| e.item == Item::Content((EntryKind::Blob, blob.clone())))
            .unwrap();
        assert_eq!((b.len, b.path.clone()), (4, l.blob(&blob)));
        let tags = found
            .iter()
            .filter(|e| matches!(e.item, Item::Tag(_)))
            .count();
        assert_eq!(tags, 1);
        let staged: Vec<u64> = found
            .iter()
            .filter(|e| e.item == Item::Staged)
            .map(|e| e.len)
            .collect();
        assert_eq!(staged.len(), 2);
        assert_eq!(staged.iter().sum::<u64>(), 7);
        let stray: Vec<&Path> = found
            .iter()
            .filter(|e| matches!(e.item, Item::Stray { .. }))
            .map(|e| e.path.as_path())
            .collect();
        for j in &junk {
            // Junk inside a stray folder is reported by that folder (not walked into).
            let reported = stray.iter().any(|s| j.starts_with(s));
            assert!(reported, "{} not reported: {stray:?}", j.display());
        }
        assert!(stray.contains(&l.blob(&fake).as_path()));
        assert!(stray.contains(&fan.join("loop").as_path()));
    }

    #[test]
    fn a_missing_folder_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(&dir.path().join("nothing"));
        assert!(!l.exists());
        assert!(walk_all(&l).is_empty());
    }
}

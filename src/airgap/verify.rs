//! Content checked while it is copied: a reader that hashes what passes through it, staging
//! a copy that is kept only when it matches its digest (and removing staged copies), whole
//! small files written through a temp file, and bounded reads of small files.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use super::{AirgapError, io_error};

use crate::cache::hasher::Hasher;
use crate::reference::Digest;

/// Hashes and counts everything read through it.
pub struct Hashing<R> {
    inner: R,
    hasher: Hasher,
    len: u64,
}

impl<R: Read> Hashing<R> {
    /// Reads `inner`, hashing with the algorithm of `like`.
    pub fn new(inner: R, like: &Digest) -> Self {
        Hashing {
            inner,
            hasher: Hasher::new(like.algorithm()),
            len: 0,
        }
    }

    /// The length when everything read hashes to `want` (and is `want_len` bytes long, when
    /// given); otherwise what is wrong, in words.
    pub fn check(self, want: &Digest, want_len: Option<u64>) -> Result<u64, String> {
        let actual = self.hasher.finish();
        if actual != *want {
            return Err(format!("{want}: content hashes to {actual}"));
        }
        match want_len {
            Some(l) if l != self.len => Err(format!("{want}: {} bytes, listed as {l}", self.len)),
            _ => Ok(self.len),
        }
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// Why content was not staged.
#[derive(Debug)]
pub enum StageError {
    /// Reading or writing failed.
    Io(io::Error),
    /// The content is not what its digest says.
    Mismatch(String),
}

/// Copies `src` to a new file `dest`, fsynced, and keeps it only when it hashes to `want` (and
/// has `want_len` bytes, when given). Nothing is left at `dest` on failure.
pub fn stage(
    src: impl Read,
    dest: &Path,
    want: &Digest,
    want_len: Option<u64>,
) -> Result<u64, StageError> {
    let result = (|| -> Result<u64, StageError> {
        let mut reader = Hashing::new(src, want);
        let mut out = io::BufWriter::with_capacity(1 << 20, File::create(dest)?);
        io::copy(&mut reader, &mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        match reader.check(want, want_len) {
            Ok(n) => {
                file.sync_all()?;
                Ok(n)
            }
            Err(why) => Err(StageError::Mismatch(why)),
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    result
}

impl From<io::Error> for StageError {
    fn from(e: io::Error) -> Self {
        StageError::Io(e)
    }
}

/// Writes `data` to `dest` through a temp file in the same folder, fsynced and renamed.
pub fn write_file(dest: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = dest.with_file_name(format!(
        ".{}.partial",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A verified copy waiting in the cache's `tmp/`.
#[derive(Debug)]
pub struct Staged {
    /// The file in `tmp/`.
    pub path: PathBuf,
    /// Its length.
    pub len: u64,
}

/// Removes staged files that will not be committed.
pub fn remove_staged(staged: impl IntoIterator<Item = Staged>) {
    for s in staged {
        let _ = std::fs::remove_file(&s.path);
    }
}

/// Largest `oci-layout` or `index.json` read.
const MAX_SMALL_FILE: u64 = 16 << 20;

/// Reads a small file whole, refusing one larger than `MAX_SMALL_FILE`.
pub fn read_small(mut r: impl Read, what: &str) -> Result<Vec<u8>, AirgapError> {
    let mut buf = Vec::new();
    (&mut r)
        .take(MAX_SMALL_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(io_error(format!("reading {what}")))?;
    if buf.len() as u64 > MAX_SMALL_FILE {
        return Err(AirgapError::Other(format!("{what} is too large")));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_keeps_only_matching_content() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("staged");
        let d = Digest::sha256(b"hello");
        assert_eq!(stage(&b"hello"[..], &dest, &d, Some(5)).unwrap(), 5);
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        std::fs::remove_file(&dest).unwrap();
        match stage(&b"hellp"[..], &dest, &d, Some(5)) {
            Err(StageError::Mismatch(why)) => assert!(why.contains("hashes to"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(!dest.exists(), "nothing partial is left");
        match stage(&b"hello"[..], &dest, &d, Some(6)) {
            Err(StageError::Mismatch(why)) => assert!(why.contains("listed as 6"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(!dest.exists());
    }

    #[test]
    fn files_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("index.json");
        write_file(&dest, b"one").unwrap();
        write_file(&dest, b"two").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

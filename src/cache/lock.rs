//! Advisory locks (flock(2)) on a cache folder that keep a command from working on a cache
//! a server is using in a way that is unsafe. The kernel releases a lock when its holder
//! exits, however it exits (kill -9 included), so a stale lock never blocks anyone.
//!
//! - Every `regcache` server holds `serve.lock` shared; one that fetches from upstreams (not
//!   offline) also holds `fetch.lock` shared. Servers share a folder freely.
//! - `prefetch` (which opens the cache as a server does, clearing `tmp/`) holds both
//!   exclusively: it refuses to run beside any server.
//! - `import` holds `fetch.lock` exclusively: it may run beside an offline server, not
//!   beside one that fetches into the folder.
//! - `gc`, `ls`, `stats` and `export` take no lock: they are safe beside a server.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};

/// Held by every server.
pub const SERVE_LOCK: &str = "serve.lock";
/// Held by every server that fetches from upstreams.
pub const FETCH_LOCK: &str = "fetch.lock";

/// Who may hold what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// A server; `fetches` unless it is offline.
    Server {
        /// Whether it fetches from upstreams.
        fetches: bool,
    },
    /// `regcache prefetch`: no server at all beside it.
    Prefetch,
    /// `regcache import`: no fetching server beside it.
    Import,
}

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds a conflicting lock.
    #[error("{0}")]
    Held(String),
    /// The lock file could not be opened or locked.
    #[error("cannot lock {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Locks held until dropped (or the process ends).
#[derive(Debug)]
pub struct CacheLock {
    _files: Vec<File>,
}

impl CacheLock {
    /// Takes the locks `holder` needs on the cache folder `root` (a server creates it if
    /// missing), without waiting: a conflicting holder is an error that says who and what
    /// to do.
    pub fn take(root: &Path, holder: Holder) -> Result<CacheLock, LockError> {
        // A folder that does not exist yet is used by no server (a server creates it before
        // anything else): a command leaves nothing in it then, not even a lock file, so that
        // a refused import of a new cache leaves the folder as it found it.
        if !matches!(holder, Holder::Server { .. }) && !root.exists() {
            return Ok(CacheLock { _files: Vec::new() });
        }
        std::fs::create_dir_all(root).map_err(|source| LockError::Io {
            path: root.to_owned(),
            source,
        })?;
        let (exclusive, names): (bool, &[&str]) = match holder {
            Holder::Server { fetches: true } => (false, &[SERVE_LOCK, FETCH_LOCK]),
            Holder::Server { fetches: false } => (false, &[SERVE_LOCK]),
            Holder::Prefetch => (true, &[SERVE_LOCK, FETCH_LOCK]),
            Holder::Import => (true, &[FETCH_LOCK]),
        };
        let mut files = Vec::new();
        for name in names {
            let path = root.join(name);
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|source| LockError::Io {
                    path: path.clone(),
                    source,
                })?;
            let op = if exclusive {
                FlockOperation::NonBlockingLockExclusive
            } else {
                FlockOperation::NonBlockingLockShared
            };
            match flock(&file, op) {
                Ok(()) => files.push(file),
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(LockError::Held(held_message(root, holder, name)));
                }
                Err(e) => {
                    return Err(LockError::Io {
                        path,
                        source: e.into(),
                    });
                }
            }
        }
        Ok(CacheLock { _files: files })
    }
}

fn held_message(root: &Path, holder: Holder, name: &str) -> String {
    let root = root.display();
    match holder {
        Holder::Server { .. } => format!(
            "a `regcache prefetch` or `regcache import` is working on the cache folder {root} \
             (it holds {name}); start the server when it has finished"
        ),
        Holder::Prefetch => format!(
            "a regcache server is using the cache folder {root} (it holds {name}); warming it \
             from here would disturb its downloads. Warm it through the server instead: \
             `regcache prefetch --server http://HOST:PORT IMAGE...`, or stop the server first"
        ),
        Holder::Import => format!(
            "a regcache server that fetches from upstreams is using the cache folder {root} \
             (it holds {name}); import while it is stopped or runs with --offline"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_share_commands_refuse_and_a_dropped_lock_frees_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let a = CacheLock::take(&root, Holder::Server { fetches: true }).unwrap();
        let b = CacheLock::take(&root, Holder::Server { fetches: true }).unwrap();
        let e = CacheLock::take(&root, Holder::Prefetch).unwrap_err();
        assert!(e.to_string().contains("--server"), "{e}");
        assert!(matches!(
            CacheLock::take(&root, Holder::Import),
            Err(LockError::Held(_))
        ));
        drop((a, b));
        // An offline server lets an import in, not a prefetch.
        let offline = CacheLock::take(&root, Holder::Server { fetches: false }).unwrap();
        let import = CacheLock::take(&root, Holder::Import).unwrap();
        assert!(CacheLock::take(&root, Holder::Prefetch).is_err());
        assert!(CacheLock::take(&root, Holder::Server { fetches: true }).is_err());
        drop((offline, import));
        let prefetch = CacheLock::take(&root, Holder::Prefetch).unwrap();
        let e = CacheLock::take(&root, Holder::Server { fetches: false }).unwrap_err();
        assert!(e.to_string().contains("prefetch"), "{e}");
        drop(prefetch);
        CacheLock::take(&root, Holder::Server { fetches: false }).unwrap();

        // A command on a folder that does not exist creates nothing.
        let fresh = dir.path().join("fresh");
        CacheLock::take(&fresh, Holder::Import).unwrap();
        assert!(!fresh.exists());
    }
}

//! What the air-gap commands print: a live line on stderr while an image downloads (only
//! when stderr is a terminal), and one plain result line per image.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use crate::units::human_bytes;

/// How often the live line is redrawn at most.
const REDRAW: Duration = Duration::from_millis(100);

/// Progress of one image's blobs. Updated from the blob downloads running concurrently, so
/// the counters are atomics.
pub struct Progress {
    live: bool,
    label: String,
    // Set once the total is known (an import learns the number of blobs in a tar only at
    // its end, so the tar pass counts against the tar's size).
    blobs_known: AtomicBool,
    blobs_total: AtomicUsize,
    bytes_total: AtomicU64,
    blobs_done: AtomicUsize,
    bytes_done: AtomicU64,
    // When the line was last drawn. Held only to compare and store an instant, never across
    // an `.await`.
    drawn: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.line())
    }
}

impl Progress {
    /// Progress of `label` over `blobs_total` blobs of `bytes_total` bytes; live when stderr is
    /// a terminal.
    pub fn new(label: &str, blobs_total: usize, bytes_total: u64) -> Self {
        Progress {
            live: std::io::stderr().is_terminal(),
            label: label.to_owned(),
            blobs_known: AtomicBool::new(true),
            blobs_total: AtomicUsize::new(blobs_total),
            bytes_total: AtomicU64::new(bytes_total),
            blobs_done: AtomicUsize::new(0),
            bytes_done: AtomicU64::new(0),
            drawn: Mutex::new(None),
        }
    }

    /// Progress of `label` over `bytes_total` bytes holding a number of blobs not known yet.
    pub fn of_bytes(label: &str, bytes_total: u64) -> Self {
        let p = Progress::new(label, 0, bytes_total);
        p.blobs_known.store(false, Ordering::Relaxed);
        p
    }

    /// Starts counting again over `blobs_total` blobs of `bytes_total` bytes (the next pass).
    pub fn restart(&self, blobs_total: usize, bytes_total: u64) {
        self.blobs_total.store(blobs_total, Ordering::Relaxed);
        self.bytes_total.store(bytes_total, Ordering::Relaxed);
        self.blobs_done.store(0, Ordering::Relaxed);
        self.bytes_done.store(0, Ordering::Relaxed);
        self.blobs_known.store(true, Ordering::Relaxed);
        self.draw(true);
    }

    /// `n` more bytes arrived (or were found cached).
    pub fn bytes(&self, n: u64) {
        self.bytes_done.fetch_add(n, Ordering::Relaxed);
        self.draw(false);
    }

    /// One more blob is done.
    pub fn blob_done(&self) {
        self.blobs_done.fetch_add(1, Ordering::Relaxed);
        self.draw(true);
    }

    /// The current state as text.
    pub fn line(&self) -> String {
        let done = self.blobs_done.load(Ordering::Relaxed);
        let blobs = if self.blobs_known.load(Ordering::Relaxed) {
            format!("blobs {done}/{}", self.blobs_total.load(Ordering::Relaxed))
        } else {
            format!("{} read", crate::units::count(done as u64, "blob"))
        };
        format!(
            "{}: {blobs}, {} of {}",
            self.label,
            human_bytes(self.bytes_done.load(Ordering::Relaxed)),
            human_bytes(self.bytes_total.load(Ordering::Relaxed))
        )
    }

    fn draw(&self, force: bool) {
        if !self.live {
            return;
        }
        {
            let mut drawn = self.drawn.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if !force && drawn.is_some_and(|t| now.duration_since(t) < REDRAW) {
                return;
            }
            *drawn = Some(now);
        }
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{}", self.line());
        let _ = err.flush();
    }

    /// Clears the live line so a result line can take its place.
    pub fn clear(&self) {
        if self.live {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536 * 1024), "1.5 MiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }

    #[test]
    fn counts() {
        let p = Progress::new("app:1", 3, 2048);
        p.bytes(1024);
        p.blob_done();
        assert_eq!(p.line(), "app:1: blobs 1/3, 1.0 KiB of 2.0 KiB");
        let t = Progress::of_bytes("import", 4096);
        t.bytes(1024);
        t.blob_done();
        assert_eq!(t.line(), "import: 1 blob read, 1.0 KiB of 4.0 KiB");
        t.restart(2, 10);
        assert_eq!(t.line(), "import: blobs 0/2, 0 B of 10 B");
    }
}

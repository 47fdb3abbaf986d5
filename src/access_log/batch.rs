//! The serving log's writer: lines from every thread gather in one buffer that a thread of
//! its own writes out in one system call per batch, woken once per batch rather than once
//! per line (a channel send per access line woke that thread for nearly every request: a
//! futex wake, a context switch and the thread's spinning). Nothing is dropped: past
//! [`HARD`] bytes queued a line waits for the writer.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

use crate::flight::lock;

/// Queued bytes that wake the writer before its interval is up.
const SOFT: usize = 64 * 1024;
/// Queued bytes past which a line waits until the writer has taken the batch.
pub const HARD: usize = 4 * 1024 * 1024;
/// Longest a line waits in the buffer: the first line of a batch wakes the writer, which
/// gathers for this long (or until [`SOFT`] bytes) before it writes.
pub const INTERVAL: Duration = Duration::from_millis(50);

struct Queue {
    buf: Vec<u8>,
    /// Lines waiting for room.
    waiting: usize,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// The writer waits here for a first line, or for [`SOFT`] bytes.
    more: Condvar,
    /// Lines wait here for room.
    room: Condvar,
}

/// Where log lines go: cheap to clone, one per layer.
#[derive(Clone)]
pub struct Batched {
    shared: Arc<Shared>,
}

/// The writing thread; dropping it writes what is queued and ends the thread.
pub struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A writer for lines and the thread (named `name`) that writes them to `out`.
pub fn batched<W: Write + Send + 'static>(out: W, name: &str) -> io::Result<(Batched, Flusher)> {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            buf: Vec::with_capacity(SOFT),
            waiting: 0,
            closed: false,
        }),
        more: Condvar::new(),
        room: Condvar::new(),
    });
    let inner = shared.clone();
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || write_batches(&inner, out))?;
    Ok((
        Batched {
            shared: shared.clone(),
        },
        Flusher {
            shared,
            thread: Some(thread),
        },
    ))
}

/// The writing thread's loop: wait for a first line, gather for [`INTERVAL`] or until
/// [`SOFT`] bytes, swap the buffer out and write it; after `closed`, write what is left.
fn write_batches<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::with_capacity(SOFT);
    loop {
        let mut queue = lock(&shared.queue);
        while queue.buf.is_empty() && !queue.closed {
            queue = shared.more.wait(queue).unwrap_or_else(|e| e.into_inner());
        }
        if queue.buf.is_empty() {
            return;
        }
        if !queue.closed && queue.buf.len() < SOFT {
            queue = shared
                .more
                .wait_timeout_while(queue, INTERVAL, |q| q.buf.len() < SOFT && !q.closed)
                .map(|(q, _)| q)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        std::mem::swap(&mut queue.buf, &mut batch);
        let waiting = queue.waiting > 0;
        drop(queue);
        if waiting {
            shared.room.notify_all();
        }
        // A log that cannot be written (a full disk, a closed pipe) is not a reason to stop
        // serving; the lines are lost, as they would be with any other writer.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
    }
}

impl Batched {
    /// Queues `line` (whole: lines from other threads never interleave with it).
    fn queue(&self, line: &[u8]) {
        let shared = &*self.shared;
        let mut queue = lock(&shared.queue);
        while queue.buf.len() >= HARD && !queue.closed {
            queue.waiting += 1;
            queue = shared.room.wait(queue).unwrap_or_else(|e| e.into_inner());
            queue.waiting -= 1;
        }
        let before = queue.buf.len();
        queue.buf.extend_from_slice(line);
        let after = queue.buf.len();
        drop(queue);
        // The writer sleeps only on an empty buffer, or while gathering below SOFT.
        if before == 0 || (before < SOFT && after >= SOFT) {
            shared.more.notify_one();
        }
    }
}

/// One event's writer (the formatters write each line with one `write_all`).
pub struct Line<'a>(&'a Batched);

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.queue(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Batched {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line(self)
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.more.notify_one();
        self.shared.room.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// An output that hands each write to the test, and may hold its first write until told.
    struct Out {
        writes: mpsc::Sender<Vec<u8>>,
        gate: Option<mpsc::Receiver<()>>,
    }

    impl Write for Out {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(gate) = self.gate.take() {
                let _ = gate.recv();
            }
            let _ = self.writes.send(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn out(gated: bool) -> (Out, mpsc::Receiver<Vec<u8>>, Option<mpsc::Sender<()>>) {
        let (tx, rx) = mpsc::channel();
        let (open, gate) = if gated {
            let (o, g) = mpsc::channel();
            (Some(o), Some(g))
        } else {
            (None, None)
        };
        (Out { writes: tx, gate }, rx, open)
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_and_in_each_threads_order() {
        let (o, writes, _) = out(false);
        let (log, flusher) = batched(o, "test-log").expect("thread");
        std::thread::scope(|s| {
            for t in 0..4 {
                let log = log.clone();
                s.spawn(move || {
                    for i in 0..5_000 {
                        let line = format!("thread {t} line {i} {}\n", "x".repeat(i % 90));
                        log.make_writer().write_all(line.as_bytes()).expect("write");
                    }
                });
            }
        });
        drop(flusher);
        let text: Vec<u8> = writes.try_iter().flatten().collect();
        let text = String::from_utf8(text).expect("utf-8");
        let mut next = [0usize; 4];
        for line in text.lines() {
            let words: Vec<&str> = line.split(' ').collect();
            let t: usize = words[1].parse().expect("thread");
            let i: usize = words[3].parse().expect("line");
            assert_eq!(i, next[t], "thread {t}'s lines out of order");
            assert_eq!(words.get(4).map_or(0, |x| x.len()), i % 90, "a torn line");
            next[t] += 1;
        }
        assert_eq!(next, [5_000; 4]);
    }

    #[test]
    fn a_line_is_written_without_waiting_for_the_end() {
        let (o, writes, _) = out(false);
        let (log, _flusher) = batched(o, "test-log").expect("thread");
        log.make_writer().write_all(b"one\n").expect("write");
        // Bounded only so that a broken writer fails the test instead of hanging it.
        let got = writes
            .recv_timeout(Duration::from_secs(30))
            .expect("the line was written while the writer lives");
        assert_eq!(got, b"one\n");
    }

    #[test]
    fn past_the_bound_lines_wait_for_the_writer_and_none_is_lost() {
        let (o, writes, open) = out(true);
        let (log, flusher) = batched(o, "test-log").expect("thread");
        // Declared after the writer, so that a failing test drops it first and the held
        // write ends instead of hanging the writer's join.
        let open = open.expect("gated");
        let line = vec![b'y'; 1023]
            .into_iter()
            .chain([b'\n'])
            .collect::<Vec<_>>();
        // The writer holds its first batch (up to SOFT bytes); twice HARD more must wait.
        log.make_writer().write_all(&line).expect("write");
        let total = 2 * HARD / line.len();
        let producer = {
            let log = log.clone();
            let line = line.clone();
            std::thread::spawn(move || {
                for _ in 0..total {
                    log.make_writer().write_all(&line).expect("write");
                }
            })
        };
        // The producer stops at the bound while the output is held...
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let queue = lock(&log.shared.queue);
            if queue.waiting == 1 {
                assert!(queue.buf.len() >= HARD, "waits below the bound");
                assert!(queue.buf.len() < HARD + line.len(), "queued past the bound");
                break;
            }
            drop(queue);
            assert!(
                std::time::Instant::now() < deadline,
                "the producer never waited"
            );
            std::thread::yield_now();
        }
        // ...and goes on once the output takes the batches.
        open.send(()).expect("gate");
        producer.join().expect("producer");
        drop(flusher);
        let bytes: usize = writes.try_iter().map(|w| w.len()).sum();
        assert_eq!(bytes, (total + 1) * line.len());
    }
}

//! Connection lanes: one single-threaded runtime per core, each serving the connections the
//! accept loop hands it for their whole life.
//!
//! A connection's reads, answers and the tasks its requests spawn stay on one thread, as in
//! nginx's worker processes: no work stealing, no waking of another worker and far less
//! bouncing of shared cache lines between cores than on a work-stealing runtime. Measured on
//! the 2-core machine (cached manifest by tag, `wrk -t2 -c32`, CPU time per request from
//! `/proc`, three runs each): 16.2–16.8 µs per request on the multi-threaded runtime,
//! 12.8–15.3 µs in lanes.
//! Connections are dealt to the lanes in turn; the process's main runtime keeps the accept
//! loop and the background work started outside a request.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// The lanes; dropping them stops every lane (tasks still on a lane are dropped with it).
pub struct Lanes {
    lanes: Vec<Lane>,
    next: AtomicUsize,
}

struct Lane {
    handle: Handle,
    // Dropped (or sent) to end the lane's thread.
    _stop: oneshot::Sender<()>,
}

impl Lanes {
    /// One lane per core the process may run on.
    pub fn per_core() -> io::Result<Lanes> {
        Lanes::start(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Starts `n` lanes (at least one), each a thread named `regcache-lane-<i>`.
    pub fn start(n: usize) -> io::Result<Lanes> {
        let lanes = (0..n.max(1))
            .map(|i| {
                let rt = Builder::new_current_thread()
                    .enable_all()
                    .thread_name(format!("lane-{i}-blocking"))
                    .build()?;
                let handle = rt.handle().clone();
                let (stop, stopped) = oneshot::channel::<()>();
                std::thread::Builder::new()
                    .name(format!("regcache-lane-{i}"))
                    .spawn(move || {
                        rt.block_on(async {
                            let _ = stopped.await;
                        });
                    })?;
                Ok(Lane {
                    handle,
                    _stop: stop,
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Lanes {
            lanes,
            next: AtomicUsize::new(0),
        })
    }

    /// Moves `stream` to the next lane and runs `serve` with it there. A stream that cannot
    /// move (its socket refused to leave the accepting runtime) is closed.
    pub fn hand<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "connection could not move to a lane; closed");
                return;
            }
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        self.lanes[i].handle.spawn(async move {
            // Registered with this lane's own I/O driver, so its readiness wakes this thread.
            match TcpStream::from_std(std) {
                Ok(stream) => serve(stream).await,
                Err(e) => {
                    tracing::debug!(error = %e, "connection could not join its lane; closed")
                }
            }
        });
    }
}

//! Connections served by hyper (TLS, HTTP/2, and plain HTTP/1.1 the fast loop handed over):
//! the `[limits]` settings, the idle timer, and the scanner that notes each HTTP/1 request
//! head with the one head reader as hyper reads it, so the edge step can check its framing.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Method, Request, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::app::App;
use crate::body;
use crate::config::LimitsConfig;
use crate::error::Error;
use crate::router::RouteError;
use crate::routes::admin::{self, Endpoint};
use crate::server::Limits;
use crate::server::edge;
use crate::server::http1::{self, HeadNote, Read};

/// The HTTP/1 and HTTP/2 settings from `[limits]`.
pub(super) fn builder(limits: &LimitsConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // The request head must fit in the read buffer (431 otherwise); validation keeps the
    // size within what hyper allows (at least 8 KiB).
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout.0)
        .max_buf_size(usize::try_from(limits.max_header_bytes.0).unwrap_or(usize::MAX))
        .max_headers(limits.max_headers);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes.0).unwrap_or(u32::MAX));
    b
}

/// Serves one registry connection with hyper until the client closes, it idles past the
/// limits, or `stop` turns `true` (then open requests finish first).
pub(super) async fn serve<I>(
    io: I,
    app: Arc<App>,
    builder: &auto::Builder<TokioExecutor>,
    peer: SocketAddr,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let notes = Notes::default();
    let activity = Activity::new();
    let service = {
        let (notes, activity) = (notes.clone(), activity.clone());
        service_fn(move |req: Request<Incoming>| {
            // Claimed here, in the order hyper parsed the requests.
            let busy = activity.begin();
            let note = if req.version() <= Version::HTTP_11 {
                notes.next()
            } else {
                None
            };
            let app = app.clone();
            async move {
                let resp = edge::answer(&app, req, note, peer).await.into_response();
                // The request counts as in flight until its body is sent or dropped.
                Ok::<_, Infallible>(resp.map(|b| body::hold(b, busy)))
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(Scanned::new(io, notes, limits)), service);
    tokio::pin!(conn);
    let (mut closing, mut stopping) = (false, false);
    let mut idle_from = Instant::now();
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
                return;
            }
            _ = activity.idle(limits.head_timeout, limits.idle_timeout, idle_from) => {
                if closing {
                    // Asked to close a while ago and still nothing in flight.
                    return;
                }
                tracing::debug!(%peer, "closing idle connection");
                conn.as_mut().graceful_shutdown();
                closing = true;
                idle_from = Instant::now();
            }
            _ = stop.wait_for(|stop| *stop), if !stopping => {
                conn.as_mut().graceful_shutdown();
                stopping = true;
            }
        }
    }
}

/// The settings of the operator listener: a client that never finishes its request head
/// is dropped.
pub(super) fn admin_builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    b
}

/// Serves the operator endpoints on one connection of the admin listener, in a task of its
/// own that ends when the client closes or on shutdown; any other path is a `404`.
pub(super) fn spawn_admin(
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    stream: TcpStream,
    peer: SocketAddr,
    app: Arc<App>,
) {
    let service = service_fn(move |req: Request<Incoming>| {
        let app = app.clone();
        async move {
            let head = req.method() == Method::HEAD;
            let resp = match Endpoint::parse(req.method(), req.uri().path()) {
                Some(e) => admin::answer(&app, e, head).await,
                None => Error::Route(RouteError::NotFound).into_response(head),
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = graceful.watch(
        builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned(),
    );
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, %peer, "admin connection ended with an error");
        }
    });
}

/// Requests in flight on one connection, how many have started, and when either last changed.
#[derive(Debug, Clone, Copy)]
struct Load {
    in_flight: usize,
    started: u64,
    since: Instant,
}

/// A connection's [`Load`], published on a `watch` so that the idle timer restarts whenever a
/// request starts or ends. Updates are `send_modify` calls: no lock is held across an `.await`.
struct Activity(watch::Sender<Load>);

/// One request counted as in flight until dropped.
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity(watch::Sender::new(Load {
            in_flight: 0,
            started: 0,
            since: Instant::now(),
        })))
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.0.send_modify(|l| {
            l.in_flight += 1;
            l.started += 1;
            l.since = Instant::now();
        });
        Busy(self.clone())
    }

    /// Resolves once no request has been in flight for `idle` (`first` before any request
    /// started), counted from `from` at the earliest.
    async fn idle(&self, first: Duration, idle: Duration, from: Instant) {
        let mut rx = self.0.subscribe();
        loop {
            let load = *rx.borrow_and_update();
            if load.in_flight == 0 {
                let limit = if load.started == 0 { first } else { idle };
                tokio::select! {
                    _ = tokio::time::sleep_until(load.since.max(from) + limit) => return,
                    _ = rx.changed() => {}
                }
            } else {
                // The sender lives in `self`, so this only returns on a change.
                let _ = rx.changed().await;
            }
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.0.send_modify(|l| {
            l.in_flight -= 1;
            l.since = Instant::now();
        });
    }
}

/// Notes of the heads scanned on one connection and not yet claimed by a request. Shared by
/// the stream (which pushes) and the service (which pops); a std lock held for one push or
/// pop, never across an `.await`.
#[derive(Debug, Clone, Default)]
struct Notes(Arc<Mutex<VecDeque<HeadNote>>>);

impl Notes {
    /// The note of the next request head, in arrival order.
    fn next(&self) -> Option<HeadNote> {
        // Pushes and pops are single statements: a poisoned lock still holds whole notes.
        crate::flight::lock(&self.0).pop_front()
    }

    fn push(&self, note: HeadNote) {
        crate::flight::lock(&self.0).push_back(note);
    }
}

/// A connection's byte stream whose HTTP/1 request heads are noted as hyper reads them.
/// Reads pass through unchanged. The scanner skips bodies of known length; after a chunked
/// body (or a length it cannot trust) it stops and marks that head `last`, so the
/// connection closes after its answer and every request served on a kept-alive connection
/// was scanned.
struct Scanned<T> {
    io: T,
    scanner: Scanner,
}

impl<T> Scanned<T> {
    fn new(io: T, notes: Notes, limits: Limits) -> Self {
        Scanned {
            io,
            scanner: Scanner::new(notes, limits.max_head, limits.max_headers),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Scanned<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        this.scanner.feed(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Scanned<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Follows the request heads and bodies of one HTTP/1 byte stream.
#[derive(Debug)]
struct Scanner {
    state: State,
    notes: Notes,
    max_head: usize,
    max_headers: usize,
}

#[derive(Debug)]
enum State {
    /// Before or inside a request head: the bytes of a head that came in pieces.
    Head(Vec<u8>),
    /// Inside a body of known length: bytes left to skip.
    Body(u64),
    /// HTTP/2, a head hyper refuses, or after a body the scanner does not follow: nothing
    /// more is scanned.
    Off,
}

/// Where one read ended for the scanner.
enum Step {
    Partial,
    Off,
    /// A complete head of `len` bytes.
    Head(usize, HeadNote),
}

impl Scanner {
    fn new(notes: Notes, max_head: usize, max_headers: usize) -> Self {
        Scanner {
            state: State::Head(Vec::new()),
            notes,
            max_head,
            max_headers,
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let kept = match &mut self.state {
                State::Off => return,
                State::Body(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = State::Head(Vec::new());
                    }
                    continue;
                }
                State::Head(kept) => kept,
            };
            let before = kept.len();
            // A head ends with a line feed: until one arrives there is nothing to read.
            let newline = data.contains(&b'\n');
            // The usual case, a whole head in one read: read in place, nothing copied.
            let in_place = before == 0 && newline;
            let step = if in_place {
                read(data, self.max_headers)
            } else {
                kept.extend_from_slice(data);
                if newline {
                    read(kept, self.max_headers)
                } else {
                    Step::Partial
                }
            };
            match step {
                Step::Partial => {
                    if in_place {
                        kept.extend_from_slice(data);
                    }
                    // Longer than hyper takes: it answers 431 and closes.
                    if kept.len() >= self.max_head {
                        self.state = State::Off;
                    }
                    return;
                }
                Step::Off => {
                    self.state = State::Off;
                    return;
                }
                Step::Head(len, mut note) => {
                    kept.clear();
                    data = data.get(len.saturating_sub(before)..).unwrap_or_default();
                    match note.body_len() {
                        Some(0) => {}
                        Some(n) => self.state = State::Body(n),
                        None => {
                            note.last = true;
                            self.state = State::Off;
                        }
                    }
                    self.notes.push(note);
                }
            }
        }
    }
}

/// One head read by the one reader, reduced to what the scanner keeps.
fn read(buf: &[u8], max_headers: usize) -> Step {
    http1::read_head(buf, max_headers, |r| match r {
        Read::Partial => Step::Partial,
        // hyper reads heads with the same parser and settings: it refuses this one, or it
        // is the HTTP/2 preface.
        Read::Unreadable => Step::Off,
        Read::Head(h) => Step::Head(h.len, h.note),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::http1::Length;

    /// Notes of `input` fed in pieces of `step` bytes.
    fn notes_of(input: &[u8], step: usize) -> Vec<HeadNote> {
        let notes = Notes::default();
        let mut s = Scanner::new(notes.clone(), 64 << 10, 100);
        for piece in input.chunks(step) {
            s.feed(piece);
        }
        std::iter::from_fn(|| notes.next()).collect()
    }

    fn each_step(input: &[u8]) -> Vec<HeadNote> {
        let whole = notes_of(input, input.len().max(1));
        for step in [1, 2, 3, 7, 64] {
            assert_eq!(notes_of(input, step), whole, "step {step}");
        }
        whole
    }

    #[test]
    fn heads_and_bodies_of_known_length_are_followed() {
        let input = b"\r\nGET /v2/ HTTP/1.1\r\nHost: a\r\n\r\n\
            PUT /x HTTP/1.1\r\nHost: a\r\ncontent-length:  16 \r\n\r\nGET / HTTP/1.1\r\n\
            HEAD /y HTTP/1.1\r\nHost: a\r\n\r\n";
        let cl = HeadNote {
            length: Length::Known(16),
            ..HeadNote::PLAIN
        };
        // The body "GET / HTTP/1.1\r\n"-looking bytes are skipped, not taken for a head.
        assert_eq!(each_step(input), vec![HeadNote::PLAIN, cl, HeadNote::PLAIN]);
    }

    #[test]
    fn ambiguous_heads_are_noted() {
        let both = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n";
        assert_eq!(
            each_step(both),
            vec![HeadNote {
                length: Length::Known(5),
                transfer_encoding: true,
                bare_lf: false,
                last: true,
            }],
            "nothing after a body the scanner does not follow is taken for a head"
        );
        let lf = b"GET / HTTP/1.1\nHost: a\r\n\r\n";
        assert!(each_step(lf)[0].bare_lf);
        let differing = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello";
        assert!(each_step(differing)[0].last);
        let unreadable = b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello";
        assert!(each_step(unreadable)[0].last, "a value it cannot read");
    }

    #[test]
    fn heads_hyper_refuses_stop_the_scan() {
        assert!(notes_of(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00", 5).is_empty());
        assert!(
            each_step(b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\nGET / HTTP/1.1\r\n\r\n").is_empty()
        );
        // Longer than the limit: hyper answers 431, nothing is noted.
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(70 << 10));
        assert!(notes_of(long.as_bytes(), 4096).is_empty());
    }
}

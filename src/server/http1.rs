//! HTTP/1 request framing checks that hyper does not make (request smuggling inputs).
//!
//! hyper already answers 400 to differing `Content-Length`s, a `Content-Length` that is not a
//! number, obs-fold, a `Transfer-Encoding` whose last coding is not `chunked` and
//! `Transfer-Encoding` on HTTP/1.0. A request with both `Content-Length` and
//! `Transfer-Encoding` it reads by the latter and hides the former (RFC 9112 section 6.3 allows
//! that), and it accepts bare-LF line ends. regcache refuses both, as well as transfer codings
//! other than a single `chunked` and a missing or repeated `Host`.
//!
//! [`Scanned`] sits between the socket and hyper: reads pass through unchanged while it notes
//! what each HTTP/1 request head held, in order. The server claims one [`HeadNote`] per request
//! hyper parsed and [`check`]s it. The scanner follows bodies of known length only: after a
//! chunked body (or anything it cannot follow) it stops, and the connection is closed after
//! answering that request, so every request served on a kept-alive connection was scanned.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use http::{Request, Version, header};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What one request head held that hyper's parsed request no longer shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeadNote {
    content_length: bool,
    transfer_encoding: bool,
    bare_lf: bool,
    /// The scanner stopped after this head: the connection must close after its answer.
    last: bool,
}

impl HeadNote {
    /// The note of one complete request head given whole (request line to blank line), for
    /// servers that parse heads themselves.
    pub fn of_head(head: &[u8]) -> HeadNote {
        let mut note = HeadNote::default();
        for (i, b) in head.iter().enumerate() {
            if *b == b'\n' && (i == 0 || head[i - 1] != b'\r') {
                note.bare_lf = true;
            }
        }
        for line in head.split(|b| *b == b'\n').skip(1) {
            let Some(colon) = line.iter().position(|b| *b == b':') else {
                continue;
            };
            let name = line[..colon].trim_ascii();
            note.content_length |= name.eq_ignore_ascii_case(b"content-length");
            note.transfer_encoding |= name.eq_ignore_ascii_case(b"transfer-encoding");
        }
        note
    }
}

/// Notes of the heads scanned on one connection and not yet claimed by a request.
#[derive(Debug, Clone, Default)]
pub struct Notes(Arc<Mutex<VecDeque<HeadNote>>>);

impl Notes {
    /// The note of the next request head, in arrival order.
    pub fn next(&self) -> Option<HeadNote> {
        // Pushes and pops are single statements: a poisoned lock still holds whole notes.
        crate::flight::lock(&self.0).pop_front()
    }

    fn push(&self, note: HeadNote) {
        crate::flight::lock(&self.0).push_back(note);
    }
}

/// Checks a request hyper parsed against the note of its head (`None` when there was none).
/// `Ok(true)` when the connection must be closed after the answer. HTTP/2 requests pass.
pub fn check<B>(req: &Request<B>, note: Option<HeadNote>) -> Result<bool, &'static str> {
    if req.version() > Version::HTTP_11 {
        return Ok(false);
    }
    let note = note.ok_or("the request head could not be checked")?;
    if note.content_length && note.transfer_encoding {
        return Err("Content-Length and Transfer-Encoding together");
    }
    if note.bare_lf {
        return Err("request lines must end in CRLF");
    }
    let mut codings = req.headers().get_all(header::TRANSFER_ENCODING).iter();
    if let Some(te) = codings.next() {
        let chunked = te
            .to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        if !chunked || codings.next().is_some() {
            return Err("the only transfer coding accepted is a single chunked");
        }
    }
    match req.headers().get_all(header::HOST).iter().count() {
        0 if req.version() == Version::HTTP_11 => Err("HTTP/1.1 requests need a Host header"),
        0 | 1 => Ok(note.last),
        _ => Err("more than one Host header"),
    }
}

/// A connection's byte stream whose HTTP/1 request heads are noted as they are read.
#[derive(Debug)]
pub struct Scanned<T> {
    io: T,
    scanner: Scanner,
}

impl<T> Scanned<T> {
    /// Wraps `io`; the notes of its request heads go to `notes`.
    pub fn new(io: T, notes: Notes) -> Self {
        Scanned {
            io,
            scanner: Scanner {
                state: State::Head(Head::default()),
                notes,
            },
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

#[derive(Debug)]
struct Scanner {
    state: State,
    notes: Notes,
}

#[derive(Debug)]
enum State {
    /// Before or inside a request head.
    Head(Head),
    /// Inside a body of known length: bytes left to skip.
    Body(u64),
    /// HTTP/2, or after a body the scanner does not follow: nothing more is scanned.
    Off,
}

/// Bytes of a line kept: enough for the field names looked for and any length value.
const KEEP: usize = 64;

#[derive(Debug, Default)]
struct Head {
    /// The start of the current line.
    kept: Vec<u8>,
    /// Length of the current line so far.
    len: usize,
    /// The last byte of the current line was CR.
    cr: bool,
    /// Complete lines of this head, the request line first.
    lines: usize,
    note: HeadNote,
    length: Option<u64>,
    /// A `Content-Length` the scanner cannot follow (repeated differently, not a number).
    unknown_length: bool,
}

impl Scanner {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Body(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = State::Head(Head::default());
                    }
                }
                State::Head(head) => match data.iter().position(|b| *b == b'\n') {
                    None => {
                        head.take(data);
                        return;
                    }
                    Some(i) => {
                        head.take(&data[..i]);
                        data = &data[i + 1..];
                        if let Some(next) = head.end_line(&self.notes) {
                            self.state = next;
                        }
                    }
                },
            }
        }
    }
}

impl Head {
    fn take(&mut self, bytes: &[u8]) {
        let Some(last) = bytes.last() else {
            return;
        };
        let room = KEEP.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&bytes[..room.min(bytes.len())]);
        self.len += bytes.len();
        self.cr = *last == b'\r';
    }

    /// A line ended; returns the next state when the head ended or the scanner must stop.
    fn end_line(&mut self, notes: &Notes) -> Option<State> {
        if !self.cr {
            self.note.bare_lf = true;
        }
        let content = self.len - usize::from(self.cr);
        let kept = self.kept.len().min(content);
        let line = std::mem::take(&mut self.kept);
        let line = &line[..kept];
        let truncated = content > kept;
        self.len = 0;
        self.cr = false;
        if content == 0 {
            if self.lines == 0 {
                // Empty lines before a request line are skipped (RFC 9112 section 2.2).
                return None;
            }
            return Some(self.end_head(notes));
        }
        self.lines += 1;
        if self.lines == 1 {
            // The HTTP/2 connection preface: no HTTP/1 heads follow.
            return line.starts_with(b"PRI * HTTP/2.0").then_some(State::Off);
        }
        // A line without a colon: hyper refuses the head; nothing to note.
        let colon = line.iter().position(|b| *b == b':')?;
        let name = &line[..colon];
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.note.transfer_encoding = true;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            self.note.content_length = true;
            let value = std::str::from_utf8(&line[colon + 1..])
                .ok()
                .filter(|_| !truncated)
                .map(|v| v.trim_matches([' ', '\t']))
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok());
            match (value, self.length) {
                (Some(v), None) => self.length = Some(v),
                (Some(v), Some(prev)) if v == prev => {}
                _ => self.unknown_length = true,
            }
        }
        None
    }

    fn end_head(&mut self, notes: &Notes) -> State {
        let mut note = self.note;
        let next = if note.transfer_encoding || self.unknown_length {
            note.last = true;
            State::Off
        } else {
            match self.length {
                Some(n) if n > 0 => State::Body(n),
                _ => State::Head(Head::default()),
            }
        };
        notes.push(note);
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Notes of `input` fed in pieces of `step` bytes.
    fn notes_of(input: &[u8], step: usize) -> Vec<HeadNote> {
        let notes = Notes::default();
        let mut s = Scanner {
            state: State::Head(Head::default()),
            notes: notes.clone(),
        };
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

    const PLAIN: HeadNote = HeadNote {
        content_length: false,
        transfer_encoding: false,
        bare_lf: false,
        last: false,
    };

    #[test]
    fn heads_and_bodies_of_known_length_are_followed() {
        let input = b"\r\nGET /v2/ HTTP/1.1\r\nHost: a\r\n\r\n\
            PUT /x HTTP/1.1\r\nHost: a\r\ncontent-length:  12 \r\n\r\nGET / HTTP/1.1\r\n\
            HEAD /y HTTP/1.1\r\nHost: a\r\n\r\n";
        let cl = HeadNote {
            content_length: true,
            ..PLAIN
        };
        // The body "GET / HTTP/1.1\r\n"-looking bytes are skipped, not taken for a head.
        assert_eq!(each_step(input), vec![PLAIN, cl, PLAIN]);
    }

    #[test]
    fn ambiguous_heads_are_noted() {
        let both = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n";
        assert_eq!(
            each_step(both),
            vec![HeadNote {
                content_length: true,
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
        let long = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}5\r\n\r\n",
            " ".repeat(KEEP)
        );
        assert!(each_step(long.as_bytes())[0].last, "a value it cannot read");
    }

    #[test]
    fn http2_is_not_scanned() {
        assert!(notes_of(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00", 5).is_empty());
    }

    fn req(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().version(version).uri("/v2/");
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn checks() {
        let h11 = Version::HTTP_11;
        let ok = Some(PLAIN);
        assert_eq!(check(&req(h11, &[("host", "a")]), ok), Ok(false));
        assert_eq!(check(&req(Version::HTTP_10, &[]), ok), Ok(false));
        assert_eq!(check(&req(Version::HTTP_2, &[]), None), Ok(false));
        let last = Some(HeadNote {
            last: true,
            ..PLAIN
        });
        assert_eq!(
            check(
                &req(h11, &[("host", "a"), ("transfer-encoding", "Chunked")]),
                last
            ),
            Ok(true)
        );
        let refused = [
            (req(h11, &[("host", "a")]), None),
            (req(h11, &[]), ok),
            (req(h11, &[("host", "a"), ("host", "b")]), ok),
            (
                req(
                    h11,
                    &[("host", "a"), ("transfer-encoding", "gzip, chunked")],
                ),
                ok,
            ),
            (
                req(
                    h11,
                    &[
                        ("host", "a"),
                        ("transfer-encoding", "chunked"),
                        ("transfer-encoding", "chunked"),
                    ],
                ),
                ok,
            ),
            (
                req(h11, &[("host", "a")]),
                Some(HeadNote {
                    bare_lf: true,
                    ..PLAIN
                }),
            ),
            (
                req(h11, &[("host", "a"), ("transfer-encoding", "chunked")]),
                Some(HeadNote {
                    content_length: true,
                    transfer_encoding: true,
                    bare_lf: false,
                    last: true,
                }),
            ),
        ];
        for (r, note) in refused {
            assert!(check(&r, note).is_err(), "{r:?} {note:?}");
        }
    }
}

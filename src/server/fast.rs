//! The plain-HTTP/1.1 connection loop: bodiless `GET`/`HEAD` requests are parsed here and
//! answered by `App::handle`, and a cached blob is sent with `sendfile(2)` (no copy through
//! user space). Anything else (a request with a body, HTTP/2, HTTP/1.0, `Expect`, `Upgrade`,
//! a malformed request) hands the connection, with the bytes already read, to hyper for the
//! rest of its life. TLS connections never come here.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::app::App;
use crate::body::Body;
use crate::cache::reader::{FileRange, TailBody};
use crate::cache::tail::Part;
use crate::server::Limits;
use crate::server::edge::{self, Answer};
use crate::server::http1::{self, HeadNote, Length, Read};
use crate::units::SecondText;

/// Largest body of known length sent in the same write as its head.
const SMALL_BODY: u64 = 64 * 1024;

/// How a connection left the loop.
pub enum Outcome {
    /// Closed (by the client, a limit, an error or shutdown).
    Closed,
    /// To be served by hyper from here on: the stream with the bytes already read.
    Handoff(Rewind),
}

/// A TCP stream with bytes already read put back in front of it.
pub struct Rewind {
    pre: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// What the loop makes of the bytes at the front of its buffer.
#[derive(Debug, PartialEq)]
enum Head {
    /// More bytes are needed.
    Partial,
    /// Not for this loop: hyper serves it (and answers malformed input with a 400).
    Hyper,
    /// Ambiguous message framing ([`http1::ambiguous`]): the shape of a request-smuggling
    /// attempt, answered 400 and closed whatever the method.
    Smuggling(Method, &'static str),
    /// A bodiless GET/HEAD this loop serves.
    Simple(Box<Simple>),
}

/// A request head this loop serves.
#[derive(Debug, PartialEq)]
struct Simple {
    method: Method,
    target: http::Uri,
    headers: HeaderMap,
    close: bool,
    // Bytes of the buffer the head takes.
    len: usize,
    note: HeadNote,
}

/// Reads one request head with the one head reader and sorts it. Pure.
fn parse_head(buf: &[u8], max_headers: usize) -> Head {
    http1::read_head(buf, max_headers, |read| match read {
        Read::Partial => Head::Partial,
        Read::Unreadable => Head::Hyper,
        Read::Head(h) => sort(&h),
    })
}

fn sort(h: &http1::Head<'_, '_>) -> Head {
    if let Some(why) = http1::ambiguous(&h.note) {
        // httparse lets only token bytes through, which every `Method` takes.
        let method = Method::from_bytes(h.method.as_bytes()).unwrap_or_default();
        return Head::Smuggling(method, why);
    }
    let method = match h.method {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        _ => return Head::Hyper,
    };
    // HTTP/1.0 and request bodies (a length other than 0, chunked) are hyper's.
    if h.minor != 1 || !matches!(h.note.length, Length::Absent | Length::Known(0)) {
        return Head::Hyper;
    }
    // Origin form only; `*` and absolute forms are hyper's.
    if !h.target.starts_with('/') {
        return Head::Hyper;
    }
    let Ok(target) = h.target.parse::<http::Uri>() else {
        return Head::Hyper;
    };
    let mut headers = HeaderMap::with_capacity(h.fields.len());
    let mut close = false;
    for f in h.fields {
        let Ok(name) = header::HeaderName::from_bytes(f.name.as_bytes()) else {
            return Head::Hyper;
        };
        let Ok(value) = HeaderValue::from_bytes(f.value) else {
            return Head::Hyper;
        };
        match name {
            // A body, or a protocol change: hyper's job, with its own framing checks.
            header::TRANSFER_ENCODING | header::EXPECT | header::UPGRADE => return Head::Hyper,
            header::CONNECTION
                if f.value
                    .split(|b| *b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close")) =>
            {
                close = true;
            }
            _ => {}
        }
        headers.append(name, value);
    }
    Head::Simple(Box::new(Simple {
        method,
        target,
        headers,
        close,
        len: h.len,
        note: h.note,
    }))
}

// Headers that describe a connection, not a response: never copied from the handler's answer.
fn hop_by_hop(name: &header::HeaderName) -> bool {
    matches!(
        *name,
        header::CONNECTION | header::TRANSFER_ENCODING | header::UPGRADE
    ) || name.as_str() == "keep-alive"
}

/// Serves requests on a plain TCP connection until it closes or needs hyper.
pub async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    app: Arc<App>,
    limits: Limits,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> io::Result<Outcome> {
    let mut buf = BytesMut::with_capacity(4096);
    // One timer for the connection's life, not one per request: it is set again only when
    // it fires before the current head's deadline (a request since moved that on), so a busy
    // connection does not touch the timer wheel per request. (The shutdown wait stays one
    // per read: kept for the connection's life, it raised the peak memory of 5,000 busy
    // connections by about 9 MiB.)
    let limit = limits.head_timeout.min(limits.idle_timeout);
    let timer = tokio::time::sleep(limit);
    tokio::pin!(timer);
    loop {
        // Read one request head, bounded in size and time.
        let deadline = tokio::time::Instant::now() + limit;
        let head = loop {
            match parse_head(&buf, limits.max_headers) {
                Head::Partial => {}
                other => break other,
            }
            if buf.len() >= limits.max_head {
                let refused = http1::Refusal {
                    status: 431,
                    why: "the request head is longer than limits.max_header_bytes",
                };
                refuse(stream, edge::head_refusal(peer, refused)).await;
                return Ok(Outcome::Closed);
            }
            if buf.is_empty() && *stopping.borrow() {
                return Ok(Outcome::Closed);
            }
            let read = tokio::select! {
                r = stream.read_buf(&mut buf) => r,
                () = &mut timer => {
                    if timer.deadline() >= deadline {
                        return Ok(Outcome::Closed);
                    }
                    timer.as_mut().reset(deadline);
                    continue;
                }
                // Shutdown while idle between requests: close now.
                _ = stopping.changed(), if buf.is_empty() => return Ok(Outcome::Closed),
            };
            match read {
                Ok(0) => return Ok(Outcome::Closed),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        };
        let simple = match head {
            Head::Simple(simple) => simple,
            Head::Smuggling(method, why) => {
                refuse(stream, edge::refusal(peer, &method, why)).await;
                return Ok(Outcome::Closed);
            }
            Head::Hyper => {
                // A head hyper would refuse with an empty body is answered here, with an
                // OCI body naming the reason.
                if let Some(refused) = http1::refusal(&buf, limits.max_headers) {
                    refuse(stream, edge::head_refusal(peer, refused)).await;
                    return Ok(Outcome::Closed);
                }
                return Ok(Outcome::Handoff(Rewind {
                    pre: buf.freeze(),
                    stream,
                }));
            }
            Head::Partial => {
                return Ok(Outcome::Handoff(Rewind {
                    pre: buf.freeze(),
                    stream,
                }));
            }
        };
        let Simple {
            method,
            target,
            headers,
            close,
            len,
            note,
        } = *simple;
        buf.advance(len);
        let mut req = Request::new(Empty::<Bytes>::new());
        *req.method_mut() = method;
        *req.uri_mut() = target;
        *req.headers_mut() = headers;
        let head = req.method() == Method::HEAD;
        // The same edge step as on hyper's path (framing rules, client address).
        let (resp, last) = match edge::answer(&app, req, Some(note), peer).await {
            Answer::Served { response, close } => (response, close),
            Answer::Refused(response) => {
                refuse(stream, response).await;
                return Ok(Outcome::Closed);
            }
        };
        let close = close || last;
        let keep = write_response(&mut stream, resp, head, close).await?;
        if close || !keep || *stopping.borrow() {
            let _ = stream.shutdown().await;
            return Ok(Outcome::Closed);
        }
    }
}

/// Answers a request that ends the connection, then closes without resetting it: the
/// client's unread bytes are drained for a moment so the answer is not lost to a reset.
async fn refuse(mut stream: TcpStream, resp: Response<Body>) {
    if write_response(&mut stream, resp, false, true)
        .await
        .is_err()
    {
        return;
    }
    let _ = stream.shutdown().await;
    let mut sink = vec![0u8; 16 * 1024];
    let drain = async {
        let mut left = 1usize << 20;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// Writes one response; returns whether the connection can carry another.
async fn write_response(
    stream: &mut TcpStream,
    resp: Response<Body>,
    head: bool,
    closing: bool,
) -> io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let file = parts.extensions.get::<FileRange>().cloned();
    let tail = parts.extensions.get::<TailBody>().cloned();
    let status = parts.status;
    let bodiless = head
        || status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED;
    let exact = http_body::Body::size_hint(&body).exact();
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut has_length = false;
    for (name, value) in parts.headers.iter() {
        if hop_by_hop(name) {
            continue;
        }
        has_length |= *name == header::CONTENT_LENGTH;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if closing {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        push_http_date(std::time::SystemTime::now(), &mut out);
        out.extend_from_slice(b"\r\n");
    }
    let chunked = !bodiless && !has_length && exact.is_none();
    if !bodiless && !has_length {
        match exact {
            Some(n) => out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
            None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
    }
    out.extend_from_slice(b"\r\n");
    if bodiless {
        stream.write_all(&out).await?;
        return Ok(true);
    }
    // A small body already in memory (a manifest, an error) goes out with the head in one
    // write: one system call and one wake-up of the client instead of two.
    if file.is_none() && tail.is_none() && !chunked && exact.is_some_and(|n| n <= SMALL_BODY) {
        while let Some(Some(frame)) = body.frame().now_or_never() {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        out.extend_from_slice(&data);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "response body failed; closing the connection");
                    stream.write_all(&out).await?;
                    return Ok(false);
                }
            }
        }
    }
    if let Some(f) = file {
        // The head waits for the file's first bytes and leaves in the same full segment.
        cork(stream, true);
        stream.write_all(&out).await?;
        // The body (unread) is dropped only after the file went out, so its accounting
        // sees the bytes `send_file` counted.
        let sent = send_file(stream, &f.file, f.offset, f.len, &f.sent).await;
        cork(stream, false);
        drop(body);
        sent?;
        return Ok(true);
    }
    stream.write_all(&out).await?;
    if let Some((t, tail)) = tail.and_then(|t| t.tail.take().map(|tail| (t, tail))) {
        let sent = send_parts(stream, tail, &t.sent).await;
        drop(body);
        return sent;
    }
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            // The body failed part-way (e.g. a download that failed verification): the
            // client must see an incomplete response, so the connection ends here.
            Err(e) => {
                tracing::debug!(error = %e, "response body failed; closing the connection");
                return Ok(false);
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            stream
                .write_all(format!("{:x}\r\n", data.len()).as_bytes())
                .await?;
            stream.write_all(&data).await?;
            stream.write_all(b"\r\n").await?;
        } else {
            stream.write_all(&data).await?;
        }
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n").await?;
    }
    Ok(true)
}

/// Sends a body in parts from its tail reader: file ranges with `sendfile(2)`, bytes
/// written; returns whether the connection can carry another response.
async fn send_parts(
    stream: &mut TcpStream,
    mut tail: crate::cache::tail::Tail,
    sent: &std::sync::atomic::AtomicU64,
) -> io::Result<bool> {
    loop {
        match tail.next_part(true).await {
            Ok(None) => return Ok(true),
            Ok(Some(Part::File { file, offset, len })) => {
                // Corked for this part only: what is on disk leaves in full segments, and
                // the rest of it at once when the part is done (a download is not held).
                cork(stream, true);
                send_file(stream, &file, offset, len, sent).await?;
                cork(stream, false);
            }
            Ok(Some(Part::Bytes(b))) => {
                stream.write_all(&b).await?;
                sent.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            // The body failed part-way: the client must see an incomplete response.
            Err(e) => {
                tracing::debug!(error = %e, "response body failed; closing the connection");
                return Ok(false);
            }
        }
    }
}

/// Appends `now` as an HTTP date, formatted once per second per thread.
fn push_http_date(now: std::time::SystemTime, out: &mut Vec<u8>) {
    thread_local! {
        static DATE: SecondText = const { SecondText::new() };
    }
    let second = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|date| {
        date.push(second, out, |text| {
            text.push_str(&httpdate::fmt_http_date(now))
        })
    });
}

/// Sets `TCP_CORK`: while it is on, the kernel sends only full segments; turning it off sends
/// the rest at once. A file sent with many `sendfile(2)` calls otherwise leaves in whatever
/// pieces each call found room for (measured: one client of a cached 512 MiB blob, ~1,500
/// MiB/s without, ~2,200 with, as nginx with `tcp_nopush`). Left on only when the connection
/// fails, and then it is closed.
fn cork(stream: &TcpStream, on: bool) {
    // A socket refusing the option only sends as before.
    let _ = rustix::net::sockopt::set_tcp_cork(stream, on);
}

/// Sends `len` bytes of `file` from `offset` to the socket with `sendfile(2)`, waiting for
/// the socket to drain, and adds what went out to `sent`.
async fn send_file(
    stream: &TcpStream,
    file: &std::fs::File,
    offset: u64,
    len: u64,
    sent: &std::sync::atomic::AtomicU64,
) -> io::Result<()> {
    let mut offset = offset;
    let end = offset + len;
    while offset < end {
        let want = usize::try_from(end - offset)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        stream.writable().await?;
        let n = stream.try_io(Interest::WRITABLE, || {
            rustix::fs::sendfile(stream, file, Some(&mut offset), want).map_err(io::Error::from)
        });
        match n {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob file shorter than its length",
                ));
            }
            Ok(n) => {
                sent.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_HEADERS: usize = 100;

    fn simple(raw: &[u8]) -> (Method, http::Uri, HeaderMap, bool, usize) {
        match parse_head(raw, MAX_HEADERS) {
            Head::Simple(s) => (s.method, s.target, s.headers, s.close, s.len),
            other => panic!("{other:?} for {:?}", String::from_utf8_lossy(raw)),
        }
    }

    #[test]
    fn bodiless_gets_and_heads_are_served_here() {
        let raw = b"GET /v2/library/alpine/blobs/sha256:ab HTTP/1.1\r\nHost: x\r\nAccept: a\r\nAccept: b\r\n\r\nGET /next";
        let (m, t, h, close, len) = simple(raw);
        assert_eq!(m, Method::GET);
        assert_eq!(t.path(), "/v2/library/alpine/blobs/sha256:ab");
        assert_eq!(h.get_all(header::ACCEPT).iter().count(), 2);
        assert!(!close);
        assert_eq!(&raw[len..], b"GET /next");
        let (m, _, _, close, _) = simple(
            b"HEAD /v2/ HTTP/1.1\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(m, Method::HEAD);
        assert!(close);
    }

    #[test]
    fn the_date_is_that_of_each_answers_own_second() {
        use std::time::{Duration, UNIX_EPOCH};
        let start = UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        // Within a second, across a second, back again, and a day on.
        for ms in [0, 400, 999, 1000, 1001, 2500, 1200, 86_400_000] {
            let now = start + Duration::from_millis(ms);
            let mut out = Vec::new();
            push_http_date(now, &mut out);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                httpdate::fmt_http_date(now),
                "{ms}"
            );
        }
    }

    #[tokio::test]
    async fn a_file_answer_leaves_the_connection_uncorked() {
        use std::io::Write as _;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let range = FileRange::new(f, 1000, 200_000);
        let mut resp = Response::new(crate::body::empty());
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(200_000u64));
        resp.extensions_mut().insert(range.clone());
        assert!(
            write_response(&mut server, resp, false, false)
                .await
                .unwrap()
        );
        // Corked, the response's last partial segment would wait up to 200 ms for more.
        assert!(!rustix::net::sockopt::tcp_cork(&server).unwrap());
        assert_eq!(
            range.sent.load(std::sync::atomic::Ordering::Relaxed),
            200_000
        );
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&got[..head_end]).to_lowercase();
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
        assert!(head.contains("content-length: 200000\r\n"), "{head}");
        assert!(got[head_end..] == data[1000..201_000]);
    }

    #[test]
    fn everything_else_goes_to_hyper() {
        for raw in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"PUT /v2/a/manifests/b HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            b"GET /v2/ HTTP/1.0\r\n\r\n",
            b"GET /v2/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /v2/ HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"GET /v2/ HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            b"GET http://other/v2/ HTTP/1.1\r\n\r\n",
            b"GET /v2/ HTTP/1.1\r\nBad Header: x\r\n\r\n",
            b"GARBAGE\r\n\r\n",
        ] {
            assert_eq!(
                parse_head(raw, MAX_HEADERS),
                Head::Hyper,
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        assert_eq!(
            parse_head(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n", MAX_HEADERS),
            Head::Partial
        );
        // More fields than `[limits]` allows: hyper answers 431.
        let many = format!("GET /v2/ HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(9));
        assert_eq!(parse_head(many.as_bytes(), 8), Head::Hyper);
        assert!(matches!(parse_head(many.as_bytes(), 9), Head::Simple(_)));
        for raw in [
            &b"GET /v2/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 0\r\n\r\n"[..],
            b"GET /v2/ HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"PATCH /v2/a/blobs/uploads/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
        ] {
            assert!(matches!(parse_head(raw, MAX_HEADERS), Head::Smuggling(..)));
        }
        // Served here, so that the edge step refuses it with the same rule as hyper's path.
        let Head::Simple(s) = parse_head(b"GET /v2/ HTTP/1.1\nHost: x\n\n", MAX_HEADERS) else {
            panic!("bare LF")
        };
        assert!(s.note.bare_lf);
    }
}

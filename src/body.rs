//! The response body type shared by every handler, and constructors for it.

use std::io;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderName, HeaderValue, Response, header};
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Frame;

/// Every response body: whole, empty, or streamed from disk or upstream.
pub type Body = UnsyncBoxBody<Bytes, io::Error>;

/// A body holding `data`.
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body (HEAD answers, 204s).
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body streamed from `stream`; an `Err` item aborts the response mid-body.
pub fn stream<S>(stream: S) -> Body
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    StreamBody::new(stream.map(|r| r.map(Frame::data))).boxed_unsync()
}

/// `body`, keeping `guard` alive until the body is finished or dropped (a download slot, a
/// request counted as in flight).
pub fn hold<G: Send + Unpin + 'static>(body: Body, guard: G) -> Body {
    Held {
        inner: body,
        _guard: guard,
    }
    .boxed_unsync()
}

struct Held<G> {
    inner: Body,
    _guard: G,
}

impl<G> http_body::Body for Held<G>
where
    G: Send + Unpin + 'static,
{
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        // `Body` is a boxed body and the guard is `Unpin`, so `Held` is too.
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A JSON answer with `Content-Type` and `Content-Length` set; HEAD answers carry no body.
pub fn json(payload: impl Into<Bytes>, head: bool) -> Response<Body> {
    let payload: Bytes = payload.into();
    let len = payload.len();
    let mut r = Response::new(if head { empty() } else { full(payload) });
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r
}

/// Sets a header from text, skipping values that are not valid header text.
pub fn set_header(resp: &mut Response<Body>, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, v);
    }
}

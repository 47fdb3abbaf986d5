//! The per-request edge step, the same on every connection: refuse a request whose framing
//! breaks the HTTP/1 rules, or give it the client's address and hand it to `App::handle`.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, header};

use crate::access::ClientAddr;
use crate::app::App;
use crate::body::Body;
use crate::error::Error;
use crate::server::http1::{self, HeadNote};

/// The answer to one request, and what becomes of its connection.
pub enum Answer {
    /// The app's answer; `close` when the connection must end after it (nothing after its
    /// head could be checked), in which case it carries `Connection: close`.
    Served {
        /// The response.
        response: Response<Body>,
        /// The connection ends after this response.
        close: bool,
    },
    /// A 400 for a request whose framing was refused; the connection ends after it.
    Refused(Response<Body>),
}

impl Answer {
    /// The response, for a connection that closes by its `Connection: close` header.
    pub fn into_response(self) -> Response<Body> {
        match self {
            Answer::Served { response, .. } | Answer::Refused(response) => response,
        }
    }
}

/// Checks `req` against the note of its head (`None` when it had none: refused unless it
/// is HTTP/2) and, when it passes, answers it with `app`.
pub async fn answer<B>(
    app: &Arc<App>,
    mut req: Request<B>,
    note: Option<HeadNote>,
    peer: SocketAddr,
) -> Answer
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match http1::check(&req, note) {
        Err(why) => Answer::Refused(refusal(peer, req.method(), why)),
        Ok(close) => {
            req.extensions_mut().insert(ClientAddr(peer));
            let mut response = app.handle(req).await;
            if close {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Answer::Served { response, close }
        }
    }
}

/// The 400 for a request refused for `why` (logged once, here), with `Connection: close`.
pub fn refusal(peer: SocketAddr, method: &Method, why: &'static str) -> Response<Body> {
    tracing::info!(%peer, %method, why, "malformed request refused");
    closing(Error::Malformed(why).into_response(method == Method::HEAD))
}

/// The answer to a request head refused before it could be parsed (`http1::refusal`): 400,
/// 431 or 505 with an OCI body naming the reason, and `Connection: close`.
pub fn head_refusal(peer: SocketAddr, refused: http1::Refusal) -> Response<Body> {
    let why = refused.why;
    tracing::info!(%peer, status = refused.status, why, "malformed request head refused");
    let error = match refused.status {
        431 => Error::HeadTooLarge(why),
        505 => Error::VersionNotSupported,
        _ => Error::Malformed(why),
    };
    closing(error.into_response(false))
}

fn closing(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

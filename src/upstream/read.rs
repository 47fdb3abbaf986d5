//! Reading upstream answers: `Content-Length` and `Content-Range`, the body as the crate's
//! body type, and whole bodies read within a size cap.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::body::Body;
use crate::error::UpstreamError;

/// First byte and total size (`None` for `*`) of a `Content-Range: bytes a-b/total` header.
pub(super) fn content_range(h: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let v = h.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let (range, total) = v.strip_prefix("bytes ")?.split_once('/')?;
    let from = range.split_once('-')?.0.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((from, total))
}

/// `Content-Length` as a number, when present and well-formed.
pub fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok())
}

/// Largest error body read from an upstream (expired-token messages, push refusals).
pub(crate) const MAX_ERROR_BODY: u64 = 64 * 1024;

/// An upstream body as the crate's body type.
pub fn box_incoming(b: Incoming) -> Body {
    b.map_err(std::io::Error::other).boxed_unsync()
}

/// Reads a whole body of at most `cap` bytes, each chunk within `idle`.
pub(crate) async fn read_capped<B>(
    mut body: B,
    cap: u64,
    idle: Duration,
) -> Result<Bytes, UpstreamError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut buf = BytesMut::new();
    loop {
        let frame = tokio::time::timeout(idle, body.frame())
            .await
            .map_err(|_| {
                UpstreamError::Timeout(format!(
                    "the body stalled for {} (timeouts.read_idle)",
                    crate::units::HumanDuration(idle)
                ))
            })?;
        match frame {
            None => return Ok(buf.freeze()),
            Some(Err(e)) => {
                return Err(UpstreamError::Unreachable(format!(
                    "the connection broke mid-body: {e}"
                )));
            }
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    if buf.len() as u64 + data.len() as u64 > cap {
                        return Err(UpstreamError::Invalid(format!(
                            "body larger than {cap} bytes"
                        )));
                    }
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn content_range_gives_the_first_byte_and_the_total() {
        let mut h = HeaderMap::new();
        let cases = [
            ("bytes 100-199/1000", Some((100, Some(1000)))),
            ("bytes 5-9/*", Some((5, None))),
            ("bytes */1000", None),
            ("items 1-2/3", None),
            ("bytes 1-2/x", None),
        ];
        for (value, want) in cases {
            h.insert(header::CONTENT_RANGE, HeaderValue::from_static(value));
            assert_eq!(content_range(&h), want, "{value}");
        }
    }
}

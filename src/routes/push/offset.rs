//! Pure bookkeeping of where a chunked upload stands: the offset the next `PATCH` must start
//! at, and the check of a chunk's `Content-Range` against it, which refuses (`416`) a chunk
//! sent twice or out of order before any byte of it reaches the upstream.

use http::{HeaderMap, header};

use crate::error::Error;

/// `Content-Range: <start>-<end>` of an upload chunk (inclusive; a `bytes ` prefix and a
/// `/<total>` suffix are tolerated).
pub fn content_range(headers: &HeaderMap) -> Option<Result<(u64, u64), ()>> {
    let v = headers.get(header::CONTENT_RANGE)?;
    Some(parse(v.to_str().unwrap_or("")).ok_or(()))
}

fn parse(v: &str) -> Option<(u64, u64)> {
    let v = v.trim();
    let v = v.strip_prefix("bytes ").unwrap_or(v).trim();
    let v = v.split('/').next()?;
    let (a, b) = v.split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b))
}

/// Whether a chunk with these headers may be appended to an upload at `offset` (`None`:
/// not known, for instance after the upstream answered without `Range`). A chunk without
/// `Content-Range` is appended wherever the upload stands.
pub fn check(offset: Option<u64>, headers: &HeaderMap) -> Result<(), Error> {
    match (content_range(headers), offset) {
        (None, _) => Ok(()),
        (Some(Err(())), o) => Err(Error::UploadOffset(
            o.unwrap_or(0),
            "malformed Content-Range".into(),
        )),
        (Some(Ok((start, _))), Some(o)) if start != o => Err(Error::UploadOffset(
            o,
            format!("chunk starts at byte {start}, the upload is at byte {o}"),
        )),
        (Some(Ok(_)), _) => Ok(()),
    }
}

/// Where the upload stands after a chunk was accepted: the upstream's `Range: 0-<last>`;
/// for its ambiguous `0-0` (an empty upload as well as one byte), and when it sent none, the
/// end of the chunk's `Content-Range`, else `offset + Content-Length`; else not known.
pub fn after_chunk(offset: Option<u64>, request: &HeaderMap, upstream: &HeaderMap) -> Option<u64> {
    let told = upstream
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse);
    if let Some((_, last)) = told.filter(|&(_, last)| last > 0) {
        return Some(last + 1);
    }
    match content_range(request) {
        Some(Ok((_, end))) => Some(end + 1),
        _ => crate::upstream::content_length(request).and_then(|len| offset.map(|o| o + len)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(k.clone(), v.parse().unwrap());
        }
        m
    }

    #[test]
    fn parsing() {
        assert_eq!(parse("0-21"), Some((0, 21)));
        assert_eq!(parse("bytes 22-41/42"), Some((22, 41)));
        assert_eq!(parse("5-4"), None);
        assert_eq!(parse("x-4"), None);
        assert_eq!(parse("4"), None);
    }

    #[test]
    fn a_retried_or_skipping_chunk_is_refused() {
        let first = h(&[(header::CONTENT_RANGE, "0-21")]);
        assert!(check(Some(0), &first).is_ok());
        let again = check(Some(22), &first).unwrap_err().into_response(false);
        assert_eq!(again.status(), 416);
        assert_eq!(again.headers()[header::RANGE], "0-21");
        let skip = check(Some(22), &h(&[(header::CONTENT_RANGE, "30-40")])).unwrap_err();
        assert_eq!(skip.into_response(false).headers()[header::RANGE], "0-21");
        assert!(check(Some(22), &h(&[(header::CONTENT_RANGE, "22-41")])).is_ok());
        assert!(check(None, &first).is_ok());
        assert!(check(Some(5), &HeaderMap::new()).is_ok());
        let bad = check(Some(5), &h(&[(header::CONTENT_RANGE, "junk")])).unwrap_err();
        assert_eq!(bad.into_response(false).status(), 416);
    }

    #[test]
    fn offsets_after_a_chunk() {
        let none = HeaderMap::new();
        let chunk = h(&[(header::CONTENT_RANGE, "0-21")]);
        assert_eq!(
            after_chunk(Some(0), &chunk, &h(&[(header::RANGE, "0-21")])),
            Some(22)
        );
        assert_eq!(after_chunk(Some(0), &chunk, &none), Some(22));
        let streamed = h(&[(header::CONTENT_LENGTH, "10")]);
        assert_eq!(after_chunk(Some(22), &streamed, &none), Some(32));
        assert_eq!(after_chunk(None, &streamed, &none), None);
        assert_eq!(
            after_chunk(Some(0), &none, &h(&[(header::RANGE, "0-0")])),
            None
        );
        let one = h(&[(header::CONTENT_LENGTH, "1")]);
        assert_eq!(
            after_chunk(Some(0), &one, &h(&[(header::RANGE, "0-0")])),
            Some(1)
        );
        let empty = h(&[(header::CONTENT_LENGTH, "0")]);
        assert_eq!(
            after_chunk(Some(0), &empty, &h(&[(header::RANGE, "0-0")])),
            Some(0)
        );
    }
}

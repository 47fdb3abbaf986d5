//! Pure: a manifest body as the upstream sent it, decoded from its `Content-Encoding`.
//! regcache never asks for an encoding, but a faulty upstream (or a CDN in front of it) may
//! gzip a manifest anyway; served as is, a client would read compressed bytes as JSON and the
//! digest would not match. Gzip is decoded within `max_manifest_size`; any other encoding is
//! refused with a reason.

use std::io::Read;

use bytes::Bytes;
use http::{HeaderMap, header};

use crate::error::UpstreamError;

/// `body` decoded according to the `Content-Encoding` in `headers`, at most `max` bytes.
pub fn decode(headers: &HeaderMap, body: Bytes, max: u64) -> Result<Bytes, UpstreamError> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(body);
    };
    let encodings: Vec<String> = value
        .to_str()
        .unwrap_or("?")
        .split(',')
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty() && e != "identity")
        .collect();
    match encodings.as_slice() {
        [] => Ok(body),
        [gzip] if gzip == "gzip" || gzip == "x-gzip" => gunzip(&body, max),
        _ => Err(UpstreamError::Invalid(format!(
            "manifest sent with Content-Encoding {}, which regcache does not decode",
            encodings.join(", ")
        ))),
    }
}

fn gunzip(body: &[u8], max: u64) -> Result<Bytes, UpstreamError> {
    // Bounded by `max` (a few MiB): decoded in place, the way the body was read.
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .take(max.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| {
            UpstreamError::Invalid(format!("gzip-encoded manifest does not decode: {e}"))
        })?;
    if out.len() as u64 > max {
        return Err(UpstreamError::Invalid(format!(
            "gzip-encoded manifest larger than {max} bytes once decoded (cache.max_manifest_size)"
        )));
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8]) -> Bytes {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap().into()
    }

    fn with(encoding: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_ENCODING, encoding.parse().unwrap());
        h
    }

    #[test]
    fn decodes_gzip_within_the_cap_and_refuses_the_rest() {
        let json = br#"{"schemaVersion":2}"#;
        assert_eq!(
            decode(&HeaderMap::new(), Bytes::from_static(json), 100).unwrap(),
            &json[..]
        );
        assert_eq!(
            decode(&with("identity"), Bytes::from_static(json), 100).unwrap(),
            &json[..]
        );
        assert_eq!(decode(&with("gzip"), gz(json), 100).unwrap(), &json[..]);
        assert_eq!(decode(&with("X-Gzip"), gz(json), 100).unwrap(), &json[..]);
        let bomb = gz(&vec![b' '; 10_000]);
        let e = decode(&with("gzip"), bomb, 1000).unwrap_err().to_string();
        assert!(e.contains("larger than 1000 bytes"), "{e}");
        let e = decode(&with("gzip"), Bytes::from_static(json), 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not decode"), "{e}");
        let e = decode(&with("br"), Bytes::from_static(json), 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Content-Encoding br"), "{e}");
        let e = decode(&with("gzip, gzip"), gz(&gz(json)), 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gzip, gzip"), "{e}");
    }
}

//! The one HTTP/1 request-head reader and the framing rules (request smuggling) that both
//! connection loops apply. Pure: bytes in, a verdict out.
//!
//! [`read_head`] parses with httparse and the settings hyper uses for requests, so that both
//! loops and hyper agree on where a head ends. It also notes what hyper's parsed request no
//! longer shows ([`HeadNote`]): whether `Content-Length` and `Transfer-Encoding` came
//! together (hyper reads such a request by the latter and hides the former, as RFC 9112
//! section 6.3 allows) and whether a line ended in a bare LF (which httparse accepts).
//!
//! hyper itself answers 400 to differing `Content-Length`s, a `Content-Length` that is not a
//! number, obs-fold, NUL bytes, a `Transfer-Encoding` whose last coding is not `chunked` and
//! `Transfer-Encoding` on HTTP/1.0. On top of that, [`check`] refuses `Content-Length` with
//! `Transfer-Encoding`, bare-LF line ends, transfer codings other than a single `chunked` and
//! a missing or repeated `Host`.

use http::{Request, Version, header};

/// Header fields read without a heap allocation; heads may have more when `[limits]` allows.
const INLINE_FIELDS: usize = 100;

/// What [`read_head`] made of the bytes at the front of a buffer.
#[derive(Debug)]
pub enum Read<'h, 'b> {
    /// The head is not complete yet: more bytes are needed.
    Partial,
    /// Not an HTTP/1.x request head (malformed, too many fields, the HTTP/2 preface): hyper
    /// decides how to answer it.
    Unreadable,
    /// A complete request head.
    Head(Head<'h, 'b>),
}

/// One complete request head, borrowed from the buffer it was read from.
#[derive(Debug)]
pub struct Head<'h, 'b> {
    /// The method token.
    pub method: &'b str,
    /// The request target as sent.
    pub target: &'b str,
    /// The minor version: `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub minor: u8,
    /// The header fields in the order sent.
    pub fields: &'h [httparse::Header<'b>],
    /// Bytes of the buffer the head takes, its blank line included.
    pub len: usize,
    /// What the framing rules look at.
    pub note: HeadNote,
}

/// The body length a head's `Content-Length` fields declare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Length {
    /// No `Content-Length` field.
    #[default]
    Absent,
    /// One length (given once, or repeated with the same value).
    Known(u64),
    /// Several fields with different lengths.
    Differing,
    /// A value that is not a plain decimal number (a sign, a list, a space inside, overflow).
    Unreadable,
}

/// What one request head held that a parsed request no longer shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeadNote {
    /// The `Content-Length` fields.
    pub length: Length,
    /// A `Transfer-Encoding` field was present.
    pub transfer_encoding: bool,
    /// A line ended in LF without CR.
    pub bare_lf: bool,
    /// Nothing after this head was read as a head (its body could not be followed): the
    /// connection must close after the answer.
    pub last: bool,
}

impl HeadNote {
    /// A `Content-Length` field was present.
    pub fn content_length(&self) -> bool {
        self.length != Length::Absent
    }

    /// The length of the body that follows the head, when the scanner can skip it: `None`
    /// for a chunked body or lengths it cannot trust.
    pub fn body_len(&self) -> Option<u64> {
        match (self.transfer_encoding, self.length) {
            (false, Length::Absent) => Some(0),
            (false, Length::Known(n)) => Some(n),
            _ => None,
        }
    }
}

/// Reads one request head from the front of `buf`, accepting at most `max_headers` fields,
/// and gives the result to `then` (the head borrows field storage that lives only here).
pub fn read_head<'b, R>(
    buf: &'b [u8],
    max_headers: usize,
    then: impl for<'h> FnOnce(Read<'h, 'b>) -> R,
) -> R {
    if max_headers <= INLINE_FIELDS {
        let mut fields = [httparse::EMPTY_HEADER; INLINE_FIELDS];
        then(parse(buf, &mut fields[..max_headers]))
    } else {
        let mut fields = vec![httparse::EMPTY_HEADER; max_headers];
        then(parse(buf, &mut fields))
    }
}

fn parse<'h, 'b>(buf: &'b [u8], fields: &'h mut [httparse::Header<'b>]) -> Read<'h, 'b> {
    // The HTTP/2 connection preface: answered by hyper as soon as its first bytes arrive.
    if buf.starts_with(b"PRI ") {
        return Read::Unreadable;
    }
    let mut req = httparse::Request::new(fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Read::Partial,
        Err(_) => return Read::Unreadable,
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        // httparse fills all three in a complete head.
        return Read::Unreadable;
    };
    let mut note = HeadNote {
        bare_lf: bare_lf(&buf[..len]),
        ..HeadNote::default()
    };
    for f in req.headers.iter() {
        if f.name.eq_ignore_ascii_case("transfer-encoding") {
            note.transfer_encoding = true;
        } else if f.name.eq_ignore_ascii_case("content-length") {
            note.length = match (note.length, digits(f.value)) {
                (_, None) | (Length::Unreadable, _) => Length::Unreadable,
                (Length::Absent, Some(n)) => Length::Known(n),
                (Length::Known(prev), Some(n)) if prev == n => Length::Known(n),
                _ => Length::Differing,
            };
        }
    }
    Read::Head(Head {
        method,
        target,
        minor,
        fields: req.headers,
        len,
        note,
    })
}

/// Whether a line of `head` ends in LF without CR.
fn bare_lf(head: &[u8]) -> bool {
    head.first() == Some(&b'\n') || head.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r')
}

/// A `Content-Length` value as hyper reads it: decimal digits only, no sign, no overflow.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

/// A head hyper would refuse with an empty body: the status and reason to answer it with
/// (an OCI JSON body) instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// 400, 431 or 505.
    pub status: u16,
    /// Why, for the client and the log.
    pub why: &'static str,
}

/// Why the head at the front of `buf` is refused at the framing level, as hyper's parser
/// (httparse with the same defaults) would refuse it: `None` while it is incomplete, for the
/// HTTP/2 preface, and for every head hyper serves.
pub fn refusal(buf: &[u8], max_headers: usize) -> Option<Refusal> {
    if buf.starts_with(b"PRI ") {
        return None;
    }
    let refused = |status, why| Some(Refusal { status, why });
    let mut fields = vec![httparse::EMPTY_HEADER; max_headers];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => None,
        Ok(httparse::Status::Complete(_)) => {
            let bad_length = req.headers.iter().any(|f| {
                f.name.eq_ignore_ascii_case("content-length") && !readable_length_list(f.value)
            });
            if bad_length {
                refused(400, "malformed Content-Length")
            } else {
                None
            }
        }
        Err(httparse::Error::TooManyHeaders) => refused(
            431,
            "more header fields than the server accepts (limits.max_headers)",
        ),
        Err(httparse::Error::Version) => refused(505, "HTTP version not supported"),
        Err(httparse::Error::HeaderName) => refused(
            400,
            "malformed header field name (obs-fold, or space before the colon)",
        ),
        Err(httparse::Error::HeaderValue) => {
            refused(400, "malformed header field value (NUL or control bytes)")
        }
        Err(httparse::Error::NewLine) => refused(400, "malformed line ending"),
        Err(httparse::Error::Token | httparse::Error::Status) => {
            refused(400, "malformed request line")
        }
    }
}

/// A `Content-Length` value hyper takes: digits, or a comma list of one repeated number.
fn readable_length_list(value: &[u8]) -> bool {
    let mut values = value.split(|b| *b == b',').map(|v| digits(v.trim_ascii()));
    let Some(Some(first)) = values.next() else {
        return false;
    };
    values.all(|v| v == Some(first))
}

/// The smuggling rule: a head whose body length two readers could take differently. Such a
/// connection is answered 400 and closed before anything else is read from it.
pub fn ambiguous(note: &HeadNote) -> Option<&'static str> {
    if note.content_length() && note.transfer_encoding {
        return Some("Content-Length and Transfer-Encoding together");
    }
    if note.length == Length::Differing {
        return Some("different Content-Length values");
    }
    None
}

/// Checks a parsed request against the note of its head (`None` when there was none).
/// `Ok(true)` when the connection must be closed after the answer. HTTP/2 requests pass.
pub fn check<B>(req: &Request<B>, note: Option<HeadNote>) -> Result<bool, &'static str> {
    if req.version() > Version::HTTP_11 {
        return Ok(false);
    }
    let note = note.ok_or("the request head could not be checked")?;
    if let Some(why) = ambiguous(&note) {
        return Err(why);
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

#[cfg(test)]
impl HeadNote {
    /// A head with no body framing and nothing odd about it, for tests to build on.
    pub(crate) const PLAIN: HeadNote = HeadNote {
        length: Length::Absent,
        transfer_encoding: false,
        bare_lf: false,
        last: false,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the reader made of `raw`, in a comparable form.
    #[derive(Debug, PartialEq)]
    enum Got {
        Partial,
        Unreadable,
        Head {
            method: String,
            target: String,
            minor: u8,
            fields: usize,
            rest: Vec<u8>,
            note: HeadNote,
        },
    }

    fn read(raw: &[u8], max_headers: usize) -> Got {
        read_head(raw, max_headers, |r| match r {
            Read::Partial => Got::Partial,
            Read::Unreadable => Got::Unreadable,
            Read::Head(h) => Got::Head {
                method: h.method.to_owned(),
                target: h.target.to_owned(),
                minor: h.minor,
                fields: h.fields.len(),
                rest: raw[h.len..].to_vec(),
                note: h.note,
            },
        })
    }

    fn note(raw: &[u8]) -> HeadNote {
        match read(raw, 100) {
            Got::Head { note, .. } => note,
            other => panic!("{other:?} for {:?}", String::from_utf8_lossy(raw)),
        }
    }

    #[test]
    fn a_head_is_read_and_what_follows_left() {
        let raw = b"GET /v2/a/blobs/sha256:ab HTTP/1.1\r\nHost: x\r\nAccept: a\r\nAccept: b\r\n\r\nGET /next";
        assert_eq!(
            read(raw, 100),
            Got::Head {
                method: "GET".into(),
                target: "/v2/a/blobs/sha256:ab".into(),
                minor: 1,
                fields: 3,
                rest: b"GET /next".to_vec(),
                note: HeadNote::PLAIN,
            }
        );
        // Empty lines before the request line are skipped (RFC 9112 section 2.2).
        let Got::Head { method, minor, .. } = read(b"\r\n\r\nHEAD / HTTP/1.0\r\n\r\n", 100) else {
            panic!("leading empty lines")
        };
        assert_eq!((method.as_str(), minor), ("HEAD", 0));
    }

    #[test]
    fn incomplete_and_hostile_heads() {
        let oversized = format!("GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n", "a".repeat(70_000));
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(9));
        let table: &[(&[u8], Got)] = &[
            (b"", Got::Partial),
            (b"GET /v2/ HTTP/1.1\r\nHost: x\r\n", Got::Partial),
            (b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r", Got::Partial),
            // An oversized head is still partial here: the loops bound the buffer.
            (oversized.as_bytes(), Got::Partial),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Got::Unreadable),
            (b"PRI ", Got::Unreadable),
            (b"GET / HTTP/2.0\r\n\r\n", Got::Unreadable),
            (b"GET / HTTP/1.2\r\n\r\n", Got::Unreadable),
            (b"GET / HTTX/1.1\r\n\r\n", Got::Unreadable),
            (b"GET /\r\n\r\n", Got::Unreadable),
            (b"GARBAGE\r\n\r\n", Got::Unreadable),
            (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", Got::Unreadable),
            (
                b"GET / HTTP/1.1\r\nContent-Length : 5\r\n\r\n",
                Got::Unreadable,
            ),
            (b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", Got::Unreadable),
            (b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", Got::Unreadable),
            (b"GET / HTTP/1.1\r\nX\x00: y\r\n\r\n", Got::Unreadable),
            // obs-fold: a field value continued on an indented line.
            (
                b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
                Got::Unreadable,
            ),
            (b"GET / HTTP/1.1\r\n Host: x\r\n\r\n", Got::Unreadable),
            // More fields than allowed.
            (many.as_bytes(), Got::Unreadable),
        ];
        for (raw, want) in table {
            assert_eq!(&read(raw, 8), want, "{:?}", String::from_utf8_lossy(raw));
        }
        // More than the inline storage holds when the limit allows it.
        let lots = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(150));
        assert!(matches!(
            read(lots.as_bytes(), 200),
            Got::Head { fields: 150, .. }
        ));
        assert_eq!(read(lots.as_bytes(), 100), Got::Unreadable);
    }

    #[test]
    fn framing_is_noted() {
        let table: &[(&[u8], HeadNote)] = &[
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", HeadNote::PLAIN),
            (
                b"PUT / HTTP/1.1\r\ncontent-length:  12 \r\n\r\n",
                HeadNote {
                    length: Length::Known(12),
                    ..HeadNote::PLAIN
                },
            ),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                HeadNote {
                    length: Length::Known(5),
                    ..HeadNote::PLAIN
                },
            ),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                HeadNote {
                    length: Length::Differing,
                    ..HeadNote::PLAIN
                },
            ),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
                HeadNote {
                    length: Length::Unreadable,
                    ..HeadNote::PLAIN
                },
            ),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
                HeadNote {
                    length: Length::Unreadable,
                    ..HeadNote::PLAIN
                },
            ),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: x\r\nContent-Length: 6\r\n\r\n",
                HeadNote {
                    length: Length::Unreadable,
                    ..HeadNote::PLAIN
                },
            ),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                HeadNote {
                    length: Length::Unreadable,
                    ..HeadNote::PLAIN
                },
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                HeadNote {
                    length: Length::Known(5),
                    transfer_encoding: true,
                    ..HeadNote::PLAIN
                },
            ),
            (
                b"GET / HTTP/1.1\nHost: x\r\n\r\n",
                HeadNote {
                    bare_lf: true,
                    ..HeadNote::PLAIN
                },
            ),
            (
                b"GET / HTTP/1.1\r\nHost: x\n\n",
                HeadNote {
                    bare_lf: true,
                    ..HeadNote::PLAIN
                },
            ),
            (
                b"\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
                HeadNote {
                    bare_lf: true,
                    ..HeadNote::PLAIN
                },
            ),
        ];
        for (raw, want) in table {
            assert_eq!(note(raw), *want, "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn refusals_as_hyper_makes_them() {
        let status = |raw: &[u8]| refusal(raw, 8).map(|r| r.status);
        for (raw, want) in [
            (&b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"[..], None),
            (b"GET /v2/ HTTP/1.1\r\nHost: x\r\n", None),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", None),
            (b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", None),
            (b"GET /v2/ HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n", Some(400)),
            (b"GET /v2/ HTTP/1.1\r\nX-A : a\r\n\r\n", Some(400)),
            (b"GET /v2/ HTTP/1.1\r\nX-A: a\0b\r\n\r\n", Some(400)),
            (b"GET /v2/\0 HTTP/1.1\r\n\r\n", Some(400)),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
                Some(400),
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", Some(400)),
            (b"GET /v2/ HTTP/1.2\r\n\r\n", Some(505)),
            (b"GET /v2/ HTTP/9.9\r\n\r\n", Some(505)),
        ] {
            assert_eq!(status(raw), want, "{:?}", String::from_utf8_lossy(raw));
        }
        let many = format!("GET /v2/ HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(9));
        assert_eq!(status(many.as_bytes()), Some(431));
    }

    #[test]
    fn ambiguous_lengths_are_the_smuggling_shape() {
        let both = HeadNote {
            length: Length::Known(0),
            transfer_encoding: true,
            ..HeadNote::PLAIN
        };
        assert!(ambiguous(&both).is_some());
        let differing = HeadNote {
            length: Length::Differing,
            ..HeadNote::PLAIN
        };
        assert!(ambiguous(&differing).is_some());
        for fine in [
            HeadNote::PLAIN,
            HeadNote {
                length: Length::Known(3),
                ..HeadNote::PLAIN
            },
            HeadNote {
                transfer_encoding: true,
                ..HeadNote::PLAIN
            },
            // Not a length at all: hyper answers it, nothing is read after it.
            HeadNote {
                length: Length::Unreadable,
                ..HeadNote::PLAIN
            },
        ] {
            assert_eq!(ambiguous(&fine), None, "{fine:?}");
        }
        assert_eq!(both.body_len(), None);
        assert_eq!(differing.body_len(), None);
        assert_eq!(HeadNote::PLAIN.body_len(), Some(0));
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
        let ok = Some(HeadNote::PLAIN);
        assert_eq!(check(&req(h11, &[("host", "a")]), ok), Ok(false));
        assert_eq!(check(&req(Version::HTTP_10, &[]), ok), Ok(false));
        assert_eq!(check(&req(Version::HTTP_2, &[]), None), Ok(false));
        let last = Some(HeadNote {
            last: true,
            transfer_encoding: true,
            ..HeadNote::PLAIN
        });
        assert_eq!(
            check(
                &req(h11, &[("host", "a"), ("transfer-encoding", "Chunked")]),
                last
            ),
            Ok(true)
        );
        let te = Some(HeadNote {
            transfer_encoding: true,
            ..HeadNote::PLAIN
        });
        let refused = [
            (req(h11, &[("host", "a")]), None),
            (req(h11, &[]), ok),
            (req(h11, &[("host", "a"), ("host", "b")]), ok),
            (
                req(
                    h11,
                    &[("host", "a"), ("transfer-encoding", "gzip, chunked")],
                ),
                te,
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
                te,
            ),
            (
                req(h11, &[("host", "a")]),
                Some(HeadNote {
                    bare_lf: true,
                    ..HeadNote::PLAIN
                }),
            ),
            (
                req(h11, &[("host", "a")]),
                Some(HeadNote {
                    length: Length::Differing,
                    ..HeadNote::PLAIN
                }),
            ),
            (
                req(h11, &[("host", "a"), ("transfer-encoding", "chunked")]),
                Some(HeadNote {
                    length: Length::Known(4),
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

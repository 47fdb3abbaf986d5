//! Pure parsing of a single `Range: bytes=...` header against a known blob size.

/// The outcome of a `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// Serve the whole blob (no header, a multi-range or a malformed one, which RFC 9110
    /// lets a server ignore).
    Full,
    /// Serve bytes `start..=end`.
    Partial {
        /// First byte.
        start: u64,
        /// Last byte, inclusive.
        end: u64,
    },
    /// The range lies outside the blob: 416.
    Unsatisfiable,
}

/// Interprets `header` (`bytes=a-b`, `bytes=a-`, `bytes=-n`) for a blob of `len` bytes.
pub fn parse(header: Option<&str>, len: u64) -> RangeSpec {
    let Some(h) = header else {
        return RangeSpec::Full;
    };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeSpec::Full;
    };
    if spec.contains(',') {
        return RangeSpec::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Full;
    };
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, true) => RangeSpec::Full,
        // Suffix: the last n bytes.
        (true, false) => match num(b) {
            None => RangeSpec::Full,
            Some(0) => RangeSpec::Unsatisfiable,
            Some(_) if len == 0 => RangeSpec::Unsatisfiable,
            Some(n) => RangeSpec::Partial {
                start: len.saturating_sub(n),
                end: len - 1,
            },
        },
        (false, open) => {
            let Some(start) = num(a) else {
                return RangeSpec::Full;
            };
            let end = if open {
                u64::MAX
            } else {
                match num(b) {
                    Some(e) if e >= start => e,
                    _ => return RangeSpec::Full,
                }
            };
            if start >= len {
                RangeSpec::Unsatisfiable
            } else {
                RangeSpec::Partial {
                    start,
                    end: end.min(len - 1),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeSpec::*;

    #[test]
    fn table() {
        let p = |h: &str, len| parse(Some(h), len);
        assert_eq!(parse(None, 10), Full);
        assert_eq!(p("bytes=0-4", 10), Partial { start: 0, end: 4 });
        assert_eq!(p("bytes=5-", 10), Partial { start: 5, end: 9 });
        assert_eq!(p("bytes=5-100", 10), Partial { start: 5, end: 9 });
        assert_eq!(p("bytes=-3", 10), Partial { start: 7, end: 9 });
        assert_eq!(p("bytes=-30", 10), Partial { start: 0, end: 9 });
        assert_eq!(p("bytes=9-9", 10), Partial { start: 9, end: 9 });
        assert_eq!(p("bytes=10-", 10), Unsatisfiable);
        assert_eq!(p("bytes=10-20", 10), Unsatisfiable);
        assert_eq!(p("bytes=-0", 10), Unsatisfiable);
        assert_eq!(p("bytes=0-", 0), Unsatisfiable);
        assert_eq!(p("bytes=-1", 0), Unsatisfiable);
        for ignored in [
            "bytes=0-1,3-4",
            "items=0-1",
            "bytes=5-2",
            "bytes=a-b",
            "bytes=-",
            "bytes=+1-2",
            "bytes=0x1-",
        ] {
            assert_eq!(p(ignored, 10), Full, "{ignored}");
        }
        assert_eq!(p("bytes=99999999999999999999-", 10), Full);
    }
}

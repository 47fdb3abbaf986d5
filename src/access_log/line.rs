//! The access line's own writer: a `tracing` layer that formats `regcache::access_log`
//! events into a reused buffer, byte for byte as `tracing-subscriber`'s JSON (flattened) or
//! plain text formatter would, without their per-event maps and allocations. One line per
//! request made the generic formatter a sixth of a cached manifest's cost. The generic
//! formatter keeps every other event, and `RUST_LOG` filters both alike.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer};

use crate::units::SecondText;

/// The target of the access-log event.
pub const TARGET: &str = "regcache::access_log";

/// How the line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// One JSON object, fields flattened (as `--log-format json`).
    Json,
    /// `<time>  INFO regcache::access_log: access name=value …`, without colour.
    Plain,
}

/// Writes access events to `make`'s writer, one line each; other events are not its own
/// (give it a filter that passes [`TARGET`] alone).
pub struct AccessLines<W> {
    make: W,
    style: Style,
}

impl<W> AccessLines<W> {
    /// Lines in `style` to `make`.
    pub fn new(make: W, style: Style) -> Self {
        AccessLines { make, style }
    }
}

thread_local! {
    // The line being built, and the text of one field, kept between events.
    static BUFFERS: RefCell<(Vec<u8>, String)> = const { RefCell::new((Vec::new(), String::new())) };
    // The timestamp up to the seconds, for the second it was made in.
    static SECOND: SecondText = const { SecondText::new() };
}

impl<S, W> Layer<S> for AccessLines<W>
where
    S: Subscriber,
    W: for<'a> MakeWriter<'a> + 'static,
{
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        BUFFERS.with(|cell| {
            // An event from inside a writer's own work would find the buffers in use: it is
            // dropped rather than tangled into this line.
            let Ok(mut bufs) = cell.try_borrow_mut() else {
                return;
            };
            let (line, text) = &mut *bufs;
            line.clear();
            write_line(line, text, event, self.style, SystemTime::now());
            let _ = self.make.make_writer().write_all(line);
        });
    }
}

/// Formats `event` at `now` into `line` (`text` is scratch space for one field).
fn write_line(
    line: &mut Vec<u8>,
    text: &mut String,
    event: &Event<'_>,
    style: Style,
    now: SystemTime,
) {
    let meta = event.metadata();
    match style {
        Style::Json => {
            line.extend_from_slice(b"{\"timestamp\":\"");
            timestamp(line, now);
            line.extend_from_slice(b"\",\"level\":\"");
            line.extend_from_slice(meta.level().as_str().as_bytes());
            line.push(b'"');
            event.record(&mut JsonFields { line, text });
            line.extend_from_slice(b",\"target\":");
            json_str(line, meta.target());
            line.extend_from_slice(b"}\n");
        }
        Style::Plain => {
            timestamp(line, now);
            let _ = write!(line, " {:>5} {}: ", meta.level().as_str(), meta.target());
            let mut fields = PlainFields {
                line,
                text,
                first: true,
            };
            event.record(&mut fields);
            line.push(b'\n');
        }
    }
}

/// Writes `now` as `tracing-subscriber` does: RFC 3339 in UTC with microseconds.
fn timestamp(line: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|second| {
        second.push(secs, line, |text| {
            let (days, rest) = (secs / 86_400, secs % 86_400);
            let (y, m, d) = civil_from_days(days as i64);
            let _ = write!(
                text,
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.",
                rest / 3600,
                rest % 3600 / 60,
                rest % 60
            );
        });
    });
    let _ = write!(line, "{:06}Z", since.subsec_micros());
}

/// The proleptic Gregorian date (year, month, day) of `days` since 1970-01-01 (Howard
/// Hinnant's algorithm). Public for the test support's date stamps.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `s` as a JSON string. Most values need no escape (names, paths, digests, ids): those are
/// copied as they are, the rest go through `serde_json`.
fn json_str(line: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        line.reserve(s.len() + 2);
        line.push(b'"');
        line.extend_from_slice(s.as_bytes());
        line.push(b'"');
        return;
    }
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *line, s);
}

/// Fields as `,"name":value`.
struct JsonFields<'a> {
    line: &'a mut Vec<u8>,
    text: &'a mut String,
}

impl JsonFields<'_> {
    fn name(&mut self, field: &Field) {
        self.line.push(b',');
        json_str(self.line, field.name());
        self.line.push(b':');
    }
}

impl Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.name(field);
        json_str(self.line, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.name(field);
        let _ = serde_json::to_writer(&mut *self.line, &value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.name(field);
        let _ = serde_json::to_writer(&mut *self.line, &value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.name(field);
        let _ = serde_json::to_writer(&mut *self.line, &value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.name(field);
        let _ = serde_json::to_writer(&mut *self.line, &value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.name(field);
        self.text.clear();
        let _ = write!(self.text, "{value:?}");
        json_str(self.line, self.text);
    }
}

/// Fields as `tracing-subscriber`'s default text formatter writes them: the message bare,
/// then ` name=value`, strings quoted.
struct PlainFields<'a> {
    line: &'a mut Vec<u8>,
    text: &'a mut String,
    first: bool,
}

impl PlainFields<'_> {
    fn sep(&mut self) {
        if !std::mem::replace(&mut self.first, false) {
            self.line.push(b' ');
        }
    }
}

impl Visit for PlainFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.sep();
            self.line.extend_from_slice(value.as_bytes());
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.sep();
        self.text.clear();
        if field.name() == "message" {
            let _ = write!(self.text, "{value:?}");
        } else {
            let _ = write!(self.text, "{}={value:?}", field.name());
        }
        self.line.extend_from_slice(self.text.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// A writer into shared memory.
    #[derive(Clone, Default)]
    struct Memory(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Memory {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Memory {
        type Writer = Memory;
        fn make_writer(&'a self) -> Memory {
            self.clone()
        }
    }

    impl Memory {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// The access event as the access log sends it, and one with the awkward values: an
    /// empty upstream, quotes and a backslash in a path, a whole-number duration.
    fn events() {
        tracing::info!(
            target: "regcache::access_log",
            request_id = %"75bfd937-2",
            method = %http::Method::GET,
            path = %"/v2/team/app/manifests/sha256:f4cd",
            status = 200u16,
            bytes = 440u64,
            duration_ms = 0.073f64,
            cache = "hit",
            upstream = "up",
            complete = true,
            "access"
        );
        tracing::info!(
            target: "regcache::access_log",
            request_id = %"x\"y",
            method = %http::Method::HEAD,
            path = %"/v2/a\\b/\u{7f}\"é",
            status = 404u16,
            bytes = 0u64,
            duration_ms = 2.0f64,
            cache = "",
            upstream = "",
            complete = false,
            "access"
        );
    }

    /// What ours and the generic formatter write for [`events`], in `style`.
    fn both(style: Style) -> (String, String) {
        let (ours, theirs) = (Memory::default(), Memory::default());
        let generic = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(theirs.clone());
        let subscriber = tracing_subscriber::registry().with(
            AccessLines::new(ours.clone(), style).with_filter(filter_fn(|m| m.target() == TARGET)),
        );
        match style {
            Style::Json => {
                let s = subscriber.with(generic.json().flatten_event(true));
                tracing::subscriber::with_default(s, events);
            }
            Style::Plain => {
                let s = subscriber.with(generic);
                tracing::subscriber::with_default(s, events);
            }
        }
        (ours.text(), theirs.text())
    }

    /// The lines without their timestamps, which differ by the time between the two writes.
    fn untimed(text: &str, style: Style) -> Vec<String> {
        text.lines()
            .map(|l| match style {
                Style::Json => {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    let t = v["timestamp"].take();
                    assert_rfc3339(t.as_str().unwrap());
                    // Field order matters too: compare the text with the time blanked.
                    l.replace(t.as_str().unwrap(), "T")
                }
                Style::Plain => {
                    let (t, rest) = l.split_once(' ').unwrap();
                    assert_rfc3339(t);
                    rest.to_owned()
                }
            })
            .collect()
    }

    fn assert_rfc3339(t: &str) {
        let b = t.as_bytes();
        assert_eq!(b.len(), 27, "{t}");
        assert_eq!(
            (b[4], b[7], b[10], b[13], b[16], b[19], b[26]),
            (b'-', b'-', b'T', b':', b':', b'.', b'Z'),
            "{t}"
        );
    }

    #[test]
    fn json_strings_are_written_as_serde_json_writes_them() {
        for s in [
            "",
            "/v2/library/alpine/manifests/latest",
            "sha256:0123abcd",
            "a \"quoted\" \\ value",
            "tab\there\nand\u{1}\u{1f}",
            "\u{7f} del, é, 鏡, 🐳",
            "<>&'/",
        ] {
            let mut fast = Vec::new();
            json_str(&mut fast, s);
            assert_eq!(fast, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn json_lines_are_the_generic_formatters_own() {
        let (ours, theirs) = both(Style::Json);
        assert_eq!(ours.lines().count(), 2, "{ours}");
        assert_eq!(untimed(&ours, Style::Json), untimed(&theirs, Style::Json));
    }

    #[test]
    fn plain_lines_are_the_generic_formatters_own() {
        let (ours, theirs) = both(Style::Plain);
        assert_eq!(ours.lines().count(), 2, "{ours}");
        assert_eq!(untimed(&ours, Style::Plain), untimed(&theirs, Style::Plain));
    }

    #[test]
    fn timestamps_are_utc_with_microseconds() {
        let at = |secs: u64, micros: u32| {
            let mut line = Vec::new();
            timestamp(
                &mut line,
                UNIX_EPOCH + std::time::Duration::new(secs, micros * 1000),
            );
            String::from_utf8(line).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_796_402_925, 629_913), "2026-12-04T16:48:45.629913Z");
        // The cached second is left for a new one.
        assert_eq!(at(1_796_402_926, 0), "2026-12-04T16:48:46.000000Z");
        assert_eq!(at(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
    }
}

//! Human-readable durations (`"5m"`, `"250ms"`) and sizes (`"4MiB"`, `"200GiB"`) for config files,
//! sizes written for people (`1.5 MiB`), and wall-clock text formatted once a second.

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Sizes for people: `512 B`, `1.5 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A count and its noun, in the plural unless it is one: `1 manifest`, `2 manifests`,
/// `3 repositories`.
pub fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        return format!("1 {noun}");
    }
    match noun.strip_suffix('y') {
        Some(stem) if !stem.ends_with(['a', 'e', 'o', 'u']) => format!("{n} {stem}ies"),
        _ => format!("{n} {noun}s"),
    }
}

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as a number and a unit: `ms`, `s`, `m`, `h`, `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{s:?} has no unit (use ms, s, m, h or d)"))?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} does not start with a whole number"))?;
        let ms = match unit.trim() {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => {
                return Err(format!(
                    "unknown duration unit {other:?} (use ms, s, m, h or d)"
                ));
            }
        };
        n.checked_mul(ms)
            .map(|ms| HumanDuration(Duration::from_millis(ms)))
            .ok_or_else(|| format!("{s:?} is too long"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms >= size && ms % size == 0 {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A byte size written as a number and an optional unit: `B`, `KB`, `MB`, `GB`, `TB`
/// (powers of 1000) or `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} does not start with a whole number"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 >= size && self.0 % size == 0 {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Wall-clock text that changes once a second (an HTTP date, the seconds of a log
/// timestamp), formatted again only when the second changed: each thread keeps its own in a
/// `thread_local!`, so a busy server formats it once a second, not once a request.
pub struct SecondText(RefCell<(u64, String)>);

impl SecondText {
    /// Nothing formatted yet.
    pub const fn new() -> Self {
        SecondText(RefCell::new((u64::MAX, String::new())))
    }

    /// Appends the text of `second` (since the Unix epoch) to `out`; `format` writes it into
    /// an empty string when the second is not the one last formatted.
    pub fn push(&self, second: u64, out: &mut Vec<u8>, format: impl FnOnce(&mut String)) {
        let mut text = self.0.borrow_mut();
        if text.0 != second {
            text.1.clear();
            format(&mut text.1);
            text.0 = second;
        }
        out.extend_from_slice(text.1.as_bytes());
    }
}

impl Default for SecondText {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_for_people() {
        assert_eq!(count(1, "manifest"), "1 manifest");
        assert_eq!(count(0, "manifest"), "0 manifests");
        assert_eq!(count(3, "repository"), "3 repositories");
        assert_eq!(count(2, "day"), "2 days");
        assert_eq!(count(1, "repository"), "1 repository");
    }

    #[test]
    fn durations() {
        let d = |s: &str| s.parse::<HumanDuration>().map(|d| d.0);
        assert_eq!(d("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(d("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(d("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(d("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(d("1d"), Ok(Duration::from_secs(86400)));
        for bad in [
            "",
            "5",
            "m",
            "1.5s",
            "-1s",
            "5 weeks",
            "99999999999999999999d",
        ] {
            assert!(d(bad).is_err(), "{bad:?}");
        }
        assert_eq!(HumanDuration(Duration::from_secs(300)).to_string(), "5m");
        assert_eq!(
            HumanDuration(Duration::from_millis(1500)).to_string(),
            "1500ms"
        );
    }

    #[test]
    fn sizes() {
        let b = |s: &str| s.parse::<ByteSize>().map(|b| b.0);
        assert_eq!(b("4MiB"), Ok(4 << 20));
        assert_eq!(b("200GiB"), Ok(200 << 30));
        assert_eq!(b("10MB"), Ok(10_000_000));
        assert_eq!(b("512"), Ok(512));
        for bad in ["", "MiB", "4 mib", "1.5GiB", "-1"] {
            assert!(b(bad).is_err(), "{bad:?}");
        }
        assert_eq!(ByteSize(4 << 20).to_string(), "4MiB");
    }

    #[test]
    fn second_text_is_formatted_once_per_second() {
        let text = SecondText::new();
        let mut made = 0;
        let mut out = Vec::new();
        for second in [5, 5, 5, 6, 6, 5] {
            text.push(second, &mut out, |s| {
                made += 1;
                s.push_str(&format!("<{second}>"));
            });
        }
        assert_eq!(String::from_utf8(out).unwrap(), "<5><5><5><6><6><5>");
        assert_eq!(made, 3, "once for 5, once for 6, once for 5 again");
    }
}

//! The status page: a bounded count of the most pulled repositories, and the server-rendered
//! HTML (inline CSS, no script) showing cache use, hit ratio, upstream health, downloads under
//! way and those repositories. Every text that came from a request or an upstream is escaped.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use crate::units::human_bytes;

/// Repositories tracked at most; the page shows the first [`SHOWN`].
const CAPACITY: usize = 256;
/// Repositories shown on the page.
pub const SHOWN: usize = 10;

/// Pull counts per repository, bounded with the space-saving algorithm: at most
/// [`CAPACITY`] names are tracked; a new name arriving when full replaces the least pulled one
/// and starts from its count, so a name pulled often is never lost. Each name also keeps the
/// count it inherited, and is ranked and shown by the pulls it is sure to have had (its
/// count less that), which are exact for every name tracked since its first pull.
#[derive(Debug, Default)]
pub struct TopPulls {
    // name → (count, inherited)
    counts: HashMap<String, (u64, u64)>,
}

impl TopPulls {
    /// Counts one pull of `name`.
    pub fn record(&mut self, name: &str) {
        if let Some((c, _)) = self.counts.get_mut(name) {
            *c += 1;
            return;
        }
        let mut start = 0;
        if self.counts.len() >= CAPACITY {
            // O(CAPACITY) only for a name not yet tracked while the table is full.
            if let Some((min_name, min)) = self
                .counts
                .iter()
                .min_by(|a, b| a.1.0.cmp(&b.1.0).then_with(|| b.0.cmp(a.0)))
                .map(|(n, (c, _))| (n.clone(), *c))
            {
                self.counts.remove(&min_name);
                start = min;
            }
        }
        self.counts.insert(name.to_owned(), (start + 1, start));
    }

    /// The `n` most pulled names with the pulls each is sure to have had, most first (ties
    /// by name).
    pub fn top(&self, n: usize) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .counts
            .iter()
            .map(|(k, (c, inherited))| (k.clone(), c - inherited))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One upstream on the page.
#[derive(Debug, Clone)]
pub struct UpstreamView {
    /// Configured name.
    pub name: String,
    /// Its URL.
    pub url: String,
    /// `up`, `failing`, `down`, `unknown` or `offline`.
    pub state: &'static str,
    /// When it last answered.
    pub last_success: Option<SystemTime>,
    /// When and how it last failed.
    pub last_error: Option<(SystemTime, String)>,
    /// When it was last asked anything (a request or a health probe).
    pub last_checked: Option<SystemTime>,
}

/// One download under way.
#[derive(Debug, Clone)]
pub struct DownloadView {
    /// The blob's digest.
    pub digest: String,
    /// Bytes written so far.
    pub written: u64,
    /// Its length, when the upstream sent one.
    pub total: Option<u64>,
    /// Time since it started.
    pub elapsed: Duration,
}

/// The fleet on the page (`[fleet]` set).
#[derive(Debug, Clone, Default)]
pub struct FleetView {
    /// `fleet: ok` or why it is degraded.
    pub summary: &'static str,
    /// The store's URL.
    pub store: String,
    /// This replica's advertised URL and id.
    pub advertise: String,
    /// This replica's id.
    pub replica: String,
    /// Leases won, followed, taken over, renewals refused.
    pub leases: [u64; 4],
    /// Store requests, all operations.
    pub store_requests: u64,
    /// Bytes read from and written to the store.
    pub store_bytes: (u64, u64),
    /// Blob bytes served to and received from other replicas.
    pub peer_bytes: (u64, u64),
    /// Times the replica went degraded.
    pub degraded_transitions: u64,
}

/// Everything the page shows, gathered from the live state.
#[derive(Debug, Clone, Default)]
pub struct StatusView {
    /// regcache's version.
    pub version: &'static str,
    /// Time since start.
    pub uptime: Duration,
    /// Bytes cached, when counted.
    pub cache_bytes: Option<u64>,
    /// Entries cached, when counted.
    pub cache_entries: Option<u64>,
    /// `cache.max_size`.
    pub cache_limit: Option<u64>,
    /// Entries and bytes evicted since start.
    pub evictions: (u64, u64),
    /// `(kind, hits, misses, stale)` per kind.
    pub lookups: Vec<(&'static str, u64, u64, u64)>,
    /// Body bytes sent from the cache.
    pub served_from_cache: u64,
    /// Body bytes sent as fetched from upstreams.
    pub served_from_upstream: u64,
    /// Body bytes received from upstreams.
    pub fetched: u64,
    /// The upstreams.
    pub upstreams: Vec<UpstreamView>,
    /// Downloads under way.
    pub downloads: Vec<DownloadView>,
    /// Most pulled repositories.
    pub top: Vec<(String, u64)>,
    /// Rates over the last hour, for the charts.
    pub history: Vec<crate::history::Interval>,
    /// The fleet, when `[fleet]` is set.
    pub fleet: Option<FleetView>,
}

impl StatusView {
    /// Share of lookups answered from the cache (hits and stale answers), if any were made.
    pub fn hit_ratio(&self) -> Option<f64> {
        let (served, all) = self
            .lookups
            .iter()
            .fold((0u64, 0u64), |(s, a), (_, h, m, st)| {
                (s + h + st, a + h + m + st)
            });
        (all > 0).then(|| served as f64 / all as f64)
    }

    /// Upstream traffic saved: bytes sent to clients beyond what was fetched.
    pub fn bytes_saved(&self) -> u64 {
        (self.served_from_cache + self.served_from_upstream).saturating_sub(self.fetched)
    }
}

fn ago(t: SystemTime, now: SystemTime) -> String {
    match now.duration_since(t) {
        Ok(d) => format!("{} ago", human_duration(d)),
        Err(_) => "just now".into(),
    }
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        3600..=86399 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        _ => format!("{} d {} h", s / 86400, (s % 86400) / 3600),
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 * 100.0 / whole as f64).min(100.0)
    }
}

const STYLE: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:2rem;color:#1d232a;background:#f6f7f9}\
h1{font-size:1.4rem;margin:0 0 .2rem}h2{font-size:1.1rem;margin:1.6rem 0 .5rem}\
.sub{color:#5b6571;margin:0 0 1rem}\
.cards{display:flex;flex-wrap:wrap;gap:1rem;margin-bottom:1rem}\
.card{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:.8rem 1rem;min-width:12rem}\
.card b{display:block;font-size:1.5rem}\
table{border-collapse:collapse;background:#fff;border:1px solid #dde1e6;min-width:40rem}\
th,td{text-align:left;padding:.35rem .7rem;border-bottom:1px solid #eceef1}\
th{background:#eef1f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}\
code{font-size:.85em}progress{width:12rem}\
.up{color:#17803d}.failing{color:#b45309}.down{color:#b91c1c}.unknown,.offline{color:#5b6571}\
.empty{color:#5b6571}";

/// Renders the status page.
pub fn render(v: &StatusView, now: SystemTime) -> String {
    let mut h = String::with_capacity(8 * 1024);
    // `write!` to a String cannot fail.
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width\">\
<meta http-equiv=\"refresh\" content=\"10\">\
<title>regcache status</title><style>{STYLE}{}</style></head><body>\
<h1>regcache</h1><p class=\"sub\">version {} · up {} · refreshes every 10 s</p>",
        crate::charts::STYLE,
        escape(v.version),
        human_duration(v.uptime)
    );

    h.push_str("<h2>Cache</h2><div class=\"cards\">");
    let size = match (v.cache_bytes, v.cache_limit) {
        (Some(b), Some(l)) => format!(
            "<b id=\"cache-size\" data-bytes=\"{b}\" data-limit=\"{l}\">{} / {}</b>\
<progress id=\"cache-use\" value=\"{b}\" max=\"{l}\"></progress> {:.1}% of the limit",
            human_bytes(b),
            human_bytes(l),
            percent(b, l)
        ),
        (Some(b), None) => format!(
            "<b id=\"cache-size\" data-bytes=\"{b}\">{}</b>no limit (cache.max_size unset)",
            human_bytes(b)
        ),
        (None, _) => "<b id=\"cache-size\">counting…</b>".to_owned(),
    };
    let _ = write!(h, "<div class=\"card\">Size{size}</div>");
    let _ = write!(
        h,
        "<div class=\"card\">Entries<b id=\"cache-entries\">{}</b>{} evicted ({})</div>",
        v.cache_entries
            .map_or_else(|| "counting…".to_owned(), |e| e.to_string()),
        v.evictions.0,
        human_bytes(v.evictions.1)
    );
    let ratio = v.hit_ratio();
    let _ = write!(
        h,
        "<div class=\"card\">Hit ratio<b id=\"hit-ratio\" data-ratio=\"{}\">{}</b>lookups answered from the cache</div>",
        ratio.map_or_else(String::new, |r| format!("{r:.4}")),
        ratio.map_or_else(|| "–".to_owned(), |r| format!("{:.1}%", r * 100.0))
    );
    let saved = v.bytes_saved();
    let _ = write!(
        h,
        "<div class=\"card\">Bytes saved<b id=\"bytes-saved\" data-bytes=\"{saved}\">{}</b>\
{} served from the cache, {} fetched upstream</div></div>",
        human_bytes(saved),
        human_bytes(v.served_from_cache),
        human_bytes(v.fetched)
    );

    h.push_str(
        "<table id=\"lookups\"><tr><th>lookup</th><th>hits</th><th>misses</th><th>stale</th></tr>",
    );
    for (kind, hit, miss, stale) in &v.lookups {
        let _ = write!(
            h,
            "<tr><td>{kind}</td><td class=\"n\">{hit}</td><td class=\"n\">{miss}</td><td class=\"n\">{stale}</td></tr>"
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Last hour</h2>");
    h.push_str(&crate::charts::render(&v.history));

    h.push_str("<h2>Downloads under way</h2>");
    if v.downloads.is_empty() {
        h.push_str("<p class=\"empty\" id=\"no-downloads\">None.</p>");
    } else {
        h.push_str("<table id=\"downloads\"><tr><th>blob</th><th>progress</th><th>bytes</th><th>running</th></tr>");
        for d in &v.downloads {
            let (bar, figures) = match d.total {
                Some(t) => (
                    format!(
                        "<progress value=\"{}\" max=\"{t}\"></progress> {:.1}%",
                        d.written,
                        percent(d.written, t)
                    ),
                    format!("{} / {}", human_bytes(d.written), human_bytes(t)),
                ),
                None => (
                    "<progress></progress>".to_owned(),
                    format!("{} / unknown", human_bytes(d.written)),
                ),
            };
            let _ = write!(
                h,
                "<tr class=\"download\" data-digest=\"{digest}\" data-written=\"{}\" data-total=\"{}\">\
<td><code>{digest}</code></td><td>{bar}</td><td class=\"n\">{figures}</td><td>{}</td></tr>",
                d.written,
                d.total.map_or_else(String::new, |t| t.to_string()),
                human_duration(d.elapsed),
                digest = escape(&d.digest),
            );
        }
        h.push_str("</table>");
    }

    h.push_str("<h2>Upstreams</h2><table id=\"upstreams\"><tr><th>name</th><th>URL</th><th>state</th><th>last checked</th><th>last success</th><th>last error</th></tr>");
    for u in &v.upstreams {
        let _ = write!(
            h,
            "<tr class=\"upstream\" data-name=\"{name}\" data-state=\"{state}\"><td>{name}</td><td><code>{url}</code></td>\
<td class=\"{state}\">{state}</td><td>{checked}</td><td>{ok}</td><td>{err}</td></tr>",
            name = escape(&u.name),
            url = escape(&u.url),
            state = u.state,
            checked = u
                .last_checked
                .map_or_else(|| "–".to_owned(), |t| ago(t, now)),
            ok = u
                .last_success
                .map_or_else(|| "–".to_owned(), |t| ago(t, now)),
            err = u.last_error.as_ref().map_or_else(
                || "–".to_owned(),
                |(t, e)| format!("{}: {}", ago(*t, now), escape(e))
            ),
        );
    }
    h.push_str("</table>");

    if let Some(f) = &v.fleet {
        let state = if f.summary == "fleet: ok" {
            "up"
        } else {
            "down"
        };
        let _ = write!(
            h,
            "<h2>Fleet</h2><p id=\"fleet-state\" class=\"{state}\">{}</p>\
<p class=\"sub\">store <code>{}</code> · this replica <code>{}</code> ({})</p>\
<table id=\"fleet\"><tr><th>figure</th><th>value</th></tr>\
<tr><td>leases won</td><td class=\"n\" id=\"fleet-won\">{}</td></tr>\
<tr><td>leases followed</td><td class=\"n\" id=\"fleet-followed\">{}</td></tr>\
<tr><td>leases taken over</td><td class=\"n\" id=\"fleet-taken-over\">{}</td></tr>\
<tr><td>lease renewals refused</td><td class=\"n\" id=\"fleet-renewal-refused\">{}</td></tr>\
<tr><td>store requests</td><td class=\"n\" id=\"fleet-store-requests\">{}</td></tr>\
<tr><td>store bytes read / written</td><td class=\"n\">{} / {}</td></tr>\
<tr><td>peer bytes served / received</td><td class=\"n\">{} / {}</td></tr>\
<tr><td>times degraded</td><td class=\"n\" id=\"fleet-degraded\">{}</td></tr></table>",
            escape(f.summary),
            escape(&f.store),
            escape(&f.advertise),
            escape(&f.replica),
            f.leases[0],
            f.leases[1],
            f.leases[2],
            f.leases[3],
            f.store_requests,
            human_bytes(f.store_bytes.0),
            human_bytes(f.store_bytes.1),
            human_bytes(f.peer_bytes.0),
            human_bytes(f.peer_bytes.1),
            f.degraded_transitions,
        );
    }

    h.push_str("<h2>Most pulled</h2>");
    if v.top.is_empty() {
        h.push_str("<p class=\"empty\">No pulls yet.</p>");
    } else {
        h.push_str("<table id=\"top\"><tr><th>repository</th><th>pulls</th></tr>");
        for (name, n) in &v.top {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"n\">{n}</td></tr>",
                escape(name)
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(4 << 20), "4.0 MiB");
    }

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
    }

    #[test]
    fn top_pulls_are_bounded_and_keep_heavy_hitters() {
        let mut t = TopPulls::default();
        for _ in 0..50 {
            t.record("hub/library/alpine");
        }
        for i in 0..10_000 {
            t.record(&format!("hub/noise/{i}"));
        }
        for _ in 0..20 {
            t.record("hub/library/debian");
        }
        assert!(t.counts.len() <= CAPACITY);
        let top = t.top(2);
        assert_eq!(top[0], ("hub/library/alpine".to_owned(), 50));
        assert_eq!(top[1], ("hub/library/debian".to_owned(), 20));
    }

    #[test]
    fn the_page_escapes_what_came_from_outside() {
        let v = StatusView {
            version: "1",
            upstreams: vec![UpstreamView {
                name: "hub".into(),
                url: "http://x/".into(),
                state: "down",
                last_success: None,
                last_error: Some((SystemTime::now(), "<b>boom</b>".into())),
                last_checked: None,
            }],
            top: vec![("hub/<img src=x>".into(), 3)],
            lookups: vec![("blob", 1, 3, 0)],
            ..Default::default()
        };
        let page = render(&v, SystemTime::now());
        assert!(!page.contains("<img"));
        assert!(!page.contains("<b>boom"));
        assert!(page.contains("hub/&lt;img src=x&gt;"));
        assert!(page.contains("id=\"hit-ratio\" data-ratio=\"0.2500\">25.0%<"));
        assert!(page.contains("id=\"no-downloads\""));
    }
}

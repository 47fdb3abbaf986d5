//! The status page's charts of the last hour, drawn on the server as inline SVG (no script):
//! bytes served from the cache against bytes fetched upstream, the hit ratio, and requests
//! per second, each a step line over the intervals of [`crate::history`]. The x axis spans
//! the last hour, or the last 1, 5, 15 or 30 minutes while the process is younger.

use std::fmt::Write as _;

use crate::history::{Interval, SPAN};
use crate::units::human_bytes;

/// Drawing size in SVG units (the page scales it).
const WIDTH: f64 = 400.0;
const HEIGHT: f64 = 170.0;
/// Plot area margins: room for the y labels on the left and the x labels below.
const LEFT: f64 = 74.0;
const RIGHT: f64 = 10.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 24.0;

/// Colours of the series (the legend uses the same).
pub const CACHE: &str = "#2563eb";
/// Fetched upstream.
pub const FETCHED: &str = "#d97706";
/// Hit ratio.
pub const RATIO: &str = "#17803d";
/// Requests per second.
pub const REQUESTS: &str = "#7c3aed";

/// CSS for the charts, added to the page's style sheet.
pub const STYLE: &str = ".charts{display:flex;flex-wrap:wrap;gap:1rem}\
.chart{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:.6rem .8rem;margin:0}\
.chart figcaption{font-weight:600;margin-bottom:.2rem}.chart svg{display:block;width:400px;height:170px}\
.chart .axis{font:11px system-ui,sans-serif;fill:#5b6571}.chart .grid{stroke:#eceef1}\
.key{display:inline-block;margin-right:.8rem;font-size:.85rem;color:#39424c}\
.key i{display:inline-block;width:.8rem;height:.8rem;border-radius:2px;margin-right:.3rem;vertical-align:-1px}";

/// One line on a chart.
struct Series<'a> {
    name: &'a str,
    colour: &'a str,
    /// The value over each interval; `None` leaves a gap.
    values: Vec<Option<f64>>,
}

/// The three charts, or a note while there is nothing to draw yet.
pub fn render(intervals: &[Interval]) -> String {
    if intervals.is_empty() {
        return "<p class=\"empty\" id=\"no-history\">No traffic recorded yet: \
the charts fill in as regcache runs (one sample every 10 s, the last hour kept).</p>"
            .to_owned();
    }
    let mut h = String::from("<div class=\"charts\">");
    let bytes = [
        Series {
            name: "served from the cache",
            colour: CACHE,
            values: intervals.iter().map(|i| Some(i.served_cache)).collect(),
        },
        Series {
            name: "fetched upstream",
            colour: FETCHED,
            values: intervals.iter().map(|i| Some(i.fetched)).collect(),
        },
    ];
    let top = nice_bytes(max_of(&bytes));
    h.push_str(&chart(
        "chart-bytes",
        "Bytes per second",
        intervals,
        &bytes,
        top,
        |v| format!("{}/s", human_bytes(v.round() as u64).replace(".0 ", " ")),
    ));
    let ratio = [Series {
        name: "lookups answered from the cache",
        colour: RATIO,
        values: intervals.iter().map(|i| i.hit_ratio).collect(),
    }];
    h.push_str(&chart(
        "chart-hit-ratio",
        "Hit ratio",
        intervals,
        &ratio,
        1.0,
        |v| format!("{:.0}%", v * 100.0),
    ));
    let requests = [Series {
        name: "requests answered",
        colour: REQUESTS,
        values: intervals.iter().map(|i| Some(i.requests)).collect(),
    }];
    let top = nice_ceiling(max_of(&requests));
    h.push_str(&chart(
        "chart-requests",
        "Requests per second",
        intervals,
        &requests,
        top,
        |v| {
            if v >= 10.0 || v == 0.0 {
                format!("{v:.0}/s")
            } else {
                format!("{v:.1}/s")
            }
        },
    ));
    h.push_str("</div>");
    h
}

fn max_of(series: &[Series<'_>]) -> f64 {
    series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .fold(0.0, |m: f64, v| m.max(*v))
}

/// The smallest 1, 2 or 5 × 10ⁿ at or above `v`; 1 for
/// nothing at all, so an idle chart still has an axis.
fn nice_ceiling(v: f64) -> f64 {
    if !v.is_finite() || v <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|c| *c >= v * (1.0 - 1e-9))
        .unwrap_or(10.0 * magnitude)
}

/// [`nice_ceiling`] in powers of 1024, so byte labels read `2.0 MiB/s`, not `1.9 MiB/s`.
fn nice_bytes(v: f64) -> f64 {
    if !v.is_finite() || v <= 1.0 {
        return 1.0;
    }
    let unit = 1024f64.powf(v.log(1024.0).floor());
    [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1024.0]
        .iter()
        .map(|m| m * unit)
        .find(|c| *c >= v * (1.0 - 1e-9))
        .unwrap_or(1024.0 * unit)
}

/// Time spans the x axis can show, in seconds: a young process's few minutes are drawn
/// across the whole width rather than as a sliver at the right edge of an hour.
const SPANS: [f64; 5] = [60.0, 300.0, 900.0, 1800.0, 3600.0];

/// The shortest span that holds every interval (at most an hour).
fn span_of(intervals: &[Interval]) -> f64 {
    let oldest = intervals
        .iter()
        .map(|i| i.from.as_secs_f64())
        .fold(0.0, f64::max);
    SPANS
        .iter()
        .copied()
        .find(|s| *s >= oldest)
        .unwrap_or(SPAN.as_secs_f64())
}

/// An x-axis label: `−45 s`, `−15 min`, `now`.
fn ago_label(secs: f64) -> String {
    match secs.round() as u64 {
        0 => "now".to_owned(),
        s if s < 120 => format!("−{s} s"),
        s => format!("−{} min", s / 60),
    }
}

/// x of a time before now: the left edge is `span` seconds ago, the right edge now.
fn x_of(ago: f64, span: f64) -> f64 {
    LEFT + (WIDTH - LEFT - RIGHT) * (1.0 - (ago / span).clamp(0.0, 1.0))
}

fn y_of(v: f64, top: f64) -> f64 {
    let plot = HEIGHT - TOP - BOTTOM;
    HEIGHT - BOTTOM - plot * (v / top).clamp(0.0, 1.0)
}

/// One chart: a title with its legend, then the SVG with grid, axes and a step line (and a
/// light area under it) per series. `label` writes a y value.
fn chart(
    id: &str,
    title: &str,
    intervals: &[Interval],
    series: &[Series<'_>],
    top: f64,
    label: impl Fn(f64) -> String,
) -> String {
    let span = span_of(intervals);
    let mut h = String::with_capacity(4096);
    // `write!` to a String cannot fail.
    let _ = write!(
        h,
        "<figure class=\"chart\" id=\"{id}\" data-intervals=\"{}\" data-max=\"{top}\"><figcaption>{title}</figcaption>",
        intervals.len()
    );
    for s in series {
        let latest = s.values.iter().rev().flatten().next();
        let _ = write!(
            h,
            "<span class=\"key\"><i style=\"background:{}\"></i>{} (now {})</span>",
            s.colour,
            s.name,
            latest.map_or_else(|| "–".to_owned(), |v| label(*v))
        );
    }
    let _ = write!(
        h,
        "<svg viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{title}, last hour\">"
    );
    // Grid lines and y labels at 0, half and the top.
    for frac in [0.0, 0.5, 1.0] {
        let y = y_of(top * frac, top);
        let _ = write!(
            h,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
<text class=\"axis\" x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            label(top * frac)
        );
    }
    // x labels at the quarters of the span.
    for (quarter, anchor) in [
        (4.0, "start"),
        (3.0, "middle"),
        (2.0, "middle"),
        (1.0, "middle"),
        (0.0, "end"),
    ] {
        let ago = span * quarter / 4.0;
        let _ = write!(
            h,
            "<text class=\"axis\" x=\"{:.1}\" y=\"{}\" text-anchor=\"{anchor}\">{}</text>",
            x_of(ago, span),
            HEIGHT - 6.0,
            ago_label(ago)
        );
    }
    for s in series {
        let (line, area) = paths(intervals, &s.values, top, span);
        let _ = write!(
            h,
            "<path d=\"{area}\" fill=\"{c}\" fill-opacity=\"0.12\" stroke=\"none\"/>\
<path class=\"series\" data-series=\"{name}\" d=\"{line}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"1.8\" stroke-linejoin=\"round\"/>",
            c = s.colour,
            name = s.name,
        );
    }
    h.push_str("</svg></figure>");
    h
}

/// The step line through `values` (one level per interval, a gap where there is none) and
/// the area under it.
fn paths(intervals: &[Interval], values: &[Option<f64>], top: f64, span: f64) -> (String, String) {
    let base = y_of(0.0, top);
    let (mut line, mut area) = (String::new(), String::new());
    let mut open: Option<f64> = None; // x where the current run began
    let mut last_x = 0.0;
    for (i, v) in intervals.iter().zip(values) {
        let (x0, x1) = (
            x_of(i.from.as_secs_f64(), span),
            x_of(i.to.as_secs_f64(), span),
        );
        match v {
            Some(v) => {
                let y = y_of(*v, top);
                if open.is_none() {
                    let _ = write!(line, "M{x0:.1} {y:.1}");
                    let _ = write!(area, "M{x0:.1} {base:.1}L{x0:.1} {y:.1}");
                    open = Some(x0);
                } else {
                    let _ = write!(line, "L{x0:.1} {y:.1}");
                    let _ = write!(area, "L{x0:.1} {y:.1}");
                }
                let _ = write!(line, "L{x1:.1} {y:.1}");
                let _ = write!(area, "L{x1:.1} {y:.1}");
                last_x = x1;
            }
            None => {
                if open.take().is_some() {
                    let _ = write!(area, "L{last_x:.1} {base:.1}Z");
                }
            }
        }
    }
    if open.is_some() {
        let _ = write!(area, "L{last_x:.1} {base:.1}Z");
    }
    (line, area)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn interval(from: u64, to: u64, cache: f64, ratio: Option<f64>) -> Interval {
        Interval {
            from: Duration::from_secs(from),
            to: Duration::from_secs(to),
            served_cache: cache,
            fetched: cache / 4.0,
            hit_ratio: ratio,
            requests: 3.0,
        }
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(0.3), 0.5);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(5.0), 5.0);
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(1.5e6), 2e6);
        assert_eq!(nice_bytes(0.0), 1.0);
        assert_eq!(nice_bytes(1500.0), 2048.0);
        assert_eq!(nice_bytes(3.0 * 1024.0 * 1024.0), 5.0 * 1024.0 * 1024.0);
        assert_eq!(nice_bytes(700.0 * 1024.0), 1024.0 * 1024.0);
    }

    #[test]
    fn axes_run_from_the_span_ago_to_now() {
        assert_eq!(x_of(3600.0, 3600.0), LEFT);
        assert_eq!(x_of(0.0, 3600.0), WIDTH - RIGHT);
        assert_eq!(x_of(99_999.0, 3600.0), LEFT);
        assert_eq!(x_of(30.0, 60.0), (LEFT + WIDTH - RIGHT) / 2.0);
        // A young process is drawn across the width; an old one over the hour.
        assert_eq!(span_of(&[interval(6, 0, 1.0, None)]), 60.0);
        assert_eq!(span_of(&[interval(240, 230, 1.0, None)]), 300.0);
        assert_eq!(span_of(&[interval(3600, 3590, 1.0, None)]), 3600.0);
        assert_eq!(span_of(&[interval(9000, 0, 1.0, None)]), 3600.0);
        assert_eq!(ago_label(0.0), "now");
        assert_eq!(ago_label(45.0), "−45 s");
        assert_eq!(ago_label(900.0), "−15 min");
        assert_eq!(y_of(0.0, 10.0), HEIGHT - BOTTOM);
        assert_eq!(y_of(10.0, 10.0), TOP);
    }

    #[test]
    fn steps_and_gaps() {
        let v = [
            interval(30, 20, 100.0, Some(0.5)),
            interval(20, 10, 200.0, None),
            interval(10, 0, 100.0, Some(1.0)),
        ];
        let (line, area) = paths(&v, &v.map(|i| i.hit_ratio), 1.0, 60.0);
        // Two runs: the gap starts a new sub-path.
        assert_eq!(line.matches('M').count(), 2, "{line}");
        assert_eq!(area.matches('Z').count(), 2, "{area}");
        let (line, _) = paths(&v, &v.map(|i| Some(i.served_cache)), 200.0, 60.0);
        assert_eq!(line.matches('M').count(), 1, "{line}");
        assert!(line.ends_with(&format!("L{:.1} {:.1}", WIDTH - RIGHT, y_of(100.0, 200.0))));
    }

    #[test]
    fn three_charts_with_legends_or_a_note() {
        assert!(render(&[]).contains("id=\"no-history\""));
        let page = render(&[interval(60, 0, 2048.0, Some(0.75))]);
        for id in ["chart-bytes", "chart-hit-ratio", "chart-requests"] {
            assert!(page.contains(&format!("id=\"{id}\"")), "{id}");
        }
        assert_eq!(page.matches("<svg").count(), 3);
        assert!(
            page.contains("served from the cache (now 2 KiB/s)"),
            "{page}"
        );
        assert!(
            page.contains("lookups answered from the cache (now 75%)"),
            "{page}"
        );
        assert!(page.contains("requests answered (now 3.0/s)"), "{page}");
        assert!(!page.contains("NaN"));
    }
}

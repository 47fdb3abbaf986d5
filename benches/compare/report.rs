//! Owns the results of a comparison run: every figure of every round, their medians, the
//! printed table, the ratios against the targets, the JSON file and the SVG chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The columns, in table order. regcache runs as deployed: with `cache.max_size`.
pub const REGCACHE: &str = "regcache max 20GiB";
/// The `cache.max_size` of [`REGCACHE`].
pub const REGCACHE_MAX_SIZE: &str = "20GiB";
/// regcache without `cache.max_size` (manifest rows only): what use tracking costs.
pub const REGCACHE_UNBOUNDED: &str = "regcache unbounded";
/// distribution (`docker-registry`) in proxy mode.
pub const DISTRIBUTION: &str = "distribution";
/// nginx `proxy_cache`.
pub const NGINX_PROXY: &str = "nginx proxy_cache";
/// nginx serving the blob as a file.
pub const NGINX_STATIC: &str = "nginx static";
/// The upstream registry itself, no cache.
pub const DIRECT: &str = "upstream direct";
/// The row of hit throughput with `n` clients (`prefix`: `hit` or `TLS hit`).
pub fn hit_row(prefix: &str, n: usize) -> String {
    let clients = if n == 1 { "client" } else { "clients" };
    format!("{prefix} {n} {clients}")
}

/// The row of a server's CPU per GiB over all hit runs of a round (`prefix` as above).
pub fn hit_cpu_row(prefix: &str) -> String {
    format!("{prefix} CPU, all client counts")
}

/// The row of the cold-miss CPU floor: one SHA-256 pass and one copy (in the regcache column).
pub const COLD_CPU_FLOOR: &str = "cold miss CPU floor: SHA-256 + one copy";

/// Every column.
pub const COLUMNS: [&str; 6] = [
    REGCACHE,
    REGCACHE_UNBOUNDED,
    DISTRIBUTION,
    NGINX_PROXY,
    NGINX_STATIC,
    DIRECT,
];

/// One row of the table: a figure with its unit, per column the value of each round.
#[derive(Debug, Default)]
struct Row {
    name: String,
    unit: &'static str,
    values: BTreeMap<&'static str, Vec<f64>>,
    failed: BTreeMap<&'static str, String>,
}

/// All figures of a run, rows in the order they were first recorded.
#[derive(Debug, Default)]
pub struct Results {
    rows: Vec<Row>,
}

/// One target line: what is compared, the ratio or figure, the target, whether it is met.
#[derive(Debug)]
pub struct Check {
    /// What is compared.
    pub what: String,
    /// The measured ratio or figure.
    pub value: f64,
    /// The target, as text (`>= 0.95`).
    pub target: String,
    /// Whether the target is met; `None` for a figure shown for context, with no target.
    pub met: Option<bool>,
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

impl Results {
    fn row(&mut self, name: &str, unit: &'static str) -> &mut Row {
        let i = match self.rows.iter().position(|r| r.name == name) {
            Some(i) => i,
            None => {
                self.rows.push(Row {
                    name: name.to_owned(),
                    unit,
                    ..Row::default()
                });
                self.rows.len() - 1
            }
        };
        &mut self.rows[i]
    }

    /// Puts row `name` in the table now, to be filled later (keeps related rows together).
    pub fn reserve(&mut self, name: &str, unit: &'static str) {
        self.row(name, unit);
    }

    /// Records one round's `value` of row `name` for `column`.
    pub fn add(&mut self, name: &str, unit: &'static str, column: &'static str, value: f64) {
        self.row(name, unit)
            .values
            .entry(column)
            .or_default()
            .push(value);
    }

    /// Records that a measurement failed (shown as `err`, the reason printed now).
    pub fn fail(&mut self, name: &str, unit: &'static str, column: &'static str, why: String) {
        eprintln!("compare: {name} / {column}: FAILED: {why}");
        self.row(name, unit).failed.insert(column, why);
    }

    /// The median over rounds of row `name` for `column`.
    pub fn median(&self, name: &str, column: &str) -> Option<f64> {
        let row = self.rows.iter().find(|r| r.name == name)?;
        median(row.values.get(column)?)
    }

    /// The table of medians, one line per row, one column per server.
    pub fn table(&self) -> String {
        let label = |r: &Row| format!("{} ({})", r.name, r.unit);
        let width = self.rows.iter().map(|r| label(r).len()).max().unwrap_or(10);
        let mut out = format!("{:width$}", "median of rounds");
        for c in COLUMNS {
            let _ = write!(out, " | {c:>18}");
        }
        out.push('\n');
        out.push_str(&"-".repeat(width + COLUMNS.len() * 21));
        out.push('\n');
        for r in &self.rows {
            let _ = write!(out, "{:width$}", label(r));
            for c in COLUMNS {
                let cell = match (r.values.get(c).and_then(|v| median(v)), r.failed.get(c)) {
                    (_, Some(_)) => "err".to_owned(),
                    (Some(m), None) => fmt_value(m),
                    (None, None) => "-".to_owned(),
                };
                let _ = write!(out, " | {cell:>18}");
            }
            out.push('\n');
        }
        out
    }

    /// The run as JSON: every round's values, the medians, the checks.
    pub fn json(&self, meta: serde_json::Value, checks: &[Check]) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .flat_map(|r| {
                COLUMNS.iter().filter_map(move |c| {
                    let values = r.values.get(c);
                    let failed = r.failed.get(c);
                    (values.is_some() || failed.is_some()).then(|| {
                        serde_json::json!({
                            "row": r.name,
                            "unit": r.unit,
                            "server": c,
                            "values": values.cloned().unwrap_or_default(),
                            "median": values.and_then(|v| median(v)),
                            "error": failed,
                        })
                    })
                })
            })
            .collect();
        let checks: Vec<serde_json::Value> = checks
            .iter()
            .map(|c| {
                serde_json::json!({
                    "what": c.what, "value": c.value, "target": c.target, "met": c.met,
                })
            })
            .collect();
        serde_json::json!({ "meta": meta, "rows": rows, "targets": checks })
    }

    /// A grouped bar chart of blob throughput: one group per (plain or TLS, clients), one bar
    /// per server that was measured there. Plain SVG, no script, no external resources.
    pub fn svg(&self, clients: &[usize], title: &str) -> String {
        const SERVERS: [(&str, &str); 4] = [
            (REGCACHE, "#d9480f"),
            (DISTRIBUTION, "#5c7cfa"),
            (NGINX_PROXY, "#37b24d"),
            (NGINX_STATIC, "#868e96"),
        ];
        let mut groups: Vec<(String, Vec<Bar>)> = Vec::new();
        for (prefix, label) in [("hit", "plain"), ("TLS hit", "TLS")] {
            for n in clients {
                let row = hit_row(prefix, *n);
                let bars: Vec<_> = SERVERS
                    .iter()
                    .filter_map(|(s, color)| Some((*s, *color, self.median(&row, s)?)))
                    .collect();
                if !bars.is_empty() {
                    groups.push((format!("{}|{label}", hit_row("", *n).trim()), bars));
                }
            }
        }
        let max = groups
            .iter()
            .flat_map(|(_, b)| b.iter().map(|x| x.2))
            .fold(0.0f64, f64::max);
        let step = nice_step(max / 5.0);
        // Room above the tallest bar for its label.
        let top = (max * 1.12 / step).ceil().max(1.0) * step;
        let (left, right, plot_top, plot_h, bar_w, gap) = (70.0, 20.0, 60.0, 300.0, 22.0, 30.0);
        let group_w = |n: usize| n as f64 * bar_w;
        let bars_w: f64 = groups.iter().map(|(_, b)| group_w(b.len()) + gap).sum();
        // Wide enough for the title and the legend however few bars there are.
        let width = (left + right + bars_w + gap).max(760.0);
        let height = plot_top + plot_h + 70.0;
        let y = |v: f64| plot_top + plot_h - v / top * plot_h;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
             font-family=\"sans-serif\" font-size=\"11\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{left}\" y=\"22\" font-size=\"14\" font-weight=\"bold\">{}</text>\n\
             <text x=\"{left}\" y=\"38\" fill=\"#555\">cache-hit blob throughput, MiB/s \
             delivered to all clients together (median of rounds)</text>\n",
            xml_escape(title)
        );
        let mut t = 0.0;
        while t <= top + step / 2.0 {
            let _ = writeln!(
                s,
                "<line x1=\"{left}\" x2=\"{:.0}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\">{t:.0}</text>",
                width - right,
                left - 6.0,
                y(t) + 4.0,
                y = y(t)
            );
            t += step;
        }
        let mut x = left + gap;
        for (label, bars) in &groups {
            for (i, (_, color, v)) in bars.iter().enumerate() {
                let bx = x + i as f64 * bar_w;
                let _ = writeln!(
                    s,
                    "<rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"/>\
                     <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" \
                     transform=\"rotate(-90 {:.1} {:.1})\">{v:.0}</text>",
                    y(*v),
                    bar_w - 2.0,
                    plot_top + plot_h - y(*v),
                    bx + bar_w / 2.0 + 3.0,
                    y(*v) - 4.0,
                    bx + bar_w / 2.0 + 3.0,
                    y(*v) - 4.0,
                );
            }
            let cx = x + group_w(bars.len()) / 2.0;
            for (i, line) in label.split('|').enumerate() {
                let _ = writeln!(
                    s,
                    "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                    plot_top + plot_h + 16.0 + 13.0 * i as f64,
                    xml_escape(line)
                );
            }
            x += group_w(bars.len()) + gap;
        }
        let ly = plot_top + plot_h + 55.0;
        for (i, (name, color)) in SERVERS.iter().enumerate() {
            let lx = left + i as f64 * 150.0;
            let _ = writeln!(
                s,
                "<rect x=\"{lx:.0}\" y=\"{:.0}\" width=\"12\" height=\"12\" fill=\"{color}\"/>\
                 <text x=\"{:.0}\" y=\"{ly:.0}\">{name}</text>",
                ly - 10.0,
                lx + 16.0
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// One bar of the chart: server, colour, MiB/s.
type Bar = (&'static str, &'static str, f64);

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// What the checks need to know about the run's settings.
pub struct Targets<'a> {
    /// Client counts of the hit rows.
    pub hit_clients: &'a [usize],
    /// Herd sizes.
    pub herd: &'a [usize],
    /// Connections of the manifest rows.
    pub conns: usize,
    /// Connections of the many-connections row.
    pub many_conns: usize,
    /// Row names of the small-layer image, cold and warm.
    pub layers: (String, String),
}

/// The ratios against the targets of issues 6 and 15, from the medians (not assertions).
pub fn checks(r: &Results, t: &Targets) -> Vec<Check> {
    let (hit_clients, herd, conns) = (t.hit_clients, t.herd, t.conns);
    let mut out = Vec::new();
    let mut notes = Vec::new();
    let mut check = |what: String, value: Option<f64>, target: &str, met: fn(f64) -> bool| {
        if let Some(value) = value.filter(|v| v.is_finite()) {
            out.push(Check {
                what,
                value,
                target: target.to_owned(),
                met: Some(met(value)),
            });
        }
    };
    let ratio = |row: &str, a: &str, b: &str| Some(r.median(row, a)? / r.median(row, b)?);
    for n in hit_clients.iter().filter(|n| [1, 8].contains(*n)) {
        check(
            format!("{}: regcache / nginx static throughput", hit_row("hit", *n)),
            ratio(&hit_row("hit", *n), REGCACHE, NGINX_STATIC),
            ">= 0.95",
            |v| v >= 0.95,
        );
    }
    check(
        "hit CPU per GiB served: regcache / nginx static".to_owned(),
        ratio(&hit_cpu_row("hit"), REGCACHE, NGINX_STATIC),
        "<= 1.2",
        |v| v <= 1.2,
    );
    for kind in crate::measure::MANIFEST_KINDS.map(|k| k.0) {
        check(
            format!("{kind}: regcache / nginx proxy_cache req/s ({conns} conns)"),
            ratio(kind, REGCACHE, NGINX_PROXY),
            ">= 1.0",
            |v| v >= 1.0,
        );
        check(
            format!("{kind}: regcache p99 ms ({conns} conns)"),
            r.median(&format!("{kind} p99"), REGCACHE),
            "< 5",
            |v| v < 5.0,
        );
    }
    check(
        "cold miss: regcache / upstream direct time".to_owned(),
        ratio("cold miss", REGCACHE, DIRECT),
        "<= 1.10",
        |v| v <= 1.10,
    );
    check(
        "cold miss: regcache CPU per GiB / floor (SHA-256 + one copy)".to_owned(),
        r.median("cold miss CPU", REGCACHE)
            .zip(r.median(COLD_CPU_FLOOR, REGCACHE))
            .map(|(c, f)| c / f),
        "<= 1.3",
        |v| v <= 1.3,
    );
    let (cold, warm) = &t.layers;
    check(
        format!("{warm}: nginx proxy_cache time / regcache time"),
        ratio(warm, NGINX_PROXY, REGCACHE),
        ">= 1.0",
        |v| v >= 1.0,
    );
    check(
        format!("{cold}: regcache time / upstream direct time"),
        ratio(cold, REGCACHE, DIRECT),
        "<= 1.2",
        |v| v <= 1.2,
    );
    let [_, p99, errors, rss, _] = crate::measure::many_rows(t.many_conns);
    check(
        format!("{errors}: regcache"),
        r.median(&errors, REGCACHE),
        "== 0",
        |v| v == 0.0,
    );
    check(
        format!("{rss}: regcache, MiB"),
        r.median(&rss, REGCACHE),
        "<= 100",
        |v| v <= 100.0,
    );
    notes.push((format!("{p99}: regcache, ms"), r.median(&p99, REGCACHE)));
    check(
        "cold miss: regcache TTFB - upstream direct TTFB, ms".to_owned(),
        r.median("cold miss TTFB", REGCACHE)
            .zip(r.median("cold miss TTFB", DIRECT))
            .map(|(a, b)| a - b),
        "<= 5",
        |v| v <= 5.0,
    );
    for n in herd {
        check(
            format!("herd {n}: regcache upstream GETs (max over rounds)"),
            r.rows
                .iter()
                .find(|row| row.name == format!("herd {n} upstream GETs"))
                .and_then(|row| row.values.get(REGCACHE))
                .map(|v| v.iter().copied().fold(0.0, f64::max)),
            "== 1",
            |v| v == 1.0,
        );
        check(
            format!("herd {n}: regcache all done / regcache one cold fetch"),
            r.median(&format!("herd {n}"), REGCACHE)
                .zip(r.median("cold miss", REGCACHE))
                .map(|(h, c)| h / c),
            "<= 1.5",
            |v| v <= 1.5,
        );
        // Not a target: how far the herd is from serving the same clients a cached blob
        // after one cold fetch, the floor on this machine.
        notes.push((
            format!(
                "herd {n}: regcache all done / (one cold fetch + the herd on the cached blob); \
                 1 is the floor"
            ),
            r.median(&format!("herd {n}"), REGCACHE)
                .zip(r.median("cold miss", REGCACHE))
                .zip(r.median(&format!("herd {n}, blob cached"), REGCACHE))
                .map(|((h, c), w)| h / (c + w)),
        ));
    }
    for n in hit_clients {
        let tls = r.median(&hit_row("TLS hit", *n), REGCACHE);
        let plain = r.median(&hit_row("hit", *n), REGCACHE);
        check(
            format!("{}: regcache TLS / regcache plain", hit_row("TLS hit", *n)),
            tls.zip(plain).map(|(t, p)| t / p),
            ">= 0.7",
            |v| v >= 0.7,
        );
    }
    out.extend(notes.into_iter().filter_map(|(what, value)| {
        Some(Check {
            what,
            value: value.filter(|v| v.is_finite())?,
            target: "none".to_owned(),
            met: None,
        })
    }));
    out
}

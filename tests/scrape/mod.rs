//! Owns reading regcache's `/metrics` in tests: fetches the exposition, parses it with
//! `prometheus-parse`, and looks samples up by name and labels.
#![allow(dead_code)]

use std::collections::BTreeSet;

use prometheus_parse::{Sample, Scrape, Value};

/// One scrape of `/metrics`.
pub struct Metrics {
    /// The exposition text as served.
    pub text: String,
    samples: Vec<Sample>,
}

/// GETs `url` (a `/metrics` URL), checks it is OpenMetrics text, and parses it.
pub async fn scrape(url: &str) -> Metrics {
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(resp.status(), 200, "GET {url}");
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    parse(resp.text().await.unwrap())
}

/// Parses exposition text.
pub fn parse(text: String) -> Metrics {
    assert!(text.ends_with("# EOF\n"), "exposition ends with # EOF");
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    Metrics {
        text,
        samples: scrape.samples,
    }
}

impl Metrics {
    /// The sum of every sample called `name` whose labels include `labels` (0 when none).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
                other => panic!("{name} is not a plain value: {other:?}"),
            })
            .sum()
    }

    /// Whether a sample called `name` with these labels exists.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.samples
            .iter()
            .any(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
    }

    /// How much `name{labels}` grew since `before`.
    pub fn delta(&self, before: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels) - before.get(name, labels)
    }

    /// Every sample name.
    pub fn names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.metric.clone()).collect()
    }

    /// Every value of label `label` across all samples.
    pub fn label_values(&self, label: &str) -> BTreeSet<String> {
        self.samples
            .iter()
            .filter_map(|s| s.labels.get(label).map(str::to_owned))
            .collect()
    }

    /// Every label value of every sample.
    pub fn all_label_values(&self) -> BTreeSet<String> {
        self.samples
            .iter()
            .flat_map(|s| s.labels.values().cloned())
            .collect()
    }
}

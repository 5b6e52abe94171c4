//! The series the shipped alert rules read, and their values on a `/metrics` page: what a
//! test compares before and after traffic that must page nobody.
//!
//! Each `name{label="v", label=~"a|b"}` selector of an `expr:` in
//! `deploy/prometheus/sv2-tpd-alerts.yml` is one series set; its value here is the sum of
//! the matching samples (a histogram's observations for `_bucket`, `_sum` and `_count`).
//! The `job` label is Prometheus' own and is not on `/metrics`. `process_*` selectors
//! measure the process (descriptors move with every connection), not what clients make
//! the daemon report, and are left out.

use std::collections::BTreeMap;

use prometheus_parse::Value;

use super::daemon_proc::Metrics;

/// One selector of an alert expression.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Selector {
    /// The metric name as written.
    pub name: String,
    /// Label matchers other than `job`: the label and the values it may take.
    pub matchers: Vec<(String, Vec<String>)>,
}

/// The `sv2_tpd_*` selectors of every `expr:` in the rules file `text`.
pub fn alert_selectors(text: &str) -> Vec<Selector> {
    let mut selectors = Vec::new();
    for line in text.lines() {
        let Some(expr) = line.trim().strip_prefix("expr:") else {
            continue;
        };
        let mut rest = expr;
        while let Some(at) = rest.find("sv2_tpd_") {
            rest = &rest[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = rest[..end].to_string();
            rest = &rest[end..];
            let matchers = match rest.strip_prefix('{') {
                Some(inner) => {
                    let close = inner.find('}').expect("a closed label selector");
                    let parsed = parse_matchers(&inner[..close]);
                    rest = &inner[close + 1..];
                    parsed
                }
                None => Vec::new(),
            };
            selectors.push(Selector { name, matchers });
        }
    }
    selectors.sort();
    selectors.dedup();
    selectors
}

fn parse_matchers(inner: &str) -> Vec<(String, Vec<String>)> {
    inner
        .split(',')
        .filter(|m| !m.trim().is_empty())
        .filter_map(|m| {
            let (label, values) = match m.split_once("=~") {
                Some((label, pattern)) => {
                    let pattern = pattern.trim().trim_matches('"');
                    assert!(
                        pattern
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '|'),
                        "only alternatives of plain values are read: {pattern}"
                    );
                    (label, pattern.split('|').map(str::to_string).collect())
                }
                None => {
                    let (label, value) = m.split_once('=').expect("a label matcher");
                    (label, vec![value.trim().trim_matches('"').to_string()])
                }
            };
            let label = label.trim().to_string();
            (label != "job").then_some((label, values))
        })
        .collect()
}

/// The value of every selector on `metrics`, keyed by its text.
pub fn alert_values(selectors: &[Selector], metrics: &Metrics) -> BTreeMap<String, f64> {
    selectors
        .iter()
        .map(|s| (format!("{}{:?}", s.name, s.matchers), value(s, metrics)))
        .collect()
}

fn value(selector: &Selector, metrics: &Metrics) -> f64 {
    let family = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| selector.name.strip_suffix(suffix))
        .unwrap_or(&selector.name);
    metrics
        .scrape
        .samples
        .iter()
        .filter(|s| s.metric == family)
        .filter(|s| {
            selector.matchers.iter().all(|(label, values)| {
                s.labels
                    .get(label)
                    .is_some_and(|v| values.iter().any(|x| x == v))
            })
        })
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map_or(0.0, |b| b.count),
            Value::Summary(_) => 0.0,
        })
        .sum()
}

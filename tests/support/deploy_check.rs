//! Cross-checks the deploy files against what the daemon exports: every metric named in
//! the Prometheus alert rules or the Grafana dashboard must be a family on `/metrics`.
//!
//! Only names in the daemon's namespaces are checked (`sv2_tpd_*` and the standard
//! `process_*`); `up` and other series Prometheus makes itself are not ours to export.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

/// Prefixes of the metric names the daemon is responsible for.
const OUR_PREFIXES: [&str; 2] = ["sv2_tpd_", "process_"];

/// Series suffixes Prometheus derives from a histogram's (or summary's) family name.
const DERIVED_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// One metric name found in a deploy file, with where it was found.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MetricUse {
    /// The name as written (a histogram may appear as `<family>_bucket`).
    pub name: String,
    /// The file and the expression it appeared in.
    pub place: String,
}

/// Metric names in one PromQL expression: identifiers with one of our prefixes, outside
/// quoted label values.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    let mut flush = |current: &mut String| {
        if OUR_PREFIXES.iter().any(|p| current.starts_with(p)) {
            names.insert(current.clone());
        }
        current.clear();
    };
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                }
            }
            None if c == '"' || c == '\'' || c == '`' => {
                flush(&mut current);
                quote = Some(c);
            }
            None if c.is_ascii_alphanumeric() || c == '_' || c == ':' => current.push(c),
            None => flush(&mut current),
        }
    }
    flush(&mut current);
    names
}

/// Metric names in a Prometheus rules file: the value of every `expr:` line. Block
/// scalars (`expr: |`) are refused rather than half-read.
pub fn rule_file_metrics(file: &str, text: &str) -> Result<Vec<MetricUse>, String> {
    let mut uses = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let Some(expr) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let expr = expr.trim();
        if expr.starts_with('|') || expr.starts_with('>') {
            return Err(format!(
                "{file}:{}: multi-line expr is not supported by this check",
                number + 1
            ));
        }
        for name in metric_names(expr) {
            uses.push(MetricUse {
                name,
                place: format!("{file}:{}: {expr}", number + 1),
            });
        }
    }
    Ok(uses)
}

/// Metric names in a Grafana dashboard: every `expr`, `query` and `definition` string
/// (panel targets and template variables).
pub fn dashboard_metrics(file: &str, dashboard: &Json) -> Vec<MetricUse> {
    fn walk(file: &str, value: &Json, uses: &mut Vec<MetricUse>) {
        match value {
            Json::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr" | "query" | "definition", Json::String(expr)) => {
                            for name in metric_names(expr) {
                                uses.push(MetricUse {
                                    name,
                                    place: format!("{file}: {expr}"),
                                });
                            }
                        }
                        _ => walk(file, v, uses),
                    }
                }
            }
            Json::Array(items) => items.iter().for_each(|v| walk(file, v, uses)),
            _ => {}
        }
    }
    let mut uses = Vec::new();
    walk(file, dashboard, &mut uses);
    uses
}

/// The uses whose metric is not among `exported` families (a histogram's `_bucket`,
/// `_sum` and `_count` series count as its family).
pub fn missing<'a>(uses: &'a [MetricUse], exported: &BTreeSet<String>) -> Vec<&'a MetricUse> {
    uses.iter()
        .filter(|u| {
            !exported.contains(&u.name)
                && !DERIVED_SUFFIXES.iter().any(|suffix| {
                    u.name
                        .strip_suffix(suffix)
                        .is_some_and(|family| exported.contains(family))
                })
        })
        .collect()
}

/// Whether the dashboard declares a template variable of type `datasource` (so it can
/// be imported into any Grafana, whatever its Prometheus data source is called).
pub fn has_datasource_variable(dashboard: &Json) -> bool {
    dashboard["templating"]["list"]
        .as_array()
        .is_some_and(|list| list.iter().any(|v| v["type"] == "datasource"))
}

/// Alerts of a rules file (`- alert: Name` lines) that its promtool test file leaves
/// without a case in which they fire (`exp_alerts:` with entries) or one in which they
/// stay silent (`exp_alerts: []`), each as "Name: no firing case" / "no silent case".
pub fn alerts_without_both_cases(rules: &str, tests: &str) -> Vec<String> {
    let mut firing = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for (name, cases) in under_names(tests, "alertname:", "exp_alerts:") {
        match cases.as_str() {
            "[]" => silent.insert(name),
            _ => firing.insert(name),
        };
    }
    let mut gaps = Vec::new();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
    {
        if !firing.contains(alert) {
            gaps.push(format!("{alert}: no firing case"));
        }
        if !silent.contains(alert) {
            gaps.push(format!("{alert}: no silent case"));
        }
    }
    gaps
}

/// Each alert of a rules file (`- alert: Name`) with its `severity:` label.
pub fn alert_severities(rules: &str) -> BTreeMap<String, String> {
    under_names(rules, "- alert:", "severity:")
        .into_iter()
        .collect()
}

/// Every `key` line of a YAML `text`, as (the value of the last `name` line above it, its
/// own value), both trimmed; `key` lines before any `name` line are left out.
fn under_names(text: &str, name: &str, key: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut current = None;
    for line in text.lines().map(str::trim) {
        if let Some(value) = line.strip_prefix(name) {
            current = Some(value.trim().to_string());
        } else if let (Some(value), Some(under)) = (line.strip_prefix(key), &current) {
            found.push((under.clone(), value.trim().to_string()));
        }
    }
    found
}

/// The README's alert table: each `` | `Name` | severity | ... | `` row's alert and
/// severity.
pub fn readme_alert_rows(readme: &str) -> BTreeMap<String, String> {
    readme
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix("`Sv2Tpd")?.strip_suffix('`')?;
            Some((format!("Sv2Tpd{name}"), cells.get(2)?.to_string()))
        })
        .collect()
}

/// The README's metric table: each metric name of the first column with the text of the
/// row's labels column (rows may name several metrics, e.g. the `process_*` gauges).
pub fn readme_metric_rows(readme: &str) -> BTreeMap<String, String> {
    let mut rows = BTreeMap::new();
    for line in readme.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "| names | type | labels | meaning |" splits into 6 cells, empty at both ends.
        if cells.len() != 6
            || !cells[1].starts_with("`sv2_tpd_") && !cells[1].starts_with("`process_")
        {
            continue;
        }
        for name in cells[1].split('`').skip(1).step_by(2) {
            rows.insert(name.to_string(), cells[3].to_string());
        }
    }
    rows
}

/// What the README's metric table leaves out of the series on `/metrics`: a family with
/// no row, a label its row does not name, or a label value missing from a row that
/// lists the values (`` `label` (`a`, `b`) ``). `le` (histogram buckets) is not a label
/// of ours.
pub fn undocumented_series(
    rows: &BTreeMap<String, String>,
    samples: &[prometheus_parse::Sample],
) -> BTreeSet<String> {
    let mut gaps = BTreeSet::new();
    for sample in samples {
        if !OUR_PREFIXES.iter().any(|p| sample.metric.starts_with(p)) {
            continue;
        }
        // A histogram's `_sum` and `_count` series belong to its family's row.
        let family = DERIVED_SUFFIXES
            .iter()
            .filter_map(|suffix| sample.metric.strip_suffix(suffix))
            .find(|family| rows.contains_key(*family))
            .unwrap_or(&sample.metric);
        let Some(cell) = rows.get(family) else {
            gaps.insert(format!("{} has no row", sample.metric));
            continue;
        };
        for (label, value) in sample.labels.iter() {
            let named = format!("`{label}`");
            let Some(at) = cell.find(&named) else {
                gaps.insert(format!("{}: label {label} not named", sample.metric));
                continue;
            };
            let after = cell[at + named.len()..].trim_start();
            let lists_values = after.starts_with('(');
            if lists_values && !after.contains(&format!("`{value}`")) {
                gaps.insert(format!("{}: {label}={value} not listed", sample.metric));
            }
        }
    }
    gaps
}

//! The files in `deploy/` checked by the tools that will read them, and against the
//! daemon itself:
//! - every metric the alert rules and the Grafana dashboard name is exported on `/metrics`
//!   (checked against the real binary), and `/metrics` passes `promtool check metrics`;
//! - the dashboard is JSON with a data source variable;
//! - the README's metric table names every family on `/metrics`, every label, and every
//!   label value where it lists them, and its alert table every alert with its severity;
//! - `promtool` accepts the rules and the scrape config, and the rule unit tests pass;
//! - `systemd-analyze verify` accepts the unit and the bitcoind drop-in without a warning.
//!
//! `promtool` and `systemd-analyze` are installed by `.ci/run`. Outside CI a test whose
//! tool is missing is skipped with a note; with `CI` set it fails instead.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value as Json;
use support::daemon_proc::DaemonProcess;
use support::deploy_check::{
    alert_severities, alerts_without_both_cases, dashboard_metrics, deploy_dir,
    has_datasource_variable, missing, readme_alert_rows, readme_metric_rows, rule_file_metrics,
    undocumented_series, MetricUse,
};
use sv2_tpd::mock::{MockNode, MockOptions};

const ALERTS: &str = "prometheus/sv2-tpd-alerts.yml";
const ALERT_TESTS: &str = "prometheus/sv2-tpd-alerts.test.yml";
const DASHBOARD: &str = "grafana/sv2-tpd.json";

/// The `process_*` series operators expect from any Prometheus-instrumented daemon.
const PROCESS_FAMILIES: [&str; 5] = [
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_cpu_seconds_total",
    "process_start_time_seconds",
];

fn read(relative: &str) -> String {
    let path = deploy_dir().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dashboard() -> Json {
    serde_json::from_str(&read(DASHBOARD)).expect("the Grafana dashboard is valid JSON")
}

/// Every metric named by the alert rules and the dashboard.
fn deploy_metric_uses() -> Vec<MetricUse> {
    let mut uses = rule_file_metrics(ALERTS, &read(ALERTS)).expect("alert rules readable");
    uses.extend(dashboard_metrics(DASHBOARD, &dashboard()));
    uses
}

/// `name` from `PATH`; `None` (test skipped) outside CI when it is not installed.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is not installed (.ci/run installs it)"
        );
        eprintln!("skipping: {name} is not installed");
    }
    found
}

/// Runs `command`; panics with its output unless it exits 0 with nothing on stderr.
fn run_clean(mut command: Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "{what} failed ({}):\n{}{stderr}",
        output.status,
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn the_checker_reports_a_metric_the_daemon_does_not_export() {
    let rules = "groups:\n  - name: x\n    rules:\n      - alert: Made\n        \
                 expr: rate(sv2_tpd_made_up_total{result=\"sv2_tpd_not_a_metric\"}[5m]) > 0 \
                 and up == 1\n      - alert: Real\n        \
                 expr: histogram_quantile(0.9, rate(sv2_tpd_latency_seconds_bucket[5m])) > 1\n";
    let dashboard: Json = serde_json::json!({
        "panels": [{"targets": [{"expr": "process_made_up_bytes{job=\"$job\"}"}]}],
        "templating": {"list": [{"type": "query", "query": "label_values(sv2_tpd_node_connected, job)"}]},
    });
    let mut uses = rule_file_metrics("rules.yml", rules).expect("rules readable");
    uses.extend(dashboard_metrics("dash.json", &dashboard));
    let exported: BTreeSet<String> = ["sv2_tpd_latency_seconds", "sv2_tpd_node_connected"]
        .map(String::from)
        .into();

    let names: BTreeSet<&str> = missing(&uses, &exported)
        .into_iter()
        .map(|u| u.name.as_str())
        .collect();
    // Label values and Prometheus' own `up` are not metric names of ours; a histogram's
    // `_bucket` series belongs to its family.
    assert_eq!(
        names,
        BTreeSet::from(["sv2_tpd_made_up_total", "process_made_up_bytes"])
    );
    assert!(!has_datasource_variable(&dashboard));

    let block = "      - alert: X\n        expr: |\n          sv2_tpd_x\n";
    assert!(rule_file_metrics("rules.yml", block).is_err());

    let readme = "| `sv2_tpd_a_total` | counter | `result` (`ok`) | a |\n\
                  | `sv2_tpd_b` | gauge | | b |\n";
    let page = "sv2_tpd_a_total{result=\"ok\"} 1\nsv2_tpd_a_total{result=\"bad\"} 1\n\
                sv2_tpd_b{kind=\"x\"} 1\nsv2_tpd_c 1\nup 1\n";
    let scrape = prometheus_parse::Scrape::parse(page.lines().map(|l| Ok(l.to_string()))).unwrap();
    let gaps = undocumented_series(&readme_metric_rows(readme), &scrape.samples);
    assert_eq!(
        gaps,
        BTreeSet::from([
            "sv2_tpd_a_total: result=bad not listed".to_string(),
            "sv2_tpd_b: label kind not named".to_string(),
            "sv2_tpd_c has no row".to_string(),
        ])
    );
}

#[test]
fn the_dashboard_is_json_with_a_datasource_variable() {
    let dashboard = dashboard();
    assert!(
        has_datasource_variable(&dashboard),
        "{DASHBOARD} has no template variable of type datasource"
    );
    assert!(
        !dashboard_metrics(DASHBOARD, &dashboard).is_empty(),
        "{DASHBOARD} queries no metric"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_files_name_only_metrics_the_daemon_exports() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("node.sock");
    let daemon = DaemonProcess::start(&socket, &dir.path().join("tpd"), &[]);
    // Labelled families (the node's interface line) only appear once the node is there.
    let _node = MockNode::start(&socket, MockOptions::default()).unwrap();
    let scrape = daemon.wait_for_metrics("the node connected with a template", |m| {
        m.value("sv2_tpd_node_connected", &[]) == 1.0
            && m.value("sv2_tpd_templates_held", &[]) >= 1.0
    });
    let exported = scrape.families();

    let uses = deploy_metric_uses();
    assert!(uses.len() > 10, "too few metric uses found: {uses:?}");
    let absent = missing(&uses, &exported);
    assert!(
        absent.is_empty(),
        "deploy files name metrics that /metrics does not have:\n{}",
        absent
            .iter()
            .map(|u| format!("  {} in {}", u.name, u.place))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let readme = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(readme).expect("README.md");
    let gaps = undocumented_series(&readme_metric_rows(&readme), &scrape.scrape.samples);
    assert!(
        gaps.is_empty(),
        "README.md's metric table leaves out:\n  {}",
        gaps.into_iter().collect::<Vec<_>>().join("\n  ")
    );

    for family in PROCESS_FAMILIES {
        assert!(exported.contains(family), "/metrics lacks {family}");
    }
    assert!(scrape.value("process_resident_memory_bytes", &[]) > 0.0);
    assert!(scrape.value("process_open_fds", &[]) > 0.0);
    assert_eq!(
        scrape.get(
            "sv2_tpd_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );

    if let Some(promtool) = tool("promtool") {
        let (status, body) = daemon.http_get("/metrics");
        assert_eq!(status, 200);
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool starts");
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(body.as_bytes())
            .expect("promtool reads /metrics");
        let output = child.wait_with_output().expect("promtool finishes");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success() && report.trim().is_empty(),
            "promtool check metrics:\n{report}"
        );
    }
}

#[test]
fn every_alert_has_a_rule_test_that_fires_it_and_one_that_does_not() {
    let gaps = alerts_without_both_cases(&read(ALERTS), &read(ALERT_TESTS));
    assert!(gaps.is_empty(), "{ALERT_TESTS}:\n{}", gaps.join("\n"));

    // The check itself sees a missing case.
    let rules = "      - alert: Tested\n      - alert: HalfTested\n      - alert: Untested\n";
    let tests = "        alertname: Tested\n        exp_alerts: []\n\
                 \x20       alertname: Tested\n        exp_alerts:\n          - exp_labels:\n\
                 \x20       alertname: HalfTested\n        exp_alerts: []\n";
    assert_eq!(
        alerts_without_both_cases(rules, tests),
        [
            "HalfTested: no firing case",
            "Untested: no firing case",
            "Untested: no silent case"
        ]
    );
}

#[test]
fn the_readme_lists_every_alert_with_its_severity() {
    let readme = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(readme).expect("README.md");
    let rules = alert_severities(&read(ALERTS));
    assert!(rules.len() > 10, "too few alerts read: {rules:?}");
    assert_eq!(readme_alert_rows(&readme), rules, "README.md's alert table");

    let text = "      - alert: A\n        for: 1m\n        labels:\n          severity: warning\n";
    assert_eq!(
        alert_severities(text),
        BTreeMap::from([("A".to_string(), "warning".to_string())])
    );
}

#[test]
fn promtool_accepts_the_rules_the_config_and_the_rule_tests() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let dir = deploy_dir().join("prometheus");
    for args in [
        &["check", "rules", "sv2-tpd-alerts.yml"][..],
        &["check", "config", "prometheus.yml"],
        &["test", "rules", "sv2-tpd-alerts.test.yml"],
    ] {
        let output = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool runs");
        assert!(
            output.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn systemd_analyze_verifies_the_unit_and_the_bitcoind_drop_in() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    // `verify` insists that ExecStart= names an existing executable, so the copy it reads
    // points at the binary under test; nothing else in the unit is changed.
    let dir = tempfile::tempdir().unwrap();
    let unit = read("sv2-tpd.service");
    let installed = "ExecStart=/usr/local/bin/sv2-tpd ";
    assert!(
        unit.contains(installed),
        "the unit no longer runs {installed}"
    );
    let binary = support::daemon_proc::binary();
    let unit = unit.replace(installed, &format!("ExecStart={} ", binary.display()));
    std::fs::write(dir.path().join("sv2-tpd.service"), unit).unwrap();
    // The drop-in is read as part of a stand-in bitcoind.service in the same directory.
    std::fs::write(
        dir.path().join("bitcoind.service"),
        "[Unit]\nDescription=stand-in for Bitcoin Core's unit\n\n\
         [Service]\nExecStart=/bin/true\n",
    )
    .unwrap();
    let drop_ins = dir.path().join("bitcoind.service.d");
    std::fs::create_dir(&drop_ins).unwrap();
    std::fs::write(
        drop_ins.join("sv2-tpd-socket.conf"),
        read("bitcoind.service.d/sv2-tpd-socket.conf"),
    )
    .unwrap();

    let mut command = Command::new(analyze);
    command
        .args(["verify", "--man=no"])
        .arg(dir.path().join("sv2-tpd.service"))
        .arg(dir.path().join("bitcoind.service"));
    run_clean(command, "systemd-analyze verify");
}

#[test]
fn the_docker_context_holds_what_the_dockerfile_copies_and_no_more() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let context = tempfile::tempdir().unwrap();
    let output = Command::new("bash")
        .arg(root.join("tests/docker-context.sh"))
        .arg(context.path())
        .output()
        .expect("bash runs");
    assert!(
        output.status.success(),
        "docker-context.sh: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let copied: BTreeSet<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect();

    // Every source of the build stage's COPY lines (not `COPY --from=`) is in the context.
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let mut sources = Vec::new();
    for line in dockerfile.lines() {
        let Some(args) = line.strip_prefix("COPY ") else {
            continue;
        };
        if args.starts_with("--from=") {
            continue;
        }
        let words: Vec<&str> = args.split_whitespace().collect();
        sources.extend(words[..words.len() - 1].iter().map(|w| w.to_string()));
    }
    assert!(!sources.is_empty(), "no COPY in the Dockerfile");
    for source in &sources {
        assert!(
            copied
                .iter()
                .any(|path| path == source || path.starts_with(&format!("{source}/"))),
            "the Dockerfile copies {source}, which .dockerignore keeps out"
        );
    }
    // ... and nothing the image does not need (tests, docs, the target directory).
    for path in &copied {
        assert!(
            sources
                .iter()
                .any(|source| path == source || path.starts_with(&format!("{source}/"))),
            "{path} is sent to docker build but never copied"
        );
    }
    assert!(copied.contains("src/main.rs") && copied.contains("Cargo.lock"));
}

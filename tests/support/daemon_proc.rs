//! The real `sv2-tpd` binary as a child process: started on a regtest socket with free
//! ports, its JSON log lines collected, `/metrics` and `/health` read over HTTP, and
//! stopped with real signals. Metrics scraped this way belong to that process alone.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use prometheus_parse::{Scrape, Value};
use serde_json::Value as Json;

/// Limit for any single wait on the child, to fail instead of hanging.
pub const CHILD_PATIENCE: Duration = Duration::from_secs(30);

const POLL: Duration = Duration::from_millis(50);

/// A running `sv2-tpd run` child process. Killed (SIGKILL) on drop if still running.
pub struct DaemonProcess {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Where SV2 clients connect (known once the daemon logged it).
    pub sv2_addr: Option<SocketAddr>,
    /// Where `/metrics` and `/health` are served (known once the daemon logged it).
    pub metrics_addr: Option<SocketAddr>,
    /// The authority public key the daemon announced.
    pub authority: Option<key_utils::Secp256k1PublicKey>,
}

impl DaemonProcess {
    /// Starts `sv2-tpd run` for regtest on `socket` with its data in `datadir`, on free
    /// loopback ports, JSON logs and `extra` flags; returns once both listeners are up.
    pub fn start(socket: &Path, datadir: &Path, extra: &[&str]) -> Self {
        let mut daemon = Self::spawn(socket, datadir, extra);
        let started = daemon.wait_for_log("sv2-tpd starting");
        let listening = daemon.wait_for_log("metrics endpoint listening");
        daemon.sv2_addr = Some(field(&started, "listen").parse().expect("SV2 address"));
        daemon.authority = Some(
            field(&started, "authority_pubkey")
                .parse()
                .expect("authority key"),
        );
        daemon.metrics_addr = Some(field(&listening, "addr").parse().expect("metrics address"));
        daemon
    }

    /// Starts the child without waiting for anything (for daemons expected to fail).
    pub fn spawn(socket: &Path, datadir: &Path, extra: &[&str]) -> Self {
        let mut command = Command::new(binary());
        // The flags below are the whole configuration: no `SV2TPD_*` from the test's env.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("SV2TPD_") {
                command.env_remove(name);
            }
        }
        let mut child = command
            .arg("run")
            .args(["--chain", "regtest", "--datadir"])
            .arg(datadir)
            .arg("--ipc-socket")
            .arg(socket)
            .args(["--sv2-port", "0", "--metrics-bind", "127.0.0.1:0"])
            .args(["--log-format", "json", "--log-level", "info"])
            .args(["--fee-delta", "1000", "--template-interval", "1"])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sv2-tpd starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        Self {
            child,
            log,
            sv2_addr: None,
            metrics_addr: None,
            authority: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A set-up SV2 client of this daemon, with small coinbase constraints (100 bytes,
    /// 10 sigops), as a pool would connect.
    pub async fn client(&self) -> super::stream_check::CheckedClient {
        super::tp::client_at(
            self.sv2_addr.expect("SV2 address"),
            self.authority.expect("authority key"),
            100,
            10,
        )
        .await
    }

    /// The daemon's resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        super::proc_status::rss_kib(self.pid()).expect("the daemon's VmRSS")
    }

    /// Every stderr line so far, joined.
    pub fn log_text(&self) -> String {
        self.lines().join("\n")
    }

    fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The first JSON log event whose message contains `message`, waiting for it.
    pub fn wait_for_log(&self, message: &str) -> Json {
        let deadline = Instant::now() + CHILD_PATIENCE;
        loop {
            let found = self.lines().iter().find_map(|line| {
                let event: Json = serde_json::from_str(line).ok()?;
                event["message"]
                    .as_str()?
                    .contains(message)
                    .then_some(event)
            });
            if let Some(event) = found {
                return event;
            }
            assert!(
                Instant::now() < deadline,
                "no log {message:?} from sv2-tpd; its log:\n{}",
                self.log_text()
            );
            thread::sleep(POLL);
        }
    }

    /// Sends `signal` (a name `kill` knows: `TERM`, `INT`, ...) to the child.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Waits up to `limit` for the child to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling sv2-tpd") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the daemon to fail with exit code `code` and returns the message of its
    /// last error line.
    pub fn failure_message(&mut self, code: i32) -> String {
        let status = self
            .wait_exit(CHILD_PATIENCE)
            .unwrap_or_else(|| panic!("sv2-tpd kept running; log:\n{}", self.log_text()));
        let log = self.log_text();
        assert_eq!(status.code(), Some(code), "log:\n{log}");
        let error = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Json>(l).ok())
            .rfind(|e| e["level"] == "ERROR")
            .unwrap_or_else(|| panic!("no error logged:\n{log}"));
        error["message"].as_str().unwrap_or_default().to_string()
    }

    /// `GET path` on the metrics endpoint: status code and body.
    pub fn http_get(&self, path: &str) -> (i32, String) {
        let addr = self.metrics_addr.expect("metrics address known");
        let response = minreq::get(format!("http://{addr}{path}"))
            .with_timeout(10)
            .send()
            .expect("metrics endpoint answers");
        let body = response.as_str().unwrap_or_default().to_string();
        (response.status_code, body)
    }

    /// The `/health` status code.
    pub fn health(&self) -> i32 {
        self.http_get("/health").0
    }

    /// Polls `/health` until it answers `status`.
    pub fn wait_for_health(&self, status: i32) {
        let deadline = Instant::now() + CHILD_PATIENCE;
        while self.health() != status {
            assert!(
                Instant::now() < deadline,
                "/health never answered {status}; log:\n{}",
                self.log_text()
            );
            thread::sleep(POLL);
        }
    }

    /// `/metrics`, parsed.
    pub fn scrape(&self) -> Metrics {
        let (status, body) = self.http_get("/metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
            .expect("/metrics parses as Prometheus text");
        Metrics { scrape }
    }

    /// Waits until the daemon has heard node `name` at `height` (its tip gauge, set once
    /// the daemon chose which tip it serves).
    pub fn wait_for_node_at(&self, name: &str, height: impl Into<u64>) -> Metrics {
        let height: u64 = height.into();
        self.wait_for_metrics(&format!("node {name} at {height}"), |m| {
            m.value("sv2_tpd_node_tip_height", &[("node", name)]) == height as f64
        })
    }

    /// Polls `/metrics` until `check` holds, returning that scrape.
    pub fn wait_for_metrics(&self, what: &str, check: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = Instant::now() + CHILD_PATIENCE;
        loop {
            let m = self.scrape();
            if check(&m) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "metrics never showed {what}:\n{m:?}\nlog:\n{}",
                self.log_text()
            );
            thread::sleep(POLL);
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A parsed `/metrics` page.
pub struct Metrics {
    /// The samples as `prometheus-parse` read them.
    pub scrape: Scrape,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for s in &self.scrape.samples {
            writeln!(f, "{} {:?} {:?}", s.metric, s.labels, s.value)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// Names of the metric families present (histograms by their base name).
    pub fn families(&self) -> std::collections::BTreeSet<String> {
        self.scrape.docs.keys().cloned().collect()
    }

    /// The counter/gauge value of `name` with exactly `labels`, if that series exists.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.scrape
            .samples
            .iter()
            .find(|s| s.metric == name && has_labels(s, labels))
            .and_then(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
                _ => None,
            })
    }

    /// Whether node `node` serves the templates (`sv2_tpd_node_serving`).
    pub fn serving(&self, node: &str) -> bool {
        self.value("sv2_tpd_node_serving", &[("node", node)]) == 1.0
    }

    /// Like [`Metrics::get`], with an absent series read as 0.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Observations of histogram `name` with `labels` (its `+Inf` bucket), 0 if absent.
    pub fn histogram_count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.scrape
            .samples
            .iter()
            .find(|s| s.metric == name && has_labels(s, labels))
            .and_then(|s| match &s.value {
                Value::Histogram(buckets) => buckets
                    .iter()
                    .find(|b| b.less_than.is_infinite())
                    .map(|b| b.count),
                _ => None,
            })
            .unwrap_or(0.0)
    }
}

/// The binary under test: `SV2_TPD_TEST_BIN` if set (e.g. a release build), else cargo's.
pub fn binary() -> std::path::PathBuf {
    std::env::var_os("SV2_TPD_TEST_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_sv2-tpd").into())
}

fn has_labels(sample: &prometheus_parse::Sample, labels: &[(&str, &str)]) -> bool {
    labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v))
}

fn field(event: &Json, name: &str) -> String {
    event[name]
        .as_str()
        .unwrap_or_else(|| panic!("log event without {name}: {event}"))
        .to_string()
}

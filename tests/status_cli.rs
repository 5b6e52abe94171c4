//! `sv2-tpd status` against the real binary: a healthy daemon on the mock node (exit 0,
//! every field printed, `--json` parses), and an unhealthy or unreachable one (exit 1).

mod support;

use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use support::daemon_proc::{binary, DaemonProcess, CHILD_PATIENCE};
use support::tp::{client_at, next_tip};
use sv2_tpd::mock::{MockNode, MockOptions};
use sv2_tpd::status::Status;

/// Runs `sv2-tpd status` for the daemon whose metrics are at `metrics` with `extra` flags.
fn status_command(metrics: std::net::SocketAddr, extra: &[&str]) -> Output {
    let mut command = Command::new(binary());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SV2TPD_") {
            command.env_remove(name);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    command
        .arg("status")
        .args(["--datadir"])
        .arg(dir.path())
        .args(["--metrics-bind", &metrics.to_string()])
        .args(extra)
        .output()
        .expect("sv2-tpd status runs")
}

/// The value printed on the `name:` line of the text output.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let prefix = format!("{name}:");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(str::trim)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `sv2-tpd status --json`, parsed.
fn status_json(metrics: std::net::SocketAddr) -> (Option<i32>, Status) {
    let output = status_command(metrics, &["--json"]);
    let status = serde_json::from_str(&stdout(&output)).unwrap_or_else(|e| {
        panic!(
            "status --json does not parse ({e}):\n{}{}",
            stdout(&output),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code(), status)
}

/// Polls `status --json` until `check` holds.
fn wait_for_status(metrics: std::net::SocketAddr, what: &str, check: impl Fn(&Status) -> bool) {
    let deadline = Instant::now() + CHILD_PATIENCE;
    loop {
        let (_, status) = status_json(metrics);
        if check(&status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed {what}: {status:#?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_healthy_daemon_shows_node_tip_and_clients() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("node.sock");
    let daemon = DaemonProcess::start(&socket, &dir.path().join("tpd"), &[]);
    let node = MockNode::start(&socket, MockOptions::default()).unwrap();
    daemon.wait_for_health(200);
    let metrics = daemon.metrics_addr.unwrap();

    let mut pool = client_at(daemon.sv2_addr.unwrap(), daemon.authority.unwrap(), 1234, 7).await;
    next_tip(&mut pool).await;
    let (tip_hash, tip_height) = node.tip();
    wait_for_status(metrics, "the client with its constraints", |s| {
        s.clients.iter().any(|c| c.constraints.is_some())
    });

    let (code, status) = status_json(metrics);
    assert_eq!(code, Some(0), "healthy daemon: {status:#?}");
    assert!(status.healthy);
    assert_eq!(status.chain, "regtest");
    assert_eq!(status.node.socket, socket);
    assert!(status.node.connected && status.node.ever_connected);
    assert_eq!(status.node.interface.as_deref(), Some("v31.99"));
    let tip = status.tip.as_ref().expect("a tip");
    assert_eq!(
        (tip.hash.as_str(), tip.height),
        (tip_hash.to_string().as_str(), tip_height)
    );
    assert!(status
        .newest_template_age_seconds
        .is_some_and(|age| age < 60.0));
    assert_eq!(status.clients.len(), 1);
    let client = &status.clients[0];
    assert!(client.peer.ip().is_loopback());
    let constraints = client.constraints.expect("constraints");
    assert_eq!(
        (
            constraints.max_additional_size,
            constraints.max_additional_sigops
        ),
        (1234, 7)
    );
    assert_eq!(status.blocks_found, 0);
    assert_eq!(status.solutions_rejected, 0);

    let text = status_command(metrics, &[]);
    assert_eq!(text.status.code(), Some(0));
    let text = stdout(&text);
    let expected = [
        ("status", "healthy".to_string()),
        ("chain", "regtest".to_string()),
        ("node socket", socket.display().to_string()),
        ("node interface", "v31.99".to_string()),
        ("node", "connected for ".to_string()),
        ("tip", format!("{tip_height} {tip_hash}")),
        ("newest template", String::new()),
        ("clients", "1".to_string()),
        ("blocks found", "0".to_string()),
        ("solutions rejected", "0".to_string()),
    ];
    for (name, value) in expected {
        let shown = field(&text, name).unwrap_or_else(|| panic!("no {name:?} line in:\n{text}"));
        assert!(
            shown.starts_with(&value),
            "{name}: {shown:?}, expected {value:?}…"
        );
    }
    let client_line = format!("{} ", client.peer);
    let listed = text
        .lines()
        .find(|l| l.trim_start().starts_with(&client_line))
        .unwrap_or_else(|| panic!("client {} not listed in:\n{text}", client.peer));
    assert!(
        listed.contains("constraints 1234 B / 7 sigops, connected"),
        "{listed}"
    );

    // The client leaves: it is no longer listed.
    drop(pool);
    wait_for_status(metrics, "no clients", |s| s.clients.is_empty());
}

#[test]
fn status_exits_nonzero_when_the_daemon_is_unhealthy_or_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("node.sock");
    // No node: the daemon runs, waits for it, and is unhealthy.
    let mut daemon = DaemonProcess::start(&socket, &dir.path().join("tpd"), &[]);
    let metrics = daemon.metrics_addr.unwrap();

    let (code, status) = status_json(metrics);
    assert_eq!(code, Some(1), "unhealthy daemon: {status:#?}");
    assert!(!status.healthy);
    assert!(!status.node.connected && !status.node.ever_connected);
    assert!(status.tip.is_none() && status.newest_template_age_seconds.is_none());

    let text = status_command(metrics, &[]);
    assert_eq!(text.status.code(), Some(1));
    let text = stdout(&text);
    assert_eq!(field(&text, "status"), Some("UNHEALTHY"), "{text}");
    assert!(
        field(&text, "node").is_some_and(|v| v.starts_with("not connected yet")),
        "{text}"
    );
    assert_eq!(field(&text, "tip"), Some("-"), "{text}");

    // Nothing listening any more: exit 1 with a reason on stderr.
    daemon.signal("TERM");
    daemon.wait_exit(CHILD_PATIENCE).expect("the daemon stops");
    let gone = status_command(metrics, &[]);
    assert_eq!(gone.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(stderr.contains("cannot reach"), "{stderr}");
}

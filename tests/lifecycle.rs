//! The operable daemon, run as the real `sv2-tpd` binary: it rides out a node crash
//! without dropping pools, stops promptly on SIGTERM/SIGINT, waits for a node that is not
//! there yet, and refuses a node it cannot drive.

mod support;

use std::time::{Duration, Instant};

use support::daemon_proc::{DaemonProcess, CHILD_PATIENCE};
use support::tp::{client_at, closed_by_server, next_template, next_tip, prev_hash};
use support::BitcoinNode;
use sv2_tpd::mock::{MockLine, MockNode, MockOptions};

/// The acceptance bound for a clean stop with clients and pending waits.
const STOP_BOUND: Duration = Duration::from_secs(5);

const CONNECTS: &str = "sv2_tpd_node_connects_total";
const CONNECTED: &str = "sv2_tpd_node_connected";

/// Starts a real regtest node with a recent tip (so it is out of initial block download),
/// or returns `None` after reporting the test skipped.
fn real_node(test: &str) -> Option<BitcoinNode> {
    let node = BitcoinNode::start_if_available(test).expect("bitcoin-node starts")?;
    node.generate(1).expect("mine a block");
    Some(node)
}

/// A client of the child daemon that sent `CoinbaseOutputConstraints`.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_crash_keeps_clients_and_reconnects() {
    let Some(node) = real_node("node_crash_keeps_clients_and_reconnects") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::start(&node.socket_path(), dir.path(), &[]);
    daemon.wait_for_health(200);
    let up = daemon.scrape();
    assert_eq!(up.value(CONNECTS, &[]), 1.0);
    assert_eq!(up.value(CONNECTED, &[]), 1.0);

    let mut c = daemon.client().await;
    let (_, p0) = next_tip(&mut c).await;
    assert_eq!(prev_hash(&p0), node.best_block_hash().unwrap());

    node.flush_to_disk().unwrap();
    node.kill9().unwrap();
    daemon.wait_for_health(503);
    let down = daemon.scrape();
    assert_eq!(down.value(CONNECTED, &[]), 0.0, "{down:?}");
    assert_eq!(down.value(CONNECTS, &[]), 1.0);
    assert_eq!(
        down.value("sv2_tpd_clients_connected", &[]),
        1.0,
        "the pool stays connected while the node is down"
    );
    daemon.wait_for_log("lost the node");

    node.restart().unwrap();
    daemon.wait_for_health(200);
    let back = daemon.scrape();
    assert_eq!(back.value(CONNECTS, &[]), 2.0, "{back:?}");
    assert_eq!(back.value(CONNECTED, &[]), 1.0);

    // On reconnect the daemon re-creates the group's template on the same connection; the
    // node came back on the tip the pool has, so it is an update, not a new tip's pair.
    assert_eq!(
        node.best_block_hash().unwrap(),
        prev_hash(&p0),
        "same chain"
    );
    let t1 = next_template(&mut c).await;
    assert!(!t1.future_template, "the same tip: no new pair");
    assert!(
        t1.template_id > p0.template_id,
        "a new template, not a replay"
    );

    // And it follows the restarted node's chain.
    let mined = node.generate(1).unwrap()[0];
    let (_, p2) = next_tip(&mut c).await;
    assert_eq!(prev_hash(&p2), mined);
    assert_eq!(daemon.scrape().value("sv2_tpd_clients_connected", &[]), 1.0);
}

/// Connects two clients to a daemon on `socket`, lets the node's waits start, then stops
/// the daemon with `signal` and checks it exits with 0 within [`STOP_BOUND`].
async fn stops_cleanly(socket: &std::path::Path, signal: &str, wait_pending: impl Fn() -> bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = DaemonProcess::start(socket, dir.path(), &[]);
    let mut a = daemon.client().await;
    let mut b = client_at(
        daemon.sv2_addr.unwrap(),
        daemon.authority.unwrap(),
        5_000,
        100,
    )
    .await;
    next_tip(&mut a).await;
    next_tip(&mut b).await;
    let deadline = Instant::now() + CHILD_PATIENCE;
    while !wait_pending() {
        assert!(
            Instant::now() < deadline,
            "no waitTipChanged reached the node"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.wait_for_metrics("both clients", |m| {
        m.value("sv2_tpd_clients_connected", &[]) == 2.0
    });

    let asked = Instant::now();
    daemon.signal(signal);
    let status = daemon
        .wait_exit(CHILD_PATIENCE)
        .unwrap_or_else(|| panic!("sv2-tpd ignored SIG{signal}; log:\n{}", daemon.log_text()));
    let took = asked.elapsed();
    println!("SIG{signal} with 2 clients and pending waits: exit {status} after {took:?}");
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log_text());
    assert!(
        took < STOP_BOUND,
        "stopping took {took:?}; log:\n{}",
        daemon.log_text()
    );
    let stopped = daemon.wait_for_log("shutting down");
    assert_eq!(stopped["signal"], format!("SIG{signal}"));
    daemon.wait_for_log("stopped");
    assert!(
        !daemon.log_text().contains("did not"),
        "a part had to be abandoned:\n{}",
        daemon.log_text()
    );
}

/// True once the real node's IPC debug log shows a `waitTipChanged` call (the tip
/// follower's wait).
fn real_wait_pending(node: &BitcoinNode) -> bool {
    std::fs::read_to_string(node.debug_log_path())
        .map(|log| log.contains("waitTipChanged"))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_clients_and_pending_waits_exits_zero_quickly() {
    let Some(node) = real_node("sigterm_with_clients_and_pending_waits_exits_zero_quickly") else {
        return;
    };
    stops_cleanly(&node.socket_path(), "TERM", || real_wait_pending(&node)).await;
    assert!(node.is_running(), "stopping sv2-tpd leaves the node alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_with_clients_and_pending_waits_exits_zero_quickly() {
    let Some(node) = real_node("sigint_with_clients_and_pending_waits_exits_zero_quickly") else {
        return;
    };
    stops_cleanly(&node.socket_path(), "INT", || real_wait_pending(&node)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_against_the_mock_exits_zero_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let node = MockNode::start(&dir.path().join("node.sock"), MockOptions::default()).unwrap();
    stops_cleanly(node.socket_path(), "TERM", || {
        node.stats()
            .calls
            .get("waitTipChanged")
            .copied()
            .unwrap_or(0)
            > 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_a_node_that_is_not_there_yet() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("node.sock");
    let data = dir.path().join("tpd");
    let daemon = DaemonProcess::start(&socket, &data, &[]);
    let waiting = daemon.wait_for_log("waiting for the node");
    assert_eq!(waiting["level"], "WARN");
    let hint = waiting["error"].as_str().unwrap_or_default();
    assert!(hint.contains(&socket.display().to_string()), "{hint}");
    assert_eq!(daemon.health(), 503, "not healthy without a node");

    // A pool may connect before the node exists; it gets templates once the node is up.
    let mut c = daemon.client().await;
    assert_eq!(daemon.scrape().value(CONNECTED, &[]), 0.0);
    let node = MockNode::start(&socket, MockOptions::default()).unwrap();
    let (_, p) = next_tip(&mut c).await;
    assert_eq!(prev_hash(&p), node.tip().0);
    daemon.wait_for_health(200);
    assert_eq!(daemon.scrape().value(CONNECTS, &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v30_node_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("node.sock");
    let _node = MockNode::start(
        &socket,
        MockOptions {
            line: MockLine::V30,
            ..MockOptions::default()
        },
    )
    .unwrap();
    let mut daemon = DaemonProcess::spawn(&socket, &dir.path().join("tpd"), &[]);
    let message = daemon.failure_message(1);
    assert!(message.contains("v30"), "{message}");
    assert!(message.contains("v31 or later"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_and_others_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("node.sock");
    let node = MockNode::start(&socket, MockOptions::default()).unwrap();
    // Big transaction data, so a client that asks for it and never reads clogs its socket.
    for _ in 0..2_000 {
        node.add_mempool_tx(bitcoin::Amount::from_sat(2_000));
    }
    // This case is the write timeout, not the per-client answer limit: let every request
    // be answered.
    let daemon = DaemonProcess::start(
        &socket,
        &dir.path().join("tpd"),
        &[
            "--max-tx-data-requests-per-client",
            "1000",
            "--max-tx-data-bytes-in-flight",
            "1000000000",
        ],
    );
    let mut slow = daemon.client().await;
    let mut steady = client_at(
        daemon.sv2_addr.unwrap(),
        daemon.authority.unwrap(),
        5_000,
        100,
    )
    .await;
    let (t, _) = next_tip(&mut slow).await;
    next_tip(&mut steady).await;
    for _ in 0..200 {
        slow.request_tx_data(t.template_id).await.unwrap();
    }
    // Wait until its session is stuck writing: the answers written stop before all are.
    let mut answered = -1.0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = daemon
            .scrape()
            .value("sv2_tpd_tx_data_requests_total", &[("result", "success")]);
        assert!(
            now < 200.0,
            "the socket took 76 MB without the client reading"
        );
        if now == answered {
            break;
        }
        answered = now;
    }
    // Far more updates than a session's queue holds, while `slow` reads nothing.
    let deadline = Instant::now() + CHILD_PATIENCE;
    while !daemon.log_text().contains("too slow") {
        assert!(
            Instant::now() < deadline,
            "the slow client's queue never filled; metrics:\n{:?}",
            daemon.scrape()
        );
        let mined = node.mine_block();
        let (_, p) = next_tip(&mut steady).await;
        assert_eq!(prev_hash(&p), mined, "the steady client misses nothing");
    }
    // The slow client is disconnected once it has drained what was already sent, rather
    // than left running with gaps in its templates.
    assert!(
        closed_by_server(&mut slow).await,
        "the slow client was kept; log:\n{}",
        daemon.log_text()
    );
    let mined = node.mine_block();
    let (_, p) = next_tip(&mut steady).await;
    assert_eq!(prev_hash(&p), mined);
    daemon.wait_for_metrics("one client left", |m| {
        m.value("sv2_tpd_clients_connected", &[]) == 1.0
    });
}

//! sv2-tpd against a mock node that misbehaves: it hangs and comes back, the daemon
//! restarts under a pool, solutions arrive for templates the daemon never made, and the
//! interface line is learnt from a real submit, never from a probe.

mod support;

use std::time::Duration;

use bitcoin::ScriptBuf;
use support::daemon_proc::DaemonProcess;
use support::tp::*;
use sv2_tpd::mock::{MockLine, MockNode, MockOptions};

const RESPONSIVE: &str = "sv2_tpd_node_responsive";
const CLIENTS: &str = "sv2_tpd_clients_connected";
const STOPPED_ANSWERING: &str = "the node stopped answering";

fn payout() -> ScriptBuf {
    support::op_true_script()
}

fn mock(dir: &tempfile::TempDir, line: MockLine) -> MockNode {
    let options = MockOptions {
        line,
        ..MockOptions::default()
    };
    MockNode::start(&dir.path().join("node.sock"), options).expect("mock starts")
}

/// Names of the files in `dir` (none if it does not exist).
fn files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_turns_health_503_and_back_with_fresh_templates_and_no_client_lost() {
    let dir = tempfile::tempdir().unwrap();
    let node = mock(&dir, MockLine::V31_99);
    let daemon = DaemonProcess::start(
        node.socket_path(),
        &dir.path().join("tpd"),
        &["--node-call-timeout", "1"],
    );
    let mut a = daemon.client().await;
    let mut b = daemon.client().await;
    let (t0, _) = next_tip(&mut a).await;
    next_tip(&mut b).await;
    daemon.wait_for_health(200);
    assert_eq!(daemon.scrape().value(RESPONSIVE, &[]), 1.0);

    node.hang(true);
    // Within the deadline (1 s) plus the probe interval (2 s); the wait allows far more.
    daemon.wait_for_health(503);
    let down = daemon.wait_for_metrics("the node not responsive", |m| {
        m.value(RESPONSIVE, &[]) == 0.0
    });
    assert_eq!(down.value("sv2_tpd_node_connected", &[]), 1.0, "{down:?}");
    assert_eq!(down.value(CLIENTS, &[]), 2.0, "pools stay connected");
    let said = daemon.wait_for_log(STOPPED_ANSWERING);
    assert_eq!(said["level"], "ERROR");

    node.hang(false);
    // The tip did not move: a fresh template as an update, not a new tip's pair.
    let t1 = next_template(&mut a).await;
    let t1b = next_template(&mut b).await;
    assert!(!t1.future_template, "the same tip: no new pair");
    assert!(t1.template_id > t0.template_id, "a fresh template");
    assert_eq!(t1b.template_id, t1.template_id);
    daemon.wait_for_health(200);
    let up = daemon.scrape();
    assert_eq!(up.value(RESPONSIVE, &[]), 1.0);
    assert_eq!(up.value(CLIENTS, &[]), 2.0);
    assert_eq!(
        up.value("sv2_tpd_node_connects_total", &[]),
        1.0,
        "no reconnect"
    );
    daemon.wait_for_log("the node answers again");
    let log = daemon.log_text();
    assert_eq!(
        log.matches(STOPPED_ANSWERING).count(),
        1,
        "logged once:\n{log}"
    );

    // And it follows the chain as before; the first SetNewPrevHash since the hang is the
    // new block's (none was sent for the unchanged tip).
    let mined = node.mine_block();
    let (_, p2) = next_tip(&mut a).await;
    assert_eq!(prev_hash(&p2), mined);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_ids_after_a_daemon_restart_are_larger_than_before() {
    let dir = tempfile::tempdir().unwrap();
    let node = mock(&dir, MockLine::V31_99);
    let config = regtest_config(node.socket_path(), dir.path(), &[]);
    let daemon = start_daemon(&config).await;
    let mut c = client(&daemon, 100, 10).await;
    let (first, _) = next_tip(&mut c).await;
    node.mine_block();
    let (last, _) = next_tip(&mut c).await;
    assert!(last.template_id > first.template_id);
    daemon.stop().await;

    let daemon = start_daemon(&config).await;
    let mut c = client(&daemon, 100, 10).await;
    let (after, _) = next_tip(&mut c).await;
    assert!(
        after.template_id > last.template_id,
        "{} after a restart, {} before",
        after.template_id,
        last.template_id
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_for_a_template_the_daemon_does_not_hold_goes_to_the_node_as_the_tips() {
    let dir = tempfile::tempdir().unwrap();
    let node = mock(&dir, MockLine::V31_99);
    let daemon = DaemonProcess::start(node.socket_path(), &dir.path().join("tpd"), &[]);
    let mut c = daemon.client().await;
    let (t, p) = next_tip(&mut c).await;
    // A pool that outlived a restart of ours names a template id we never made; its
    // header meets the target on a template of the tip with the same transactions.
    let (mut solution, hash) = solve(&t, &p, &build_coinbase(&t, &payout(), true));
    solution.template_id = 424_242;
    c.submit_solution(solution).await.unwrap();
    let logged = daemon.wait_for_log("a block for a template this daemon does not hold");
    assert_eq!(logged["template_id"], 424_242);
    daemon.wait_for_log("block accepted by the node");
    assert!(node
        .accepted_blocks()
        .iter()
        .any(|b| b.block_hash() == hash));
    let solutions = dir.path().join("tpd").join("solutions");
    eventually("the block saved", || {
        files(&solutions)
            .iter()
            .any(|f| f.ends_with(&format!("{hash}.block.hex")))
    })
    .await;
    let m = daemon.scrape();
    assert_eq!(m.value("sv2_tpd_blocks_found_total", &[]), 1.0);
    assert_eq!(
        m.value("sv2_tpd_solutions_total", &[("result", "unknown-template")]),
        0.0
    );
}

/// Nothing is submitted to find out the interface line; the first solution learns it,
/// and the metric's label follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v32_line_is_learnt_from_the_first_solution_without_a_probe() {
    let dir = tempfile::tempdir().unwrap();
    let node = mock(&dir, MockLine::V32);
    let daemon = DaemonProcess::start(node.socket_path(), &dir.path().join("tpd"), &[]);
    let mut c = daemon.client().await;
    let (t, p) = next_tip(&mut c).await;
    let info = "sv2_tpd_node_info";
    let before = daemon.scrape();
    assert_eq!(before.get(info, &[("interface", "v31.99")]), Some(1.0));
    assert!(node.stats().submit_ordinals.is_empty(), "a probe submit");

    let (solution, hash) = solve(&t, &p, &build_coinbase(&t, &payout(), true));
    c.submit_solution(solution).await.unwrap();
    let (_, p1) = next_tip(&mut c).await;
    assert_eq!(prev_hash(&p1), hash);
    assert_eq!(node.stats().submit_ordinals, [10]);
    let after = daemon.wait_for_metrics("the v32 label", |m| {
        m.get(info, &[("interface", "v32")]) == Some(1.0)
    });
    assert_eq!(after.get(info, &[("interface", "v31.99")]), None);
}

/// A block solved on an older template of the group while the node is away is saved
/// whole and submitted once the node is back, however long that takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_of_an_older_template_found_while_the_node_is_away_reaches_it_later() {
    let dir = tempfile::tempdir().unwrap();
    let node = mock(&dir, MockLine::V31_99);
    let config = regtest_config(node.socket_path(), dir.path(), &[]);
    let daemon = start_daemon(&config).await;
    let mut c = client(&daemon, 100, 10).await;
    let (first, p) = next_tip(&mut c).await;
    // The tip's first template is the empty one (tip first); the older template solved
    // below has a transaction, so its block comes from the node's getBlock.
    node.add_mempool_tx(bitcoin::Amount::from_sat(50_000));
    let old = next_template(&mut c).await;
    assert!(old.template_id > first.template_id && !old.future_template);
    node.add_mempool_tx(bitcoin::Amount::from_sat(60_000));
    let newer = next_template(&mut c).await;
    assert!(newer.template_id > old.template_id && !newer.future_template);

    // Stopping the node too soon after the templates could leave a block unread.
    eventually("both template blocks in the node's getBlock count", || {
        node.calls("getBlock") >= 2
    })
    .await;
    node.stop();
    let (solution, hash) = solve(&old, &p, &build_coinbase(&old, &payout(), true));
    c.submit_solution(solution).await.unwrap();
    let solutions = dir.path().join("solutions");
    eventually("the block saved whole", || {
        files(&solutions)
            .iter()
            .any(|f| f.ends_with(&format!("{hash}.block.hex")))
    })
    .await;
    // Several retry rounds pass with no node at all.
    tokio::time::sleep(Duration::from_secs(5)).await;
    node.restart().unwrap();
    eventually("the block accepted", || {
        node.accepted_blocks()
            .iter()
            .any(|b| b.block_hash() == hash)
    })
    .await;
    assert_eq!(node.tip().0, hash);
    daemon.stop().await;
}

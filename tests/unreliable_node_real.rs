//! sv2-tpd (the real binary) against a real regtest `bitcoin-node` that misbehaves: it is
//! stopped with SIGSTOP and resumed, shut down for longer than a minute while a pool finds
//! a block, and killed with -9. Pools stay connected throughout; found blocks reach the
//! node, or the log says why they could not.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bitcoin::{Amount, BlockHash, ScriptBuf};
use stratum_core::template_distribution_sv2::{NewTemplateOwned, SetNewPrevHashOwned};
use support::daemon_proc::DaemonProcess;
use support::stream_check::CheckedClient;
use support::tp::*;
use support::BitcoinNode;
use sv2_tpd::sv2::TdpMessage;

/// The daemon's `node_call_timeout` in these tests, and its probe interval.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// Slack for a loaded machine on top of deadline + probe interval.
const SLACK: Duration = Duration::from_secs(5);
/// How long the node stays away while a block waits for it (longer than the old fixed
/// 60-second patience).
const AWAY: Duration = Duration::from_secs(90);
/// Limit for a found block to reach a node that is back.
const DELIVERY_PATIENCE: Duration = Duration::from_secs(120);

const STOPPED_ANSWERING: &str = "the node stopped answering";

fn payout() -> ScriptBuf {
    support::op_true_script()
}

/// Sends `signal` to the node's process.
fn signal(node: &BitcoinNode, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(node.pid().to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} failed");
}

/// Resumes a stopped node when dropped, so a failing test does not leave it frozen.
struct Resume<'a>(&'a BitcoinNode);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        if self.0.is_running() {
            signal(self.0, "CONT");
        }
    }
}

fn start_daemon(node: &BitcoinNode, dir: &Path) -> DaemonProcess {
    let timeout = CALL_TIMEOUT.as_secs().to_string();
    DaemonProcess::start(&node.socket_path(), dir, &["--node-call-timeout", &timeout])
}

/// Asks for `template_id`'s transactions until answered: once answered, the daemon holds
/// the template's block, so a solution for it can be saved whole.
async fn cache_block(c: &mut CheckedClient, template_id: u64) {
    c.request_tx_data(template_id).await.unwrap();
    loop {
        match recv(c).await {
            TdpMessage::RequestTransactionDataSuccess(s) if s.template_id == template_id => return,
            TdpMessage::RequestTransactionDataError { error_code, .. } => {
                panic!("transaction data refused: {error_code}")
            }
            _ => {}
        }
    }
}

/// The file the daemon saved block `hash` in, waiting for it.
async fn saved_block(solutions: &Path, hash: BlockHash) -> PathBuf {
    saved_file(solutions, &format!("{hash}.block.hex")).await
}

/// A daemon on `node` (after one block, so out of IBD) with a client that has the tip's
/// template, whose block the daemon holds (so a solution for it is saved whole).
async fn served_with_a_cached_template(
    node: &BitcoinNode,
) -> (
    tempfile::TempDir,
    DaemonProcess,
    CheckedClient,
    NewTemplateOwned,
    SetNewPrevHashOwned,
) {
    node.generate(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(node, dir.path());
    let mut c = daemon.client().await;
    let (t, p) = next_tip(&mut c).await;
    cache_block(&mut c, t.template_id).await;
    (dir, daemon, c, t, p)
}

/// Waits until the node's active chain contains `hash`.
fn wait_in_chain(node: &BitcoinNode, hash: BlockHash, daemon: &DaemonProcess) {
    let deadline = Instant::now() + DELIVERY_PATIENCE;
    loop {
        let confirmations = node
            .rpc("getblockheader", serde_json::json!([hash.to_string()]))
            .ok()
            .and_then(|h| h["confirmations"].as_i64());
        if confirmations.is_some_and(|c| c >= 1) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "block {hash} never reached the node's chain; log:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_turns_health_503_and_back_without_restarting_anything() {
    let test = "a_stopped_node_turns_health_503_and_back_without_restarting_anything";
    let Some(node) = BitcoinNode::start_if_available(test).expect("bitcoin-node starts") else {
        return;
    };
    node.generate(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(&node, dir.path());
    let mut a = daemon.client().await;
    let mut b = daemon.client().await;
    let (t0, _) = next_tip(&mut a).await;
    next_tip(&mut b).await;
    daemon.wait_for_health(200);

    signal(&node, "STOP");
    let resume = Resume(&node);
    let stopped = Instant::now();
    daemon.wait_for_health(503);
    let took = stopped.elapsed();
    println!("/health 503 {took:?} after SIGSTOP");
    assert!(
        took <= CALL_TIMEOUT + PROBE_EVERY + SLACK,
        "503 only after {took:?}"
    );
    let down = daemon.wait_for_metrics("the node not responsive", |m| {
        m.value("sv2_tpd_node_responsive", &[]) == 0.0
    });
    assert_eq!(down.value("sv2_tpd_clients_connected", &[]), 2.0);
    daemon.wait_for_log(STOPPED_ANSWERING);

    signal(&node, "CONT");
    drop(resume);
    // The tip did not move: fresh templates as updates, not a new tip's pair.
    let t1 = next_template(&mut a).await;
    let t1b = next_template(&mut b).await;
    assert!(!t1.future_template, "the same tip: no new pair");
    assert!(t1.template_id > t0.template_id, "fresh templates");
    assert_eq!(t1b.template_id, t1.template_id);
    daemon.wait_for_health(200);
    let up = daemon.scrape();
    assert_eq!(up.value("sv2_tpd_node_responsive", &[]), 1.0);
    assert_eq!(up.value("sv2_tpd_clients_connected", &[]), 2.0);
    assert_eq!(
        up.value("sv2_tpd_node_connects_total", &[]),
        1.0,
        "no reconnect"
    );
    let log = daemon.log_text();
    assert_eq!(
        log.matches(STOPPED_ANSWERING).count(),
        1,
        "logged once:\n{log}"
    );

    // The first SetNewPrevHash since the stop is the new block's.
    let mined = node.generate(1).unwrap()[0];
    let (_, p2) = next_tip(&mut a).await;
    assert_eq!(prev_hash(&p2), mined);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_found_while_the_node_is_shut_down_for_90_s_reaches_it() {
    let test = "a_block_found_while_the_node_is_shut_down_for_90_s_reaches_it";
    let Some(node) = BitcoinNode::start_if_available(test).expect("bitcoin-node starts") else {
        return;
    };
    node.fund_op_true().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(&node, dir.path());
    let mut c = daemon.client().await;
    let (old, p) = next_tip(&mut c).await;
    // A newer template of the same group, on the same tip; the pool solves the older.
    node.send_fee_tx(Amount::from_sat(20_000)).unwrap();
    let newer = next_template(&mut c).await;
    assert!(!newer.future_template && newer.template_id > old.template_id);
    cache_block(&mut c, old.template_id).await;

    signal(&node, "TERM");
    node.stop().unwrap();
    daemon.wait_for_log("lost the node");
    let (solution, hash) = solve(&old, &p, &build_coinbase(&old, &payout(), true));
    c.submit_solution(solution).await.unwrap();
    let file = saved_block(&dir.path().join("solutions"), hash).await;
    println!("saved {}", file.display());

    // The deliberate part of the scenario: the node stays away for 90 s.
    tokio::time::sleep(AWAY).await;
    node.restart().unwrap();
    wait_in_chain(&node, hash, &daemon);
    daemon.wait_for_log("block accepted by the node");
    assert!(file.exists(), "the saved block stays in solutions/");
    assert_eq!(daemon.scrape().value("sv2_tpd_clients_connected", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_found_while_the_node_is_killed_is_resubmitted_or_its_loss_explained() {
    let test = "a_block_found_while_the_node_is_killed_is_resubmitted_or_its_loss_explained";
    let Some(node) = BitcoinNode::start_if_available(test).expect("bitcoin-node starts") else {
        return;
    };
    let (dir, daemon, mut c, t, p) = served_with_a_cached_template(&node).await;
    let parent = prev_hash(&p);
    let height = u64::from(t.coinbase_tx_locktime) + 1;

    node.kill9().unwrap();
    daemon.wait_for_log("lost the node");
    let (solution, hash) = solve(&t, &p, &build_coinbase(&t, &payout(), true));
    c.submit_solution(solution).await.unwrap();
    saved_block(&dir.path().join("solutions"), hash).await;

    node.restart().unwrap();
    let knows_parent = node
        .rpc("getblockheader", serde_json::json!([parent.to_string()]))
        .is_ok();
    println!(
        "after kill -9 the node is at height {} and {} the block's parent",
        node.block_count().unwrap(),
        if knows_parent {
            "knows"
        } else {
            "does not know"
        }
    );
    if knows_parent {
        // Out of IBD again at once only with a recent tip; the daemon resubmits then.
        wait_in_chain(&node, hash, &daemon);
        daemon.wait_for_log("block accepted by the node");
    } else {
        // A chain of its own grows past the block's height: the block is worthless now,
        // and the log must say so.
        let count = node.block_count().unwrap();
        node.generate(height.saturating_sub(count).max(1)).unwrap();
        let deadline = Instant::now() + DELIVERY_PATIENCE;
        let log = loop {
            let log = daemon.log_text();
            if [
                "giving the block up",
                "block rejected by the node",
                "(a stale block)",
            ]
            .iter()
            .any(|m| log.contains(m))
            {
                break log;
            }
            assert!(Instant::now() < deadline, "no word on the block:\n{log}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let why: Vec<&str> = log
            .lines()
            .filter(|l| {
                ["giving the block up", "block rejected", "(a stale block)"]
                    .iter()
                    .any(|m| l.contains(m))
            })
            .collect();
        println!("why the block was dropped: {why:?}");
        let named = why.iter().any(|l| l.contains(&hash.to_string()));
        assert!(named, "the log names the block:\n{log}");
    }
    assert_eq!(daemon.scrape().value("sv2_tpd_clients_connected", &[]), 1.0);
}

/// `submitSolution` and `submitBlock` requests the node has received, from its
/// `-debug=ipc` log.
fn submits_received(node: &BitcoinNode) -> usize {
    let log = std::fs::read_to_string(node.debug_log_path()).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("IPC server recv request"))
        .filter(|l| l.contains("submitSolution") || l.contains("submitBlock"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_submitted_to_a_stopped_node_is_sent_once_and_lands() {
    let test = "a_block_submitted_to_a_stopped_node_is_sent_once_and_lands";
    let Some(node) = BitcoinNode::start_if_available(test).expect("bitcoin-node starts") else {
        return;
    };
    let (_dir, daemon, mut c, t, p) = served_with_a_cached_template(&node).await;
    let before = submits_received(&node);

    // The node stops as the block goes out, and stays stopped for three deadlines.
    signal(&node, "STOP");
    let resume = Resume(&node);
    let (solution, hash) = solve(&t, &p, &build_coinbase(&t, &payout(), true));
    c.submit_solution(solution).await.unwrap();
    daemon.wait_for_metrics("the submit overdue", |m| {
        m.value(
            "sv2_tpd_node_calls_overdue",
            &[("method", "submitSolution")],
        ) == 1.0
    });
    tokio::time::sleep(3 * CALL_TIMEOUT).await;
    signal(&node, "CONT");
    drop(resume);

    wait_in_chain(&node, hash, &daemon);
    daemon.wait_for_log("block accepted by the node");
    let m = daemon.wait_for_metrics("the overdue submit ended", |m| {
        m.value(
            "sv2_tpd_node_calls_overdue",
            &[("method", "submitSolution")],
        ) == 0.0
    });
    assert_eq!(m.value("sv2_tpd_blocks_found_total", &[]), 1.0);
    assert_eq!(
        m.value("sv2_tpd_solutions_total", &[("result", "rejected")]),
        0.0
    );
    assert_eq!(
        submits_received(&node) - before,
        1,
        "the node ran one submit"
    );
    assert!(node.block_count().is_ok(), "the node is alive");
    let log = daemon.log_text();
    assert!(!log.contains("block rejected"), "no rejection:\n{log}");
    assert_eq!(m.value("sv2_tpd_clients_connected", &[]), 1.0);
}

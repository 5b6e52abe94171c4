//! Several nodes behind one daemon, against two mock nodes on the same chain (not peered:
//! a block reaches the other mock only when the test hands it over): which tip is
//! served, by which node, and where a found block goes.

mod support;

use std::time::{Duration, Instant};

use bitcoin::ScriptBuf;
use support::daemon_proc::DaemonProcess;
use support::tp::*;
use sv2_tpd::mock::{MockNode, MockOptions};

/// Two mocks on one chain (b copies a's), and a daemon on both (a first).
struct TwoNodes {
    a: MockNode,
    b: MockNode,
    daemon: DaemonProcess,
    _dir: tempfile::TempDir,
}

fn two_nodes() -> TwoNodes {
    let dir = tempfile::tempdir().unwrap();
    let socket = |name: &str| {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        sub.join("node.sock")
    };
    let a = MockNode::start(&socket("a"), MockOptions::default()).expect("mock a");
    let b = MockNode::start(
        &socket("b"),
        MockOptions {
            initial_blocks: 0,
            ..MockOptions::default()
        },
    )
    .expect("mock b");
    for block in a.blocks_above(0) {
        assert!(b.submit_block(block), "b takes a's chain");
    }
    assert_eq!(a.tip(), b.tip());
    let node =
        |name: &str, mock: &MockNode| format!("{name}=unix:{}", mock.socket_path().display());
    let daemon = DaemonProcess::start(
        a.socket_path(),
        dir.path(),
        &["--node", &node("a", &a), "--node", &node("b", &b)],
    );
    TwoNodes {
        a,
        b,
        daemon,
        _dir: dir,
    }
}

/// Hands the tip of `from` (above `to`'s tip) to `to`, as a peer would.
fn relay_tip(from: &MockNode, to: &MockNode) {
    for block in from.blocks_above(to.tip().1) {
        assert!(to.submit_block(block), "the block is taken");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_reaching_one_node_first_is_served_by_it_and_the_second_report_sends_nothing() {
    let nodes = two_nodes();
    let mut c = nodes.daemon.client().await;
    assert_eq!(next_pair_tip(&mut c).await, nodes.a.tip().0);

    // b hears of the block first.
    let block = nodes.b.mine_empty_block();
    assert_eq!(next_pair_tip(&mut c).await, block);
    let m = nodes.daemon.wait_for_node_at("b", nodes.b.tip().1);
    assert!(m.serving("b"), "the first to report the tip builds it");

    // Then a: the same tip, nothing new for the client.
    relay_tip(&nodes.b, &nodes.a);
    let m = nodes.daemon.wait_for_node_at("a", nodes.a.tip().1);
    assert!(m.serving("b"));
    assert_eq!(m.value("sv2_tpd_node_tip_current", &[("node", "a")]), 1.0);

    // The next message is the next block's pair, not a second pair for this one (the
    // stream checker fails a repeated pair on its own).
    let next = nodes.a.mine_empty_block();
    assert_eq!(next_pair_tip(&mut c).await, next);
    let m = nodes.daemon.wait_for_node_at("a", nodes.a.tip().1);
    assert!(m.serving("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_tip_from_one_node_is_ignored_while_another_healthy_node_is_higher() {
    let nodes = two_nodes();
    let mut c = nodes.daemon.client().await;
    next_pair_tip(&mut c).await;
    let top = nodes.a.tip().1;

    // a goes down a block (invalidateblock, or a restart on an older state).
    nodes.a.invalidate_tip().expect("a block to invalidate");
    let m = nodes.daemon.wait_for_node_at("a", top - 1);
    assert_eq!(m.value("sv2_tpd_node_tip_current", &[("node", "a")]), 0.0);
    assert_eq!(m.value("sv2_tpd_node_tip_current", &[("node", "b")]), 1.0);

    // The pools are not pulled back: the next pair is b's next block.
    let next = nodes.b.mine_empty_block();
    assert_eq!(next_pair_tip(&mut c).await, next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_same_height_the_tip_seen_first_stands() {
    let nodes = two_nodes();
    let mut c = nodes.daemon.client().await;
    next_pair_tip(&mut c).await;

    // Siblings: a's block first, then b's own block at the same height.
    let first = nodes.a.mine_empty_block();
    assert_eq!(next_pair_tip(&mut c).await, first);
    // A block of b's own (one transaction of its mempool in it).
    nodes.b.add_mempool_tx(bitcoin::Amount::from_sat(2_000));
    let sibling = nodes.b.mine_block();
    assert_ne!(sibling, first);
    nodes.daemon.wait_for_node_at("b", nodes.b.tip().1);

    // The next pair builds on a's chain: b's sibling was never served.
    let child = nodes.a.mine_empty_block();
    assert_eq!(next_pair_tip(&mut c).await, child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_node_with_the_best_tip_serves_the_best_of_the_rest_at_once() {
    let nodes = two_nodes();
    let mut c = nodes.daemon.client().await;
    next_pair_tip(&mut c).await;
    let lower = nodes.a.tip().0;
    let higher = nodes.b.mine_empty_block();
    assert_eq!(next_pair_tip(&mut c).await, higher);

    // b goes away: a's tip (lower) is the best left.
    let lost = Instant::now();
    nodes.b.stop();
    assert_eq!(next_pair_tip(&mut c).await, lower);
    println!(
        "best-tip node lost -> next best tip's pair: {:.1} ms",
        lost.elapsed().as_secs_f64() * 1000.0
    );
    let m = nodes.daemon.wait_for_node_at("a", nodes.a.tip().1);
    assert!(m.serving("a"));
    assert_eq!(nodes.daemon.health(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_found_block_goes_to_both_nodes_and_counts_once() {
    let nodes = two_nodes();
    let mut c = nodes.daemon.client().await;
    let (t, p) = next_tip(&mut c).await;
    // A full template, if one follows, is on the same tip; the pair is enough.
    let (solution, hash) = solve(&t, &p, &build_coinbase(&t, &payout(), true));
    c.submit_solution(solution).await.unwrap();
    let m = nodes.daemon.wait_for_metrics("the block found", |m| {
        m.value("sv2_tpd_blocks_found_total", &[]) == 1.0
            && m.value(
                "sv2_tpd_node_block_submits_total",
                &[("node", "b"), ("result", "accepted")],
            ) == 1.0
    });
    assert_eq!(
        m.value(
            "sv2_tpd_node_block_submits_total",
            &[("node", "a"), ("result", "accepted")],
        ),
        1.0
    );
    for node in [&nodes.a, &nodes.b] {
        assert_eq!(node.tip().0, hash, "the block is in both chains");
    }
    assert_eq!(
        m.value("sv2_tpd_solutions_total", &[("result", "accepted")]),
        1.0
    );
    let log = nodes.daemon.log_text();
    assert!(
        log.contains("the node has the block"),
        "b's verdict is logged"
    );
    assert!(log.contains("block accepted by the node"));
    // One pair for the new tip, though both nodes report it.
    assert_eq!(next_pair_tip(&mut c).await, hash);
}

#[test]
fn a_node_list_names_each_node_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let a = MockNode::start(&dir.path().join("node.sock"), MockOptions::default()).expect("mock");
    let missing = dir.path().join("none").join("node.sock");
    let daemon = DaemonProcess::start(
        a.socket_path(),
        dir.path(),
        &[
            "--node",
            &format!("main-a=unix:{}", a.socket_path().display()),
            "--node",
            &format!("far=unix:{}", missing.display()),
        ],
    );
    daemon.wait_for_health(200);
    let (code, body) = daemon.http_get("/status");
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let nodes = status["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2, "{body}");
    assert_eq!(nodes[0]["name"], "main-a");
    assert_eq!(nodes[0]["serving"], true);
    assert_eq!(nodes[0]["current"], true);
    assert_eq!(nodes[1]["name"], "far");
    assert_eq!(nodes[1]["connected"], false);
    assert!(nodes[1]["endpoint"]
        .as_str()
        .is_some_and(|e| e.ends_with("none/node.sock")));
}

fn payout() -> ScriptBuf {
    ScriptBuf::new_p2wsh(&bitcoin::WScriptHash::from_raw_hash(
        bitcoin::hashes::Hash::from_byte_array([7u8; 32]),
    ))
}

#[test]
fn a_node_on_another_chain_is_refused_at_start_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let signet = dir.path().join("signet");
    std::fs::create_dir_all(&signet).unwrap();
    let node = MockNode::start(&signet.join("node.sock"), MockOptions::default()).expect("mock");
    let mut daemon = DaemonProcess::spawn(
        node.socket_path(),
        &dir.path().join("tpd"),
        &[
            "--node",
            &format!("s=unix:{}", node.socket_path().display()),
        ],
    );
    let message = daemon.failure_message(2);
    assert!(message.contains("is on signet"), "{message}");
    assert!(message.contains("not on regtest"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_whose_template_connection_dies_mid_submit_is_not_sent_again_where_a_relay_runs() {
    let nodes = two_nodes();
    let (own, hash) = found_while_the_template_node_goes(&nodes, MockNode::drop_connections).await;
    // The template's node gets it over its next connection (or had it already).
    eventually("the block in the template's node", || own.tip().0 == hash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_whose_template_node_is_gone_for_good_is_settled_by_the_relay() {
    let nodes = two_nodes();
    found_while_the_template_node_goes(&nodes, MockNode::stop).await;
}

/// A block on the serving node's template, whose node goes (`go`) while it has the
/// submit and the relay to the other node is in flight: found once, the other node sent
/// it once. Returns the template's node and the block.
async fn found_while_the_template_node_goes(
    nodes: &TwoNodes,
    go: fn(&MockNode),
) -> (&MockNode, bitcoin::BlockHash) {
    let mut c = nodes.daemon.client().await;
    let (t, p) = next_tip(&mut c).await;
    let m = nodes.daemon.scrape();
    let (own, other, other_name) = match m.serving("a") {
        true => (&nodes.a, &nodes.b, "b"),
        false => (&nodes.b, &nodes.a, "a"),
    };
    other.set_delay(
        sv2_tpd::mock::MockMethod::SubmitBlock,
        Duration::from_secs(3),
    );
    own.set_delay(
        sv2_tpd::mock::MockMethod::SubmitSolution,
        Duration::from_secs(2),
    );
    let (solution, hash) = solve(&t, &p, &build_coinbase(&t, &payout(), true));
    c.submit_solution(solution).await.unwrap();
    eventually("the template's node has the submit", || {
        own.calls("submitSolution") == 1 && other.calls("submitBlock") == 1
    })
    .await;
    go(own);
    let m = nodes.daemon.wait_for_metrics("the block found", |m| {
        m.value("sv2_tpd_blocks_found_total", &[]) == 1.0
    });
    nodes.daemon.wait_for_metrics("the relay's verdict", |m| {
        m.value(
            "sv2_tpd_node_block_submits_total",
            &[("node", other_name), ("result", "accepted")],
        ) + m.value(
            "sv2_tpd_node_block_submits_total",
            &[("node", other_name), ("result", "duplicate")],
        ) == 1.0
    });
    assert_eq!(
        other.calls("submitBlock"),
        1,
        "no second submit beside the relay"
    );
    assert_eq!(other.tip().0, hash);
    assert_eq!(
        m.value("sv2_tpd_solutions_total", &[("result", "accepted")]),
        1.0
    );
    (own, hash)
}

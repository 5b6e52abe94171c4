//! A found block lands exactly once and every alert means what it says (mock node, the
//! real binary): a slow `submitSolution` is waited for, never sent again; a block the node
//! already has is a found block; junk pages nobody; a block beyond the in-flight limit
//! still reaches the node; a node that comes back on the same tip keeps the pools' fees.

mod support;

use std::path::Path;
use std::time::Duration;

use bitcoin::{Block, ScriptBuf, Transaction, TxMerkleNode};
use stratum_core::template_distribution_sv2::{
    NewTemplateOwned, SetNewPrevHashOwned, SubmitSolutionOwned,
};
use support::alert_series::{alert_selectors, alert_values};
use support::daemon_proc::DaemonProcess;
use support::tp::*;
use sv2_tpd::mock::{MockLine, MockMethod, MockNode, MockOptions};
use sv2_tpd::sv2::TdpMessage;

const SOLUTIONS: &str = "sv2_tpd_solutions_total";
const FOUND: &str = "sv2_tpd_blocks_found_total";
const OVERDUE: &str = "sv2_tpd_node_calls_overdue";

fn payout() -> ScriptBuf {
    support::op_true_script()
}

fn mock(dir: &Path, line: MockLine) -> MockNode {
    let options = MockOptions {
        line,
        ..MockOptions::default()
    };
    MockNode::start(&dir.join("node.sock"), options).expect("mock starts")
}

fn daemon(node: &MockNode, dir: &Path, extra: &[&str]) -> DaemonProcess {
    DaemonProcess::start(node.socket_path(), &dir.join("tpd"), extra)
}

/// The whole block of a solution for a template without transactions.
fn coinbase_only_block(
    t: &NewTemplateOwned,
    p: &SetNewPrevHashOwned,
    coinbase: &Transaction,
    solution: &SubmitSolutionOwned,
) -> Block {
    assert!(t.merkle_path.is_empty(), "a template without transactions");
    let header = bitcoin::block::Header {
        version: bitcoin::block::Version::from_consensus(solution.version as i32),
        prev_blockhash: prev_hash(p),
        merkle_root: TxMerkleNode::from_raw_hash(coinbase.compute_txid().to_raw_hash()),
        time: solution.header_timestamp,
        bits: bitcoin::CompactTarget::from_consensus(p.n_bits),
        nonce: solution.header_nonce,
    };
    Block {
        header,
        txdata: vec![coinbase.clone()],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_slower_than_the_call_deadline_is_waited_for_and_sent_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = mock(dir.path(), MockLine::V31_99);
    let daemon = daemon(
        &node,
        dir.path(),
        &["--node-call-timeout", "1", "--stale-template-grace", "1"],
    );
    let mut c = daemon.client().await;
    let (t, p) = next_tip(&mut c).await;
    // Only the submit is slow: ten times the deadline (room enough to see it overdue on a
    // loaded machine). The probe and everything else answer at once, so nothing else
    // holds a resubmit back.
    node.set_delay(MockMethod::SubmitSolution, Duration::from_secs(10));
    let (solution, hash) = solve(&t, &p, &build_coinbase(&t, &payout(), true));
    c.submit_solution(solution).await.unwrap();
    daemon.wait_for_metrics("the submit overdue", |m| {
        m.value(OVERDUE, &[("method", "submitSolution")]) == 1.0
    });
    daemon.wait_for_log("the node has not answered yet; still waiting for it");
    let (status, body) = daemon.http_get("/health");
    assert_eq!(status, 200, "a slow submit is no outage: {body}");
    assert!(body.contains("1 block submit(s) overdue"), "{body}");

    daemon.wait_for_log("block accepted by the node");
    let m = daemon.wait_for_metrics("the overdue call ended", |m| {
        m.value(OVERDUE, &[("method", "submitSolution")]) == 0.0
    });
    assert_eq!(node.calls("submitSolution"), 1, "sent exactly once");
    assert_eq!(node.stats().destroyed_while_in_use, 0);
    assert_eq!(node.tip().0, hash, "the node's verdict: a new tip");
    assert_eq!(m.value(FOUND, &[]), 1.0);
    assert_eq!(m.value(SOLUTIONS, &[("result", "accepted")]), 1.0);
    assert_eq!(m.value(SOLUTIONS, &[("result", "node-unavailable")]), 0.0);
    // Its template is released once the submit is over, not under it.
    node.set_delay(MockMethod::SubmitSolution, Duration::ZERO);
    let (_, p2) = next_tip(&mut c).await;
    assert_eq!(prev_hash(&p2), hash);
    eventually("the old tip's templates destroyed", || {
        node.stats().templates_alive <= 2
    })
    .await;
    assert_eq!(node.stats().destroyed_while_in_use, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_the_node_already_has_is_a_found_block() {
    let dir = tempfile::tempdir().unwrap();
    let node = mock(dir.path(), MockLine::V32);
    let daemon = daemon(&node, dir.path(), &[]);
    let mut c = daemon.client().await;
    let (t, p) = next_tip(&mut c).await;
    let coinbase = build_coinbase(&t, &payout(), true);
    let (solution, hash) = solve(&t, &p, &coinbase);
    // A peer relayed the same block first.
    assert!(node.submit_block(coinbase_only_block(&t, &p, &coinbase, &solution)));
    c.submit_solution(solution).await.unwrap();
    let accepted = daemon.wait_for_log("block accepted by the node");
    assert_eq!(accepted["reason"], "duplicate");
    let m = daemon.wait_for_metrics("the block found", |m| m.value(FOUND, &[]) == 1.0);
    assert_eq!(m.value(SOLUTIONS, &[("result", "rejected")]), 0.0);
    assert_eq!(node.tip().0, hash);
    assert!(
        !daemon.log_text().contains("rejected"),
        "no word of a rejection:\n{}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_junk_solutions_move_no_series_an_alert_reads() {
    const CLIENTS: usize = 4;
    const EACH: usize = 250;
    let dir = tempfile::tempdir().unwrap();
    let node = mock(dir.path(), MockLine::V31_99);
    let daemon = daemon(&node, dir.path(), &["--max-bad-solutions", "1000"]);
    let rules = std::fs::read_to_string(
        support::deploy_check::deploy_dir().join("prometheus/sv2-tpd-alerts.yml"),
    )
    .unwrap();
    let selectors = alert_selectors(&rules);
    assert!(
        selectors.iter().any(|s| s.name == SOLUTIONS),
        "the rules read the solutions"
    );
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut c = daemon.client().await;
        let (t, p) = next_tip(&mut c).await;
        clients.push((c, t, p));
    }
    let before = alert_values(&selectors, &daemon.scrape());
    for (c, t, p) in &mut clients {
        let bad = bad_nonce_solution(t, p, &payout());
        for n in 0..EACH {
            let mut junk = bad.clone();
            if n % 2 == 0 {
                // A template id never issued, with no block on any held template.
                junk.template_id = 1_000 + n as u64;
            }
            c.submit_solution(junk).await.unwrap();
        }
    }
    let after = daemon.wait_for_metrics("every junk solution counted", |m| {
        let junk = m.value(SOLUTIONS, &[("result", "bad-pow")])
            + m.value(SOLUTIONS, &[("result", "unknown-template")]);
        junk == (CLIENTS * EACH) as f64
    });
    assert_eq!(alert_values(&selectors, &after), before);
    assert_eq!(node.calls("submitSolution"), 0);
    assert_eq!(
        after.value("sv2_tpd_clients_connected", &[]),
        CLIENTS as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_beyond_the_in_flight_limit_waits_for_a_place_and_reaches_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = mock(dir.path(), MockLine::V31_99);
    let daemon = daemon(&node, dir.path(), &["--max-solutions-in-flight", "1"]);
    let mut c = daemon.client().await;
    let (t, p) = next_tip(&mut c).await;
    // Long enough that the second block surely arrives while the first holds the place.
    node.set_delay(MockMethod::SubmitSolution, Duration::from_secs(2));
    // Two different blocks on one template (two payouts), the second while the first
    // holds the only place.
    let other = ScriptBuf::from_bytes(vec![0x51, 0x51, 0x93]);
    let (first, _) = solve(&t, &p, &build_coinbase(&t, &payout(), true));
    let (second, second_hash) = solve(&t, &p, &build_coinbase(&t, &other, true));
    c.submit_solution(first).await.unwrap();
    c.submit_solution(second).await.unwrap();
    let m = daemon.wait_for_metrics("both blocks answered", |m| {
        m.value(SOLUTIONS, &[("result", "accepted")]) == 2.0
    });
    assert_eq!(node.calls("submitSolution"), 2);
    assert_eq!(m.value(SOLUTIONS, &[("result", "throttled")]), 0.0);
    assert!(node
        .accepted_blocks()
        .iter()
        .any(|b| b.block_hash() == second_hash));
    saved_file(
        &dir.path().join("tpd/solutions"),
        &format!("{second_hash}.block.hex"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_whose_template_was_never_read_is_on_disk_before_the_node_answers() {
    let dir = tempfile::tempdir().unwrap();
    let node = mock(dir.path(), MockLine::V31_99);
    // A template with transactions (one without needs no read), whose block read hangs
    // (the prefetch never completes), and so does the submit.
    node.add_mempool_tx(bitcoin::Amount::from_sat(5_000));
    node.set_delay(MockMethod::GetBlock, Duration::from_secs(3600));
    let daemon = daemon(&node, dir.path(), &["--node-call-timeout", "1"]);
    let mut c = daemon.client().await;
    let (t, p) = next_tip(&mut c).await;
    assert!(!t.merkle_path.is_empty());
    node.set_delay(MockMethod::SubmitSolution, Duration::from_secs(3600));
    let (solution, hash) = solve(&t, &p, &build_coinbase(&t, &payout(), true));
    c.submit_solution(solution).await.unwrap();
    // The header and coinbase, saved while the node has not answered.
    saved_file(
        &dir.path().join("tpd/solutions"),
        &format!("{hash}.solution.json"),
    )
    .await;
    let m = daemon.wait_for_metrics("the submit still waited for", |m| {
        m.value(OVERDUE, &[("method", "submitSolution")]) == 1.0
    });
    assert_eq!(m.value(SOLUTIONS, &[("result", "accepted")]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_on_a_template_released_since_is_saved_and_pages() {
    let dir = tempfile::tempdir().unwrap();
    let node = mock(dir.path(), MockLine::V31_99);
    let daemon = daemon(&node, dir.path(), &["--stale-template-grace", "1"]);
    let mut c = daemon.client().await;
    let (t, p) = next_tip(&mut c).await;
    node.mine_block();
    next_tip(&mut c).await;
    // Once the grace period is over the old tip's template is released.
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the template never released"
        );
        c.request_tx_data(t.template_id).await.unwrap();
        match recv(&mut c).await {
            TdpMessage::RequestTransactionDataError { error_code, .. }
                if error_code == "template-id-not-found" =>
            {
                break
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    // A pool still mining it finds a block.
    let (solution, hash) = solve(&t, &p, &build_coinbase(&t, &payout(), true));
    c.submit_solution(solution).await.unwrap();
    daemon.wait_for_log("a block was found on a template this daemon had already released");
    let m = daemon.wait_for_metrics("the block counted as released", |m| {
        m.value(SOLUTIONS, &[("result", "released")]) == 1.0
    });
    assert_eq!(m.value(SOLUTIONS, &[("result", "unknown-template")]), 0.0);
    saved_file(
        &dir.path().join("tpd/solutions"),
        &format!("{hash}.solution.json"),
    )
    .await;
}

/// Collects messages until a `SetNewPrevHash`, returning the non-future templates before
/// it and the `SetNewPrevHash` itself.
async fn updates_until_prev_hash(
    c: &mut support::stream_check::CheckedClient,
) -> (Vec<NewTemplateOwned>, SetNewPrevHashOwned) {
    let mut updates = Vec::new();
    loop {
        match recv(c).await {
            TdpMessage::NewTemplate(t) if !t.future_template => updates.push(t),
            TdpMessage::SetNewPrevHash(p) => return (updates, p),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_on_the_same_tip_keeps_the_fees_and_sends_no_new_pair() {
    let dir = tempfile::tempdir().unwrap();
    let node = mock(dir.path(), MockLine::V31_99);
    for _ in 0..30 {
        node.add_mempool_tx(bitcoin::Amount::from_sat(5_000));
    }
    let daemon = daemon(&node, dir.path(), &["--node-call-timeout", "1"]);
    let mut c = daemon.client().await;
    let (first, _) = next_tip(&mut c).await;
    assert!(
        !first.merkle_path.is_empty(),
        "the first template has the mempool"
    );

    // A reconnect on the unchanged tip.
    node.drop_connections();
    daemon.wait_for_metrics("the reconnect", |m| {
        m.value("sv2_tpd_node_connects_total", &[]) == 2.0
    });
    let refreshed = next_template(&mut c).await;
    assert!(!refreshed.future_template, "the same tip: an update");
    assert!(!refreshed.merkle_path.is_empty(), "with the mempool's fees");
    assert!(refreshed.template_id > first.template_id);

    // A node that stops answering and answers again, on the unchanged tip.
    node.hang(true);
    daemon.wait_for_metrics("the node unresponsive", |m| {
        m.value("sv2_tpd_node_responsive", &[]) == 0.0
    });
    node.hang(false);
    let again = next_template(&mut c).await;
    assert!(!again.future_template && !again.merkle_path.is_empty());
    assert!(again.template_id > refreshed.template_id);

    // The first SetNewPrevHash since the start is the next block's.
    let mined = node.mine_empty_block();
    let (_, p) = updates_until_prev_hash(&mut c).await;
    assert_eq!(prev_hash(&p), mined);
    let m = daemon.scrape();
    assert_eq!(
        m.value("sv2_tpd_templates_created_total", &[("reason", "refresh")]),
        2.0
    );
}

#[test]
fn alert_selectors_are_read_with_their_matchers() {
    let rules = r#"
      - alert: A
        expr: increase(sv2_tpd_solutions_total{job="sv2-tpd",result=~"node-unavailable|throttled"}[30m]) > 0
      - alert: B
        expr: max by (job, instance) (sv2_tpd_node_connected{job="sv2-tpd"}) == 1 and on (job, instance) sv2_tpd_templates_held{job="sv2-tpd"} == 0
      - alert: C
        expr: sum by (job, instance) (sv2_tpd_node_serving{job="sv2-tpd"} * on (job, instance, node) sv2_tpd_node_responsive) == 0 or on (job, instance) (up{job="sv2-tpd"} == 1 unless on (job, instance) sv2_tpd_node_serving{job="sv2-tpd"})
    "#;
    let selectors = alert_selectors(rules);
    let names: Vec<&str> = selectors.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "sv2_tpd_node_connected",
            "sv2_tpd_node_responsive",
            "sv2_tpd_node_serving",
            "sv2_tpd_solutions_total",
            "sv2_tpd_templates_held"
        ]
    );
    // Grouping labels (`by`, `on`) are not matchers, and Prometheus' own `up` is no
    // selector of ours.
    assert!(selectors
        .iter()
        .filter(|s| s.name != "sv2_tpd_solutions_total")
        .all(|s| s.matchers.is_empty()));
    assert_eq!(
        selectors[3].matchers,
        [(
            "result".to_string(),
            vec!["node-unavailable".to_string(), "throttled".to_string()]
        )]
    );
}

//! Hostile clients that try to turn their messages into work, against the real `sv2-tpd`
//! binary and the mock node (whose counters show what reached the node): a flood of
//! solutions that miss their target, hundreds of constraint changes, and transaction-data
//! requests from clients that never read. In each case a pool connected beside them keeps
//! getting every new tip and the daemon's memory stays bounded. The figures printed here
//! are the ones in docs/robustness.md.

mod support;

use std::time::Instant;

use bitcoin::{Amount, ScriptBuf};
use stratum_core::template_distribution_sv2::{NewTemplateOwned, SetNewPrevHashOwned};
use support::daemon_proc::DaemonProcess;
use support::stream_check::CheckedClient;
use support::tp::{
    bad_nonce_solution, build_coinbase, client_at, next_tip, prev_hash, recv, solve,
};
use sv2_tpd::mock::{MockNode, MockOptions};
use sv2_tpd::sv2::TdpMessage;

/// Memory an attack below may add to the daemon: far above what a bounded daemon needs,
/// far below what keeping the attack's input would cost.
const RSS_BOUND_KIB: u64 = 64 * 1024;

fn payout() -> ScriptBuf {
    ScriptBuf::new_p2wsh(&bitcoin::WScriptHash::from_raw_hash(
        bitcoin::hashes::Hash::from_byte_array([5u8; 32]),
    ))
}

async fn connect(daemon: &DaemonProcess, size: u32) -> CheckedClient {
    client_at(
        daemon.sv2_addr.expect("SV2 address"),
        daemon.authority.expect("authority key"),
        size,
        10,
    )
    .await
}

/// Mines a block, checks the pool gets its tip, and returns the pool's new template.
async fn pool_gets_the_next_tip(
    node: &MockNode,
    pool: &mut CheckedClient,
) -> (NewTemplateOwned, SetNewPrevHashOwned) {
    let mined = node.mine_block();
    let (t, p) = next_tip(pool).await;
    assert_eq!(prev_hash(&p), mined, "the pool missed a tip");
    (t, p)
}

fn start(
    dir: &tempfile::TempDir,
    node_opts: MockOptions,
    extra: &[&str],
) -> (MockNode, DaemonProcess) {
    let socket = dir.path().join("node.sock");
    let node = MockNode::start(&socket, node_opts).expect("mock starts");
    let daemon = DaemonProcess::start(&socket, &dir.path().join("tpd"), extra);
    (node, daemon)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn solutions_that_miss_their_target_cost_nothing_and_a_real_block_goes_through() {
    let dir = tempfile::tempdir().unwrap();
    let (node, daemon) = start(&dir, MockOptions::default(), &[]);
    let mut pool = connect(&daemon, 100).await;
    let (t, p) = next_tip(&mut pool).await;
    // (The standing group's first template is not waited for: once the pool's group
    // runs, the standing group may rest before it ever builds one.)
    let submits_before = node.calls("submitSolution");
    let rss_before = daemon.rss_kib();

    // 2,000 solutions whose header misses the target, from attackers that reconnect each
    // time they are thrown out (after max_bad_solutions).
    let bogus = bad_nonce_solution(&t, &p, &payout());
    let started = Instant::now();
    let (mut sent, mut connections) = (0, 0);
    while sent < 2_000 {
        let mut attacker = connect(&daemon, 100).await;
        connections += 1;
        while sent < 2_000 {
            if attacker.submit_solution(bogus.clone()).await.is_err() {
                break;
            }
            sent += 1;
        }
        if connections % 50 == 0 {
            pool_gets_the_next_tip(&node, &mut pool).await;
        }
    }
    // Every attacker but the last was thrown out, each after more than
    // max_bad_solutions (3) refusals.
    let thrown_out = (connections - 1) as f64;
    let refused = daemon.wait_for_metrics("the bogus solutions refused", |m| {
        m.value(
            "sv2_tpd_clients_disconnected_total",
            &[("reason", "bad_solutions")],
        ) >= thrown_out
            && m.value("sv2_tpd_solutions_total", &[("result", "bad-pow")]) >= 4.0 * thrown_out
    });
    let rss_after = daemon.rss_kib();
    println!(
        "2,000 bogus solutions over {connections} connections in {:?}: bad-pow {}, \
         throttled {}, attackers disconnected {}; RSS {rss_before} -> {rss_after} KiB",
        started.elapsed(),
        refused.value("sv2_tpd_solutions_total", &[("result", "bad-pow")]),
        refused.value("sv2_tpd_solutions_total", &[("result", "throttled")]),
        refused.value(
            "sv2_tpd_clients_disconnected_total",
            &[("reason", "bad_solutions")]
        ),
    );
    assert_eq!(
        node.calls("submitSolution"),
        submits_before,
        "a bogus solution reached the node"
    );
    assert!(
        !dir.path().join("tpd/solutions").exists()
            || std::fs::read_dir(dir.path().join("tpd/solutions"))
                .unwrap()
                .next()
                .is_none(),
        "a bogus solution was written to disk"
    );
    assert!(
        rss_after < rss_before + RSS_BOUND_KIB,
        "RSS {rss_before} -> {rss_after} KiB"
    );

    // A real block right after is accepted at once.
    let (t, p) = pool_gets_the_next_tip(&node, &mut pool).await;
    let (block, hash) = solve(&t, &p, &build_coinbase(&t, &payout(), true));
    let submitted = Instant::now();
    pool.submit_solution(block.clone()).await.unwrap();
    let (_, p) = next_tip(&mut pool).await;
    assert_eq!(prev_hash(&p), hash, "the real block was not accepted");
    println!(
        "real block right after: accepted and its tip out in {:?}",
        submitted.elapsed()
    );

    // Replaying that block (anyone can, once it is public) costs no node call.
    let submits = node.calls("submitSolution");
    let mut replayer = connect(&daemon, 100).await;
    for _ in 0..20 {
        replayer.submit_solution(block.clone()).await.unwrap();
    }
    daemon.wait_for_metrics("the replays refused", |m| {
        m.value("sv2_tpd_solutions_total", &[("result", "duplicate")]) >= 20.0
    });
    assert_eq!(
        node.calls("submitSolution"),
        submits,
        "a replay reached the node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constraint_changes_are_coalesced_and_node_work_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (node, daemon) = start(&dir, MockOptions::default(), &[]);
    let mut pool = connect(&daemon, 100).await;
    next_tip(&mut pool).await;
    let creates_before = node.calls("createNewBlock");
    let rss_before = daemon.rss_kib();

    let mut attacker = connect(&daemon, 200).await;
    let mut max_threads = 0;
    let started = Instant::now();
    for i in 0..500u32 {
        attacker
            .send_constraints(1_000 + i, 10)
            .await
            .expect("constraints sent");
        max_threads = max_threads.max(node.stats().threads_alive);
    }
    // The latest change wins once the rate limit lets it through.
    let m = daemon.wait_for_metrics("the coalesced changes", |m| {
        m.value(
            "sv2_tpd_constraint_changes_total",
            &[("result", "superseded")],
        ) >= 1.0
    });
    for _ in 0..3 {
        pool_gets_the_next_tip(&node, &mut pool).await;
        max_threads = max_threads.max(node.stats().threads_alive);
    }
    let creates = node.calls("createNewBlock") - creates_before;
    let rss_after = daemon.rss_kib();
    println!(
        "500 constraint changes in {:?}: applied {}, superseded {}; createNewBlock {creates}; \
         node threads at most {max_threads}; RSS {rss_before} -> {rss_after} KiB",
        started.elapsed(),
        m.value("sv2_tpd_constraint_changes_total", &[("result", "applied")]),
        m.value(
            "sv2_tpd_constraint_changes_total",
            &[("result", "superseded")]
        ),
    );
    // One change a second goes through. Each block mined costs every live group (the
    // pool's and the attacker's; the standing group rests) an empty template and then the
    // full one (tip-first): 3 blocks x 2 groups x 2.
    let seconds = started.elapsed().as_secs() + 1;
    assert!(
        creates <= 2 * seconds + 2 + 3 * 2 * 2,
        "{creates} createNewBlock calls in {seconds} s"
    );
    assert!(max_threads <= 32, "{max_threads} node threads");
    assert!(rss_after < rss_before + RSS_BOUND_KIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_data_for_clients_that_never_read_stays_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let budget: u64 = 8 << 20;
    let budget_flag = budget.to_string();
    let (node, daemon) = start(
        &dir,
        MockOptions::default(),
        &["--max-tx-data-bytes-in-flight", &budget_flag],
    );
    // Big transaction data: about 380 KB an answer.
    for _ in 0..2_000 {
        node.add_mempool_tx(Amount::from_sat(2_000));
    }
    let mut pool = connect(&daemon, 100).await;
    let (t, _) = next_tip(&mut pool).await;
    let rss_before = daemon.rss_kib();

    // 10 clients × 100 requests, none of them ever reads.
    let mut readers = Vec::new();
    for _ in 0..10 {
        let mut reader = connect(&daemon, 100).await;
        for _ in 0..100 {
            // The current template of the pool's group, which the readers share.
            if reader.request_tx_data(t.template_id).await.is_err() {
                break;
            }
        }
        readers.push(reader);
    }
    // Their sessions are stuck writing answers nobody reads; the pool is served all the
    // same.
    let m = daemon.wait_for_metrics("answers going out", |m| {
        m.value("sv2_tpd_tx_data_requests_total", &[("result", "success")]) >= 1.0
    });
    // A client that reads still gets its transaction data, and the pool its tips.
    let mut reading = connect(&daemon, 100).await;
    let (current, _) = next_tip(&mut reading).await;
    reading.request_tx_data(current.template_id).await.unwrap();
    loop {
        match recv(&mut reading).await {
            TdpMessage::RequestTransactionDataSuccess(s) => {
                assert_eq!(s.template_id, current.template_id);
                break;
            }
            TdpMessage::NewTemplate(_) | TdpMessage::SetNewPrevHash(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    pool_gets_the_next_tip(&node, &mut pool).await;
    let rss_after = daemon.rss_kib();
    println!(
        "1,000 RequestTransactionData from 10 clients that never read: throttled {}, \
         RSS {rss_before} -> {rss_after} KiB (budget {} KiB)",
        m.value("sv2_tpd_tx_data_requests_total", &[("result", "throttled")]),
        budget / 1024
    );
    assert!(
        rss_after < rss_before + budget / 1024 + RSS_BOUND_KIB,
        "RSS {rss_before} -> {rss_after} KiB"
    );
    drop(readers);
}

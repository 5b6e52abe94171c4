//! `/metrics` of the real `sv2-tpd` binary, driven against the mock node: the page parses
//! as Prometheus text, every family declared in src/metrics.rs appears, and each one moves
//! when the thing it counts happens. The daemon is a child process, so the counters are
//! its own and not shared with other tests.

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use bitcoin::hashes::Hash;
use bitcoin::{Amount, ScriptBuf};
use support::daemon_proc::{DaemonProcess, Metrics};
use support::stream_check::CheckedClient;
use support::tp::{
    bad_nonce_solution, build_coinbase, client_at, next_template, next_tip, prev_hash, recv, solve,
};
use sv2_tpd::mock::{MockNode, MockOptions};
use sv2_tpd::sv2::TdpMessage;
use tokio::io::AsyncWriteExt;

const CREATED: &str = "sv2_tpd_templates_created_total";
const SENT: &str = "sv2_tpd_messages_sent_total";
const RECEIVED: &str = "sv2_tpd_messages_received_total";
const TX_DATA: &str = "sv2_tpd_tx_data_requests_total";
const SOLUTIONS: &str = "sv2_tpd_solutions_total";
const IPC: &str = "sv2_tpd_ipc_call_duration_seconds";
const LATENCY: &str = "sv2_tpd_new_tip_to_prevhash_seconds";
const CLIENTS: &str = "sv2_tpd_clients_connected";
const HELD: &str = "sv2_tpd_templates_held";
const BUILDS: &str = "sv2_tpd_node_template_builds_total";

/// Every metric family named in src/metrics.rs (its `"sv2_tpd_..."` name literals).
fn declared_families() -> BTreeSet<String> {
    let source =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/metrics.rs"))
            .expect("src/metrics.rs");
    source
        .split('"')
        .filter(|piece| piece.starts_with("sv2_tpd_") && !piece.contains(' '))
        .map(str::to_string)
        .collect()
}

fn payout() -> ScriptBuf {
    ScriptBuf::new_p2wsh(&bitcoin::WScriptHash::from_byte_array([9u8; 32]))
}

/// Reads until a `RequestTransactionData` answer, skipping template updates.
async fn tx_data_answer(c: &mut CheckedClient) -> TdpMessage {
    loop {
        match recv(c).await {
            TdpMessage::NewTemplate(_) | TdpMessage::SetNewPrevHash(_) => continue,
            other => return other,
        }
    }
}

fn assert_moved(before: &Metrics, after: &Metrics, name: &str, labels: &[(&str, &str)]) {
    let (b, a) = (before.value(name, labels), after.value(name, labels));
    assert!(a > b, "{name}{labels:?} did not move: {b} -> {a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_moves_with_what_it_counts() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("node.sock");
    let daemon = DaemonProcess::start(&socket, &dir.path().join("tpd"), &[]);
    let sv2 = daemon.sv2_addr.unwrap();
    let authority = daemon.authority.unwrap();

    // No node yet.
    let m0 = daemon.scrape();
    assert_eq!(m0.value("sv2_tpd_node_connected", &[]), 0.0);
    assert_eq!(m0.value("sv2_tpd_node_connects_total", &[]), 0.0);
    assert_eq!(m0.value(CLIENTS, &[]), 0.0);
    assert_eq!(m0.value(HELD, &[]), 0.0);

    // The node appears: connected, its interface line, one connect, the standing group's
    // template made and held, the IPC calls timed.
    let node = MockNode::start(&socket, MockOptions::default()).unwrap();
    let m1 = daemon.wait_for_metrics("the node connected with a template", |m| {
        m.value("sv2_tpd_node_connected", &[]) == 1.0 && m.value(HELD, &[]) >= 1.0
    });
    assert_eq!(
        m1.get("sv2_tpd_node_info", &[("interface", "v31.99")]),
        Some(1.0)
    );
    assert_eq!(m1.value("sv2_tpd_node_connects_total", &[]), 1.0);
    assert_moved(&m0, &m1, CREATED, &[("reason", "constraints")]);
    assert!(m1.histogram_count(IPC, &[("method", "createNewBlock")]) >= 1.0);
    assert!(m1.histogram_count(IPC, &[("method", "isInitialBlockDownload")]) >= 1.0);

    // A pool connects: handshake, SetupConnection, constraints, its first template pair.
    let mut c = client_at(sv2, authority, 100, 10).await;
    let (t0, _) = next_tip(&mut c).await;
    // Sent messages are counted once written, which may be just after the client read them.
    let m2 = daemon.wait_for_metrics("the first pair counted", |m| {
        m.value(SENT, &[("type", "SetNewPrevHash")]) >= 1.0
    });
    assert_eq!(m2.value(CLIENTS, &[]), 1.0);
    assert_eq!(m2.value(RECEIVED, &[("type", "SetupConnection")]), 1.0);
    assert_eq!(
        m2.value(RECEIVED, &[("type", "CoinbaseOutputConstraints")]),
        1.0
    );
    assert_eq!(m2.value(SENT, &[("type", "SetupConnectionSuccess")]), 1.0);
    assert!(m2.value(SENT, &[("type", "NewTemplate")]) >= 1.0);
    assert!(m2.value(SENT, &[("type", "SetNewPrevHash")]) >= 1.0);
    assert_moved(&m1, &m2, CREATED, &[("reason", "constraints")]);

    // A new tip: a tip template, a waitTipChanged that returned, a template build, a
    // latency observation.
    node.mine_block();
    let (_, p1) = next_tip(&mut c).await;
    let m3 = daemon.wait_for_metrics("the new tip's pair counted", |m| {
        m.value(SENT, &[("type", "SetNewPrevHash")]) > m2.value(SENT, &[("type", "SetNewPrevHash")])
    });
    assert_moved(&m2, &m3, CREATED, &[("reason", "tip")]);
    assert!(m3.histogram_count(LATENCY, &[]) > m2.histogram_count(LATENCY, &[]));
    assert!(
        m3.histogram_count(IPC, &[("method", "waitTipChanged")])
            > m2.histogram_count(IPC, &[("method", "waitTipChanged")])
    );
    // Tip-first: the node built an empty template for the tip.
    assert_moved(&m2, &m3, BUILDS, &[("kind", "empty")]);

    // Fees rise on the same tip: a fee template.
    node.add_mempool_tx(Amount::from_sat(5_000));
    let t2 = next_template(&mut c).await;
    assert!(!t2.future_template);
    let m4 = daemon.scrape();
    assert_moved(&m3, &m4, CREATED, &[("reason", "fees")]);

    // Transaction data: success, unknown id, and a template of the previous tip.
    c.request_tx_data(t2.template_id).await.unwrap();
    assert!(matches!(
        tx_data_answer(&mut c).await,
        TdpMessage::RequestTransactionDataSuccess(_)
    ));
    c.request_tx_data(999_999).await.unwrap();
    assert!(matches!(
        tx_data_answer(&mut c).await,
        TdpMessage::RequestTransactionDataError { .. }
    ));
    c.request_tx_data(t0.template_id).await.unwrap();
    match tx_data_answer(&mut c).await {
        TdpMessage::RequestTransactionDataError { error_code, .. } => {
            assert_eq!(error_code, "stale-template-id")
        }
        other => panic!("unexpected {other:?}"),
    }
    let m5 = daemon.wait_for_metrics("the answers counted", |m| {
        m.value(SENT, &[("type", "RequestTransactionDataError")]) == 2.0
    });
    for result in ["success", "template-id-not-found", "stale-template-id"] {
        assert_eq!(
            m5.value(TX_DATA, &[("result", result)]) - m4.value(TX_DATA, &[("result", result)]),
            1.0,
            "{result}"
        );
    }
    assert_eq!(
        m5.value(RECEIVED, &[("type", "RequestTransactionData")]),
        3.0
    );
    assert_moved(&m4, &m5, SENT, &[("type", "RequestTransactionDataSuccess")]);
    assert_eq!(
        m5.value(SENT, &[("type", "RequestTransactionDataError")]),
        2.0
    );

    // Solutions: for an unknown template (and no block on any held one), with a bad
    // nonce, and a good one (a block).
    let coinbase = build_coinbase(&t2, &payout(), true);
    // (On regtest half of all headers meet the target, so its coinbase lacks the height
    // push: it can be no template's block.)
    let mut no_height = build_coinbase(&t2, &payout(), true);
    no_height.input[0].script_sig = ScriptBuf::from_bytes(vec![0x51, 0x51]);
    let (mut unknown, _) = solve(&t2, &p1, &no_height);
    unknown.template_id = 424_242;
    c.submit_solution(unknown).await.unwrap();
    c.submit_solution(bad_nonce_solution(&t2, &p1, &payout()))
        .await
        .unwrap();
    let m6 = daemon.wait_for_metrics("the refused solutions", |m| {
        m.value(SOLUTIONS, &[("result", "unknown-template")]) == 1.0
            && m.value(SOLUTIONS, &[("result", "bad-pow")]) == 1.0
    });
    assert_eq!(m6.value(SOLUTIONS, &[("result", "rejected")]), 0.0);
    assert_eq!(m6.value(SOLUTIONS, &[("result", "accepted")]), 0.0);
    assert_eq!(m6.value("sv2_tpd_blocks_found_total", &[]), 0.0);
    assert!(node.accepted_blocks().is_empty());

    let (good, hash) = solve(&t2, &p1, &coinbase);
    c.submit_solution(good).await.unwrap();
    let (_, p3) = next_tip(&mut c).await;
    assert_eq!(prev_hash(&p3), hash);
    let m7 = daemon.wait_for_metrics("the accepted solution", |m| {
        m.value(SOLUTIONS, &[("result", "accepted")]) == 1.0
    });
    assert_eq!(m7.value("sv2_tpd_blocks_found_total", &[]), 1.0);
    assert_eq!(m7.value(RECEIVED, &[("type", "SubmitSolution")]), 3.0);
    // Only the real block reached the node: the bad nonce was refused before it.
    assert_eq!(
        m7.histogram_count(IPC, &[("method", "submitSolution")])
            - m6.histogram_count(IPC, &[("method", "submitSolution")]),
        1.0
    );
    assert_eq!(m7.value(SOLUTIONS, &[("result", "node-unavailable")]), 0.0);

    // A message a Template Distribution client never sends is counted as unexpected.
    c.send_raw_frame(0, 0x15, &[]).await.unwrap();
    let m8 = daemon.wait_for_metrics("the unexpected message", |m| {
        m.value("sv2_tpd_messages_unexpected_total", &[]) == 1.0
    });
    assert_eq!(m8.value(RECEIVED, &[("type", "NewMiningJob")]), 1.0);

    // Garbage instead of a Noise handshake.
    let mut raw = tokio::net::TcpStream::connect(sv2).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    raw.shutdown().await.unwrap();
    daemon.wait_for_metrics("the failed handshake", |m| {
        m.value("sv2_tpd_handshake_failures_total", &[]) == 1.0
    });
    drop(raw);

    // The pool leaves.
    drop(c);
    daemon.wait_for_metrics("the client gone", |m| m.value(CLIENTS, &[]) == 0.0);

    // Steady state: the gauge is exactly what the node holds for us.
    let steady = daemon.wait_for_metrics("templates_held settled", |m| {
        m.value(HELD, &[]) as u64 == node.stats().templates_alive
    });
    assert!(steady.value(HELD, &[]) >= 1.0);

    // The node drops the connection: a reconnect, and templates held again. The old
    // connection's templates are counted out as they are released, so the gauge never
    // goes below what the new connection holds.
    let before_reconnect = daemon.scrape();
    node.drop_connections();
    let reconnected = daemon.wait_for_metrics("the reconnect", |m| {
        m.value("sv2_tpd_node_connects_total", &[]) == 2.0
            && m.value("sv2_tpd_node_connected", &[]) == 1.0
            && m.value(HELD, &[]) >= 1.0
    });
    // The standing group's template for the node's tip; a correct engine makes no
    // other, so the count is checked once it is there.
    let m10 = daemon.wait_for_metrics("the standing group's template", |m| {
        m.value(CREATED, &[("reason", "tip")])
            > before_reconnect.value(CREATED, &[("reason", "tip")])
    });
    // Templates made after a reconnect count as reason="tip" (they stand for the tip
    // the node has now).
    assert_eq!(
        m10.value(CREATED, &[("reason", "tip")])
            - before_reconnect.value(CREATED, &[("reason", "tip")]),
        1.0,
        "after a reconnect only the standing group is re-created, not the departed \
         client's: {reconnected:?}"
    );
    assert_eq!(
        m10.value(CREATED, &[("reason", "constraints")]),
        before_reconnect.value(CREATED, &[("reason", "constraints")]),
    );
    let held = m10.value(HELD, &[]);
    assert!(
        held >= 1.0 && held as u64 <= node.stats().templates_alive,
        "templates_held after a reconnect: {held}"
    );

    // Every declared family is on the page.
    let present = m10.families();
    let missing: Vec<_> = declared_families()
        .into_iter()
        .filter(|f| !present.contains(f))
        .collect();
    assert!(
        missing.is_empty(),
        "families missing from /metrics: {missing:?}"
    );
}

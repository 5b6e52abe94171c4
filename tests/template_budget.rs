//! One budget for the templates held, all constraint groups together: 32 SV2 clients
//! (built on SRI's crates) with distinct constraints, tip after tip and a fee rise on
//! each, against the mock node. The daemon's `sv2_tpd_templates_held` gauge and the
//! mock's count of live templates agree and never settle above `max_templates_held`,
//! every group's current template stays served, and the groups' equal transaction lists
//! are held once. The daemon runs in this process, alone in this test binary, so the
//! gauge is its own.

mod support;

use bitcoin::Amount;
use support::stream_check::CheckedClient;
use support::tp::*;
use sv2_tpd::metrics::metrics;
use sv2_tpd::mock::{MockNode, MockOptions};
use sv2_tpd::sv2::TdpMessage;

/// Distinct constraint groups: the most the daemon serves.
const GROUPS: u32 = 32;
/// `max_templates_held`: above the 33 current templates (32 groups and the standing one),
/// well below the three templates per group and tip the rounds make.
const BUDGET: u64 = 40;
/// New tips mined.
const TIPS: u64 = 6;

/// The transactions `c` is sent for template `id` (failing on an error answer).
async fn tx_data(c: &mut CheckedClient, id: u64) -> Vec<Vec<u8>> {
    c.request_tx_data(id).await.expect("request sent");
    match recv(c).await {
        TdpMessage::RequestTransactionDataSuccess(s) => s
            .transaction_list
            .iter_bytes()
            .map(<[u8]>::to_vec)
            .collect(),
        other => panic!("template {id}: expected its transactions, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_groups_and_many_tips_stay_within_one_budget() {
    let dir = tempfile::tempdir().unwrap();
    let node = MockNode::start(&dir.path().join("node.sock"), MockOptions::default())
        .expect("mock starts");
    let budget = BUDGET.to_string();
    // Fee checks every second, and a grace period that keeps the previous tip's templates
    // wanted: only the budget bounds what is held.
    let config = regtest_config(
        node.socket_path(),
        dir.path(),
        &[
            ("stale_template_grace", "600"),
            ("max_templates_held", &budget),
        ],
    );
    let daemon = start_daemon(&config).await;
    let mut clients = Vec::new();
    for i in 0..GROUPS {
        let mut c = client(&daemon, 100 + i * 320, 10).await;
        next_tip(&mut c).await;
        clients.push(c);
    }

    let held = || metrics().templates_held.get() as u64;
    let alive = || node.stats().templates_alive;
    for round in 1..=TIPS {
        // A new tip with one more transaction in the mempool: the tip's empty template
        // (one for all groups) and every group's full one.
        node.add_mempool_tx(Amount::from_sat(2_000));
        let mined = node.mine_empty_block();
        let mut full = Vec::new();
        for c in &mut clients {
            let (empty, p) = next_tip(c).await;
            assert_eq!(prev_hash(&p), mined, "round {round}");
            let t = next_template(c).await;
            assert!(!t.future_template, "round {round}: the full template");
            assert!(t.coinbase_tx_value_remaining > empty.coinbase_tx_value_remaining);
            full.push(t);
        }
        // Then the fees rise on the same tip: every group's fee template.
        node.add_mempool_tx(Amount::from_sat(5_000));
        let mut current = Vec::new();
        for (c, full) in clients.iter_mut().zip(&full) {
            let t = next_template(c).await;
            assert!(!t.future_template, "round {round}: a fee template");
            assert_eq!(
                t.coinbase_tx_value_remaining,
                full.coinbase_tx_value_remaining + 5_000
            );
            current.push(t.template_id);
        }
        // Each group's current template is still held and served, whatever the budget
        // released; they all hold the same transactions.
        let mut list_bytes = 0;
        for (c, id) in clients.iter_mut().zip(&current) {
            let txs = tx_data(c, *id).await;
            assert_eq!(txs.len() as u64, 2 * round, "round {round}: the mempool");
            list_bytes = txs.iter().map(Vec::len).sum::<usize>();
        }
        // The clients' requests came after every template of the round, so the daemon has
        // made its choice: 96 templates this round beside the 33 current ones (the 32 of
        // the shared empty template one block in the node), and what
        // it keeps is the budget. The node holds more only until it has destroyed the
        // rest (and for the moment a group's fee check takes): both counts come down to
        // the budget, not below and not above.
        eventually(&format!("round {round}: the node holds the budget"), || {
            alive() == BUDGET && held() == BUDGET
        })
        .await;
        // The 32 current templates' list is held once, beside the list of the tip's full
        // templates (the newest ones not current); the previous tips' went with theirs.
        let bytes = metrics().template_bytes_held.get() as usize;
        assert!(
            list_bytes <= bytes && bytes < 2 * list_bytes,
            "round {round}: {bytes} bytes cached, lists of {list_bytes} bytes"
        );
    }
    let made = node.stats().templates_created;
    let peak = node.stats().templates_alive_peak;
    println!(
        "{GROUPS} groups, {TIPS} tips with a fee rise each: {made} templates made, {} held \
         (budget {BUDGET}), at most {peak} alive in the node at once, {} bytes of \
         transactions cached",
        alive(),
        metrics().template_bytes_held.get()
    );
    // Between a template's creation and the destroy of what it pushes out of the budget,
    // the node holds more for a moment: at worst, before any destroy is answered, the
    // tip's empty template, each group's full one and a fee check's candidate — never
    // more than that, whatever the number of tips.
    assert!(
        peak <= BUDGET + 3 * u64::from(GROUPS),
        "{peak} templates alive at once (budget {BUDGET})"
    );
    assert!(
        made >= (1 + 2 * u64::from(GROUPS)) * TIPS,
        "the rounds made {made}"
    );
    daemon.stop().await;
}

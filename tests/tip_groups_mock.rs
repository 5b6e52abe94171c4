//! Several constraint groups on a new tip, against the mock node: one template without
//! mempool transactions serves every group, every group's pair is out before any full
//! template is asked for, and the full templates follow one at a time, the group with the
//! most clients first. (One test in this binary: it reads the daemon's metrics, which are
//! the process's.)

mod support;

use bitcoin::Amount;
use support::tp::*;
use sv2_tpd::mock::{MockNode, MockOptions};
use sv2_tpd::template::block_reserved_weight;
use sv2_tpd::template::Constraints;

fn weight(size: u32) -> u64 {
    block_reserved_weight(Constraints {
        max_additional_size: size,
        max_additional_sigops: 10,
    })
}

fn tip_templates() -> u64 {
    sv2_tpd::metrics::metrics()
        .templates_created
        .with_label_values(&["tip"])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_groups_pairs_come_from_one_empty_template_before_any_full_one() {
    let dir = tempfile::tempdir().unwrap();
    let node = MockNode::start(&dir.path().join("node.sock"), MockOptions::default())
        .expect("mock starts");
    let daemon = start_daemon_without_fee_checks(node.socket_path(), dir.path()).await;
    // Four groups, in this order of age; 2,100 has the most clients, then 1,100.
    let groups = [(100, 1), (1_100, 2), (2_100, 3), (3_100, 1)];
    let mut clients = Vec::new();
    for (size, count) in groups {
        for _ in 0..count {
            let mut c = client(&daemon, size, 10).await;
            next_tip(&mut c).await;
            clients.push(c);
        }
    }
    for _ in 0..3 {
        node.add_mempool_tx(Amount::from_sat(5_000));
    }

    // The node is busy with the first full template it is asked for, and builds nothing
    // else meanwhile (as under `cs_main`): every pair must be out without it.
    node.hold_full_builds(true);
    let before = node.stats().builds.len();
    let tips_before = tip_templates();
    let mined = node.mine_empty_block();
    for c in &mut clients {
        let (t, p) = next_tip(c).await;
        assert_eq!(prev_hash(&p), mined);
        assert!(
            t.merkle_path.is_empty(),
            "the pair has no mempool transaction"
        );
    }
    eventually("the first full build asked for", || {
        node.builds_waiting() == 1
    })
    .await;
    assert_eq!(
        tip_templates() - tips_before,
        4,
        "every group's pair was published before the first full build was asked for"
    );
    let asked = node.stats().builds[before..].to_vec();
    assert_eq!(
        asked.len(),
        2,
        "one empty template, then one full: {asked:?}"
    );
    assert!(!asked[0].use_mempool && asked[1].use_mempool, "{asked:?}");

    // The rest follow one at a time, the most clients first (equal counts: the older
    // group first).
    node.hold_full_builds(false);
    for c in &mut clients {
        let full = next_template(c).await;
        assert!(!full.future_template);
        assert_eq!(
            full.merkle_path.len(),
            2,
            "the mempool's three transactions"
        );
    }
    let asked = node.stats().builds[before..].to_vec();
    let empties = asked.iter().filter(|b| !b.use_mempool).count();
    assert_eq!(empties, 1, "one empty template for all groups: {asked:?}");
    let fulls: Vec<u64> = asked
        .iter()
        .filter(|b| b.use_mempool)
        .map(|b| b.block_reserved_weight)
        .collect();
    assert_eq!(
        fulls,
        [weight(2_100), weight(1_100), weight(100), weight(3_100)],
        "full builds by client count"
    );
    daemon.stop().await;
}

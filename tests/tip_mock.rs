//! Following the node's tip against the mock node: tip-first (a template without
//! mempool transactions at once, the full one next), tips that go down and come back,
//! and what the daemon costs the node while the tip stays.

mod support;

use std::time::{Duration, Instant};

use bitcoin::{Amount, ScriptBuf};
use support::stream_check::CheckedClient;
use support::tp::*;
use sv2_tpd::mock::{MockNode, MockOptions};
use sv2_tpd::sv2::TdpMessage;

fn mock(dir: &tempfile::TempDir) -> MockNode {
    MockNode::start(&dir.path().join("node.sock"), MockOptions::default()).expect("mock starts")
}

fn payout() -> ScriptBuf {
    ScriptBuf::new_p2wsh(&bitcoin::WScriptHash::from_raw_hash(
        bitcoin::hashes::Hash::from_byte_array([9u8; 32]),
    ))
}

/// The next message, or `None` when none arrives within `quiet`.
async fn within(c: &mut CheckedClient, quiet: Duration) -> Option<TdpMessage> {
    tokio::time::timeout(quiet, c.recv())
        .await
        .ok()
        .map(|m| m.expect("message"))
}

/// Solves `t` on `p` and waits until the node has the block; returns its hash.
async fn mine_on(
    node: &MockNode,
    c: &mut CheckedClient,
    t: &stratum_core::template_distribution_sv2::NewTemplateOwned,
    p: &stratum_core::template_distribution_sv2::SetNewPrevHashOwned,
) -> bitcoin::BlockHash {
    let (solution, hash) = solve(t, p, &build_coinbase(t, &payout(), true));
    c.submit_solution(solution).await.unwrap();
    eventually("the block accepted", || {
        node.accepted_blocks()
            .iter()
            .any(|b| b.block_hash() == hash)
    })
    .await;
    hash
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_tip_goes_out_from_the_empty_template_then_the_full_one_follows() {
    let dir = tempfile::tempdir().unwrap();
    let node = mock(&dir);
    // No fee checks during the test: every template is the tip's.
    let config = regtest_config(
        node.socket_path(),
        dir.path(),
        &[("template_interval", "600")],
    );
    let daemon = start_daemon(&config).await;
    let mut c = client(&daemon, 100, 10).await;
    next_tip(&mut c).await;
    for _ in 0..3 {
        node.add_mempool_tx(Amount::from_sat(5_000));
    }

    // A block that leaves the mempool as it is.
    let mined = node.mine_empty_block();
    let (empty, p) = next_tip(&mut c).await;
    assert_eq!(prev_hash(&p), mined);
    assert!(empty.merkle_path.is_empty(), "no mempool transaction in it");
    let full = next_template(&mut c).await;
    assert!(
        !full.future_template,
        "the full template is not a future one"
    );
    assert!(full.template_id > empty.template_id);
    assert_eq!(
        full.coinbase_tx_value_remaining,
        empty.coinbase_tx_value_remaining + 15_000,
        "the mempool's fees"
    );
    assert_eq!(
        full.merkle_path.len(),
        2,
        "three transactions beside the coinbase"
    );

    // The full template builds on the same tip: solved with that tip's SetNewPrevHash,
    // the node takes it.
    let hash = mine_on(&node, &mut c, &full, &p).await;
    assert_eq!(node.tip().0, hash);
    let last = node.accepted_blocks().last().cloned().expect("block");
    assert_eq!(last.txdata.len(), 4, "coinbase and the three transactions");

    // A block solved on a tip's empty template is taken too.
    let (empty, p) = next_tip(&mut c).await;
    assert_eq!(prev_hash(&p), hash);
    let hash = mine_on(&node, &mut c, &empty, &p).await;
    assert_eq!(node.tip().0, hash, "the empty template's block is the tip");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tip_first_off_the_pair_comes_from_the_full_template() {
    let dir = tempfile::tempdir().unwrap();
    let node = mock(&dir);
    let config = regtest_config(
        node.socket_path(),
        dir.path(),
        &[("template_interval", "600"), ("tip_first", "false")],
    );
    let daemon = start_daemon(&config).await;
    let mut c = client(&daemon, 100, 10).await;
    let (first, _) = next_tip(&mut c).await;
    node.add_mempool_tx(Amount::from_sat(5_000));

    let mined = node.mine_empty_block();
    let (t, p) = next_tip(&mut c).await;
    assert_eq!(prev_hash(&p), mined);
    assert_eq!(
        t.merkle_path.len(),
        1,
        "the mempool transaction is in the pair's template"
    );
    assert!(t.coinbase_tx_value_remaining >= first.coinbase_tx_value_remaining + 5_000 - 1);
    let extra = within(&mut c, Duration::from_millis(1_500)).await;
    assert!(extra.is_none(), "nothing follows the pair: {extra:?}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tip_that_goes_down_and_back_reaches_every_client_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let node = mock(&dir);
    let daemon = start_daemon(&regtest_config(node.socket_path(), dir.path(), &[])).await;
    let mut clients = vec![
        client(&daemon, 100, 10).await,
        client(&daemon, 100, 10).await,
        client(&daemon, 3_000, 20).await,
    ];
    for c in &mut clients {
        next_tip(c).await;
    }
    let parent = node.tip().0;
    let top = node.mine_block();
    for c in &mut clients {
        assert_eq!(prev_hash(&next_tip(c).await.1), top);
    }

    // invalidateblock of the tip: the node's tip is lower; every client follows it.
    let since = Instant::now();
    assert_eq!(node.invalidate_tip(), Some(top));
    for c in &mut clients {
        let (_, p) = next_tip(c).await;
        assert_eq!(prev_hash(&p), parent, "the lower tip");
    }
    let took = since.elapsed();
    assert!(took < Duration::from_secs(1), "lower tip after {took:?}");

    // reconsiderblock: back up.
    let since = Instant::now();
    assert_eq!(node.reconsider(), top);
    for c in &mut clients {
        assert_eq!(prev_hash(&next_tip(c).await.1), top, "back on the block");
    }
    let took = since.elapsed();
    assert!(took < Duration::from_secs(1), "back after {took:?}");

    // And a block mined after that is delivered.
    let next = node.mine_block();
    for c in &mut clients {
        assert_eq!(prev_hash(&next_tip(c).await.1), next);
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_builds_for_the_clients_group_only_and_once_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let node = mock(&dir);
    let config = regtest_config(
        node.socket_path(),
        dir.path(),
        &[("template_interval", "2")],
    );
    let daemon = start_daemon(&config).await;
    let mut c = client(&daemon, 100, 10).await;
    next_tip(&mut c).await;

    // A new tip with a mempool: the clients' group builds an empty and a full template;
    // the standing group, with no client of its own, builds nothing.
    node.add_mempool_tx(Amount::from_sat(5_000));
    let before = node.calls("createNewBlock");
    node.mine_empty_block();
    next_tip(&mut c).await;
    next_template(&mut c).await;
    let after_tip = node.calls("createNewBlock");
    assert_eq!(after_tip - before, 2, "one empty and one full template");

    // The tip stays and the mempool changes all the time: one build per interval.
    let since = Instant::now();
    let mut fee_templates = 0;
    while since.elapsed() < Duration::from_secs(5) {
        node.add_mempool_tx(Amount::from_sat(2_000));
        if let Some(TdpMessage::NewTemplate(t)) = within(&mut c, Duration::from_millis(200)).await {
            assert!(!t.future_template);
            fee_templates += 1;
        }
    }
    let made = node.calls("createNewBlock") - after_tip;
    let allowed = since.elapsed().as_secs() / 2 + 1;
    assert!(
        made <= allowed,
        "{made} builds in {:?} at one per 2 s",
        since.elapsed()
    );
    assert!(fee_templates >= 1, "fee rises still go out");
    daemon.stop().await;
}

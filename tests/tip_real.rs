//! Following the tip of a real regtest bitcoin-node: tip-first with a full mempool (the
//! pair from the empty template, then the full one; blocks on either accepted), and a
//! tip that goes down (`invalidateblock`) and back (`reconsiderblock`).

mod support;

use std::time::{Duration, Instant};

use bitcoin::ScriptBuf;
use serde_json::json;
use support::tp::*;

fn payout() -> ScriptBuf {
    ScriptBuf::new_p2wsh(&bitcoin::WScriptHash::from_raw_hash(
        bitcoin::hashes::Hash::from_byte_array([5u8; 32]),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_full_mempool_the_pair_comes_first_and_blocks_on_either_template_are_taken() {
    let node = node_or_skip!(
        "with_a_full_mempool_the_pair_comes_first_and_blocks_on_either_template_are_taken"
    );
    node.fill_mempool(300).expect("mempool filled");
    let dir = tempfile::tempdir().unwrap();
    // No fee checks during the test: every template is a tip's.
    let daemon = start_daemon_without_fee_checks(&node.socket_path(), dir.path()).await;
    let mut c = client(&daemon, 100, 10).await;
    next_tip(&mut c).await;

    let mined = node.generate_empty().expect("generateblock");
    let (empty, p) = next_tip(&mut c).await;
    assert_eq!(prev_hash(&p), mined);
    assert!(
        empty.merkle_path.is_empty(),
        "the pair's template has no transaction"
    );
    let full = next_template(&mut c).await;
    assert!(
        !full.future_template,
        "the full template is not a future one"
    );
    assert!(
        full.coinbase_tx_value_remaining > empty.coinbase_tx_value_remaining,
        "fees in the full template"
    );
    assert!(!full.merkle_path.is_empty());

    // The full template on that tip (its SetNewPrevHash is the pair's): the node takes it.
    let (solution, on_full) = solve(&full, &p, &build_coinbase(&full, &payout(), true));
    c.submit_solution(solution).await.unwrap();
    let (empty2, p2) = next_tip(&mut c).await;
    assert_eq!(
        prev_hash(&p2),
        on_full,
        "the block on the full template is the tip"
    );
    let block = node.get_block(&on_full).unwrap();
    assert_eq!(block.txdata.len(), 301, "coinbase and the mempool");

    // The empty template of the next tip: taken too.
    let (solution, on_empty) = solve(&empty2, &p2, &build_coinbase(&empty2, &payout(), true));
    c.submit_solution(solution).await.unwrap();
    let (_, p3) = next_tip(&mut c).await;
    assert_eq!(
        prev_hash(&p3),
        on_empty,
        "the block on the empty template is the tip"
    );
    assert_eq!(node.best_block_hash().unwrap(), on_empty);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidateblock_and_reconsiderblock_reach_every_client_within_a_second() {
    let node =
        node_or_skip!("invalidateblock_and_reconsiderblock_reach_every_client_within_a_second");
    node.fund_op_true().expect("funding leaves IBD");
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(&regtest_config(&node.socket_path(), dir.path(), &[])).await;
    let mut clients = vec![
        client(&daemon, 100, 10).await,
        client(&daemon, 100, 10).await,
        client(&daemon, 4_000, 20).await,
    ];
    let mut on_top = Vec::new();
    for c in &mut clients {
        on_top.push(next_tip(c).await);
    }
    let top = node.best_block_hash().unwrap();
    let parent = node.block_hash(node.block_count().unwrap() - 1).unwrap();

    node.rpc("invalidateblock", json!([top.to_string()]))
        .expect("invalidateblock");
    let since = Instant::now();
    for c in &mut clients {
        let (_, p) = next_tip(c).await;
        assert_eq!(prev_hash(&p), parent, "the lower tip");
    }
    let took = since.elapsed();
    println!("invalidateblock -> pair at every client: {took:?}");
    assert!(took < Duration::from_secs(1), "lower tip after {took:?}");

    // A block found on the template of the tip just invalidated is still handed to the
    // node (it decides what it is worth): its verdict comes back as a rejection.
    let rejected = || {
        sv2_tpd::metrics::metrics()
            .solutions
            .with_label_values(&["rejected"])
            .get()
    };
    let rejected_before = rejected();
    let (t, p) = &on_top[0];
    let (late, _) = solve(t, p, &build_coinbase(t, &payout(), true));
    clients[0].submit_solution(late).await.unwrap();
    eventually("the node's verdict on the invalidated tip's block", || {
        rejected() > rejected_before
    })
    .await;

    node.rpc("reconsiderblock", json!([top.to_string()]))
        .expect("reconsiderblock");
    let since = Instant::now();
    for c in &mut clients {
        assert_eq!(prev_hash(&next_tip(c).await.1), top, "back on the block");
    }
    let took = since.elapsed();
    println!("reconsiderblock -> pair at every client: {took:?}");
    assert!(took < Duration::from_secs(1), "back after {took:?}");

    let next = node.generate(1).unwrap()[0];
    for c in &mut clients {
        assert_eq!(prev_hash(&next_tip(c).await.1), next, "a block after that");
    }
    daemon.stop().await;
}

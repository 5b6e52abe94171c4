//! The IPC client (`sv2_tpd::node`) against a real regtest `bitcoin-node`: templates that
//! match the chain, a solved block accepted, mempool transactions reaching the next
//! template, `waitTipChanged`, a submit that does not queue behind it, and a node that
//! dies or stops under a pending wait. Skipped (with a printed notice) when no node binary is
//! available outside CI.

mod support;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bitcoin::{Amount, BlockHash, ScriptBuf};
use support::{grind, BitcoinNode};
use sv2_tpd::node::{CreateOptions, NodeClient, NodeError, NodeLine, Template, Tip};

/// Limit for any single step, so a hang fails the test instead of blocking the suite.
const PATIENCE: Duration = Duration::from_secs(30);
/// How long the waits that only a new tip (or the node going away) can end may last.
const LONG_WAIT: Duration = Duration::from_secs(60);
/// Regtest's subsidy before its first halving.
const INITIAL_SUBSIDY_SAT: u64 = 50 * 100_000_000;
/// Regtest halves the subsidy every 150 blocks.
const REGTEST_HALVING_INTERVAL: u32 = 150;

/// Starts a node (blocking, so off the async workers), or returns from the test after
/// reporting it skipped.
macro_rules! node_or_skip {
    ($test:expr) => {
        match blocking(|| BitcoinNode::start_if_available($test)).expect("bitcoin-node starts") {
            Some(node) => Arc::new(node),
            None => return,
        }
    };
}

/// Runs a blocking harness call without stalling the other tasks of the test.
fn blocking<T>(call: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(call)
}

/// Awaits `step`, failing the test if it takes longer than [`PATIENCE`].
async fn within<T>(what: &str, step: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, step)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {PATIENCE:?}"))
}

fn regtest_subsidy(height: u32) -> Amount {
    Amount::from_sat(INITIAL_SUBSIDY_SAT >> (height / REGTEST_HALVING_INTERVAL))
}

fn payout() -> ScriptBuf {
    support::op_true_script()
}

/// Connects to `node`'s IPC socket.
async fn connect(node: &BitcoinNode) -> NodeClient {
    within("connect", NodeClient::connect(&node.socket_path()))
        .await
        .expect("connects to bitcoin-node")
}

/// Mines the 101 blocks that leave IBD and mature an OP_TRUE coinbase.
fn fund(node: &BitcoinNode) {
    let coins = node.fund_op_true().expect("funding blocks");
    assert!(!coins.is_empty(), "no mature OP_TRUE coin after funding");
}

async fn new_template(client: &NodeClient) -> Template {
    within(
        "createNewBlock",
        client.create_new_block(CreateOptions::default()),
    )
    .await
    .expect("createNewBlock")
}

fn best_block_hash(node: &BitcoinNode) -> BlockHash {
    blocking(|| node.best_block_hash()).expect("getbestblockhash")
}

/// Solves `template` and submits it; returns the node's acceptance and the solution.
async fn mine(template: &Template) -> (bool, grind::Solved) {
    within("submitSolution", grind::mine(template, &payout())).await
}

/// A `waitTipChanged` from `node`'s current tip in its own task, which only a new tip (or
/// the node going away) ends within [`LONG_WAIT`].
fn wait_for_new_tip(
    client: &NodeClient,
    node: &BitcoinNode,
) -> tokio::task::JoinHandle<Result<Option<Tip>, NodeError>> {
    let current = best_block_hash(node);
    let watcher = client.clone();
    tokio::spawn(async move { watcher.wait_tip_changed(current, LONG_WAIT).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_matches_the_chain_and_our_solved_block_is_accepted() {
    let node = node_or_skip!("template_matches_the_chain_and_our_solved_block_is_accepted");
    blocking(|| fund(&node));
    let fee = Amount::from_sat(25_000);
    let txid = blocking(|| node.send_fee_tx(fee)).expect("fee transaction");
    let client = connect(&node).await;

    let best = best_block_hash(&node);
    let count = blocking(|| node.block_count()).expect("getblockcount");
    let tip = within("getTip", client.tip())
        .await
        .expect("getTip")
        .expect("the node has a tip");
    assert_eq!(tip.hash, best);
    assert_eq!(u64::from(tip.height), count);

    let template = new_template(&client).await;
    let data = template.data();
    println!("bitcoin-node interface line: {}", client.line().label());
    assert!(
        matches!(client.line(), NodeLine::V31_99 | NodeLine::V32),
        "this node has getTransactionsByTxID: {:?}",
        client.line()
    );
    assert_eq!(data.header.prev_blockhash, best);
    assert_eq!(u64::from(data.height()), count + 1);
    assert_eq!(
        data.tx_fees,
        vec![fee],
        "our fee transaction is in the template"
    );
    assert_eq!(
        data.coinbase.block_reward_remaining,
        regtest_subsidy(data.height()) + data.total_fees()
    );
    let block = within("getBlock", template.block())
        .await
        .expect("getBlock");
    assert!(block.txdata.iter().any(|tx| tx.compute_txid() == txid));

    let (accepted, solved) = mine(&template).await;
    assert!(accepted, "bitcoin-node refused our block");
    assert_eq!(
        blocking(|| node.block_count()).expect("getblockcount"),
        count + 1
    );
    let best = best_block_hash(&node);
    assert_eq!(best, solved.header.block_hash());
    let mined = blocking(|| node.get_block(&best)).expect("getblock");
    assert_eq!(
        mined.txdata[0], solved.coinbase,
        "the block's coinbase is ours"
    );
    assert!(mined.txdata.iter().any(|tx| tx.compute_txid() == txid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_mempool_transaction_reaches_the_next_template() {
    let node = node_or_skip!("a_new_mempool_transaction_reaches_the_next_template");
    blocking(|| fund(&node));
    let client = connect(&node).await;
    let template = new_template(&client).await;
    assert_eq!(template.data().total_fees(), Amount::ZERO);

    let fee = Amount::from_sat(30_000);
    let txid = blocking(|| node.send_fee_tx(fee)).expect("fee transaction");
    let next = new_template(&client).await;

    assert_eq!(next.data().total_fees(), fee);
    assert_eq!(
        next.data().header.prev_blockhash,
        template.data().header.prev_blockhash
    );
    let block = within("getBlock", next.block()).await.expect("getBlock");
    assert!(
        block.txdata.iter().any(|tx| tx.compute_txid() == txid),
        "the new transaction is not in the template's block"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_tip_changed_returns_a_block_mined_over_rpc() {
    let node = node_or_skip!("wait_tip_changed_returns_a_block_mined_over_rpc");
    blocking(|| node.generate(1)).expect("leave IBD");
    let client = connect(&node).await;
    let current = best_block_hash(&node);

    let watcher = client.clone();
    let changed = tokio::spawn(async move { watcher.wait_tip_changed(current, LONG_WAIT).await });
    // From another thread while the wait runs (it may not have reached the node yet; then
    // it sees the tip already moved and returns at once, which is as correct).
    let miner = node.clone();
    let mined = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(200));
        miner.generate(1)
    });
    let tip = within("waitTipChanged", changed)
        .await
        .expect("wait task")
        .expect("waitTipChanged")
        .expect("a tip, not an interruption");
    let mined = within("generate", mined)
        .await
        .expect("mining thread")
        .expect("generate");
    assert_eq!(tip.hash, mined[0]);
    assert_eq!(tip.hash, best_block_hash(&node));
    assert_eq!(tip.height, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_returns_while_wait_tip_changed_blocks() {
    let node = node_or_skip!("submit_returns_while_wait_tip_changed_blocks");
    blocking(|| node.generate(1)).expect("leave IBD");
    let client = connect(&node).await;
    let template = new_template(&client).await;
    let pending = wait_for_new_tip(&client, &node);
    // Give the wait time to reach the node and block there.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "waitTipChanged returned without a new tip"
    );

    // `mine` gives up after 30 s, well before the wait's 60 s: a submit queued behind
    // the wait could not return before the wait does.
    let (accepted, solved) = mine(&template).await;
    assert!(accepted, "bitcoin-node refused our block");
    assert_eq!(best_block_hash(&node), solved.header.block_hash());

    let tip = within("waitTipChanged after our block", pending)
        .await
        .expect("wait task")
        .expect("waitTipChanged")
        .expect("our block as the tip");
    assert_eq!(tip.hash, solved.header.block_hash());
}

/// A pending `waitTipChanged` on a node that goes away ends — with an error or `None` —
/// and the client notices the closed connection.
async fn pending_wait_ends_when_the_node_goes(node: &BitcoinNode, stop: impl FnOnce()) {
    blocking(|| node.generate(1)).expect("leave IBD");
    let client = connect(node).await;
    let pending = wait_for_new_tip(&client, node);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "waitTipChanged returned without a new tip"
    );

    blocking(stop);
    let ended = within("the pending waitTipChanged", pending)
        .await
        .expect("the wait task did not panic");
    println!("pending waitTipChanged ended with {ended:?}");
    assert!(
        !matches!(ended, Ok(Some(_))),
        "waitTipChanged reported a tip while the node went away"
    );
    within("closed()", client.closed()).await;
    let later = within("getTip after the node went", client.tip()).await;
    assert!(later.is_err(), "a call after the node went: {later:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_ends_a_pending_wait_tip_changed() {
    let node = node_or_skip!("kill9_ends_a_pending_wait_tip_changed");
    pending_wait_ends_when_the_node_goes(&node, || node.kill9().expect("kill -9")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_stop_ends_a_pending_wait_tip_changed() {
    let node = node_or_skip!("rpc_stop_ends_a_pending_wait_tip_changed");
    pending_wait_ends_when_the_node_goes(&node, || node.stop().expect("RPC stop")).await;
}

//! The mock Bitcoin node driven by a raw capnp-rpc client over its unix socket.

use std::cell::Cell;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use bitcoin::absolute::LockTime;
use bitcoin::block::Header;
use bitcoin::consensus::encode::{deserialize, serialize};
use bitcoin::hashes::{sha256d, Hash};
use bitcoin::{
    Amount, BlockHash, OutPoint, ScriptBuf, Sequence, Target, Transaction, TxIn, TxMerkleNode,
    TxOut, Witness,
};
use capnp::ErrorKind;
use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
use sv2_tpd::mock::{MockLine, MockMethod, MockNode, MockOptions};
use sv2_tpd::node::schema::init_capnp::init;
use sv2_tpd::node::schema::mining_capnp::{block_template, mining};
use sv2_tpd::node::schema::proxy_capnp::{thread, thread_map};
use tokio::task::{spawn_local, LocalSet};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

const MAX_MONEY: i64 = 2_100_000_000_000_000;

/// Runs a test body on a current-thread runtime with a `LocalSet` (capnp-rpc is `!Send`),
/// bounded so a hang fails instead of blocking the suite.
fn run<F: Future>(body: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    LocalSet::new().block_on(&runtime, async {
        tokio::time::timeout(Duration::from_secs(20), body)
            .await
            .expect("test timed out")
    })
}

struct Fixture {
    _dir: tempfile::TempDir,
    node: MockNode,
}

impl Fixture {
    fn new(opts: MockOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = MockNode::start(&socket_in(dir.path()), opts).expect("mock starts");
        Fixture { _dir: dir, node }
    }

    fn line(line: MockLine) -> Self {
        Fixture::new(MockOptions {
            line,
            ..MockOptions::default()
        })
    }
}

fn socket_in(dir: &Path) -> PathBuf {
    dir.join("node.sock")
}

/// A raw client: the bootstrap `Init` and the `ThreadMap` it constructed.
struct Client {
    init: init::Client,
    threads: thread_map::Client,
}

impl Client {
    async fn connect(path: &Path) -> Result<Client, capnp::Error> {
        let stream = tokio::net::UnixStream::connect(path).await?;
        let (reader, writer) = stream.into_split();
        let network = twoparty::VatNetwork::new(
            reader.compat(),
            writer.compat_write(),
            Side::Client,
            Default::default(),
        );
        let mut rpc = RpcSystem::new(Box::new(network), None);
        let init: init::Client = rpc.bootstrap(Side::Server);
        spawn_local(rpc);
        let response = init.construct_request().send().promise.await?;
        let threads = response.get()?.get_thread_map()?;
        Ok(Client { init, threads })
    }

    async fn thread(&self, name: &str) -> thread::Client {
        let mut request = self.threads.make_thread_request();
        request.get().set_name(name);
        let response = request.send().promise.await.expect("makeThread");
        response
            .get()
            .expect("results")
            .get_result()
            .expect("thread")
    }

    async fn mining(&self, on: &thread::Client) -> Result<mining::Client, capnp::Error> {
        let mut request = self.init.make_mining_request();
        request.get().init_context().set_thread(on.clone());
        let response = request.send().promise.await?;
        response.get()?.get_result()
    }
}

async fn get_tip(mining: &mining::Client, on: &thread::Client) -> (BlockHash, u32) {
    let mut request = mining.get_tip_request();
    request.get().init_context().set_thread(on.clone());
    let response = request.send().promise.await.expect("getTip");
    let results = response.get().expect("results");
    assert!(results.get_has_result());
    let tip = results.get_result().expect("tip");
    let hash: [u8; 32] = tip.get_hash().expect("hash").try_into().expect("32 bytes");
    (BlockHash::from_byte_array(hash), tip.get_height() as u32)
}

async fn create_block(
    mining: &mining::Client,
    on: &thread::Client,
) -> Result<Option<block_template::Client>, capnp::Error> {
    let mut request = mining.create_new_block_request();
    request.get().init_context().set_thread(on.clone());
    request.get().init_options();
    let response = request.send().promise.await?;
    let results = response.get()?;
    if !results.has_result() {
        return Ok(None);
    }
    results.get_result().map(Some)
}

async fn header(template: &block_template::Client, on: &thread::Client) -> Header {
    let mut request = template.get_block_header_request();
    request.get().init_context().set_thread(on.clone());
    let response = request.send().promise.await.expect("getBlockHeader");
    let bytes = response.get().expect("results").get_result().expect("data");
    assert_eq!(bytes.len(), 80);
    deserialize(bytes).expect("header")
}

async fn tx_fees(template: &block_template::Client, on: &thread::Client) -> Vec<i64> {
    let mut request = template.get_tx_fees_request();
    request.get().init_context().set_thread(on.clone());
    let response = request.send().promise.await.expect("getTxFees");
    let list = response.get().expect("results").get_result().expect("fees");
    list.iter().collect()
}

/// Builds the coinbase a miner would from `getCoinbaseTx`, paying the reward to OP_TRUE.
async fn miner_coinbase(template: &block_template::Client, on: &thread::Client) -> Transaction {
    let mut request = template.get_coinbase_tx_request();
    request.get().init_context().set_thread(on.clone());
    let response = request.send().promise.await.expect("getCoinbaseTx");
    let cb = response
        .get()
        .expect("results")
        .get_result()
        .expect("coinbase");
    let mut script_sig = cb.get_script_sig_prefix().expect("prefix").to_vec();
    script_sig.extend_from_slice(&[0x04, 0xde, 0xad, 0xbe, 0xef]); // extranonce push
    let mut output = vec![TxOut {
        value: Amount::from_sat(cb.get_block_reward_remaining() as u64),
        script_pubkey: ScriptBuf::from_bytes(vec![0x51]),
    }];
    for required in cb.get_required_outputs().expect("outputs").iter() {
        let bytes = required.expect("output");
        assert_eq!(bytes.len(), 47, "witness commitment TxOut");
        output.push(deserialize(bytes).expect("TxOut"));
    }
    Transaction {
        version: bitcoin::transaction::Version(cb.get_version() as i32),
        lock_time: LockTime::from_consensus(cb.get_lock_time()),
        input: vec![TxIn {
            previous_output: OutPoint::null(),
            script_sig: ScriptBuf::from_bytes(script_sig),
            sequence: Sequence(cb.get_sequence()),
            witness: Witness::from_slice(&[cb.get_witness().expect("witness")]),
        }],
        output,
    }
}

async fn merkle_path(template: &block_template::Client, on: &thread::Client) -> Vec<[u8; 32]> {
    let mut request = template.get_coinbase_merkle_path_request();
    request.get().init_context().set_thread(on.clone());
    let response = request.send().promise.await.expect("getCoinbaseMerklePath");
    let list = response.get().expect("results").get_result().expect("path");
    list.iter()
        .map(|h| h.expect("hash").try_into().expect("32 bytes"))
        .collect()
}

/// A header for `template` with `coinbase`, its merkle root, and a nonce that meets (or,
/// with `valid == false`, misses) the regtest target.
async fn solve(
    template: &block_template::Client,
    on: &thread::Client,
    coinbase: &Transaction,
    valid: bool,
) -> Header {
    let mut header = header(template, on).await;
    let mut node = coinbase.compute_txid().to_byte_array();
    for sibling in merkle_path(template, on).await {
        node = sha256d::Hash::hash(&[node, sibling].concat()).to_byte_array();
    }
    header.merkle_root = TxMerkleNode::from_byte_array(node);
    let target = Target::from_compact(header.bits);
    while header.validate_pow(target).is_ok() != valid {
        header.nonce += 1;
    }
    header
}

async fn submit_solution(
    template: &block_template::Client,
    on: &thread::Client,
    header: &Header,
    coinbase: &Transaction,
) -> Result<bool, capnp::Error> {
    let mut request = template.submit_solution_request();
    let mut params = request.get();
    params.reborrow().init_context().set_thread(on.clone());
    params.set_version(header.version.to_consensus() as u32);
    params.set_timestamp(header.time);
    params.set_nonce(header.nonce);
    params.set_coinbase(&serialize(coinbase));
    let response = request.send().promise.await?;
    Ok(response.get()?.get_result())
}

async fn wait_next(
    template: &block_template::Client,
    on: &thread::Client,
    timeout_ms: f64,
    fee_threshold: i64,
) -> Option<block_template::Client> {
    let mut request = template.wait_next_request();
    request.get().init_context().set_thread(on.clone());
    let mut options = request.get().init_options();
    options.set_timeout(timeout_ms);
    options.set_fee_threshold(fee_threshold);
    let response = request.send().promise.await.expect("waitNext");
    let results = response.get().expect("results");
    results
        .has_result()
        .then(|| results.get_result().expect("template"))
}

async fn wait_tip_changed(
    mining: &mining::Client,
    on: &thread::Client,
    current: BlockHash,
    timeout_ms: f64,
) -> Option<BlockHash> {
    let mut request = mining.wait_tip_changed_request();
    request.get().init_context().set_thread(on.clone());
    request.get().set_current_tip(&current.to_byte_array());
    request.get().set_timeout(timeout_ms);
    let response = request.send().promise.await.expect("waitTipChanged");
    let results = response.get().expect("results");
    results.has_result().then(|| {
        let hash = results.get_result().expect("ref").get_hash().expect("hash");
        BlockHash::from_byte_array(hash.try_into().expect("32 bytes"))
    })
}

async fn interrupt(mining: &mining::Client) {
    mining
        .interrupt_request()
        .send()
        .promise
        .await
        .expect("interrupt");
}

/// Connects and returns the client, a thread and a Mining on it.
async fn session(node: &MockNode) -> (Client, thread::Client, mining::Client) {
    let client = Client::connect(node.socket_path()).await.expect("connect");
    let thread = client.thread("main").await;
    let mining = client.mining(&thread).await.expect("makeMining");
    (client, thread, mining)
}

#[test]
fn handle_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<MockNode>();
}

#[test]
fn get_tip_matches_the_handle() {
    let fx = Fixture::new(MockOptions::default());
    run(async {
        let (_client, thread, mining) = session(&fx.node).await;
        let tip = get_tip(&mining, &thread).await;
        assert_eq!(tip, fx.node.tip());
        assert_eq!(tip.1, 101);
        let mined = fx.node.mine_block();
        assert_eq!(get_tip(&mining, &thread).await, (mined, 102));
    });
}

#[test]
fn template_builds_on_tip_and_pays_subsidy_plus_fees() {
    let fx = Fixture::new(MockOptions::default());
    fx.node.add_mempool_tx(Amount::from_sat(1_234));
    fx.node.add_mempool_tx(Amount::from_sat(766));
    run(async {
        let (_client, thread, mining) = session(&fx.node).await;
        let template = create_block(&mining, &thread).await.unwrap().unwrap();
        let header = header(&template, &thread).await;
        assert_eq!(header.prev_blockhash, fx.node.tip().0);
        assert_eq!(header.merkle_root, TxMerkleNode::all_zeros());
        assert_eq!(header.version.to_consensus(), 0x2000_0000);
        assert_eq!(header.bits.to_consensus(), 0x207f_ffff);
        let mut fees = tx_fees(&template, &thread).await;
        fees.sort_unstable();
        assert_eq!(fees, vec![766, 1_234]);
        let coinbase = miner_coinbase(&template, &thread).await;
        assert_eq!(
            coinbase.output[0].value,
            Amount::from_int_btc(50) + Amount::from_sat(2_000)
        );
        // BIP34 push of height 102, then our extranonce.
        assert_eq!(&coinbase.input[0].script_sig.as_bytes()[..2], &[0x01, 102]);
        assert_eq!(coinbase.lock_time.to_consensus_u32(), 101);
        assert_eq!(merkle_path(&template, &thread).await.len(), 2);
    });
}

#[test]
fn solved_template_is_accepted_and_a_bad_nonce_is_not() {
    let fx = Fixture::new(MockOptions::default());
    fx.node.add_mempool_tx(Amount::from_sat(5_000));
    run(async {
        let (_client, thread, mining) = session(&fx.node).await;
        let template = create_block(&mining, &thread).await.unwrap().unwrap();
        let coinbase = miner_coinbase(&template, &thread).await;

        let bad = solve(&template, &thread, &coinbase, false).await;
        assert!(!submit_solution(&template, &thread, &bad, &coinbase)
            .await
            .unwrap());
        assert_eq!(fx.node.tip().1, 101);

        let good = solve(&template, &thread, &coinbase, true).await;
        assert!(submit_solution(&template, &thread, &good, &coinbase)
            .await
            .unwrap());
        assert_eq!(fx.node.tip(), (good.block_hash(), 102));
        let accepted = fx.node.accepted_blocks();
        assert_eq!(accepted.len(), 1);
        assert_eq!(accepted[0].txdata.len(), 2);
        assert_eq!(accepted[0].txdata[0], coinbase);
        assert_eq!(get_tip(&mining, &thread).await.0, good.block_hash());
    });
}

#[test]
fn call_without_context_thread_is_rejected() {
    let fx = Fixture::new(MockOptions::default());
    run(async {
        let (_client, _thread, mining) = session(&fx.node).await;
        let request = mining.get_tip_request();
        let error = request.send().promise.await.err().expect("rejected");
        assert_eq!(error.kind, ErrorKind::Failed);
        assert_eq!(fx.node.stats().rejected_without_thread, 1);
    });
}

#[test]
fn calls_on_one_thread_run_in_arrival_order() {
    let fx = Fixture::new(MockOptions::default());
    run(async {
        let (client, busy, mining) = session(&fx.node).await;
        let other = client.thread("other").await;
        let template = create_block(&mining, &busy).await.unwrap().unwrap();

        let wait_done = Rc::new(Cell::new(false));
        let waiting = {
            let (template, busy, wait_done) = (template.clone(), busy.clone(), wait_done.clone());
            spawn_local(async move {
                let next = wait_next(&template, &busy, 1_500.0, MAX_MONEY).await;
                wait_done.set(true);
                next
            })
        };
        tokio::task::yield_now().await;
        // On another thread a call gets through while waitNext holds `busy`...
        header(&template, &other).await;
        assert!(!wait_done.get(), "other thread was not blocked by waitNext");
        // ...while on the same thread it queues behind the wait.
        header(&template, &busy).await;
        assert!(wait_done.get(), "same-thread call overtook waitNext");
        assert!(waiting.await.expect("task").is_none(), "waitNext timed out");
    });
}

#[test]
fn interrupt_is_sticky_and_cancels_pending_waits() {
    let fx = Fixture::new(MockOptions::default());
    run(async {
        let (client, thread, mining) = session(&fx.node).await;
        let tip = fx.node.tip().0;
        // Times out with the current tip.
        assert_eq!(
            wait_tip_changed(&mining, &thread, tip, 50.0).await,
            Some(tip)
        );
        // Raised with nothing pending: cancels the next wait.
        interrupt(&mining).await;
        assert_eq!(
            wait_tip_changed(&mining, &thread, tip, 60_000.0).await,
            None
        );
        // Consumed: the following wait runs normally.
        assert_eq!(
            wait_tip_changed(&mining, &thread, tip, 50.0).await,
            Some(tip)
        );
        // Raised while a wait is pending (from another thread, as interrupt has no context).
        let pending = {
            let (mining, thread) = (mining.clone(), thread.clone());
            spawn_local(async move { wait_tip_changed(&mining, &thread, tip, 60_000.0).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        interrupt(&mining).await;
        assert_eq!(pending.await.expect("task"), None);

        // Per-template interruptWait is sticky too.
        let other = client.thread("other").await;
        let template = create_block(&mining, &other).await.unwrap().unwrap();
        template
            .interrupt_wait_request()
            .send()
            .promise
            .await
            .expect("interruptWait");
        assert!(wait_next(&template, &other, 60_000.0, 0).await.is_none());
        // A sticky Mining.interrupt makes the next createNewBlock return null.
        interrupt(&mining).await;
        assert!(create_block(&mining, &thread).await.unwrap().is_none());
    });
}

#[test]
fn wait_next_returns_on_fee_rise_and_new_tip_and_null_on_timeout() {
    let fx = Fixture::new(MockOptions::default());
    run(async {
        let (_client, thread, mining) = session(&fx.node).await;
        let template = create_block(&mining, &thread).await.unwrap().unwrap();

        assert!(wait_next(&template, &thread, 100.0, MAX_MONEY)
            .await
            .is_none());

        let pending = {
            let (template, thread) = (template.clone(), thread.clone());
            spawn_local(async move { wait_next(&template, &thread, 10_000.0, 1_000).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        fx.node.add_mempool_tx(Amount::from_sat(400)); // below the threshold
        tokio::time::sleep(Duration::from_millis(50)).await;
        fx.node.add_mempool_tx(Amount::from_sat(700)); // now 1100 >= 1000
        let richer = pending.await.expect("task").expect("template on fee rise");
        let fees: i64 = tx_fees(&richer, &thread).await.iter().sum();
        assert_eq!(fees, 1_100);

        let pending = {
            let (richer, thread) = (richer.clone(), thread.clone());
            spawn_local(async move { wait_next(&richer, &thread, 10_000.0, MAX_MONEY).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mined = fx.node.mine_block();
        let next = pending.await.expect("task").expect("template on new tip");
        assert_eq!(header(&next, &thread).await.prev_blockhash, mined);
    });
}

#[test]
fn old_tip_ticks_return_same_tip_templates() {
    let fx = Fixture::new(MockOptions {
        old_tip_ticks: true,
        ..MockOptions::default()
    });
    run(async {
        let (_client, thread, mining) = session(&fx.node).await;
        let template = create_block(&mining, &thread).await.unwrap().unwrap();
        let next = wait_next(&template, &thread, 5_000.0, MAX_MONEY)
            .await
            .expect("a tick template");
        assert_eq!(header(&next, &thread).await.prev_blockhash, fx.node.tip().0);
    });
}

#[test]
fn pipelined_template_reads_cost_no_extra_round_trip() {
    let fx = Fixture::new(MockOptions::default());
    fx.node.add_mempool_tx(Amount::from_sat(1_000));
    // Delivery is decided by dispatch order; a creating call that takes a while leaves no
    // doubt that the pipelined reads were dispatched before it returned, on a busy
    // machine too.
    fx.node
        .set_delay(MockMethod::CreateNewBlock, Duration::from_millis(50));
    run(async {
        let (_client, thread, mining) = session(&fx.node).await;
        let mut request = mining.create_new_block_request();
        request.get().init_context().set_thread(thread.clone());
        request.get().init_options();
        let created = request.send();
        let template = created.pipeline.get_result();
        let mut header_request = template.get_block_header_request();
        header_request
            .get()
            .init_context()
            .set_thread(thread.clone());
        let mut fees_request = template.get_tx_fees_request();
        fees_request.get().init_context().set_thread(thread.clone());
        let mut path_request = template.get_coinbase_merkle_path_request();
        path_request.get().init_context().set_thread(thread.clone());
        let (created, header_response, fees_response, path_response) = futures::join!(
            created.promise,
            header_request.send().promise,
            fees_request.send().promise,
            path_request.send().promise,
        );
        created.expect("createNewBlock");
        header_response.expect("getBlockHeader");
        fees_response.expect("getTxFees");
        path_response.expect("getCoinbaseMerklePath");
        let stats = fx.node.stats();
        assert_eq!(stats.template_calls_after_delivery, 0);
        assert_eq!(stats.templates_created, 1);

        // A read after the template arrived is one more round trip.
        header(&template, &thread).await;
        assert_eq!(fx.node.stats().template_calls_after_delivery, 1);
        assert_eq!(fx.node.stats().calls.get("getBlockHeader"), Some(&2));
    });
}

#[test]
fn ibd_cooldown_blocks_create_new_block_until_it_ends() {
    let fx = Fixture::new(MockOptions {
        ibd: true,
        ..MockOptions::default()
    });
    run(async {
        let (client, thread, mining) = session(&fx.node).await;
        let pending = {
            let (mining, thread) = (mining.clone(), thread.clone());
            spawn_local(async move { create_block(&mining, &thread).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!pending.is_finished());
        fx.node.set_ibd(false);
        assert!(pending.await.expect("task").unwrap().is_some());

        fx.node.set_ibd(true);
        let other = client.thread("other").await;
        let pending = {
            let (mining, other) = (mining.clone(), other.clone());
            spawn_local(async move { create_block(&mining, &other).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        interrupt(&mining).await;
        assert!(pending.await.expect("task").unwrap().is_none());
    });
}

#[test]
fn create_new_block_rejects_small_reserved_weight() {
    let fx = Fixture::new(MockOptions::default());
    run(async {
        let (_client, thread, mining) = session(&fx.node).await;
        let mut request = mining.create_new_block_request();
        request.get().init_context().set_thread(thread.clone());
        request
            .get()
            .init_options()
            .set_block_reserved_weight(1_999);
        assert!(request.send().promise.await.is_err());
    });
}

#[test]
fn destroy_and_release_are_counted() {
    let fx = Fixture::new(MockOptions::default());
    run(async {
        let (client, thread, mining) = session(&fx.node).await;
        let first = create_block(&mining, &thread).await.unwrap().unwrap();
        let second = create_block(&mining, &thread).await.unwrap().unwrap();
        assert_eq!(fx.node.stats().templates_alive, 2);
        let mut request = first.destroy_request();
        request.get().init_context().set_thread(thread.clone());
        request.send().promise.await.expect("destroy");
        assert_eq!(fx.node.stats().templates_alive, 1);
        drop(second);
        drop(first);
        // Releasing a capability is a message; a round trip after it has been processed.
        client.thread("sync").await;
        assert_eq!(fx.node.stats().templates_alive, 0);
        assert_eq!(fx.node.stats().templates_created, 2);
        assert!(fx.node.stats().threads_alive >= 2);
    });
}

#[test]
fn delays_and_dropped_connections() {
    let fx = Fixture::new(MockOptions::default());
    fx.node
        .set_delay(MockMethod::GetTip, Duration::from_millis(5_000));
    run(async {
        let (_client, thread, mining) = session(&fx.node).await;
        let pending = {
            let (mining, thread) = (mining.clone(), thread.clone());
            spawn_local(async move {
                let mut request = mining.get_tip_request();
                request.get().init_context().set_thread(thread);
                request.send().promise.await.map(|_| ())
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!pending.is_finished(), "getTip is delayed");
        fx.node.drop_connections();
        let error = pending
            .await
            .expect("task")
            .expect_err("connection dropped");
        assert_eq!(error.kind, ErrorKind::Disconnected);
        // Still listening.
        fx.node.set_delay(MockMethod::GetTip, Duration::ZERO);
        let (_client, thread, mining) = session(&fx.node).await;
        assert_eq!(get_tip(&mining, &thread).await, fx.node.tip());
    });
}

#[test]
fn stop_ends_waits_and_restart_keeps_the_chain() {
    let fx = Fixture::new(MockOptions::default());
    run(async {
        let (_client, thread, mining) = session(&fx.node).await;
        let mined = fx.node.mine_block();
        let pending = {
            let (mining, thread) = (mining.clone(), thread.clone());
            spawn_local(async move {
                let mut request = mining.wait_tip_changed_request();
                request.get().init_context().set_thread(thread);
                request.get().set_current_tip(&mined.to_byte_array());
                request.get().set_timeout(60_000.0);
                let response = request.send().promise.await?;
                Ok::<bool, capnp::Error>(response.get()?.has_result())
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let node = &fx.node;
        node.stop();
        // The wait ended: null reply or, at worst, the closed connection.
        assert!(!matches!(pending.await.expect("task"), Ok(true)));
        assert!(!node.socket_path().exists());
        assert!(Client::connect(node.socket_path()).await.is_err());

        node.restart().expect("restart");
        let (_client, thread, mining) = session(node).await;
        assert_eq!(get_tip(&mining, &thread).await, (mined, 102));
    });
}

#[test]
fn interface_lines_differ_like_bitcoin_core() {
    // v30: makeMining @3 does not exist.
    let v30 = Fixture::line(MockLine::V30);
    run(async {
        let client = Client::connect(v30.node.socket_path())
            .await
            .expect("connect");
        let thread = client.thread("main").await;
        let error = client.mining(&thread).await.err().expect("v30");
        assert_eq!(error.kind, ErrorKind::Unimplemented);
    });

    // v31.0: no getTransactionsByTxID.
    let v31 = Fixture::line(MockLine::V31_0);
    run(async {
        let (_client, thread, mining) = session(&v31.node).await;
        let mut request = mining.get_transactions_by_tx_i_d_request();
        request.get().init_context().set_thread(thread);
        request.get().init_txids(0);
        let error = request.send().promise.await.err().expect("v31.0");
        assert_eq!(error.kind, ErrorKind::Unimplemented);
    });

    // v31.99: submitSolution @10 does not exist, @7 works.
    let v3199 = Fixture::line(MockLine::V31_99);
    run(async {
        let (_client, thread, mining) = session(&v3199.node).await;
        let txid = v3199.node.add_mempool_tx(Amount::from_sat(300));
        let mut request = mining.get_transactions_by_tx_i_d_request();
        request.get().init_context().set_thread(thread.clone());
        request.get().init_txids(1).set(0, &txid.to_byte_array());
        let response = request.send().promise.await.expect("getTransactionsByTxID");
        let tx: Transaction = deserialize(
            response
                .get()
                .unwrap()
                .get_result()
                .unwrap()
                .get(0)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(tx.compute_txid(), txid);

        let template = create_block(&mining, &thread).await.unwrap().unwrap();
        let coinbase = miner_coinbase(&template, &thread).await;
        let solved = solve(&template, &thread, &coinbase, true).await;
        let mut request = template.submit_solution_v32_request();
        request.get().init_context().set_thread(thread.clone());
        let error = request.send().promise.await.err().expect("v31.99 @10");
        assert_eq!(error.kind, ErrorKind::Unimplemented);
        assert!(submit_solution(&template, &thread, &solved, &coinbase)
            .await
            .unwrap());
    });

    // v32: @7 fails without submitting, @10 submits.
    let v32 = Fixture::line(MockLine::V32);
    run(async {
        let (_client, thread, mining) = session(&v32.node).await;
        let template = create_block(&mining, &thread).await.unwrap().unwrap();
        let coinbase = miner_coinbase(&template, &thread).await;
        let solved = solve(&template, &thread, &coinbase, true).await;
        assert!(submit_solution(&template, &thread, &solved, &coinbase)
            .await
            .is_err());
        assert_eq!(v32.node.tip().1, 101);
        assert!(v32.node.accepted_blocks().is_empty());

        let mut request = template.submit_solution_v32_request();
        let mut params = request.get();
        params.reborrow().init_context().set_thread(thread.clone());
        params.set_version(solved.version.to_consensus() as u32);
        params.set_timestamp(solved.time);
        params.set_nonce(solved.nonce);
        params.set_coinbase(&serialize(&coinbase));
        let response = request.send().promise.await.expect("@10");
        let results = response.get().unwrap();
        assert!(results.get_result());
        assert_eq!(results.get_reason().unwrap().to_str().unwrap(), "");
        assert_eq!(v32.node.tip(), (solved.block_hash(), 102));
    });
}

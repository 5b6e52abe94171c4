//! The IPC client (`sv2_tpd::node`) against the mock node: the mining flows, every
//! injected fault mapped to its typed `NodeError`, the interface lines, the round trips
//! spent per template, and template release.

mod support;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use bitcoin::{Amount, ScriptBuf};
use support::grind;
use sv2_tpd::mock::{MockLine, MockMethod, MockNode, MockOptions};
use sv2_tpd::node::{CreateOptions, NodeClient, NodeError, NodeLine, Template, Tip};

/// Limit for any single step, so a hang fails the test instead of blocking the suite.
const PATIENCE: Duration = Duration::from_secs(20);
/// Regtest's subsidy before the first halving (at height 150).
const REGTEST_SUBSIDY: Amount = Amount::from_sat(50 * 100_000_000);

/// Awaits `step`, failing the test if it takes longer than [`PATIENCE`].
async fn within<T>(what: &str, step: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, step)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {PATIENCE:?}"))
}

/// Polls `condition` every 10 ms until it holds, failing after [`PATIENCE`].
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// A mock node on a socket in its own temporary directory.
struct Fixture {
    dir: tempfile::TempDir,
    mock: MockNode,
}

impl Fixture {
    fn start(options: MockOptions) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mock = MockNode::start(&dir.path().join("node.sock"), options).expect("mock starts");
        Fixture { dir, mock }
    }

    fn line(line: MockLine) -> Self {
        Fixture::start(MockOptions {
            line,
            ..MockOptions::default()
        })
    }

    fn socket(&self) -> PathBuf {
        self.mock.socket_path().to_path_buf()
    }

    async fn connect(&self) -> NodeClient {
        within("connect", NodeClient::connect(&self.socket()))
            .await
            .expect("connects to the mock")
    }
}

/// The payout script of our solved blocks (anyone-can-spend is fine on a mock chain).
fn payout() -> ScriptBuf {
    support::op_true_script()
}

async fn new_template(client: &NodeClient) -> Template {
    within(
        "createNewBlock",
        client.create_new_block(CreateOptions::default()),
    )
    .await
    .expect("createNewBlock")
}

/// Starts a `waitTipChanged` from the mock's current tip in its own task, so the test can
/// act meanwhile.
fn spawn_tip_wait(
    client: &NodeClient,
    mock: &MockNode,
    timeout: Duration,
) -> tokio::task::JoinHandle<Result<Option<Tip>, NodeError>> {
    let (current, _) = mock.tip();
    let watcher = client.clone();
    tokio::spawn(async move { watcher.wait_tip_changed(current, timeout).await })
}

/// Solves `template` and submits it; returns the node's acceptance and the solution.
async fn mine(template: &Template) -> (bool, grind::Solved) {
    within("submitSolution", grind::mine(template, &payout())).await
}

/// Gives the template-creating calls some latency, as a real node has. The mock counts a
/// data call as an extra round trip when it arrives after the creating call returned; a
/// mock that answers within microseconds can return before a (debug-built, preempted)
/// client has even finished writing its pipelined calls, which would count them although
/// they left before any answer came back. A client that waits for the template before
/// asking for its data still scores one call per getter with this latency.
fn give_creating_calls_latency(mock: &MockNode) {
    mock.set_delay(MockMethod::CreateNewBlock, Duration::from_millis(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_the_tip_and_a_template_in_one_round_trip() {
    let f = Fixture::start(MockOptions::default());
    let fee = Amount::from_sat(12_345);
    f.mock.add_mempool_tx(fee);
    give_creating_calls_latency(&f.mock);
    let client = f.connect().await;

    let tip = within("getTip", client.tip())
        .await
        .expect("getTip")
        .expect("the mock has a tip");
    let (hash, height) = f.mock.tip();
    assert_eq!((tip.hash, tip.height), (hash, height));

    let template = new_template(&client).await;
    let data = template.data();
    assert_eq!(data.header.prev_blockhash, hash);
    assert_eq!(data.height(), height + 1);
    assert_eq!(data.tx_fees, vec![fee]);
    assert_eq!(
        data.coinbase.block_reward_remaining,
        REGTEST_SUBSIDY + data.total_fees()
    );
    assert_eq!(data.merkle_path.len(), 1, "one mempool tx: one sibling");

    let stats = f.mock.stats();
    assert_eq!(stats.calls.get("createNewBlock"), Some(&1));
    assert_eq!(
        stats.template_calls_after_delivery, 0,
        "createNewBlock's data was not read pipelined"
    );
    println!(
        "createNewBlock: {} template data call(s) after delivery => 1 IPC round trip per template",
        stats.template_calls_after_delivery
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn solved_template_is_accepted_with_our_coinbase() {
    let f = Fixture::start(MockOptions::default());
    f.mock.add_mempool_tx(Amount::from_sat(5_000));
    let client = f.connect().await;
    let (_, height) = f.mock.tip();

    let template = new_template(&client).await;
    let (accepted, solved) = mine(&template).await;
    assert!(accepted, "the mock refused a solved block");

    let (tip, new_height) = f.mock.tip();
    assert_eq!(new_height, height + 1);
    assert_eq!(tip, solved.header.block_hash());
    let block = f.mock.accepted_blocks().pop().expect("an accepted block");
    assert_eq!(block.txdata[0], solved.coinbase);
    assert_eq!(block.txdata.len(), 2, "the mempool tx was mined too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_tip_changed_returns_the_new_tip() {
    let f = Fixture::start(MockOptions::default());
    let client = f.connect().await;
    let (current, height) = f.mock.tip();

    let watcher = client.clone();
    let changed = tokio::spawn(async move {
        watcher
            .wait_tip_changed(current, Duration::from_secs(15))
            .await
    });
    let mined = f.mock.mine_block();
    let tip = within("waitTipChanged", changed)
        .await
        .expect("wait task")
        .expect("waitTipChanged")
        .expect("a tip, not an interruption");
    assert_eq!((tip.hash, tip.height), (mined, height + 1));

    // On timeout it answers the unchanged tip.
    let same = within(
        "waitTipChanged timing out",
        client.wait_tip_changed(mined, Duration::from_millis(50)),
    )
    .await
    .expect("waitTipChanged")
    .expect("the current tip");
    assert_eq!(same.hash, mined);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_socket_is_socket_missing() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("node.sock");
    let error = within("connect", NodeClient::connect(&path))
        .await
        .expect_err("nothing listens there");
    assert!(
        matches!(&error, NodeError::SocketMissing { path: p } if *p == path),
        "expected SocketMissing, got {error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untraversable_socket_directory_is_permission_denied() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::start(MockOptions::default());
    let dir = f.dir.path().to_path_buf();
    let set_mode = |mode| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode));
    set_mode(0o000).expect("chmod 000");
    // Root (CAP_DAC_OVERRIDE) ignores the mode, and so would connect: nothing to test.
    let permissions_apply = std::fs::read_dir(&dir).is_err();
    let outcome = if permissions_apply {
        Some(within("connect", NodeClient::connect(&f.socket())).await)
    } else {
        None
    };
    set_mode(0o700).expect("chmod back, so the directory can be removed");
    match outcome {
        None => {
            let notice = "skipped: untraversable_socket_directory_is_permission_denied: \
                          running with permission overrides (root), which open any socket";
            println!("{notice}");
            eprintln!("{notice}");
        }
        Some(Ok(_)) => panic!("connected through a directory with mode 000"),
        Some(Err(error)) => assert!(
            matches!(&error, NodeError::PermissionDenied { path } if *path == f.socket()),
            "expected PermissionDenied, got {error:?}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_fails_the_pending_call_and_closes_the_client() {
    let f = Fixture::start(MockOptions::default());
    let client = f.connect().await;
    let (current, _) = f.mock.tip();
    assert!(!client.is_closed());

    let watcher = client.clone();
    let pending = tokio::spawn(async move {
        watcher
            .wait_tip_changed(current, Duration::from_secs(60))
            .await
    });
    eventually("waitTipChanged reaches the mock", || {
        f.mock.stats().calls.contains_key("waitTipChanged")
    })
    .await;
    let mock = &f.mock;
    tokio::task::block_in_place(|| mock.drop_connections());

    let error = within("the pending call", pending)
        .await
        .expect("wait task")
        .expect_err("the connection is gone");
    assert!(
        matches!(error, NodeError::Disconnected),
        "expected Disconnected, got {error:?}"
    );
    assert!(error.is_disconnect());
    within("closed()", client.closed()).await;
    assert!(client.is_closed());
    let later = within("getTip", client.tip()).await;
    assert!(
        matches!(later, Err(NodeError::Disconnected)),
        "a call after the disconnect: {later:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_calls_still_complete() {
    let f = Fixture::start(MockOptions::default());
    let client = f.connect().await;
    let delay = Duration::from_millis(300);
    for method in [
        MockMethod::GetTip,
        MockMethod::CreateNewBlock,
        MockMethod::GetCoinbaseTx,
        MockMethod::SubmitSolution,
    ] {
        f.mock.set_delay(method, delay);
    }
    let tip = within("slow getTip", client.tip())
        .await
        .expect("getTip")
        .expect("a tip");
    assert_eq!(tip.hash, f.mock.tip().0);
    let template = new_template(&client).await;
    assert_eq!(template.data().header.prev_blockhash, tip.hash);
    let (accepted, _) = mine(&template).await;
    assert!(accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_new_block_waits_out_initial_block_download() {
    let f = Fixture::start(MockOptions {
        ibd: true,
        ..MockOptions::default()
    });
    let client = f.connect().await;
    assert!(
        within("isInitialBlockDownload", client.is_initial_block_download())
            .await
            .expect("isInitialBlockDownload")
    );

    let creator = client.clone();
    let mut pending =
        tokio::spawn(async move { creator.create_new_block(CreateOptions::default()).await });
    eventually("createNewBlock reaches the mock", || {
        f.mock.stats().calls.contains_key("createNewBlock")
    })
    .await;
    // Still blocked a while later: the node is in IBD.
    let early = tokio::time::timeout(Duration::from_millis(500), &mut pending).await;
    assert!(early.is_err(), "createNewBlock returned during IBD");
    assert_eq!(f.mock.stats().templates_created, 0);

    f.mock.set_ibd(false);
    let template = within("createNewBlock after IBD", pending)
        .await
        .expect("create task")
        .expect("createNewBlock");
    assert_eq!(template.data().header.prev_blockhash, f.mock.tip().0);
    assert!(
        !within("isInitialBlockDownload", client.is_initial_block_download())
            .await
            .expect("isInitialBlockDownload")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_a_restart() {
    let f = Fixture::start(MockOptions::default());
    let client = f.connect().await;
    let template = new_template(&client).await;
    let mock = &f.mock;
    tokio::task::block_in_place(|| mock.restart()).expect("mock restarts");

    within("closed()", client.closed()).await;
    let solved = grind::solve(template.data(), &payout());
    let stale = within(
        "submit on the old connection",
        template.submit_solution(
            solved.version(),
            solved.header.time,
            solved.header.nonce,
            &solved.coinbase,
        ),
    )
    .await;
    assert!(
        matches!(stale, Err(NodeError::Disconnected)),
        "a template of the old connection: {stale:?}"
    );
    let again = f.connect().await;
    let tip = within("getTip", again.tip())
        .await
        .expect("getTip")
        .expect("a tip");
    assert_eq!(tip.hash, f.mock.tip().0, "the chain survived the restart");
    let fresh = new_template(&again).await;
    let (accepted, _) = mine(&fresh).await;
    assert!(accepted, "mining works on the new connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_node_ends_a_pending_wait_tip_changed() {
    let f = Fixture::start(MockOptions::default());
    let client = f.connect().await;

    let pending = spawn_tip_wait(&client, &f.mock, Duration::from_secs(60));
    eventually("waitTipChanged reaches the mock", || {
        f.mock.calls(MockMethod::WaitTipChanged.name()) > 0
    })
    .await;
    let mock = &f.mock;
    tokio::task::block_in_place(|| mock.stop());

    let ended = within("the pending waitTipChanged", pending)
        .await
        .expect("the wait task did not panic");
    match ended {
        Ok(None) | Err(_) => {}
        Ok(Some(tip)) => panic!("waitTipChanged reported {tip:?} while the node stopped"),
    }
    within("closed()", client.closed()).await;
}

/// The tip follower's wait blocks until a new tip, and meanwhile a template is mined:
/// were the submit queued behind the wait, it would not return before the wait's minute
/// is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_returns_while_wait_tip_changed_blocks() {
    let f = Fixture::start(MockOptions::default());
    let client = f.connect().await;
    let template = new_template(&client).await;

    let pending = spawn_tip_wait(&client, &f.mock, Duration::from_secs(60));
    eventually("waitTipChanged reaches the mock", || {
        f.mock.calls(MockMethod::WaitTipChanged.name()) > 0
    })
    .await;
    // `mine` gives up after 20 s, long before the wait's own timeout.
    let (accepted, solved) = mine(&template).await;
    assert!(accepted);
    let tip = within("waitTipChanged after our block", pending)
        .await
        .expect("wait task")
        .expect("waitTipChanged")
        .expect("our block as the tip");
    assert_eq!(tip.hash, solved.header.block_hash());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v30_is_refused_as_unsupported() {
    let f = Fixture::line(MockLine::V30);
    let error = within("connect", NodeClient::connect(&f.socket()))
        .await
        .expect_err("v30 is not supported");
    assert!(
        matches!(error, NodeError::UnsupportedVersion { line: "v30" }),
        "expected UnsupportedVersion {{ line: \"v30\" }}, got {error:?}"
    );
}

/// Connects to a mock of `line` and mines two blocks. Nothing is submitted to find the
/// line out: a template alone leaves it as detected at connect, and no `submitSolution`
/// reaches the node before a solution. The first solution's submit learns the ordinal
/// (`@10` first, `@7` only after UNIMPLEMENTED: `ordinals`) and the line; the second goes
/// straight to the ordinal that worked.
async fn line_round(
    line: MockLine,
    at_connect: NodeLine,
    after_submit: NodeLine,
    ordinals: &[u16],
) {
    let f = Fixture::line(line);
    let client = f.connect().await;
    assert_eq!(client.line(), at_connect, "{line:?} at connect");
    let template = new_template(&client).await;
    assert_eq!(
        client.line(),
        at_connect,
        "{line:?}: a template teaches nothing"
    );
    assert_eq!(
        f.mock.stats().submit_ordinals,
        [0u16; 0],
        "{line:?}: a probe submit"
    );
    let (accepted, solved) = mine(&template).await;
    assert!(accepted, "{line:?}: the block was refused");
    assert_eq!(f.mock.tip().0, solved.header.block_hash());
    assert_eq!(client.line(), after_submit, "{line:?} after a submit");
    assert_eq!(
        f.mock.stats().submit_ordinals,
        ordinals,
        "{line:?}: submit order"
    );

    let template = new_template(&client).await;
    let (accepted, solved) = mine(&template).await;
    assert!(accepted, "{line:?}: the second block was refused");
    assert_eq!(f.mock.tip().0, solved.header.block_hash());
    let mut twice = ordinals.to_vec();
    twice.extend(ordinals.last());
    assert_eq!(
        f.mock.stats().submit_ordinals,
        twice,
        "{line:?}: remembered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v31_0_line_is_detected_and_mines_through_at_7() {
    line_round(MockLine::V31_0, NodeLine::V31_0, NodeLine::V31_0, &[7]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v31_99_line_tries_at_10_once_then_mines_through_at_7() {
    line_round(
        MockLine::V31_99,
        NodeLine::V31_99,
        NodeLine::V31_99,
        &[10, 7],
    )
    .await;
}

/// The v32 mock's `submitSolution @7` refuses without submitting, so an accepted block
/// went through `@10`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v32_line_is_learnt_from_the_first_submit_and_mines_through_at_10() {
    line_round(MockLine::V32, NodeLine::V31_99, NodeLine::V32, &[10]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_round_trip_per_template_over_many_templates() {
    let f = Fixture::start(MockOptions::default());
    give_creating_calls_latency(&f.mock);
    let client = f.connect().await;
    new_template(&client).await;
    let rounds = 5;
    for round in 0..rounds {
        if round % 2 == 0 {
            f.mock.add_mempool_tx(Amount::from_sat(1_000 * (round + 1)));
        } else {
            f.mock.mine_block();
        }
        let template = new_template(&client).await;
        assert_eq!(template.data().header.prev_blockhash, f.mock.tip().0);
    }
    let stats = f.mock.stats();
    assert_eq!(stats.templates_created, rounds + 1);
    assert_eq!(stats.template_calls_after_delivery, 0);
    let round_trips = (stats.templates_created + stats.template_calls_after_delivery) as f64
        / stats.templates_created as f64;
    println!(
        "IPC round trips per new template: {round_trips} ({} templates, {} data calls after \
         delivery)",
        stats.templates_created, stats.template_calls_after_delivery
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_templates_are_released_in_the_node() {
    let f = Fixture::start(MockOptions::default());
    let client = f.connect().await;
    let first = new_template(&client).await;
    let copy = first.clone();
    let second = new_template(&client).await;
    f.mock.mine_block();
    let third = new_template(&client).await;
    assert_eq!(f.mock.stats().templates_alive, 3);

    drop(first);
    // A clone keeps it alive.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(f.mock.stats().templates_alive, 3);
    drop((copy, second, third));
    eventually("every template released", || {
        f.mock.stats().templates_alive == 0
    })
    .await;
    assert_eq!(f.mock.stats().calls.get("destroy"), Some(&3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_outlives_its_handle_while_a_call_on_it_runs() {
    let f = Fixture::start(MockOptions::default());
    let client = f.connect().await;
    let template = new_template(&client).await;
    f.mock
        .set_delay(MockMethod::GetBlock, Duration::from_millis(500));

    // The only handle goes into the call's task; the test keeps none.
    let pending = tokio::spawn(async move {
        let block = template.block().await;
        drop(template);
        block
    });
    eventually("getBlock reaches the mock", || {
        f.mock.calls(MockMethod::GetBlock.name()) > 0
    })
    .await;
    let block = within("getBlock", pending)
        .await
        .expect("call task")
        .expect("getBlock completes normally");
    assert_eq!(block.header.prev_blockhash, f.mock.tip().0);
    eventually("the template released", || {
        f.mock.stats().templates_alive == 0
    })
    .await;
    assert_eq!(f.mock.calls(MockMethod::Destroy.name()), 1);
    drop(client);
}

/// A caller that gives up on a call on a template (its future dropped, e.g. by a
/// `select!`) and drops the template: the node's call is still running, so the template
/// must not be destroyed under it; once the call ends, nothing may be left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_call_defers_the_destroy_and_leaks_nothing() {
    let f = Fixture::start(MockOptions::default());
    let client = f.connect().await;
    let template = new_template(&client).await;
    // Long enough that the node is still inside the call when the test looks.
    f.mock
        .set_delay(MockMethod::GetBlock, Duration::from_secs(3));

    let caller = template.clone();
    let pending = tokio::spawn(async move { caller.block().await });
    eventually("getBlock reaches the mock", || {
        f.mock.calls(MockMethod::GetBlock.name()) > 0
    })
    .await;
    pending.abort();
    assert!(pending.await.is_err_and(|e| e.is_cancelled()));
    drop(template);

    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = f.mock.stats();
    assert_eq!(
        stats.calls.get("destroy"),
        None,
        "destroyed while a getBlock on it was running"
    );
    assert_eq!(stats.templates_alive, 1);

    eventually("every template released", || {
        f.mock.stats().templates_alive == 0
    })
    .await;
    assert_eq!(f.mock.calls(MockMethod::Destroy.name()), 1);
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_misses_the_call_deadline_and_answers_once_thawed() {
    let f = Fixture::start(MockOptions::default());
    let deadline = Duration::from_millis(300);
    let client = within(
        "connect",
        NodeClient::connect_with_timeout(&f.socket().into(), deadline),
    )
    .await
    .expect("connects to the mock");
    let tip = within("getTip", client.tip()).await.expect("getTip");
    f.mock.hang(true);
    let started = std::time::Instant::now();
    let error = within("getTip while hung", client.tip())
        .await
        .expect_err("no answer from a hung node");
    assert!(
        matches!(
            error,
            NodeError::Timeout {
                method: "getTip",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(started.elapsed() >= deadline);
    assert!(
        !client.is_closed(),
        "a missed deadline keeps the connection"
    );
    f.mock.hang(false);
    let again = within("getTip after the hang", client.tip())
        .await
        .expect("answers again");
    assert_eq!(again, tip);
}

//! A mock Bitcoin node for tests and benchmarks: an in-process Cap'n Proto server that
//! speaks sv2-tpd's IPC schema (`crate::node::schema`) over a real unix socket.
//!
//! It imitates Bitcoin Core's `Mining` interface on a simulated regtest chain: real
//! templates and coinbase requirements, proof-of-work checked solutions, per-`Thread` FIFO
//! execution, sticky interrupts, IBD with cooldown, the ordinal differences between the
//! v30 / v31.0 / v31.99 / v32 interface lines, and injected faults (slow calls, dropped
//! connections, a hang, stop and restart).
//!
//! capnp-rpc is `!Send`, so the server runs on its own OS thread (current-thread tokio
//! runtime and `LocalSet`); [`MockNode`] is the `Send + Sync` handle that controls it.

mod chain;
mod hang;
mod queue;
mod runtime;
mod server;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bitcoin::{Amount, Block, BlockHash, Txid};
use tokio::sync::watch;

use chain::Chain;
use runtime::ServerHandle;

/// Which Bitcoin Core interface line the mock imitates.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MockLine {
    /// v30: `Init.makeMining @3` is UNIMPLEMENTED (only `makeMiningV30 @2` exists, and the
    /// mock refuses it with an error, as sv2-tpd does not support v30).
    V30,
    /// v31.0: `submitSolution @7`; `@10`, `submitBlock`, `getTransactionsBy*` UNIMPLEMENTED.
    V31_0,
    /// v31.99 (master): `submitSolution @7`, `submitBlock`, `getTransactionsBy*`; `@10`
    /// UNIMPLEMENTED.
    #[default]
    V31_99,
    /// v32: `submitSolution @10` returns (reason, debug, result); `@7` fails without
    /// submitting.
    V32,
}

/// How to start a [`MockNode`].
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Interface line to imitate.
    pub line: MockLine,
    /// Blocks mined on top of regtest genesis at start.
    pub initial_blocks: u32,
    /// Start in initial block download: `createNewBlock(cooldown = true)` blocks until
    /// [`MockNode::set_ibd`]`(false)`.
    pub ibd: bool,
    /// `waitNext` also returns a same-tip template about every second, as real regtest does
    /// when its tip is older than 20 minutes.
    pub old_tip_ticks: bool,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            line: MockLine::V31_99,
            initial_blocks: 101,
            ibd: false,
            old_tip_ticks: false,
        }
    }
}

/// The mock's methods, to slow them down with [`MockNode::set_delay`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MockMethod {
    /// `Init.makeMining`.
    MakeMining,
    /// `Mining.isTestChain`.
    IsTestChain,
    /// `Mining.isInitialBlockDownload`.
    IsInitialBlockDownload,
    /// `Mining.getTip`.
    GetTip,
    /// `Mining.waitTipChanged`.
    WaitTipChanged,
    /// `Mining.createNewBlock`.
    CreateNewBlock,
    /// `Mining.checkBlock`.
    CheckBlock,
    /// `Mining.interrupt`.
    Interrupt,
    /// `Mining.submitBlock`.
    SubmitBlock,
    /// `Mining.getTransactionsByTxID`.
    GetTransactionsByTxId,
    /// `Mining.getTransactionsByWitnessID`.
    GetTransactionsByWitnessId,
    /// `BlockTemplate.destroy`.
    Destroy,
    /// `BlockTemplate.getBlockHeader`.
    GetBlockHeader,
    /// `BlockTemplate.getBlock`.
    GetBlock,
    /// `BlockTemplate.getTxFees`.
    GetTxFees,
    /// `BlockTemplate.getTxSigops`.
    GetTxSigops,
    /// `BlockTemplate.getCoinbaseTx`.
    GetCoinbaseTx,
    /// `BlockTemplate.getCoinbaseMerklePath`.
    GetCoinbaseMerklePath,
    /// `BlockTemplate.submitSolution` (@7 and @10).
    SubmitSolution,
    /// `BlockTemplate.waitNext`.
    WaitNext,
    /// `BlockTemplate.interruptWait`.
    InterruptWait,
}

impl MockMethod {
    /// The schema's method name, the key of [`MockStats::calls`]. Both `submitSolution @7`
    /// and `@10` count as `"submitSolution"`; `Init.makeMiningV30 @2` counts as
    /// `"makeMiningV30"`. Methods that are UNIMPLEMENTED on the imitated line are not
    /// counted (nothing ran).
    pub fn name(self) -> &'static str {
        match self {
            MockMethod::MakeMining => "makeMining",
            MockMethod::IsTestChain => "isTestChain",
            MockMethod::IsInitialBlockDownload => "isInitialBlockDownload",
            MockMethod::GetTip => "getTip",
            MockMethod::WaitTipChanged => "waitTipChanged",
            MockMethod::CreateNewBlock => "createNewBlock",
            MockMethod::CheckBlock => "checkBlock",
            MockMethod::Interrupt => "interrupt",
            MockMethod::SubmitBlock => "submitBlock",
            MockMethod::GetTransactionsByTxId => "getTransactionsByTxID",
            MockMethod::GetTransactionsByWitnessId => "getTransactionsByWitnessID",
            MockMethod::Destroy => "destroy",
            MockMethod::GetBlockHeader => "getBlockHeader",
            MockMethod::GetBlock => "getBlock",
            MockMethod::GetTxFees => "getTxFees",
            MockMethod::GetTxSigops => "getTxSigops",
            MockMethod::GetCoinbaseTx => "getCoinbaseTx",
            MockMethod::GetCoinbaseMerklePath => "getCoinbaseMerklePath",
            MockMethod::SubmitSolution => "submitSolution",
            MockMethod::WaitNext => "waitNext",
            MockMethod::InterruptWait => "interruptWait",
        }
    }
}

/// Counters of what clients did, for assertions in tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MockStats {
    /// Calls received, by schema method name (see [`MockMethod::name`]), counted when
    /// dispatched, before waiting for their `Thread`.
    pub calls: BTreeMap<&'static str, u64>,
    /// Calls refused because their `Context.thread` was null.
    pub rejected_without_thread: u64,
    /// Templates handed out by `createNewBlock` and `waitNext`.
    pub templates_created: u64,
    /// Templates neither destroyed nor released by the client.
    pub templates_alive: u64,
    /// The most templates alive at once so far.
    pub templates_alive_peak: u64,
    /// `Thread`s made by `ThreadMap.makeThread` and not yet released.
    pub threads_alive: u64,
    /// Data calls on a template (getBlockHeader, getBlock, getTxFees, getTxSigops,
    /// getCoinbaseTx, getCoinbaseMerklePath) dispatched after the call that created the
    /// template had returned it: the IPC round trips a client spent beyond the first. A
    /// client that pipelines them on the creating call scores 0.
    pub template_calls_after_delivery: u64,
    /// Distinct `blockReservedWeight` values `createNewBlock` was asked for.
    pub reserved_weights: std::collections::BTreeSet<u64>,
    /// Every `createNewBlock`, in arrival order.
    pub builds: Vec<MockBuild>,
    /// Ordinals of the `submitSolution` calls received (7 or 10), in arrival order,
    /// including those UNIMPLEMENTED on the imitated line.
    pub submit_ordinals: Vec<u16>,
    /// `destroy` calls that arrived while a `submitSolution` or `getBlock` on the same
    /// template was still running: in Bitcoin Core, a use-after-free.
    pub destroyed_while_in_use: u64,
}

/// One `createNewBlock` as asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MockBuild {
    /// Whether mempool transactions were asked for (a full template).
    pub use_mempool: bool,
    /// The weight kept for the coinbase.
    pub block_reserved_weight: u64,
}

/// Errors starting or restarting the mock node.
#[derive(Debug, thiserror::Error)]
pub enum MockError {
    /// The unix socket could not be bound.
    #[error("mock node: cannot listen on {path}: {source}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The server thread or its runtime could not be started.
    #[error("mock node: cannot start the server thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// State shared between the handle and the server thread.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Bumped on every change a wait may care about (tip, mempool, IBD, shutdown).
    changes: watch::Sender<u64>,
    line: MockLine,
    old_tip_ticks: bool,
    /// The hang fault ([`MockNode::hang`]).
    hang: Arc<hang::HangSwitch>,
}

pub(crate) struct State {
    chain: Chain,
    ibd: bool,
    shutting_down: bool,
    delays: HashMap<MockMethod, Duration>,
    stats: MockStats,
    /// Full builds wait ([`MockNode::hold_full_builds`]).
    full_builds_held: bool,
    /// Builds waiting while full builds are held.
    builds_waiting: u32,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes every wait so it re-checks the state.
    fn notify(&self) {
        self.changes
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    fn count_call(&self, method: MockMethod) -> Duration {
        let mut state = self.lock();
        *state.stats.calls.entry(method.name()).or_default() += 1;
        state.delays.get(&method).copied().unwrap_or_default()
    }

    fn count_named_call(&self, name: &'static str) {
        *self.lock().stats.calls.entry(name).or_default() += 1;
    }
}

/// Handle on a running mock node. `Send + Sync`; dropping it stops the server and removes
/// the socket.
pub struct MockNode {
    socket_path: PathBuf,
    shared: Arc<Shared>,
    server: Mutex<Option<ServerHandle>>,
}

impl std::fmt::Debug for MockNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockNode")
            .field("socket_path", &self.socket_path)
            .field("line", &self.shared.line)
            .finish_non_exhaustive()
    }
}

impl MockNode {
    /// Mines `opts.initial_blocks` regtest blocks and starts serving on `socket_path`
    /// (a stale socket file there is replaced).
    pub fn start(socket_path: &Path, opts: MockOptions) -> Result<MockNode, MockError> {
        let (changes, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                chain: Chain::new(opts.initial_blocks),
                ibd: opts.ibd,
                shutting_down: false,
                delays: HashMap::new(),
                stats: MockStats::default(),
                full_builds_held: false,
                builds_waiting: 0,
            }),
            changes,
            line: opts.line,
            old_tip_ticks: opts.old_tip_ticks,
            hang: Arc::default(),
        });
        let server = runtime::spawn(socket_path, shared.clone())?;
        Ok(MockNode {
            socket_path: socket_path.to_path_buf(),
            shared,
            server: Mutex::new(Some(server)),
        })
    }

    /// Where the node listens.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Mines a block on the tip with the whole mempool; wakes waits. Returns its hash.
    pub fn mine_block(&self) -> BlockHash {
        let hash = self.shared.lock().chain.mine_block(true);
        self.shared.notify();
        hash
    }

    /// Mines a block on the tip with no mempool transaction, so the mempool stays (like
    /// `generateblock` with an empty list); wakes waits. Returns its hash.
    pub fn mine_empty_block(&self) -> BlockHash {
        let hash = self.shared.lock().chain.mine_block(false);
        self.shared.notify();
        hash
    }

    /// Takes the tip off the chain, like `invalidateblock` of the tip: the tip goes down
    /// by one. Wakes waits. Returns the invalidated block's hash (`None` at genesis).
    pub fn invalidate_tip(&self) -> Option<BlockHash> {
        let hash = self.shared.lock().chain.invalidate_tip();
        self.shared.notify();
        hash
    }

    /// Puts every invalidated block back, like `reconsiderblock`; wakes waits. Returns
    /// the tip.
    pub fn reconsider(&self) -> BlockHash {
        let hash = self.shared.lock().chain.reconsider();
        self.shared.notify();
        hash
    }

    /// Adds a made-up but well-formed segwit transaction paying `fee` to the mempool (it
    /// spends an invented outpoint); it enters the next templates. Wakes waits.
    pub fn add_mempool_tx(&self, fee: Amount) -> Txid {
        let txid = self.shared.lock().chain.add_mempool_tx(fee);
        self.shared.notify();
        txid
    }

    /// Hands `block` to the chain as a peer would relay it (proof of work and merkle root
    /// checked); wakes waits when it is the new tip. True when the chain took it.
    pub fn submit_block(&self, block: Block) -> bool {
        let outcome = self.shared.lock().chain.submit(block, true, true);
        let taken = matches!(
            outcome,
            chain::SubmitOutcome::NewTip | chain::SubmitOutcome::Stale
        );
        if outcome == chain::SubmitOutcome::NewTip {
            self.shared.notify();
        }
        taken
    }

    /// Hash and height of the tip.
    pub fn tip(&self) -> (BlockHash, u32) {
        self.shared.lock().chain.tip()
    }

    /// The blocks of the chain above `height`, lowest first: hand them to another mock
    /// ([`MockNode::submit_block`]) to put both on the same chain.
    pub fn blocks_above(&self, height: u32) -> Vec<Block> {
        self.shared.lock().chain.blocks_above(height)
    }

    /// Blocks accepted through `submitSolution` / `submitBlock`, in order (including valid
    /// ones that arrived after their parent stopped being the tip).
    pub fn accepted_blocks(&self) -> Vec<Block> {
        self.shared.lock().chain.accepted_blocks().to_vec()
    }

    /// Makes every later call of `method` sleep `delay` once it holds its `Thread`, so calls
    /// queued behind it on that thread wait too (zero removes the delay). Applies to the
    /// methods that take a `Context`; `interrupt` and `interruptWait` are never delayed.
    pub fn set_delay(&self, method: MockMethod, delay: Duration) {
        let mut state = self.shared.lock();
        if delay.is_zero() {
            state.delays.remove(&method);
        } else {
            state.delays.insert(method, delay);
        }
    }

    /// Abruptly closes every client connection (pending calls get no reply); keeps
    /// listening. Returns once they are closed.
    pub fn drop_connections(&self) {
        let server = self.server.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(server) = server.as_ref() {
            server.drop_connections();
        }
    }

    /// Stops serving: pending waits return null, then connections are closed and the socket
    /// removed. The chain is kept for [`MockNode::restart`]. Idempotent.
    pub fn stop(&self) {
        let server = self.server.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(server) = server {
            self.shared.lock().shutting_down = true;
            self.shared.notify();
            server.stop();
            if let Err(e) = std::fs::remove_file(&self.socket_path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %self.socket_path.display(), "mock node: removing socket: {e}");
                }
            }
        }
    }

    /// Listens again on the same path with the chain, mempool and stats kept (stops first if
    /// still running).
    pub fn restart(&self) -> Result<(), MockError> {
        self.stop();
        self.shared.lock().shutting_down = false;
        let server = runtime::spawn(&self.socket_path, self.shared.clone())?;
        *self.server.lock().unwrap_or_else(|p| p.into_inner()) = Some(server);
        Ok(())
    }

    /// Stops answering (`true`), as a node under `kill -STOP` does: nothing is read from or
    /// written to any connection, new ones included, until `hang(false)`; then everything
    /// held back flows again. The node's own state (chain, pending waits) carries on.
    pub fn hang(&self, hung: bool) {
        self.shared.hang.set(hung);
    }

    /// Enters or leaves initial block download; wakes waits.
    pub fn set_ibd(&self, ibd: bool) {
        self.shared.lock().ibd = ibd;
        self.shared.notify();
    }

    /// Changes the difficulty (nBits) of new templates on the same tip, as testnet's
    /// minimum-difficulty rule does once the tip is 20 minutes old; solutions must then
    /// match it.
    pub fn set_difficulty_bits(&self, bits: u32) {
        self.shared.lock().chain.bits = bits;
        self.shared.notify();
    }

    /// Holds `createNewBlock` calls with the mempool (`true`) as if `cs_main` were busy:
    /// each waits, answerless, and so does every build that arrives while one waits (the
    /// node builds one template at a time), until `hold_full_builds(false)`.
    pub fn hold_full_builds(&self, held: bool) {
        self.shared.lock().full_builds_held = held;
        self.shared.notify();
    }

    /// Builds waiting while full builds are held ([`MockNode::hold_full_builds`]).
    pub fn builds_waiting(&self) -> u32 {
        self.shared.lock().builds_waiting
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MockStats {
        self.shared.lock().stats.clone()
    }

    /// Calls of `method` (a schema method name) received so far.
    pub fn calls(&self, method: &str) -> u64 {
        self.shared
            .lock()
            .stats
            .calls
            .get(method)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for MockNode {
    fn drop(&mut self) {
        self.stop();
    }
}

//! The Cap'n Proto objects the mock serves: `Init`, `ThreadMap`, `Thread`, `Mining` and
//! `BlockTemplate`, behaving like Bitcoin Core's (`src/node/interfaces.cpp`, `miner.cpp`).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bitcoin::consensus::encode::{deserialize, serialize};
use bitcoin::hashes::Hash;
use bitcoin::{Block, Transaction};
use capnp::Error;
use capnp_rpc::{rpc_twoparty_capnp, twoparty, CapabilityServerSet, RpcSystem};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::chain::{
    SubmitOutcome, TemplateData, TemplateOptions, MAX_BLOCK_SIGOPS_COST, MAX_MONEY,
    MIN_BLOCK_RESERVED_WEIGHT,
};
use super::hang::Freezable;
use super::queue::{Permit, SerialQueue, Ticket};
use super::{MockLine, MockMethod, Shared};
use crate::node::schema::init_capnp::init;
use crate::node::schema::mining_capnp::{block_template, mining};
use crate::node::schema::proxy_capnp::{context, thread, thread_map};

/// Interval of `waitNext`'s fee checks and old-tip templates (Bitcoin Core's tick).
const WAIT_NEXT_TICK: Duration = Duration::from_secs(1);
/// Longest wait the mock schedules (timeouts beyond it, like `maxDouble`, mean "forever").
const LONGEST_WAIT: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Times a template-creating call yields after publishing its pipeline and before
/// returning, so calls the client pipelined on the template are dispatched first.
const PIPELINE_SETTLE_YIELDS: usize = 16;

/// Serves one client connection until it closes (or the task is aborted).
pub(crate) async fn serve_connection(stream: tokio::net::UnixStream, ctx: Rc<ServerCtx>) {
    use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
    let (reader, writer) = stream.into_split();
    let switch = ctx.shared.hang.clone();
    let network = twoparty::VatNetwork::new(
        Freezable::new(reader.compat(), switch.clone()),
        Freezable::new(writer.compat_write(), switch),
        rpc_twoparty_capnp::Side::Server,
        Default::default(),
    );
    let bootstrap: init::Client = capnp_rpc::new_client(InitImpl { ctx });
    let rpc = RpcSystem::new(Box::new(network), Some(bootstrap.client));
    if let Err(e) = rpc.await {
        tracing::debug!("mock node: connection ended: {e}");
    }
}

/// Per-server-thread context shared by every object the mock serves.
pub(crate) struct ServerCtx {
    shared: Arc<Shared>,
    threads: RefCell<CapabilityServerSet<ThreadImpl, thread::Client>>,
}

/// Where a call stands in its `Thread`'s line.
enum Place {
    InLine(Ticket),
    /// The thread capability is still a promise; resolve it, then take a place.
    Unresolved(thread::Client, Rc<ServerCtx>),
}

impl ServerCtx {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        ServerCtx {
            shared,
            threads: RefCell::new(CapabilityServerSet::new()),
        }
    }

    fn line(&self) -> MockLine {
        self.shared.line
    }

    /// Counts the call and takes its place on `context.thread` now (at dispatch); the
    /// returned future resolves when the call may run, after its injected delay.
    fn enter(
        self: &Rc<Self>,
        method: MockMethod,
        context: capnp::Result<context::Reader<'_>>,
    ) -> impl Future<Output = Result<Permit, Error>> + 'static {
        let delay = self.shared.count_call(method);
        let place = self.take_place(context);
        async move {
            let permit = match place? {
                Place::InLine(ticket) => ticket.wait().await?,
                Place::Unresolved(client, ctx) => {
                    let resolved = capnp::capability::get_resolved_cap(client).await;
                    let thread = ctx
                        .threads
                        .borrow()
                        .get_local_server_of_resolved(&resolved)
                        .ok_or_else(foreign_thread)?;
                    thread.queue.enqueue().wait().await?
                }
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(permit)
        }
    }

    fn take_place(
        self: &Rc<Self>,
        context: capnp::Result<context::Reader<'_>>,
    ) -> Result<Place, Error> {
        let context = context?;
        if !context.has_thread() {
            self.shared.lock().stats.rejected_without_thread += 1;
            return Err(Error::failed(
                "mock node: Context.thread is null; calls with a Context must name a Thread \
                 made by ThreadMap.makeThread"
                    .into(),
            ));
        }
        let client = context.get_thread()?;
        let known = self.threads.borrow().get_local_server_of_resolved(&client);
        Ok(match known {
            Some(thread) => Place::InLine(thread.queue.enqueue()),
            None => Place::Unresolved(client, self.clone()),
        })
    }

    fn shutting_down(&self) -> bool {
        self.shared.lock().shutting_down
    }
}

fn foreign_thread() -> Error {
    Error::failed("mock node: Context.thread is not a Thread made by this node's ThreadMap".into())
}

/// Bitcoin Core's sticky interrupt: raised with no wait pending, it cancels the next one.
#[derive(Default)]
struct InterruptFlag {
    pending: Cell<bool>,
    wake: Notify,
}

impl InterruptFlag {
    fn raise(&self) {
        self.pending.set(true);
        self.wake.notify_waiters();
    }

    fn take(&self) -> bool {
        self.pending.replace(false)
    }
}

/// Sleeps until the shared state changes, `interrupt` is raised, or `until`.
async fn wait_for_change(
    changes: &mut watch::Receiver<u64>,
    interrupt: &InterruptFlag,
    until: Instant,
) {
    tokio::select! {
        changed = changes.changed() => {
            if changed.is_err() {
                tokio::time::sleep_until(until).await;
            }
        }
        _ = interrupt.wake.notified() => {}
        _ = tokio::time::sleep_until(until) => {}
    }
}

/// The deadline `timeout_ms` from now (negative: now; huge or NaN: a year away).
fn deadline_after_ms(timeout_ms: f64) -> Instant {
    let timeout = if timeout_ms.is_nan() {
        LONGEST_WAIT
    } else {
        Duration::try_from_secs_f64(timeout_ms.max(0.0) / 1000.0)
            .unwrap_or(LONGEST_WAIT)
            .min(LONGEST_WAIT)
    };
    Instant::now() + timeout
}

struct InitImpl {
    ctx: Rc<ServerCtx>,
}

impl init::Server for InitImpl {
    fn construct(
        self: Rc<Self>,
        _params: init::ConstructParams,
        mut results: init::ConstructResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let map: thread_map::Client = capnp_rpc::new_client(ThreadMapImpl {
            ctx: self.ctx.clone(),
        });
        results.get().set_thread_map(map);
        std::future::ready(Ok(()))
    }

    fn make_mining_v30(
        self: Rc<Self>,
        _params: init::MakeMiningV30Params,
        _results: init::MakeMiningV30Results,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        self.ctx.shared.count_named_call("makeMiningV30");
        let message = match self.ctx.line() {
            MockLine::V30 => "mock node: the v30 Mining interface is not imitated",
            _ => "mock node: makeMining @2 is the v30 method; use makeMining @3",
        };
        std::future::ready(Err(Error::failed(message.into())))
    }

    fn make_mining(
        self: Rc<Self>,
        params: init::MakeMiningParams,
        mut results: init::MakeMiningResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let line = self.ctx.line();
        let entry = (line != MockLine::V30).then(|| {
            self.ctx.enter(
                MockMethod::MakeMining,
                params.get().and_then(|p| p.get_context()),
            )
        });
        let ctx = self.ctx.clone();
        async move {
            let Some(entry) = entry else {
                return Err(Error::unimplemented(
                    "method init::Server::make_mining not implemented".into(),
                ));
            };
            let _permit = entry.await?;
            if ctx.shutting_down() {
                return Ok(()); // null: the node is shutting down
            }
            let mining: mining::Client = capnp_rpc::new_client(MiningImpl {
                ctx,
                interrupt: InterruptFlag::default(),
            });
            results.get().set_result(mining);
            Ok(())
        }
    }
}

struct ThreadMapImpl {
    ctx: Rc<ServerCtx>,
}

impl thread_map::Server for ThreadMapImpl {
    fn make_thread(
        self: Rc<Self>,
        params: thread_map::MakeThreadParams,
        mut results: thread_map::MakeThreadResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let outcome = (|| -> Result<(), Error> {
            let name = params.get()?.get_name()?.to_string()?;
            let thread = ThreadImpl::new(self.ctx.shared.clone(), name);
            let mut threads = self.ctx.threads.borrow_mut();
            threads.gc();
            results.get().set_result(threads.new_client(thread));
            Ok(())
        })();
        std::future::ready(outcome)
    }
}

/// A node-side worker thread: runs the calls naming it one at a time, in arrival order.
struct ThreadImpl {
    name: String,
    queue: SerialQueue,
    shared: Arc<Shared>,
}

impl ThreadImpl {
    fn new(shared: Arc<Shared>, name: String) -> Self {
        shared.lock().stats.threads_alive += 1;
        ThreadImpl {
            name,
            queue: SerialQueue::default(),
            shared,
        }
    }
}

impl Drop for ThreadImpl {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.stats.threads_alive = state.stats.threads_alive.saturating_sub(1);
    }
}

impl thread::Server for ThreadImpl {
    fn get_name(
        self: Rc<Self>,
        _params: thread::GetNameParams,
        mut results: thread::GetNameResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        results.get().set_result(self.name.as_str());
        std::future::ready(Ok(()))
    }
}

struct MiningImpl {
    ctx: Rc<ServerCtx>,
    interrupt: InterruptFlag,
}

impl MiningImpl {
    /// While a test holds full builds ([`super::MockNode::hold_full_builds`]), a build
    /// with the mempool waits, as if `cs_main` were held, and so does every build that
    /// arrives while one waits: the node builds one template at a time.
    async fn wait_while_builds_held(&self, use_mempool: bool) {
        let shared = &self.ctx.shared;
        let mut changes = shared.changes.subscribe();
        let mut waiting = false;
        loop {
            {
                let mut state = shared.lock();
                if !state.full_builds_held {
                    if waiting {
                        state.builds_waiting -= 1;
                    }
                    return;
                }
                if !waiting {
                    if !use_mempool && state.builds_waiting == 0 {
                        return;
                    }
                    state.builds_waiting += 1;
                    waiting = true;
                }
            }
            let recheck = Instant::now() + WAIT_NEXT_TICK;
            wait_for_change(&mut changes, &self.interrupt, recheck).await;
        }
    }

    fn unless_line(&self, missing_on: &[MockLine], method: &str) -> Result<(), Error> {
        if missing_on.contains(&self.ctx.line()) {
            return Err(Error::unimplemented(format!(
                "method mining::Server::{method} not implemented"
            )));
        }
        Ok(())
    }
}

impl mining::Server for MiningImpl {
    fn is_test_chain(
        self: Rc<Self>,
        params: mining::IsTestChainParams,
        mut results: mining::IsTestChainResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let entry = self.ctx.enter(
            MockMethod::IsTestChain,
            params.get().and_then(|p| p.get_context()),
        );
        async move {
            let _permit = entry.await?;
            results.get().set_result(true);
            Ok(())
        }
    }

    fn is_initial_block_download(
        self: Rc<Self>,
        params: mining::IsInitialBlockDownloadParams,
        mut results: mining::IsInitialBlockDownloadResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let entry = self.ctx.enter(
            MockMethod::IsInitialBlockDownload,
            params.get().and_then(|p| p.get_context()),
        );
        async move {
            let _permit = entry.await?;
            let ibd = self.ctx.shared.lock().ibd;
            results.get().set_result(ibd);
            Ok(())
        }
    }

    fn get_tip(
        self: Rc<Self>,
        params: mining::GetTipParams,
        mut results: mining::GetTipResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let entry = self.ctx.enter(
            MockMethod::GetTip,
            params.get().and_then(|p| p.get_context()),
        );
        async move {
            let _permit = entry.await?;
            let (hash, height) = self.ctx.shared.lock().chain.tip();
            let mut result = results.get();
            let mut tip = result.reborrow().init_result();
            tip.set_hash(&hash.to_byte_array());
            tip.set_height(height as i32);
            result.set_has_result(true);
            Ok(())
        }
    }

    fn wait_tip_changed(
        self: Rc<Self>,
        params: mining::WaitTipChangedParams,
        mut results: mining::WaitTipChangedResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let entry = self.ctx.enter(
            MockMethod::WaitTipChanged,
            params.get().and_then(|p| p.get_context()),
        );
        async move {
            let p = params.get()?;
            let current_tip = p.get_current_tip()?.to_vec();
            let timeout_ms = p.get_timeout();
            let _permit = entry.await?;
            let deadline = deadline_after_ms(timeout_ms);
            let shared = &self.ctx.shared;
            let mut changes = shared.changes.subscribe();
            loop {
                if self.interrupt.take() || self.ctx.shutting_down() {
                    return Ok(()); // null
                }
                let (hash, height) = shared.lock().chain.tip();
                if hash.to_byte_array()[..] != current_tip[..] || Instant::now() >= deadline {
                    let mut tip = results.get().init_result();
                    tip.set_hash(&hash.to_byte_array());
                    tip.set_height(height as i32);
                    return Ok(());
                }
                wait_for_change(&mut changes, &self.interrupt, deadline).await;
            }
        }
    }

    fn create_new_block(
        self: Rc<Self>,
        params: mining::CreateNewBlockParams,
        mut results: mining::CreateNewBlockResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let entry = self.ctx.enter(
            MockMethod::CreateNewBlock,
            params.get().and_then(|p| p.get_context()),
        );
        async move {
            let p = params.get()?;
            let o = p.get_options()?;
            let options = TemplateOptions {
                use_mempool: o.get_use_mempool(),
                block_reserved_weight: o.get_block_reserved_weight(),
                coinbase_output_max_additional_sigops: o
                    .get_coinbase_output_max_additional_sigops(),
            };
            let cooldown = p.get_cooldown();
            {
                let mut state = self.ctx.shared.lock();
                state
                    .stats
                    .reserved_weights
                    .insert(options.block_reserved_weight);
                state.stats.builds.push(super::MockBuild {
                    use_mempool: options.use_mempool,
                    block_reserved_weight: options.block_reserved_weight,
                });
            }
            let _permit = entry.await?;
            if options.block_reserved_weight < MIN_BLOCK_RESERVED_WEIGHT {
                return Err(Error::failed(format!(
                    "block_reserved_weight ({}) must be at least {MIN_BLOCK_RESERVED_WEIGHT} weight units",
                    options.block_reserved_weight
                )));
            }
            if options.block_reserved_weight > super::chain::MAX_BLOCK_WEIGHT {
                return Err(Error::failed(format!(
                    "block_reserved_weight ({}) exceeds consensus maximum block weight",
                    options.block_reserved_weight
                )));
            }
            if options.coinbase_output_max_additional_sigops > MAX_BLOCK_SIGOPS_COST {
                return Err(Error::failed(format!(
                    "coinbase_output_max_additional_sigops ({}) exceeds consensus maximum block sigops cost",
                    options.coinbase_output_max_additional_sigops
                )));
            }
            self.wait_while_builds_held(options.use_mempool).await;
            let shared = &self.ctx.shared;
            let mut changes = shared.changes.subscribe();
            loop {
                // Like Core's initial waitTipChanged: a pending interrupt is consumed here.
                if self.interrupt.take() || self.ctx.shutting_down() {
                    return Ok(()); // null
                }
                if !(cooldown && shared.lock().ibd) {
                    break;
                }
                let recheck = Instant::now() + WAIT_NEXT_TICK;
                wait_for_change(&mut changes, &self.interrupt, recheck).await;
            }
            let data = shared.lock().chain.build_template(options);
            let (template, client) = TemplateImpl::create(&self.ctx, data);
            results.get().set_result(client);
            deliver(&template, &mut results).await
        }
    }

    fn check_block(
        self: Rc<Self>,
        params: mining::CheckBlockParams,
        mut results: mining::CheckBlockResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let entry = self.ctx.enter(
            MockMethod::CheckBlock,
            params.get().and_then(|p| p.get_context()),
        );
        async move {
            let p = params.get()?;
            let block: Block = deserialize(p.get_block()?)
                .map_err(|e| Error::failed(format!("mock node: checkBlock: bad block: {e}")))?;
            let o = p.get_options()?;
            let (check_merkle, check_pow) = (o.get_check_merkle_root(), o.get_check_pow());
            let _permit = entry.await?;
            let state = self.ctx.shared.lock();
            let outcome = if block.header.prev_blockhash != state.chain.tip().0 {
                Err(("inconclusive-not-best-prevblk".to_string(), String::new()))
            } else {
                state
                    .chain
                    .check(&block, check_pow, check_merkle)
                    .map_err(|r| (r.reason, r.debug))
            };
            drop(state);
            let mut r = results.get();
            match outcome {
                Ok(()) => r.set_result(true),
                Err((reason, debug)) => {
                    r.set_reason(reason.as_str());
                    r.set_debug(debug.as_str());
                    r.set_result(false);
                }
            }
            Ok(())
        }
    }

    fn interrupt(
        self: Rc<Self>,
        _params: mining::InterruptParams,
        _results: mining::InterruptResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        self.ctx.shared.count_call(MockMethod::Interrupt);
        self.interrupt.raise();
        std::future::ready(Ok(()))
    }

    fn submit_block(
        self: Rc<Self>,
        params: mining::SubmitBlockParams,
        mut results: mining::SubmitBlockResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let available = self.unless_line(&[MockLine::V30, MockLine::V31_0], "submit_block");
        let entry = available.is_ok().then(|| {
            self.ctx.enter(
                MockMethod::SubmitBlock,
                params.get().and_then(|p| p.get_context()),
            )
        });
        async move {
            available?;
            let block: Block = deserialize(params.get()?.get_block()?)
                .map_err(|e| Error::failed(format!("mock node: submitBlock: bad block: {e}")))?;
            if let Some(entry) = entry {
                let _permit = entry.await?;
            }
            let outcome = self.ctx.submit(block);
            let (reason, debug, result) = match outcome {
                SubmitOutcome::NewTip => (String::new(), String::new(), true),
                SubmitOutcome::Duplicate => ("duplicate".into(), String::new(), false),
                SubmitOutcome::Stale => ("inconclusive".into(), String::new(), false),
                SubmitOutcome::Rejected(r) => (r.reason, r.debug, false),
            };
            let mut r = results.get();
            r.set_reason(reason.as_str());
            r.set_debug(debug.as_str());
            r.set_result(result);
            Ok(())
        }
    }

    fn get_transactions_by_tx_i_d(
        self: Rc<Self>,
        params: mining::GetTransactionsByTxIDParams,
        mut results: mining::GetTransactionsByTxIDResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let available = self.unless_line(
            &[MockLine::V30, MockLine::V31_0],
            "get_transactions_by_tx_i_d",
        );
        let entry = available.is_ok().then(|| {
            self.ctx.enter(
                MockMethod::GetTransactionsByTxId,
                params.get().and_then(|p| p.get_context()),
            )
        });
        async move {
            available?;
            let ids = params.get()?.get_txids()?;
            if let Some(entry) = entry {
                let _permit = entry.await?;
            }
            self.ctx
                .write_mempool_txs(ids, results.get().init_result(ids.len()))
        }
    }

    fn get_transactions_by_witness_i_d(
        self: Rc<Self>,
        params: mining::GetTransactionsByWitnessIDParams,
        mut results: mining::GetTransactionsByWitnessIDResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let available = self.unless_line(
            &[MockLine::V30, MockLine::V31_0],
            "get_transactions_by_witness_i_d",
        );
        let entry = available.is_ok().then(|| {
            self.ctx.enter(
                MockMethod::GetTransactionsByWitnessId,
                params.get().and_then(|p| p.get_context()),
            )
        });
        async move {
            available?;
            let ids = params.get()?.get_wtxids()?;
            if let Some(entry) = entry {
                let _permit = entry.await?;
            }
            self.ctx
                .write_mempool_txs(ids, results.get().init_result(ids.len()))
        }
    }
}

impl ServerCtx {
    /// Hands `block` to the chain; wakes waits when the tip moved.
    fn submit(&self, block: Block) -> SubmitOutcome {
        let outcome = self.shared.lock().chain.submit(block, true, true);
        if outcome == SubmitOutcome::NewTip {
            self.shared.notify();
        }
        outcome
    }

    /// Writes each requested mempool transaction (serialized with witness), or empty data
    /// for an unknown id.
    fn write_mempool_txs(
        &self,
        ids: capnp::data_list::Reader<'_>,
        mut out: capnp::data_list::Builder<'_>,
    ) -> Result<(), Error> {
        let state = self.shared.lock();
        for (i, id) in ids.iter().enumerate() {
            if let Some(tx) = state.chain.mempool_tx(id?) {
                out.set(i as u32, &serialize(tx));
            }
        }
        Ok(())
    }
}

/// A template handed to a client, with the state Bitcoin Core's `BlockTemplateImpl` keeps.
struct TemplateImpl {
    ctx: Rc<ServerCtx>,
    data: TemplateData,
    interrupt: InterruptFlag,
    /// The creating call has returned this template to the client.
    delivered: Cell<bool>,
    /// Destroyed or dropped; counted out of `templates_alive`.
    released: Cell<bool>,
    /// `submitSolution` and `getBlock` calls on it running now (dispatched, not answered).
    busy: Cell<u32>,
}

/// Marks a template busy with a call while alive (see [`TemplateImpl::busy`]).
struct Busy(Rc<TemplateImpl>);

impl Busy {
    fn new(template: &Rc<TemplateImpl>) -> Self {
        template.busy.set(template.busy.get() + 1);
        Busy(template.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.set(self.0.busy.get() - 1);
    }
}

/// Publishes the freshly set result to calls pipelined on it, lets those calls be
/// dispatched, then marks the template delivered (the creating call returns right after).
async fn deliver<T: capnp::traits::Owned>(
    template: &TemplateImpl,
    results: &mut capnp::capability::Results<T>,
) -> Result<(), Error> {
    results.set_pipeline()?;
    for _ in 0..PIPELINE_SETTLE_YIELDS {
        tokio::task::yield_now().await;
    }
    template.delivered.set(true);
    Ok(())
}

impl TemplateImpl {
    fn create(
        ctx: &Rc<ServerCtx>,
        data: TemplateData,
    ) -> (Rc<TemplateImpl>, block_template::Client) {
        {
            let mut state = ctx.shared.lock();
            state.stats.templates_created += 1;
            state.stats.templates_alive += 1;
            state.stats.templates_alive_peak = state
                .stats
                .templates_alive_peak
                .max(state.stats.templates_alive);
        }
        let template = Rc::new(TemplateImpl {
            ctx: ctx.clone(),
            data,
            interrupt: InterruptFlag::default(),
            delivered: Cell::new(false),
            released: Cell::new(false),
            busy: Cell::new(0),
        });
        let client = capnp_rpc::new_client_from_rc(template.clone());
        (template, client)
    }

    fn release(&self) {
        if !self.released.replace(true) {
            let mut state = self.ctx.shared.lock();
            state.stats.templates_alive = state.stats.templates_alive.saturating_sub(1);
        }
    }

    /// Entry for a data getter: counts it as a round trip when it arrives after delivery.
    fn enter_data_call(
        self: &Rc<Self>,
        method: MockMethod,
        context: capnp::Result<context::Reader<'_>>,
    ) -> impl Future<Output = Result<Permit, Error>> + 'static {
        if self.delivered.get() {
            self.ctx.shared.lock().stats.template_calls_after_delivery += 1;
        }
        self.enter(method, context)
    }

    fn enter(
        self: &Rc<Self>,
        method: MockMethod,
        context: capnp::Result<context::Reader<'_>>,
    ) -> impl Future<Output = Result<Permit, Error>> + 'static {
        let entry = self.ctx.enter(method, context);
        let template = self.clone();
        async move {
            let permit = entry.await?;
            if template.released.get() {
                return Err(Error::failed(
                    "mock node: block template was destroyed".into(),
                ));
            }
            Ok(permit)
        }
    }

    /// Rebuilds this template's block with the miner's coinbase and header fields.
    fn solved_block(
        &self,
        version: u32,
        timestamp: u32,
        nonce: u32,
        coinbase: &[u8],
    ) -> Result<Block, String> {
        let coinbase: Transaction =
            deserialize(coinbase).map_err(|e| format!("coinbase does not deserialize: {e}"))?;
        let mut block = self.data.block.clone();
        block.txdata[0] = coinbase;
        block.header.version = bitcoin::block::Version::from_consensus(version as i32);
        block.header.time = timestamp;
        block.header.nonce = nonce;
        if let Some(root) = block.compute_merkle_root() {
            block.header.merkle_root = root;
        }
        Ok(block)
    }
}

impl Drop for TemplateImpl {
    fn drop(&mut self) {
        self.release();
    }
}

impl block_template::Server for TemplateImpl {
    fn destroy(
        self: Rc<Self>,
        params: block_template::DestroyParams,
        _results: block_template::DestroyResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let entry = self.enter(
            MockMethod::Destroy,
            params.get().and_then(|p| p.get_context()),
        );
        async move {
            let _permit = entry.await?;
            if self.busy.get() > 0 {
                // In Bitcoin Core this frees the block a running call still works on.
                self.ctx.shared.lock().stats.destroyed_while_in_use += 1;
            }
            self.release();
            Ok(())
        }
    }

    fn get_block_header(
        self: Rc<Self>,
        params: block_template::GetBlockHeaderParams,
        mut results: block_template::GetBlockHeaderResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let entry = self.enter_data_call(
            MockMethod::GetBlockHeader,
            params.get().and_then(|p| p.get_context()),
        );
        async move {
            let _permit = entry.await?;
            results.get().set_result(&self.data.header_bytes());
            Ok(())
        }
    }

    fn get_block(
        self: Rc<Self>,
        params: block_template::GetBlockParams,
        mut results: block_template::GetBlockResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let busy = Busy::new(&self);
        let entry = self.enter_data_call(
            MockMethod::GetBlock,
            params.get().and_then(|p| p.get_context()),
        );
        async move {
            let _busy = busy;
            let _permit = entry.await?;
            results.get().set_result(&serialize(&self.data.block));
            Ok(())
        }
    }

    fn get_tx_fees(
        self: Rc<Self>,
        params: block_template::GetTxFeesParams,
        mut results: block_template::GetTxFeesResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let entry = self.enter_data_call(
            MockMethod::GetTxFees,
            params.get().and_then(|p| p.get_context()),
        );
        async move {
            let _permit = entry.await?;
            fill_i64s(
                results.get().init_result(self.data.tx_fees.len() as u32),
                &self.data.tx_fees,
            );
            Ok(())
        }
    }

    fn get_tx_sigops(
        self: Rc<Self>,
        params: block_template::GetTxSigopsParams,
        mut results: block_template::GetTxSigopsResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let entry = self.enter_data_call(
            MockMethod::GetTxSigops,
            params.get().and_then(|p| p.get_context()),
        );
        async move {
            let _permit = entry.await?;
            fill_i64s(
                results.get().init_result(self.data.tx_sigops.len() as u32),
                &self.data.tx_sigops,
            );
            Ok(())
        }
    }

    fn get_coinbase_tx(
        self: Rc<Self>,
        params: block_template::GetCoinbaseTxParams,
        mut results: block_template::GetCoinbaseTxResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let entry = self.enter_data_call(
            MockMethod::GetCoinbaseTx,
            params.get().and_then(|p| p.get_context()),
        );
        async move {
            let _permit = entry.await?;
            let cb = &self.data.coinbase;
            let mut out = results.get().init_result();
            out.set_version(cb.version);
            out.set_sequence(cb.sequence);
            out.set_script_sig_prefix(&cb.script_sig_prefix);
            if let Some(witness) = &cb.witness {
                out.set_witness(witness);
            }
            out.set_block_reward_remaining(cb.block_reward_remaining.to_sat() as i64);
            out.set_lock_time(cb.lock_time);
            let mut outputs = out.init_required_outputs(cb.required_outputs.len() as u32);
            for (i, output) in cb.required_outputs.iter().enumerate() {
                outputs.set(i as u32, &serialize(output));
            }
            Ok(())
        }
    }

    fn get_coinbase_merkle_path(
        self: Rc<Self>,
        params: block_template::GetCoinbaseMerklePathParams,
        mut results: block_template::GetCoinbaseMerklePathResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let entry = self.enter_data_call(
            MockMethod::GetCoinbaseMerklePath,
            params.get().and_then(|p| p.get_context()),
        );
        async move {
            let _permit = entry.await?;
            let path = self.data.coinbase_merkle_path();
            let mut out = results.get().init_result(path.len() as u32);
            for (i, hash) in path.iter().enumerate() {
                out.set(i as u32, hash);
            }
            Ok(())
        }
    }

    fn submit_solution(
        self: Rc<Self>,
        params: block_template::SubmitSolutionParams,
        mut results: block_template::SubmitSolutionResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        self.ctx.shared.lock().stats.submit_ordinals.push(7);
        let busy = Busy::new(&self);
        let entry = self.enter(
            MockMethod::SubmitSolution,
            params.get().and_then(|p| p.get_context()),
        );
        async move {
            let _busy = busy;
            let p = params.get()?;
            let (version, timestamp, nonce) = (p.get_version(), p.get_timestamp(), p.get_nonce());
            let coinbase = p.get_coinbase()?;
            let _permit = entry.await?;
            if self.ctx.line() == MockLine::V32 {
                return Err(Error::failed(
                    "mock node: submitSolution @7 is deprecated on this node; use @10 (nothing was submitted)"
                        .into(),
                ));
            }
            let accepted = match self.solved_block(version, timestamp, nonce, coinbase) {
                Ok(block) => !matches!(self.ctx.submit(block), SubmitOutcome::Rejected(_)),
                Err(_) => false,
            };
            results.get().set_result(accepted);
            Ok(())
        }
    }

    fn submit_solution_v32(
        self: Rc<Self>,
        params: block_template::SubmitSolutionV32Params,
        mut results: block_template::SubmitSolutionV32Results,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        self.ctx.shared.lock().stats.submit_ordinals.push(10);
        let available = self.ctx.line() == MockLine::V32;
        let busy = available.then(|| Busy::new(&self));
        let entry = available.then(|| {
            self.enter(
                MockMethod::SubmitSolution,
                params.get().and_then(|p| p.get_context()),
            )
        });
        async move {
            let _busy = busy;
            let Some(entry) = entry else {
                return Err(Error::unimplemented(
                    "method block_template::Server::submit_solution_v32 not implemented".into(),
                ));
            };
            let p = params.get()?;
            let (version, timestamp, nonce) = (p.get_version(), p.get_timestamp(), p.get_nonce());
            let coinbase = p.get_coinbase()?;
            let _permit = entry.await?;
            let (reason, debug, result) =
                match self.solved_block(version, timestamp, nonce, coinbase) {
                    Err(debug) => ("bad-coinbase".to_string(), debug, false),
                    Ok(block) => match self.ctx.submit(block) {
                        SubmitOutcome::NewTip => (String::new(), String::new(), true),
                        SubmitOutcome::Duplicate => ("duplicate".into(), String::new(), false),
                        SubmitOutcome::Stale => ("inconclusive".into(), String::new(), false),
                        SubmitOutcome::Rejected(r) => (r.reason, r.debug, false),
                    },
                };
            let mut r = results.get();
            r.set_reason(reason.as_str());
            r.set_debug(debug.as_str());
            r.set_result(result);
            Ok(())
        }
    }

    fn wait_next(
        self: Rc<Self>,
        params: block_template::WaitNextParams,
        mut results: block_template::WaitNextResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let entry = self.enter(
            MockMethod::WaitNext,
            params.get().and_then(|p| p.get_context()),
        );
        async move {
            let o = params.get()?.get_options()?;
            let (timeout_ms, fee_threshold) = (o.get_timeout(), o.get_fee_threshold());
            let _permit = entry.await?;
            let deadline = deadline_after_ms(timeout_ms);
            let shared = &self.ctx.shared;
            let mut changes = shared.changes.subscribe();
            let current_fees = self.data.total_fees.to_sat() as i64;
            let mut next_tick = Instant::now() + WAIT_NEXT_TICK;
            // Like Core, fees are compared only after the first wake-up (a tick or, sooner
            // than Core, a mempool change), never the instant the wait starts.
            let mut woken = false;
            let fresh = loop {
                if self.interrupt.take() || self.ctx.shutting_down() {
                    return Ok(()); // null
                }
                let ticked = Instant::now() >= next_tick;
                if ticked {
                    woken = true;
                    next_tick += WAIT_NEXT_TICK;
                }
                {
                    let state = shared.lock();
                    let tip_changed = state.chain.tip().0 != self.data.block.header.prev_blockhash;
                    if tip_changed || (ticked && shared.old_tip_ticks) {
                        break state.chain.build_template(self.data.options);
                    }
                    if woken && fee_threshold < MAX_MONEY {
                        let fresh = state.chain.build_template(self.data.options);
                        let new_fees = fresh.total_fees.to_sat() as i64;
                        if new_fees >= current_fees.saturating_add(fee_threshold) {
                            break fresh;
                        }
                    }
                }
                if Instant::now() >= deadline {
                    return Ok(()); // null: timed out
                }
                wait_for_change(&mut changes, &self.interrupt, next_tick.min(deadline)).await;
                woken = true;
            };
            let (template, client) = TemplateImpl::create(&self.ctx, fresh);
            results.get().set_result(client);
            deliver(&template, &mut results).await
        }
    }

    fn interrupt_wait(
        self: Rc<Self>,
        _params: block_template::InterruptWaitParams,
        _results: block_template::InterruptWaitResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        self.ctx.shared.count_call(MockMethod::InterruptWait);
        self.interrupt.raise();
        std::future::ready(Ok(()))
    }
}

/// Copies `values` into a Cap'n Proto list of the same length.
fn fill_i64s(mut out: capnp::primitive_list::Builder<'_, i64>, values: &[i64]) {
    for (i, value) in values.iter().enumerate() {
        out.set(i as u32, *value);
    }
}

//! The engine actor: one task owns every template, subscriber and constraint group; the
//! node's waits run in one task per group and report back over a channel.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::consensus::serialize;
use bitcoin::hashes::Hash;
use bitcoin::{Amount, Block, BlockHash};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::api::{
    Constraints, EngineHandle, EngineRequest, SolutionOutcome, TemplateEvent, TransactionData,
    TxDataError,
};
use super::group::{run_group, GroupReport, GroupSpec, Reason};
use super::messages::{new_template, set_new_prev_hash, SolvedBlock};
use crate::metrics::metrics;
use crate::node::{NodeClient, NodeError, Template};
use stratum_core::template_distribution_sv2::SubmitSolutionOwned;

/// The engine's settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The node's IPC socket.
    pub socket: PathBuf,
    /// Minimum fee rise (sats) worth a new template on the same tip.
    pub fee_delta: Amount,
    /// Minimum time between two fee-driven templates of one group (tips never wait).
    pub template_interval: Duration,
    /// How long templates of the previous tip stay usable after a new tip.
    pub stale_grace: Duration,
    /// Where solved blocks are written before they go to the node.
    pub solutions_dir: PathBuf,
}

/// What `/health` and the daemon read about the engine.
#[derive(Debug, Default)]
pub struct EngineStatus {
    node_connected: AtomicBool,
    has_template: AtomicBool,
}

impl EngineStatus {
    /// True while the node is connected and a current template exists.
    pub fn healthy(&self) -> bool {
        self.node_connected.load(Ordering::Relaxed) && self.has_template.load(Ordering::Relaxed)
    }
}

/// The engine stopped for a reason the operator must act on.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The node cannot be driven by this version (e.g. a v30 node).
    #[error(transparent)]
    Unsupported(NodeError),
}

/// Constraints of the group the engine keeps running even with no client, so a template
/// (and `/health`) is ready before the first pool connects.
const STANDING_GROUP: Constraints = Constraints {
    max_additional_size: 0,
    max_additional_sigops: 0,
};

/// Templates of the current tip kept per group beyond those younger than the grace
/// period. Each one holds a whole block in the node's memory, and a tip can last hours on
/// test networks; solutions for anything but the newest few are not expected.
const MAX_TEMPLATES_PER_GROUP: usize = 16;

/// Templates per group whose block we keep in memory (for transaction data, and to save
/// a solution without asking the node).
const BLOCKS_CACHED_PER_GROUP: usize = 3;

/// Distinct constraint sets served with their own group (each is a `waitNext` loop and up
/// to [`MAX_TEMPLATES_PER_GROUP`] blocks in the node); more clients share a larger group.
const MAX_GROUPS: usize = 32;

/// Pause before a group the node refused (e.g. constraints it cannot satisfy) is tried again.
const GROUP_RETRY: Duration = Duration::from_secs(5);

/// Starts the engine; it runs until `shutdown` is cancelled.
pub fn spawn(
    config: EngineConfig,
    shutdown: CancellationToken,
) -> (
    EngineHandle,
    Arc<EngineStatus>,
    tokio::task::JoinHandle<Result<(), EngineError>>,
) {
    let (requests_tx, requests) = mpsc::channel(1024);
    let (internal_tx, internal) = mpsc::channel(1024);
    let status = Arc::new(EngineStatus::default());
    let engine = Engine {
        config,
        status: status.clone(),
        generation: 0,
        groups: HashMap::new(),
        subscribers: Vec::new(),
        templates: BTreeMap::new(),
        next_id: 1,
        tip: None,
        previous_tip: None,
        current_node: watch::channel(None).0,
        next_group_serial: 1,
        internal_tx,
        shutdown,
    };
    let task = tokio::spawn(engine.run(requests, internal));
    (EngineHandle::from_channel(requests_tx), status, task)
}

/// Messages from the engine's own helper tasks.
pub(crate) enum Internal {
    Connected(NodeClient),
    Fatal(NodeError),
    Disconnected {
        generation: u64,
    },
    Group(GroupReport),
    BlockFetched {
        template_id: u64,
        block: Arc<Block>,
    },
    RestartGroup {
        constraints: Constraints,
        generation: u64,
    },
}

struct Subscriber {
    constraints: Constraints,
    events: mpsc::Sender<TemplateEvent>,
}

struct Group {
    cancel: CancellationToken,
    current: Option<u64>,
    /// Tells this group's reports from those of an earlier task for the same constraints.
    serial: u64,
}

/// A template handed out to clients.
struct Held {
    template: Template,
    group: Constraints,
    prev_hash: BlockHash,
    made: Instant,
    new_template: Arc<stratum_core::template_distribution_sv2::NewTemplateOwned>,
    prev_hash_msg: Arc<stratum_core::template_distribution_sv2::SetNewPrevHashOwned>,
    block: Option<Arc<Block>>,
    tx_data: Option<Arc<Vec<Vec<u8>>>>,
}

struct Engine {
    config: EngineConfig,
    status: Arc<EngineStatus>,
    /// Bumped on every (re)connect; reports from older connections are ignored.
    generation: u64,
    groups: HashMap<Constraints, Group>,
    subscribers: Vec<Subscriber>,
    templates: BTreeMap<u64, Held>,
    next_id: u64,
    /// The newest tip templates were published for, with its height.
    tip: Option<(BlockHash, u32)>,
    /// The tip before `tip`, and when it was replaced.
    previous_tip: Option<(BlockHash, Instant)>,
    /// The live connection; `submit` also reads it, for solutions whose template died
    /// with an earlier one.
    current_node: watch::Sender<Option<NodeClient>>,
    next_group_serial: u64,
    internal_tx: mpsc::Sender<Internal>,
    shutdown: CancellationToken,
}

impl Engine {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<EngineRequest>,
        mut internal: mpsc::Receiver<Internal>,
    ) -> Result<(), EngineError> {
        self.spawn_connect(Duration::ZERO);
        let mut prune = tokio::time::interval(Duration::from_secs(1));
        let result = loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break Ok(()),
                Some(request) = requests.recv() => self.on_request(request),
                Some(event) = internal.recv() => {
                    if let Err(e) = self.on_internal(event) {
                        break Err(e);
                    }
                }
                _ = prune.tick() => self.prune(),
            }
        };
        self.stop().await;
        result
    }

    async fn stop(&mut self) {
        for (_, group) in self.groups.drain() {
            group.cancel.cancel();
        }
        self.templates.clear();
        self.subscribers.clear();
        if let Some(node) = self.current_node.send_replace(None) {
            // Let the group tasks interrupt their waits, then release the rest.
            tokio::time::sleep(Duration::from_millis(50)).await;
            node.release_all().await;
        }
        self.status.node_connected.store(false, Ordering::Relaxed);
        metrics().node_connected.set(0);
    }

    /// Connects in the background, retrying with backoff and saying so every few seconds.
    fn spawn_connect(&self, first_delay: Duration) {
        let socket = self.config.socket.clone();
        let tx = self.internal_tx.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(first_delay).await;
            let mut delay = Duration::from_millis(100);
            let mut last_said = None::<Instant>;
            loop {
                if shutdown.is_cancelled() {
                    return;
                }
                match NodeClient::connect(&socket).await {
                    Ok(node) => match wait_out_ibd(&node, &shutdown).await {
                        Ok(()) => {
                            let _ = tx.send(Internal::Connected(node)).await;
                            return;
                        }
                        Err(e) => debug!(error = %e, "lost the node during IBD"),
                    },
                    Err(e @ NodeError::UnsupportedVersion { .. }) => {
                        let _ = tx.send(Internal::Fatal(e)).await;
                        return;
                    }
                    Err(e) => {
                        if last_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                            warn!(error = %e, "waiting for the node");
                            last_said = Some(Instant::now());
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        });
    }

    fn on_internal(&mut self, event: Internal) -> Result<(), EngineError> {
        match event {
            Internal::Connected(node) => self.on_connected(node),
            Internal::Fatal(e) => {
                error!(error = %e, "cannot use this node");
                return Err(EngineError::Unsupported(e));
            }
            Internal::Disconnected { generation } if generation == self.generation => {
                self.on_disconnected()
            }
            Internal::Disconnected { .. } => {}
            Internal::Group(report) => self.on_group_report(report),
            Internal::RestartGroup {
                constraints,
                generation,
            } => {
                if generation == self.generation
                    && (constraints == STANDING_GROUP || self.wanted(constraints))
                {
                    self.ensure_group(constraints, Reason::Constraints);
                }
            }
            Internal::BlockFetched { template_id, block } => {
                if let Some(held) = self.templates.get_mut(&template_id) {
                    held.block = Some(block);
                }
            }
        }
        Ok(())
    }

    fn on_connected(&mut self, node: NodeClient) {
        self.generation += 1;
        let line = node.line().label();
        info!(interface = line, "node ready; serving templates");
        let m = metrics();
        m.node_connected.set(1);
        m.node_connects.inc();
        m.node_info.reset();
        m.node_info.with_label_values(&[line]).set(1);
        crate::status::node_facts().connected(line);
        self.status.node_connected.store(true, Ordering::Relaxed);
        let watcher = node.clone();
        let tx = self.internal_tx.clone();
        let generation = self.generation;
        tokio::spawn(async move {
            watcher.closed().await;
            let _ = tx.send(Internal::Disconnected { generation }).await;
        });
        self.current_node.send_replace(Some(node));
        // After a reconnect the first templates stand for the node's (possibly new) tip.
        let reason = if self.generation > 1 {
            Reason::Tip
        } else {
            Reason::Constraints
        };
        self.ensure_group(STANDING_GROUP, reason);
        self.forget_gone_subscribers();
        let wanted: Vec<Constraints> = self.subscribers.iter().map(|s| s.constraints).collect();
        for constraints in wanted {
            self.ensure_group(constraints, reason);
        }
    }

    fn on_disconnected(&mut self) {
        warn!("lost the node; clients stay connected, reconnecting");
        for group in self.groups.values() {
            group.cancel.cancel();
        }
        self.groups.clear();
        // The templates stay: their capabilities died with the connection, but pools keep
        // mining them while the tip has not moved, and a solution for one is still saved
        // and handed to the node over the next connection (see `submit`). They go when
        // the tip moves, as always.
        self.current_node.send_replace(None);
        self.status.node_connected.store(false, Ordering::Relaxed);
        self.status.has_template.store(false, Ordering::Relaxed);
        // `templates_held` is not zeroed here: the old connection's templates are counted
        // down as their handles drop (the IPC thread releases each one once), and zeroing
        // first would drive the gauge negative.
        metrics().node_connected.set(0);
        crate::status::node_facts().lost();
        self.spawn_connect(Duration::from_millis(100));
    }

    /// Starts a group for `constraints` unless one runs; `first` labels its first template.
    fn ensure_group(&mut self, constraints: Constraints, first: Reason) {
        let Some(node) = self.current_node.borrow().clone() else {
            return;
        };
        if self.groups.contains_key(&constraints) {
            return;
        }
        let cancel = self.shutdown.child_token();
        let span = info_span!(
            "group",
            size = constraints.max_additional_size,
            sigops = constraints.max_additional_sigops
        );
        tokio::spawn(
            run_group(
                node,
                GroupSpec {
                    constraints,
                    first_reason: first,
                    fee_delta: self.config.fee_delta,
                    interval: self.config.template_interval,
                    generation: self.generation,
                    serial: self.next_group_serial,
                },
                self.internal_tx.clone(),
                cancel.clone(),
            )
            .instrument(span),
        );
        self.groups.insert(
            constraints,
            Group {
                cancel,
                current: None,
                serial: self.next_group_serial,
            },
        );
        self.next_group_serial += 1;
    }

    /// Whether `serial` is the running task of the group for `constraints`.
    fn is_live_group(&self, constraints: Constraints, serial: u64) -> bool {
        self.groups
            .get(&constraints)
            .is_some_and(|g| g.serial == serial)
    }

    fn on_group_report(&mut self, report: GroupReport) {
        match report {
            GroupReport::Publish {
                serial,
                constraints,
                template,
                reason,
                received_at,
            } => {
                if self.is_live_group(constraints, serial) {
                    self.publish(constraints, template, reason, received_at);
                }
            }
            GroupReport::Failed {
                serial,
                generation,
                constraints,
                error,
            } => {
                if !self.is_live_group(constraints, serial) {
                    return;
                }
                if error.is_disconnect() {
                    // The connection watcher reports it; nothing else to do here.
                    return;
                }
                warn!(
                    error = %error,
                    size = constraints.max_additional_size,
                    sigops = constraints.max_additional_sigops,
                    "the node refused a template group; retrying in {GROUP_RETRY:?}"
                );
                self.groups.remove(&constraints);
                // Not at once: a node that refuses these constraints would refuse again.
                let tx = self.internal_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(GROUP_RETRY).await;
                    let _ = tx
                        .send(Internal::RestartGroup {
                            constraints,
                            generation,
                        })
                        .await;
                });
            }
        }
    }

    /// The group a client asking for `requested` joins: its own, or — once
    /// [`MAX_GROUPS`] distinct ones run — the smallest that reserves at least as much
    /// (a little less block space for that client, instead of another template loop in
    /// the node). `None` when no such group exists.
    fn group_for(&self, requested: Constraints) -> Option<Constraints> {
        let mut distinct: Vec<Constraints> =
            self.subscribers.iter().map(|s| s.constraints).collect();
        distinct.sort_unstable();
        distinct.dedup();
        if requested == STANDING_GROUP
            || distinct.contains(&requested)
            || distinct.len() < MAX_GROUPS
        {
            return Some(requested);
        }
        distinct
            .into_iter()
            .chain([STANDING_GROUP])
            .filter(|c| {
                c.max_additional_size >= requested.max_additional_size
                    && c.max_additional_sigops >= requested.max_additional_sigops
            })
            .min_by_key(|c| (c.max_additional_size, c.max_additional_sigops))
    }

    fn wanted(&self, constraints: Constraints) -> bool {
        self.subscribers
            .iter()
            .any(|s| s.constraints == constraints)
    }

    fn publish(
        &mut self,
        constraints: Constraints,
        template: Template,
        reason: Reason,
        received_at: Instant,
    ) {
        let data = template.data().clone();
        let prev_hash = data.header.prev_blockhash;
        let tip_height = data.height().saturating_sub(1);
        // A group can report a template built on a tip another group has already moved
        // past; the tip only moves forward (a same-height reorg still counts).
        if let Some((tip, height)) = self.tip {
            if tip != prev_hash && tip_height < height {
                debug!(%prev_hash, tip_height, "template on an older tip; its group will catch up");
                return;
            }
        }
        let future = reason != Reason::Fees;
        let id = self.next_id;
        let (new_tmpl, snph) = match (
            new_template(id, future, &data),
            set_new_prev_hash(id, &data),
        ) {
            (Ok(a), Ok(b)) => (Arc::new(a), Arc::new(b)),
            (Err(e), _) | (_, Err(e)) => {
                error!(error = %e, "template cannot be sent");
                return;
            }
        };
        self.next_id += 1;
        let _span = info_span!("template", template_id = id).entered();
        if self.tip.map(|(hash, _)| hash) != Some(prev_hash) {
            if let Some((old, _)) = self.tip.replace((prev_hash, tip_height)) {
                self.previous_tip = Some((old, Instant::now()));
            }
            info!(tip = %prev_hash, height = tip_height, "new chain tip");
        }
        info!(
            reason = reason.label(),
            fees = data.total_fees().to_sat(),
            txs = data.tx_fees.len(),
            "new template"
        );
        metrics()
            .templates_created
            .with_label_values(&[reason.label()])
            .inc();

        // Only the newest few templates of a group keep their block in our memory;
        // solutions for older ones are rare and fetch it from the node.
        for held in self
            .templates
            .values_mut()
            .rev()
            .filter(|h| h.group == constraints)
            .skip(BLOCKS_CACHED_PER_GROUP - 1)
        {
            held.block = None;
            held.tx_data = None;
        }
        if let Some(group) = self.groups.get_mut(&constraints) {
            group.current = Some(id);
        }
        self.templates.insert(
            id,
            Held {
                template: template.clone(),
                group: constraints,
                prev_hash,
                made: Instant::now(),
                new_template: new_tmpl.clone(),
                prev_hash_msg: snph.clone(),
                block: None,
                tx_data: None,
            },
        );
        self.status.has_template.store(true, Ordering::Relaxed);
        crate::status::node_facts().template_made(prev_hash, tip_height);

        // A subscriber that is gone, or too slow to take this update, is dropped: a
        // client that silently missed templates would mine on a stale tip.
        self.subscribers.retain(|sub| {
            if sub.constraints != constraints {
                return true;
            }
            send(sub, TemplateEvent::NewTemplate(new_tmpl.clone()))
                && (!future || send(sub, TemplateEvent::SetNewPrevHash(snph.clone())))
        });
        if future {
            metrics()
                .new_tip_to_prevhash_seconds
                .observe(received_at.elapsed().as_secs_f64());
        }

        // Fetch the block now, so transaction data and solutions need no IPC later and a
        // solution can be written to disk even if the node is gone by then.
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            match template.block().await {
                Ok(block) => {
                    let _ = tx
                        .send(Internal::BlockFetched {
                            template_id: id,
                            block: Arc::new(block),
                        })
                        .await;
                }
                Err(e) => debug!(template_id = id, error = %e, "prefetching the block failed"),
            }
        });
        self.prune();
    }

    /// Drops templates of tips before the previous one, and of the previous tip once its
    /// grace period is over. The node's copies are released with them.
    fn prune(&mut self) {
        // Clients that left: without this their groups would keep waiting in the node
        // until the next template found their channel closed.
        self.forget_gone_subscribers();
        let grace_over = self
            .previous_tip
            .is_none_or(|(_, since)| since.elapsed() >= self.config.stale_grace);
        let tip = self.tip.map(|(hash, _)| hash);
        let previous = self.previous_tip.map(|(h, _)| h);
        let grace = self.config.stale_grace;
        let current_ids: Vec<u64> = self.groups.values().filter_map(|g| g.current).collect();
        // Newest first, so the per-group cap keeps the latest.
        let mut per_group: HashMap<Constraints, usize> = HashMap::new();
        let mut keep = std::collections::HashSet::new();
        for (id, held) in self.templates.iter().rev() {
            let kept = per_group.entry(held.group).or_default();
            let recent = Some(held.prev_hash) == tip
                && (*kept < MAX_TEMPLATES_PER_GROUP || held.made.elapsed() < grace);
            if current_ids.contains(id)
                || recent
                || (!grace_over && Some(held.prev_hash) == previous)
            {
                *kept += 1;
                keep.insert(*id);
            }
        }
        self.templates.retain(|id, _| keep.contains(id));
        self.forget_gone_subscribers();
        // Groups no subscriber needs any more.
        let unwanted: Vec<Constraints> = self
            .groups
            .keys()
            .copied()
            .filter(|c| *c != STANDING_GROUP && !self.wanted(*c))
            .collect();
        for c in unwanted {
            if let Some(group) = self.groups.remove(&c) {
                group.cancel.cancel();
            }
        }
    }

    fn forget_gone_subscribers(&mut self) {
        self.subscribers.retain(|s| !s.events.is_closed());
    }

    fn on_request(&mut self, request: EngineRequest) {
        match request {
            EngineRequest::Subscribe {
                constraints,
                events,
            } => {
                self.forget_gone_subscribers();
                let Some(constraints) = self.group_for(constraints) else {
                    warn!(
                        size = constraints.max_additional_size,
                        sigops = constraints.max_additional_sigops,
                        "too many distinct coinbase constraints ({MAX_GROUPS}) and none \
                         larger to share; refusing this client"
                    );
                    return;
                };
                let sub = Subscriber {
                    constraints,
                    events,
                };
                // The group's current template goes out at once.
                let current = self
                    .groups
                    .get(&constraints)
                    .and_then(|g| g.current)
                    .and_then(|id| self.templates.get(&id));
                if let Some(held) = current {
                    let mut nt = (*held.new_template).clone();
                    nt.future_template = true;
                    send(&sub, TemplateEvent::NewTemplate(Arc::new(nt)));
                    send(
                        &sub,
                        TemplateEvent::SetNewPrevHash(held.prev_hash_msg.clone()),
                    );
                }
                self.subscribers.push(sub);
                self.ensure_group(constraints, Reason::Constraints);
            }
            EngineRequest::TransactionData { template_id, reply } => {
                self.on_transaction_data(template_id, reply)
            }
            EngineRequest::SubmitSolution { solution, reply } => {
                self.on_submit_solution(solution, reply)
            }
        }
    }

    fn on_transaction_data(
        &mut self,
        template_id: u64,
        reply: oneshot::Sender<Result<TransactionData, TxDataError>>,
    ) {
        let Some(held) = self.templates.get_mut(&template_id) else {
            let _ = reply.send(Err(TxDataError::TemplateIdNotFound));
            return;
        };
        if Some(held.prev_hash) != self.tip.map(|(hash, _)| hash) {
            let _ = reply.send(Err(TxDataError::StaleTemplateId));
            return;
        }
        let excess_data = held
            .template
            .data()
            .coinbase
            .witness
            .clone()
            .unwrap_or_default();
        if held.tx_data.is_none() {
            if let Some(block) = &held.block {
                held.tx_data = Some(Arc::new(transactions(block)));
            }
        }
        if let Some(txs) = &held.tx_data {
            let _ = reply.send(Ok(TransactionData {
                transactions: txs.clone(),
                excess_data,
            }));
            return;
        }
        let template = held.template.clone();
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let answer = match template.block().await {
                Ok(block) => {
                    let answer = TransactionData {
                        transactions: Arc::new(transactions(&block)),
                        excess_data,
                    };
                    let block = Arc::new(block);
                    let _ = internal
                        .send(Internal::BlockFetched { template_id, block })
                        .await;
                    Ok(answer)
                }
                Err(e) => {
                    warn!(template_id, error = %e, "cannot read the template's transactions");
                    Err(TxDataError::TemplateIdNotFound)
                }
            };
            let _ = reply.send(answer);
        });
    }

    fn on_submit_solution(
        &mut self,
        solution: SubmitSolutionOwned,
        reply: oneshot::Sender<SolutionOutcome>,
    ) {
        let template_id = solution.template_id;
        let Some(held) = self.templates.get(&template_id) else {
            warn!(template_id, "solution for an unknown template");
            metrics()
                .solutions
                .with_label_values(&["unknown-template"])
                .inc();
            let _ = reply.send(SolutionOutcome::UnknownTemplate);
            return;
        };
        let template = held.template.clone();
        let cached_block = held.block.clone();
        let dir = self.config.solutions_dir.clone();
        let nodes = self.current_node.subscribe();
        let span = info_span!("solution", template_id);
        tokio::spawn(
            async move {
                let outcome = submit(template, cached_block, solution, dir, nodes).await;
                let _ = reply.send(outcome);
            }
            .instrument(span),
        );
    }
}

/// Waits while the node is in initial block download, saying so every few seconds.
async fn wait_out_ibd(node: &NodeClient, shutdown: &CancellationToken) -> Result<(), NodeError> {
    let mut said = false;
    while node.is_initial_block_download().await? {
        if !said {
            info!("the node is in initial block download; waiting for it to finish");
            said = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
    Ok(())
}

fn send(sub: &Subscriber, event: TemplateEvent) -> bool {
    match sub.events.try_send(event) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            warn!("a client is too slow to take templates; dropping it");
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// The non-coinbase transactions of `block`, serialized with witness.
fn transactions(block: &Block) -> Vec<Vec<u8>> {
    block.txdata.iter().skip(1).map(serialize).collect()
}

/// Writes the block to disk, then hands the solution to the node.
async fn submit(
    template: Template,
    cached_block: Option<Arc<Block>>,
    solution: SubmitSolutionOwned,
    dir: PathBuf,
    nodes: watch::Receiver<Option<NodeClient>>,
) -> SolutionOutcome {
    let m = metrics();
    let solved = match SolvedBlock::new(template.data(), &solution) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "solution rejected before reaching the node");
            m.solutions.with_label_values(&["rejected"]).inc();
            return SolutionOutcome::Rejected {
                block_hash: BlockHash::all_zeros(),
                reason: e.to_string(),
            };
        }
    };
    let block_hash = solved.header.block_hash();
    let height = template.data().height();
    let to_node = template.submit_solution(
        solved.header.version.to_consensus() as u32,
        solved.header.time,
        solved.header.nonce,
        &solved.coinbase,
    );
    // The block goes to disk and to the node at once: neither waits for the other (a
    // slow disk must not delay a block). Without a cached template block, the node is
    // asked for it only after the submit (a getBlock may not overlap a submit).
    let (verdict, template_block) = match cached_block {
        Some(block) => {
            let (verdict, ()) =
                tokio::join!(to_node, save_solution(&dir, height, &solved, Some(&block)));
            (verdict, Some(block))
        }
        None => {
            let verdict = to_node.await;
            let block = template.block().await.ok().map(Arc::new);
            save_solution(&dir, height, &solved, block.as_deref()).await;
            (verdict, block)
        }
    };
    let verdict = match (verdict, template_block) {
        // The template died with an earlier connection: hand the whole block to the
        // node over the current one.
        (Err(e), Some(block)) if e.is_disconnect() => {
            resubmit(solved.block(&block), nodes).await.map_err(|_| e)
        }
        (verdict, _) => verdict,
    };
    match verdict {
        Ok(v) if v.accepted => {
            info!(%block_hash, "block accepted by the node");
            m.solutions.with_label_values(&["accepted"]).inc();
            m.blocks_found.inc();
            SolutionOutcome::Accepted { block_hash }
        }
        Ok(v) => {
            warn!(%block_hash, reason = %v.reason, "block rejected by the node");
            m.solutions.with_label_values(&["rejected"]).inc();
            SolutionOutcome::Rejected {
                block_hash,
                reason: v.reason,
            }
        }
        Err(e) => {
            error!(%block_hash, error = %e, "could not submit the block; it is saved in the solutions directory");
            m.solutions.with_label_values(&["node-unavailable"]).inc();
            SolutionOutcome::NodeUnavailable(e.to_string())
        }
    }
}

/// How long a solution whose connection died waits for the node to be back.
const RESUBMIT_PATIENCE: Duration = Duration::from_secs(60);

/// Submits `block` with `submitBlock` over the first live connection within
/// [`RESUBMIT_PATIENCE`].
async fn resubmit(
    block: Block,
    mut nodes: watch::Receiver<Option<NodeClient>>,
) -> Result<crate::node::SubmitVerdict, NodeError> {
    info!(block_hash = %block.block_hash(), "the template's connection is gone; submitting the whole block once the node is back");
    let node = tokio::time::timeout(RESUBMIT_PATIENCE, async {
        loop {
            if let Some(node) = nodes.borrow_and_update().clone().filter(|n| !n.is_closed()) {
                return Some(node);
            }
            if nodes.changed().await.is_err() {
                return None;
            }
        }
    })
    .await
    .ok()
    .flatten()
    .ok_or(NodeError::Disconnected)?;
    node.submit_block(&block).await
}

/// Saves the solved block as hex (ready for `bitcoin-cli submitblock`), or, when the
/// template's transactions could not be read, the header and coinbase.
async fn save_solution(
    dir: &std::path::Path,
    height: u32,
    solved: &SolvedBlock,
    template_block: Option<&Block>,
) {
    let hash = solved.header.block_hash();
    let (path, contents) = match template_block {
        Some(block) => (
            dir.join(format!("{height}-{hash}.block.hex")),
            bitcoin::consensus::encode::serialize_hex(&solved.block(block)),
        ),
        None => (
            dir.join(format!("{height}-{hash}.solution.json")),
            serde_json::json!({
                "header": bitcoin::consensus::encode::serialize_hex(&solved.header),
                "coinbase": bitcoin::consensus::encode::serialize_hex(&solved.coinbase),
            })
            .to_string(),
        ),
    };
    let result = async {
        tokio::fs::create_dir_all(dir).await?;
        tokio::fs::write(&path, contents).await
    }
    .await;
    match result {
        Ok(()) => info!(path = %path.display(), "solution saved"),
        Err(e) => error!(path = %path.display(), error = %e, "cannot save the solution"),
    }
}

//! The engine actor: one task owns every template, subscriber and constraint group, and
//! reacts to what the node supervisor, the group tasks and the sessions tell it. The
//! decisions live beside it — [`super::store`], [`super::fanout`], [`super::group`],
//! [`super::solutions`] — and take data, not the actor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::BlockHash;
use stratum_core::template_distribution_sv2::SubmitSolutionOwned;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::api::{
    Constraints, EngineConfig, EngineError, EngineHandle, EngineRequest, EngineStatus, PairFanout,
    SolutionOutcome, TemplateEvent,
};
use super::best_tip::Served;
use super::blocks::{BlockReads, FetchedBlock};
use super::build::{FeePolicy, GroupReport, Reason};
use super::cache::TemplateTxs;
use super::fanout::{CurrentPair, Fanout, Subscriber, STANDING_GROUP};
use super::group::{GroupStart, Groups};
use super::health::NodeLinks;
use super::ids::first_template_id;
use super::publish::{self, Published};
use super::released::Issued;
use super::solutions::{self, Gate, Submission};
use super::store::{Held, TemplateBudget, TemplateStore};
use super::supervisor::{supervise, NodeEvent, NodeReport, NodeTarget};
use super::tip::{self, NodeTip, TipFollower, TipReport};
use super::tip_board::TipBoard;
use super::unknown;
use crate::metrics::metrics;
use crate::node::{NodeClient, Template};

/// The node the groups build on, and the served tips they build for.
struct Serving {
    /// Its index in the configured list.
    node: usize,
    /// Its connection.
    client: NodeClient,
    /// The served tip, while this node serves (a new node gets a new channel).
    tips: watch::Sender<Option<NodeTip>>,
}

/// Templates of the tip (the newest) an unknown-template solution is tried against.
const UNKNOWN_CANDIDATES: usize = 16;

/// Room in each of the engine's inbound queues.
const QUEUE: usize = 1024;

/// Starts the engine; it runs until `shutdown` is cancelled.
pub fn spawn(
    config: EngineConfig,
    shutdown: CancellationToken,
) -> (
    EngineHandle,
    Arc<EngineStatus>,
    tokio::task::JoinHandle<Result<(), EngineError>>,
) {
    let (requests_tx, requests) = mpsc::channel(QUEUE);
    let (node_tx, node_events) = mpsc::channel(QUEUE);
    let (reports_tx, reports) = mpsc::channel(QUEUE);
    let (fetched_tx, fetched) = mpsc::channel(QUEUE);
    let (tips_tx, tips) = mpsc::channel(QUEUE);
    let status = Arc::new(EngineStatus::default());
    let client_calls = Arc::new(Semaphore::new(config.max_node_calls));
    for (index, spec) in config.nodes.iter().enumerate() {
        let target = NodeTarget {
            index,
            endpoint: spec.endpoint.clone(),
            chain: config.chain,
            call_timeout: config.node_call_timeout,
        };
        let span = tracing::info_span!("node", node = %spec.name);
        tokio::spawn(tracing::Instrument::instrument(
            supervise(target, node_tx.clone(), shutdown.clone()),
            span,
        ));
    }
    drop(node_tx);
    let fees = FeePolicy {
        fee_delta: config.fee_delta,
        interval: config.template_interval,
        tip_first: config.tip_first,
    };
    let engine = Engine {
        reads: BlockReads::new(fetched_tx, client_calls.clone()),
        store: TemplateStore::new(
            config.stale_grace,
            first_template_id(),
            TemplateBudget {
                templates: config.max_templates_held,
                bytes: config.max_template_bytes_held,
            },
        ),
        gate: Gate::new(config.max_solutions_in_flight),
        issued: Issued::default(),
        groups: Groups::new(fees, client_calls, reports_tx, shutdown.clone()),
        fanout: Fanout::default(),
        nodes: NodeLinks::new(&config.nodes, status.clone()),
        followers: config.nodes.iter().map(|_| None).collect(),
        board: TipBoard::new(config.nodes.len()),
        applied: None,
        refused: 0,
        sent_tips: std::collections::HashMap::new(),
        serving: None,
        served_before: false,
        config,
        tips_tx,
        shutdown,
    };
    let inbox = Inbox {
        requests,
        node_events,
        reports,
        fetched,
        tips,
    };
    let task = tokio::spawn(engine.run(inbox));
    (EngineHandle::from_channel(requests_tx), status, task)
}

/// Everything the engine listens to.
struct Inbox {
    requests: mpsc::Receiver<EngineRequest>,
    node_events: mpsc::Receiver<NodeReport>,
    reports: mpsc::Receiver<GroupReport>,
    fetched: mpsc::Receiver<FetchedBlock>,
    tips: mpsc::Receiver<TipReport>,
}

struct Engine {
    config: EngineConfig,
    /// Every node's connection and what the operator sees of it.
    nodes: NodeLinks,
    /// Each node's tip follower, while connected.
    followers: Vec<Option<TipFollower>>,
    /// Which tip is served, and by which node (the followers report to it too).
    board: Arc<TipBoard>,
    /// The choice the groups follow (what [`Engine::sync`] last applied).
    applied: Option<Served>,
    /// Nodes refused for good (wrong chain, version or socket).
    refused: usize,
    /// Each group's tip as its clients have it: that of the last template sent to them.
    sent_tips: std::collections::HashMap<Constraints, BlockHash>,
    /// The node whose templates the groups build, and the tips they build on.
    serving: Option<Serving>,
    /// Whether any node served before (templates after that count as `tip`).
    served_before: bool,
    groups: Groups,
    fanout: Fanout,
    store: TemplateStore<Published>,
    /// What a solution must pass before it costs a disk write or a node call.
    gate: Gate,
    /// The templates handed out lately, also those released since.
    issued: Issued,
    /// Block reads on their way (prefetches, one at a time; reads clients wait for).
    reads: BlockReads,
    tips_tx: mpsc::Sender<TipReport>,
    shutdown: CancellationToken,
}

impl Engine {
    async fn run(mut self, mut inbox: Inbox) -> Result<(), EngineError> {
        let mut prune = tokio::time::interval(Duration::from_secs(1));
        let result = loop {
            // What the daemon learnt comes before what clients ask: a session's request
            // then always sees the node's latest news (its tip, cached transactions). The prune
            // tick comes before requests too, so a busy request stream cannot starve it.
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break Ok(()),
                Some(NodeReport { node, event }) = inbox.node_events.recv() => match event {
                    NodeEvent::Connected(client) => self.on_connected(node, client),
                    NodeEvent::Lost => self.on_disconnected(node),
                    NodeEvent::Unresponsive(e) => self.on_unresponsive(node, &e),
                    NodeEvent::Responsive => self.on_responsive(node),
                    NodeEvent::Unusable(e) => {
                        // Before anything was served the operator must fix the
                        // configuration, and so when no node is left; otherwise the
                        // other nodes carry on.
                        self.refused += 1;
                        if !self.served_before || self.refused == self.followers.len() {
                            error!(node = &*self.nodes.get(node).name, error = %e, "cannot use this node");
                            break Err(EngineError::Unsupported(e));
                        }
                        // It never connected (the check runs before): nothing to undo.
                        self.nodes.refused(node, &e);
                    }
                },
                // The tip before templates: a template is current when built on it.
                Some(report) = inbox.tips.recv() => self.on_tip(report),
                Some(read) = inbox.fetched.recv() => if let Some((id, txs)) = self.reads.done(read) {
                    self.cache_txs(id, txs)
                },
                Some(report) = inbox.reports.recv() => self.on_group_report(report),
                _ = prune.tick() => self.prune(),
                Some(request) = inbox.requests.recv() => self.on_request(request),
            }
        };
        self.stop().await;
        result
    }

    async fn stop(&mut self) {
        self.followers.iter_mut().for_each(|f| *f = None);
        self.serving = None;
        self.groups.stop_all();
        self.store.clear();
        self.store_changed();
        self.fanout.clear();
        self.nodes.stop().await;
    }

    fn on_connected(&mut self, node: usize, client: NodeClient) {
        self.nodes.connected(node, client.clone());
        self.follow(node, client);
        // Its tip counts once the follower reports it.
        self.board.set_healthy(node, true);
        self.sync();
    }

    /// Starts the tip follower of `node` on `client` (dropping the old one stops it).
    fn follow(&mut self, node: usize, client: NodeClient) {
        let (tips, cancel) = (self.tips_tx.clone(), self.shutdown.child_token());
        let name = self.nodes.get(node).name.clone();
        let to = (self.board.clone(), tips);
        self.followers[node] = Some(TipFollower::start((node, &name), client, to, cancel));
    }

    /// Starts the standing group and every group a client uses.
    fn start_groups(&mut self, first: Reason) {
        let groups = self.clients_tips();
        self.start_groups_on(first, groups);
    }

    /// The standing group and every group a client uses, each with the tip its clients
    /// have a template for (read before the served tip changes).
    fn clients_tips(&mut self) -> Vec<(Constraints, Option<BlockHash>)> {
        self.fanout.forget_gone();
        [STANDING_GROUP]
            .into_iter()
            .chain(self.fanout.groups())
            .map(|c| (c, self.sent_tips.get(&c).copied()))
            .collect()
    }

    /// Starts `groups` (see [`Engine::clients_tips`]).
    fn start_groups_on(&mut self, first: Reason, groups: Vec<(Constraints, Option<BlockHash>)>) {
        for (constraints, clients_tip) in groups {
            let start = GroupStart {
                first,
                client_caused: false,
                clients_tip,
            };
            self.ensure_group(constraints, start);
        }
    }

    fn on_unresponsive(&mut self, node: usize, e: &crate::node::NodeError) {
        self.nodes.unresponsive(node, e);
        self.board.set_healthy(node, false);
        self.sync();
        self.nodes.health(self.serving_node());
    }

    /// Node `node` answers again: its tip follower starts over (a wait may have been lost
    /// in the node), and, if it serves, every group does too, so clients get fresh
    /// templates. (While it did not answer, clients kept their templates: they stay
    /// valid while the tip holds.)
    fn on_responsive(&mut self, node: usize) {
        self.nodes.responsive(node);
        let restart = self.serving_node() == Some(node);
        if let Some(client) = self.nodes.get(node).current() {
            self.follow(node, client);
        }
        self.board.set_healthy(node, true);
        if restart {
            self.restart_groups();
        }
        self.sync();
        self.nodes.health(self.serving_node());
    }

    fn on_disconnected(&mut self, node: usize) {
        self.nodes.lost(node);
        self.followers[node] = None;
        self.board.lost(node);
        if self.serving_node() == Some(node) {
            // The groups die with the connection. The templates stay: their capabilities
            // died too, but pools keep mining them while the tip has not moved, and a
            // solution for one is still saved and handed to the nodes that are left (see
            // `solutions`). They go when the tip moves, as always.
            self.stop_serving();
        }
        self.sync();
        self.nodes.health(self.serving_node());
    }

    /// The node whose templates are served.
    fn serving_node(&self) -> Option<usize> {
        self.serving.as_ref().map(|s| s.node)
    }

    /// Follows the tip choice: applies it when it changed, else shows which nodes are on
    /// the served tip.
    fn sync(&mut self) {
        let now = self.board.served();
        if now != self.applied {
            let before = std::mem::replace(&mut self.applied, now);
            self.apply(before, now);
        } else if let Some(served) = now {
            self.show_currents(served);
        }
    }

    /// Shows which node serves and which are on the served tip.
    fn show_currents(&self, served: Served) {
        let on_tip = self.board.on_tip(served.tip.hash());
        self.nodes.serving(Some(served.node), |i| {
            on_tip.get(i).copied().unwrap_or(false)
        });
    }

    /// Serves what the tip choice changed to (from `before`): the store's tip first (a
    /// template is current when built on it), then the groups — on the same node they
    /// build for the new tip; on another node they start over there (on the tip their
    /// clients already have, the first template is an update, not a second pair).
    fn apply(&mut self, before: Option<Served>, next: Option<Served>) {
        let Some(served) = next else {
            if let Some(old) = before {
                warn!(
                    node = &*self.nodes.get(old.node).name,
                    "no node serves templates now"
                );
            }
            self.stop_serving();
            self.nodes.serving(None, |_| false);
            return;
        };
        let Served { node, tip } = served;
        // What the clients have, before the served tip moves under it.
        let groups = self.clients_tips();
        tip::record(&mut self.store, tip);
        match &self.serving {
            // The tip just recorded, unless a follower moved the board on meanwhile.
            Some(serving) if serving.node == node => self.board.wake_groups_with(served),
            _ => {
                let Some(client) = self.nodes.get(node).current() else {
                    return;
                };
                if let Some(old) = &self.serving {
                    warn!(
                        from = &*self.nodes.get(old.node).name,
                        to = &*self.nodes.get(node).name,
                        "templates now come from another node"
                    );
                }
                let first = match std::mem::replace(&mut self.served_before, true) {
                    true => Reason::Tip,
                    false => Reason::Constraints,
                };
                let tips = watch::channel(Some(tip)).0;
                self.board.serve_to(Some((node, tips.clone())));
                self.serving = Some(Serving { node, client, tips });
                self.groups.stop_all();
                self.start_groups_on(first, groups);
            }
        }
        self.show_currents(served);
    }

    /// No node serves: its groups stop and the followers hand tips to nobody.
    fn stop_serving(&mut self) {
        self.serving = None;
        self.board.serve_to(None);
        self.groups.stop_all();
    }

    /// Every group starts over on the serving node.
    fn restart_groups(&mut self) {
        self.groups.stop_all();
        self.start_groups(Reason::Tip);
    }

    /// Starts a group for `constraints` on the serving node unless one runs.
    fn ensure_group(&mut self, constraints: Constraints, start: GroupStart) {
        let Some(serving) = &self.serving else {
            return;
        };
        let active = constraints != STANDING_GROUP || self.standing_needed();
        let tips = serving.tips.subscribe();
        self.groups
            .ensure(&serving.client, constraints, start, tips, active);
    }

    /// Whether the standing group builds templates: only while no client is served by
    /// another group, so it never competes with the templates clients wait for.
    fn standing_needed(&self) -> bool {
        self.fanout.wanted(STANDING_GROUP) || self.fanout.groups().is_empty()
    }

    /// A node moved its tip (its follower reported it to the board): the choice of the
    /// served tip may have changed.
    fn on_tip(&mut self, report: TipReport) {
        let live = self.followers[report.node]
            .as_ref()
            .is_some_and(|f| f.serial == report.serial);
        if !live {
            return;
        }
        self.sync();
        // Last, so a node's tip height shows only once the choice is made.
        self.nodes.tip(report.node, report.tip.tip);
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
                let tip = template.data().header.prev_blockhash;
                if self.groups.is_live(constraints, serial) {
                    self.publish(constraints, template, reason, received_at);
                }
                if reason == Reason::Tip {
                    // Out (or dropped): the full builds need not wait for it.
                    self.groups.pair_out(serial, tip);
                }
            }
            GroupReport::Failed {
                serial,
                constraints,
                error,
            } => self.groups.on_failed(constraints, serial, &error),
        }
    }

    fn publish(
        &mut self,
        constraints: Constraints,
        template: Template,
        reason: Reason,
        received_at: Instant,
    ) {
        let Some(id) = publish::hold(&mut self.store, constraints, &template, reason) else {
            return;
        };
        self.issued.record(id, template.data());
        let Some(held) = self.store.get(id) else {
            return;
        };
        let future = held.payload.new_template.future_template;
        let (new_tmpl, snph) = held.payload.frames.clone();
        self.groups.set_current(constraints, id);
        self.sent_tips.insert(constraints, held.prev_hash);
        self.nodes.template_ready();
        let event = match future {
            true => TemplateEvent::EncodedTip(new_tmpl, snph, PairFanout::start()),
            false => TemplateEvent::Encoded(new_tmpl),
        };
        self.fanout.publish(constraints, event);
        if reason == Reason::Tip {
            metrics()
                .new_tip_to_prevhash_seconds
                .observe(received_at.elapsed().as_secs_f64());
        }
        // Now that the clients have it: the block, so transaction data and solutions
        // need no IPC later and a solution can be saved even if the node is gone by then.
        if let Some(txs) = self.reads.prefetch(id, template) {
            self.store.set_txs(id, txs);
        }
        // On a new tip only the budget is enforced now (releasing the older tips'
        // templates is node work, and the full template is being built); the next prune
        // tick (within a second) does the rest.
        match reason {
            Reason::Tip => self.fit_budget(),
            _ => self.prune(),
        }
    }

    /// Caches template `id`'s transactions, within the budget.
    fn cache_txs(&mut self, id: u64, txs: TemplateTxs) {
        self.store.set_txs(id, txs);
        self.fit_budget();
    }

    /// Releases the oldest templates beyond the budget (never a group's current one).
    fn fit_budget(&mut self) {
        self.store.fit_budget(&self.groups.current_ids());
        self.store_changed();
    }

    /// Releases templates no client can use any more, and groups no client needs.
    fn prune(&mut self) {
        // Clients that left: without this their groups would keep waiting in the node
        // until the next template found their channel closed.
        self.fanout.forget_gone();
        self.store.prune(&self.groups.current_ids(), Instant::now());
        self.store_changed();
        self.stop_unwanted_groups();
        self.count_clients();
    }

    /// Tells the groups how many clients each has (the fuller first for full builds).
    fn count_clients(&self) {
        let counts = self.fanout.client_counts();
        self.groups
            .set_clients(|c| counts.get(&c).copied().unwrap_or(0));
    }

    /// Shows what the store holds now.
    fn store_changed(&self) {
        let bytes = i64::try_from(self.store.bytes_held()).unwrap_or(i64::MAX);
        metrics().template_bytes_held.set(bytes);
    }

    /// Stops the groups no subscribed session uses (the standing group stays).
    fn stop_unwanted_groups(&mut self) {
        let fanout = &self.fanout;
        self.groups
            .retain(|c| c == STANDING_GROUP || fanout.wanted(c));
        self.sent_tips
            .retain(|c, _| *c == STANDING_GROUP || fanout.wanted(*c));
        self.groups
            .set_active(STANDING_GROUP, self.standing_needed());
    }

    fn on_request(&mut self, request: EngineRequest) {
        match request {
            EngineRequest::Subscribe {
                constraints,
                events,
            } => {
                self.fanout.forget_gone();
                let Some(constraints) = self.fanout.group_for(constraints) else {
                    return;
                };
                // The group's current template goes out at once, if on the node's tip.
                let current = group_template(&self.groups, &self.store, constraints);
                // A group that starts now builds on what the joiner was just sent: on the
                // same tip its first template is an update, not a second pair.
                let sent_tip = current.map(|held| held.prev_hash);
                let current = current.map(pair_of);
                if current.is_none() {
                    // This client has no tip from the group yet: a restart must send a pair.
                    self.sent_tips.remove(&constraints);
                }
                let sub = Subscriber {
                    constraints,
                    events,
                };
                self.fanout.add(sub, current);
                // A session that changed its constraints left its old group: stop that
                // one now, so the group count is what clients use, not what they used.
                self.stop_unwanted_groups();
                let start = GroupStart {
                    first: Reason::Constraints,
                    client_caused: constraints != STANDING_GROUP,
                    clients_tip: sent_tip,
                };
                self.ensure_group(constraints, start);
                self.count_clients();
            }
            EngineRequest::Resend {
                subscription,
                reply,
            } => {
                let _ = reply.send(self.resend(subscription));
            }
            EngineRequest::TransactionData { template_id, reply } => {
                let lookup = self.store.transaction_data(template_id);
                self.reads
                    .answer(template_id, lookup, |p| p.template, reply);
            }
            EngineRequest::SubmitSolution { solution, reply } => {
                self.on_submit_solution(solution, reply)
            }
        }
    }

    /// Queues a subscribed session's group's current template to it again (a client
    /// that sends `CoinbaseOutputConstraints` needs a template to mine on now); false if
    /// the session is gone or its group has no template on the tip yet, whose next one
    /// then reaches it anyway. Held data only: no node call.
    fn resend(&mut self, subscription: mpsc::WeakSender<TemplateEvent>) -> bool {
        let Some(events) = subscription.upgrade() else {
            return false;
        };
        let Some(group) = self.fanout.group_of(&events) else {
            return false;
        };
        match current_pair(&self.groups, &self.store, group) {
            Some(current) => self.fanout.resend(&events, current),
            None => false,
        }
    }

    fn on_submit_solution(
        &mut self,
        solution: SubmitSolutionOwned,
        reply: oneshot::Sender<SolutionOutcome>,
    ) {
        let held = match self.store.get(solution.template_id) {
            Some(held) => held,
            // Not a template we hold (a pool that outlived a restart of ours, or one
            // released long ago): a real block only if its header meets the target on a
            // template of the tip, and then it is that template's block.
            None => {
                let tip = self
                    .store
                    .on_tip()
                    .take(UNKNOWN_CANDIDATES)
                    .map(|held| (held, &**held.payload.template.data()));
                match unknown::proven_on(tip, &solution) {
                    Some(held) => {
                        warn!(
                            template_id = solution.template_id,
                            "a block for a template this daemon does not hold: it solves a \
                             template of the tip, and goes to the node as that one's"
                        );
                        held
                    }
                    // A template released since: a real block must not pass for junk.
                    None => match self.issued.get(solution.template_id) {
                        Some(data) => {
                            match self.gate.admit(data, &solution) {
                                Ok(admitted) => solutions::spawn_released(
                                    admitted.solved,
                                    data.height(),
                                    self.config.solutions_dir.clone(),
                                    reply,
                                ),
                                Err(refused) => {
                                    let _ = reply.send(refused);
                                }
                            }
                            return;
                        }
                        None => {
                            let _ = reply.send(self.gate.refuse_unknown(solution.template_id));
                            return;
                        }
                    },
                }
            }
        };
        match self.gate.admit(held.payload.template.data(), &solution) {
            Ok(admitted) => {
                let job = Submission {
                    template: held.payload.template.clone(),
                    cached_block: held.txs.clone(),
                    solved: admitted.solved,
                    dir: self.config.solutions_dir.clone(),
                    nodes: self.nodes.subscribe(),
                    admitted: admitted.admitted,
                    in_flight: admitted.in_flight,
                };
                solutions::spawn(job, reply);
            }
            Err(refused) => {
                let _ = reply.send(refused);
            }
        }
    }
}

/// The template of the group for `constraints` that its clients mine on, or that a
/// joining client gets: its newest, while on the node's tip; or, while a restarted group
/// has made none yet, the newest of its templates on that tip (still valid: the tip has
/// not moved).
fn group_template<'a>(
    groups: &Groups,
    store: &'a TemplateStore<Published>,
    constraints: Constraints,
) -> Option<&'a Held<Published>> {
    let tip = store.tip();
    groups
        .current(constraints)
        .and_then(|id| store.get(id))
        .filter(|held| tip == Some(held.prev_hash))
        .or_else(|| store.on_tip().find(|held| held.group == constraints))
}

/// The current template of `group` with its `SetNewPrevHash` (see [`group_template`]):
/// what a client joining or asking again is sent.
fn current_pair<'a>(
    groups: &Groups,
    store: &'a TemplateStore<Published>,
    group: Constraints,
) -> Option<CurrentPair<'a>> {
    group_template(groups, store, group).map(pair_of)
}

/// A held template's `NewTemplate` and `SetNewPrevHash`.
fn pair_of(held: &Held<Published>) -> CurrentPair<'_> {
    (&*held.payload.new_template, &held.payload.prev_hash_msg)
}

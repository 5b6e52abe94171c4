//! The engine actor: one task owns every template, subscriber and constraint group, and
//! reacts to what the node supervisor, the group tasks and the sessions tell it. The
//! decisions live beside it — [`super::store`], [`super::fanout`], [`super::group`],
//! [`super::solutions`] — and take data, not the actor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use stratum_core::template_distribution_sv2::{
    NewTemplateOwned, SetNewPrevHashOwned, SubmitSolutionOwned,
};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn};

use super::api::{
    Constraints, EngineConfig, EngineError, EngineHandle, EngineRequest, EngineStatus,
    SolutionOutcome,
};
use super::blocks::{BlockReads, FetchedBlock, TxDataReply};
use super::fanout::{Fanout, Subscriber, STANDING_GROUP};
use super::group::{FeePolicy, GroupReport, Groups, Reason};
use super::health::NodeLink;
use super::ids::first_template_id;
use super::messages::announce;
use super::solutions::{self, Gate, Submission};
use super::store::{transactions, Held, TemplateStore, TxLookup};
use super::supervisor::{supervise, NodeEvent};
use super::unknown::{self, UnknownSolutions};
use crate::metrics::metrics;
use crate::node::{NodeClient, Template};

/// Templates of the tip an unknown-template solution is tried against.
const UNKNOWN_CANDIDATES: usize = 64;

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
    let status = Arc::new(EngineStatus::default());
    let client_calls = Arc::new(Semaphore::new(config.max_node_calls));
    tokio::spawn(supervise(
        config.socket.clone(),
        config.node_call_timeout,
        node_tx,
        shutdown.clone(),
    ));
    let fees = FeePolicy {
        fee_delta: config.fee_delta,
        interval: config.template_interval,
    };
    let engine = Engine {
        reads: BlockReads::new(fetched_tx, client_calls.clone()),
        store: TemplateStore::new(config.stale_grace, first_template_id()),
        gate: Gate::new(config.max_solutions_in_flight),
        groups: Groups::new(fees, client_calls, reports_tx, shutdown.clone()),
        fanout: Fanout::default(),
        unknown: UnknownSolutions::new(config.solutions_dir.clone()),
        config,
        node: NodeLink::new(status.clone()),
        shutdown,
    };
    let inbox = Inbox {
        requests,
        node_events,
        reports,
        fetched,
    };
    let task = tokio::spawn(engine.run(inbox));
    (EngineHandle::from_channel(requests_tx), status, task)
}

/// Everything the engine listens to.
struct Inbox {
    requests: mpsc::Receiver<EngineRequest>,
    node_events: mpsc::Receiver<NodeEvent>,
    reports: mpsc::Receiver<GroupReport>,
    fetched: mpsc::Receiver<FetchedBlock>,
}

/// What the engine keeps with each held template.
#[derive(Clone, Debug)]
struct Published {
    template: Template,
    new_template: Arc<NewTemplateOwned>,
    prev_hash_msg: Arc<SetNewPrevHashOwned>,
}

struct Engine {
    config: EngineConfig,
    node: NodeLink,
    groups: Groups,
    fanout: Fanout,
    store: TemplateStore<Published>,
    unknown: UnknownSolutions,
    /// What a solution must pass before it costs a disk write or a node call.
    gate: Gate,
    /// Block reads on their way, and who waits for them.
    reads: BlockReads,
    shutdown: CancellationToken,
}

impl Engine {
    async fn run(mut self, mut inbox: Inbox) -> Result<(), EngineError> {
        let mut prune = tokio::time::interval(Duration::from_secs(1));
        let result = loop {
            // What the daemon learnt comes before what clients ask: a session's request
            // then always sees the node's latest news (its tip, a cached block).
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break Ok(()),
                Some(event) = inbox.node_events.recv() => match event {
                    NodeEvent::Connected(node) => self.on_connected(node),
                    NodeEvent::Lost => self.on_disconnected(),
                    NodeEvent::Unresponsive(e) => self.node.unresponsive(&e),
                    NodeEvent::Responsive => self.on_responsive(),
                    NodeEvent::Unusable(e) => {
                        error!(error = %e, "cannot use this node");
                        break Err(EngineError::Unsupported(e));
                    }
                },
                Some(fetched) = inbox.fetched.recv() => self.on_block_read(fetched),
                Some(report) = inbox.reports.recv() => self.on_group_report(report),
                Some(request) = inbox.requests.recv() => self.on_request(request),
                _ = prune.tick() => self.prune(),
            }
        };
        self.stop().await;
        result
    }

    async fn stop(&mut self) {
        self.groups.stop_all();
        self.store.clear();
        self.fanout.clear();
        self.node.stop().await;
    }

    fn on_connected(&mut self, node: NodeClient) {
        // After a reconnect the first templates stand for the node's (possibly new) tip.
        let reason = match self.node.connected(node) {
            true => Reason::Tip,
            false => Reason::Constraints,
        };
        self.start_groups(reason);
    }

    /// Starts the standing group and every group a client uses.
    fn start_groups(&mut self, first: Reason) {
        self.fanout.forget_gone();
        for constraints in [STANDING_GROUP].into_iter().chain(self.fanout.groups()) {
            self.ensure_group(constraints, first);
        }
    }

    /// The node answers again: every group starts over, so clients get fresh templates
    /// even if a wait of the old groups was lost in the node. (While it did not answer,
    /// clients kept their templates: they stay valid while the tip holds.)
    fn on_responsive(&mut self) {
        self.node.responsive();
        self.groups.stop_all();
        self.start_groups(Reason::Tip);
    }

    fn on_disconnected(&mut self) {
        self.node.lost();
        self.groups.stop_all();
        // The templates stay: their capabilities died with the connection, but pools keep
        // mining them while the tip has not moved, and a solution for one is still saved
        // and handed to the node over the next connection (see `submit`). They go when
        // the tip moves, as always.
    }

    /// Starts a group for `constraints` on the live connection unless one runs.
    fn ensure_group(&mut self, constraints: Constraints, first: Reason) {
        let Some(node) = self.node.current() else {
            return;
        };
        self.groups.ensure(&node, constraints, first);
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
                if self.groups.is_live(constraints, serial) {
                    self.publish(constraints, template, reason, received_at);
                }
            }
            GroupReport::Failed {
                serial,
                constraints,
                error,
            } => {
                if self.groups.is_live(constraints, serial) {
                    warn!(
                        error = %error,
                        size = constraints.max_additional_size,
                        sigops = constraints.max_additional_sigops,
                        "the node refused a template group; retrying shortly"
                    );
                    self.groups.clear_current(constraints);
                }
            }
        }
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
        if self.store.is_behind(prev_hash, tip_height) {
            debug!(%prev_hash, tip_height, "template on an older tip; its group will catch up");
            return;
        }
        let future = reason != Reason::Fees;
        let id = self.store.next_id();
        let (new_tmpl, snph) = match announce(id, future, &data) {
            Ok((a, b)) => (Arc::new(a), Arc::new(b)),
            Err(e) => {
                error!(error = %e, "template cannot be sent");
                return;
            }
        };
        let published = Published {
            template: template.clone(),
            new_template: new_tmpl.clone(),
            prev_hash_msg: snph.clone(),
        };
        let excess_data = data.coinbase.witness.clone().unwrap_or_default();
        let held = Held::new(
            published,
            constraints,
            prev_hash,
            Instant::now(),
            excess_data,
        );
        let (id, new_tip) = self.store.insert(held, tip_height);
        let _span = info_span!("template", template_id = id).entered();
        if new_tip {
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
        self.groups.set_current(constraints, id);
        self.node.template_ready();
        self.fanout
            .publish(constraints, &new_tmpl, future.then_some(&snph));
        if future {
            metrics()
                .new_tip_to_prevhash_seconds
                .observe(received_at.elapsed().as_secs_f64());
        }
        // Fetch the block now, so transaction data and solutions need no IPC later and a
        // solution can be written to disk even if the node is gone by then.
        self.reads.prefetch(id, template);
        self.prune();
    }

    fn on_block_read(&mut self, FetchedBlock { template_id, block }: FetchedBlock) {
        let transactions = block.map(|block| {
            self.store.set_block(template_id, block.clone());
            // A template pruned meanwhile still answers those who waited for it.
            self.store
                .transactions(template_id)
                .unwrap_or_else(|| Arc::new(transactions(&block)))
        });
        self.reads.done(template_id, transactions);
    }

    /// Releases templates no client can use any more, and groups no client needs.
    fn prune(&mut self) {
        // Clients that left: without this their groups would keep waiting in the node
        // until the next template found their channel closed.
        self.fanout.forget_gone();
        self.store.prune(&self.groups.current_ids(), Instant::now());
        self.stop_unwanted_groups();
    }

    /// Stops the groups no subscribed session uses (the standing group stays).
    fn stop_unwanted_groups(&mut self) {
        let fanout = &self.fanout;
        self.groups
            .retain(|c| c == STANDING_GROUP || fanout.wanted(c));
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
                // The group's current template goes out at once.
                let current = self
                    .groups
                    .current(constraints)
                    .and_then(|id| self.store.get(id))
                    .map(|held| (&*held.payload.new_template, &held.payload.prev_hash_msg));
                let sub = Subscriber {
                    constraints,
                    events,
                };
                self.fanout.add(sub, current);
                // A session that changed its constraints left its old group: stop that
                // one now, so the group count is what clients use, not what they used.
                self.stop_unwanted_groups();
                self.ensure_group(constraints, Reason::Constraints);
            }
            EngineRequest::TransactionData { template_id, reply } => {
                match self.store.transaction_data(template_id) {
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                    Ok(TxLookup::Ready(data)) => {
                        let _ = reply.send(Ok(data));
                    }
                    Ok(TxLookup::Fetch {
                        payload,
                        excess_data,
                    }) => {
                        let waiting = TxDataReply { excess_data, reply };
                        self.reads.read_for(template_id, payload.template, waiting)
                    }
                }
            }
            EngineRequest::SubmitSolution { solution, reply } => {
                self.on_submit_solution(solution, reply)
            }
        }
    }

    fn on_submit_solution(
        &mut self,
        solution: SubmitSolutionOwned,
        reply: oneshot::Sender<SolutionOutcome>,
    ) {
        let Some(held) = self.store.get(solution.template_id) else {
            let tip = self
                .store
                .on_tip()
                .map(|held| &**held.payload.template.data());
            let proven = unknown::proven(tip.take(UNKNOWN_CANDIDATES), &solution);
            return self.unknown.refuse(solution, reply, proven, Instant::now());
        };
        match self.gate.admit(held.payload.template.data(), &solution) {
            Ok((solved, slot)) => {
                let job = Submission {
                    template: held.payload.template.clone(),
                    cached_block: held.block.clone(),
                    solved,
                    dir: self.config.solutions_dir.clone(),
                    nodes: self.node.subscribe(),
                    slot,
                };
                solutions::spawn(job, reply);
            }
            Err(refused) => {
                let _ = reply.send(refused);
            }
        }
    }
}

//! One constraint group's task: it builds the group's templates in the daemon's order.
//!
//! No `waitNext` is ever left pending: a pending one starts building a full template
//! under `cs_main` the moment the tip changes, and every other `createNewBlock` queues
//! behind it. Instead the task waits for the tip follower ([`super::tip`]). On a new
//! tip it takes the tip's template without mempool selection (tip-first; one for all
//! groups, see [`super::tip_round`]), which goes out as `NewTemplate(future)` +
//! `SetNewPrevHash`, and then asks for the full one, which goes out as a non-future
//! `NewTemplate`: once every group's pair is out, one group at a time, the group with the
//! most clients first. While the tip stays, it builds at most one template per interval
//! to look at fees, the groups' checks spread over the interval.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::{Amount, BlockHash, CompactTarget};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::api::Constraints;
use super::tip::NodeTip;
use super::tip_round::Membership;
use crate::metrics::metrics;
use crate::node::{CreateOptions, NodeClient, NodeError, Template};

/// Why a template was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A new chain tip (or the node came back): sent as a future template with its
    /// `SetNewPrevHash`. With tip-first, this is the template without mempool
    /// transactions.
    Tip,
    /// With tip-first, the full template that follows a tip's empty one.
    Full,
    /// Fees rose by at least the configured delta.
    Fees,
    /// First template for a new set of constraints.
    Constraints,
    /// The node came back (a reconnect, or it answers again) on the tip the group's
    /// clients already mine on: the full template, sent as a non-future update.
    Refresh,
}

impl Reason {
    /// Label for `sv2_tpd_templates_created_total`.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Tip => "tip",
            Reason::Full => "full",
            Reason::Fees => "fees",
            Reason::Constraints => "constraints",
            Reason::Refresh => "refresh",
        }
    }
}

/// What a group task reports.
#[derive(Debug)]
pub(crate) enum GroupReport {
    /// A template worth sending to the group's clients.
    Publish {
        /// The reporting task ([`Groups::is_live`]).
        serial: u64,
        /// The group.
        constraints: Constraints,
        /// The node's template.
        template: Template,
        /// Why it was made.
        reason: Reason,
        /// When the node reported the tip (for a tip's template) or answered (others).
        received_at: Instant,
    },
    /// The node refused the group's call; the task tries again after a pause.
    Failed {
        /// The reporting task.
        serial: u64,
        /// The group.
        constraints: Constraints,
        /// What the node said.
        error: NodeError,
    },
}

/// Weight the node keeps free for a client's coinbase (spec §7.1): the coinbase without
/// the client's outputs is 1168 WU at most; outputs weigh 4 WU a byte; the node refuses
/// less than 2000.
pub fn block_reserved_weight(constraints: Constraints) -> u64 {
    (1168 + 4 * u64::from(constraints.max_additional_size)).max(2000)
}

/// The `createNewBlock` options for `constraints` (a full template, with cooldown).
pub fn create_options(constraints: Constraints) -> CreateOptions {
    CreateOptions {
        block_reserved_weight: block_reserved_weight(constraints),
        coinbase_output_max_additional_sigops: u64::from(constraints.max_additional_sigops),
        use_mempool: true,
        cooldown: true,
    }
}

/// How every group builds its templates.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FeePolicy {
    /// Minimum fee rise (sats) worth a new template on the same tip.
    pub fee_delta: Amount,
    /// Minimum time between two template builds of one group on the same tip (the fee
    /// checks); tips never wait.
    pub interval: Duration,
    /// On a new tip, a template without mempool transactions first, the full one next.
    pub tip_first: bool,
}

/// What a group task is started with.
pub(crate) struct GroupSpec {
    /// The group.
    pub constraints: Constraints,
    /// Labels the group's first template.
    pub first_reason: Reason,
    /// How it builds.
    pub fees: FeePolicy,
    /// Which task for these constraints this is.
    pub serial: u64,
    /// Places for node calls clients cause, when a client caused this group: its first
    /// template takes one.
    pub client_calls: Option<Arc<Semaphore>>,
    /// The tip the group's clients already have a template (and its `SetNewPrevHash`)
    /// for, when the task is a restart: if the node is still on it, the first template
    /// is a non-future [`Reason::Refresh`], not a new tip's pair.
    pub clients_tip: Option<BlockHash>,
}

/// What a group task listens to: the node's tip, and whether it may build.
pub(crate) type Inputs = (watch::Receiver<Option<NodeTip>>, watch::Receiver<bool>);

/// Pause before a group the node refused (e.g. constraints it cannot satisfy) tries
/// again: a node that refuses these constraints would refuse again at once.
const GROUP_RETRY: Duration = Duration::from_secs(5);

/// Runs one group until `cancel` fires or the connection ends; when the node refuses
/// its calls, reports it and starts over after [`GROUP_RETRY`].
pub(crate) async fn run_group(
    node: NodeClient,
    mut spec: GroupSpec,
    (mut inputs, round): (Inputs, Membership),
    reports: mpsc::Sender<GroupReport>,
    cancel: CancellationToken,
) {
    loop {
        let mut task = Task {
            node: &node,
            spec: &spec,
            round: &round,
            reports: &reports,
            cancel: &cancel,
            last: None,
            first_place: spec.client_calls.clone(),
        };
        let Err(error) = task.follow(&mut inputs).await else {
            return;
        };
        if error.is_disconnect() {
            // The supervisor reports a lost connection.
            return;
        }
        let failed = GroupReport::Failed {
            serial: spec.serial,
            constraints: spec.constraints,
            error,
        };
        if reports.send(failed).await.is_err() {
            return;
        }
        // Nobody's full template waits for this group while it pauses.
        let _away = round.away();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(GROUP_RETRY) => {}
        }
        spec.first_reason = Reason::Constraints;
    }
}

/// How long a group waits for the follower when the node built on a tip the follower
/// has not reported yet.
const CATCH_UP: Duration = Duration::from_secs(1);

/// What the group last published.
#[derive(Clone, Copy, Debug)]
struct Sent {
    prev_hash: BlockHash,
    bits: CompactTarget,
    fees: Amount,
    /// When the group looks at fees next.
    next_check: Instant,
}

/// Which template to ask the node for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// No mempool selection, no cooldown: its cost does not grow with the mempool.
    Empty,
    /// The node's best block, without waiting (for a tip the node just reported).
    Full,
    /// The best block, letting the node wait out IBD and headers ahead (a first template).
    FullCooldown,
}

struct Task<'a> {
    node: &'a NodeClient,
    spec: &'a GroupSpec,
    /// What the group tasks share on a tip (the empty template, the full-build order).
    round: &'a Membership,
    reports: &'a mpsc::Sender<GroupReport>,
    cancel: &'a CancellationToken,
    last: Option<Sent>,
    /// Where the first build takes its place among client-caused node calls, if it must.
    first_place: Option<Arc<Semaphore>>,
}

impl Task<'_> {
    /// Builds templates until cancelled (`Ok`) or the node fails a call.
    async fn follow(&mut self, inputs: &mut Inputs) -> Result<(), NodeError> {
        let (tips, active) = inputs;
        loop {
            if self.cancel.is_cancelled() {
                return Ok(());
            }
            // Rest until the group may build and the node has named its tip.
            let tip = loop {
                let tip = *tips.borrow_and_update();
                match tip {
                    Some(tip) if *active.borrow_and_update() => break tip,
                    _ => {}
                }
                tokio::select! {
                    _ = self.cancel.cancelled() => return Ok(()),
                    r = tips.changed() => if r.is_err() { return Ok(()) },
                    r = active.changed() => if r.is_err() { return Ok(()) },
                }
            };
            let Some(last) = self.last.filter(|l| l.prev_hash == tip.hash()) else {
                if !self.on_new_tip(tip, tips).await? {
                    // No pair is coming from this group for that tip.
                    self.round.settle(tip.hash());
                    // The node built on another tip than the follower named: wait for
                    // the follower to catch up rather than build again at once.
                    tokio::select! {
                        _ = self.cancel.cancelled() => return Ok(()),
                        _ = tips.changed() => {}
                        _ = tokio::time::sleep(CATCH_UP) => {}
                    }
                }
                continue;
            };
            // The same tip: wait for the next one, or look at fees when it is time.
            let due = tokio::time::Instant::from_std(last.next_check);
            tokio::select! {
                _ = self.cancel.cancelled() => return Ok(()),
                r = tips.changed() => if r.is_err() { return Ok(()) },
                r = active.changed() => if r.is_err() { return Ok(()) },
                _ = tokio::time::sleep_until(due) => self.check_fees(last, tips).await?,
            }
        }
    }

    /// Publishes the group's templates for a tip it has none for; `false` when the node
    /// built on another tip.
    async fn on_new_tip(
        &mut self,
        tip: NodeTip,
        tips: &mut watch::Receiver<Option<NodeTip>>,
    ) -> Result<bool, NodeError> {
        let reason = match self.last {
            None if self.spec.clients_tip == Some(tip.hash()) => Reason::Refresh,
            None => self.spec.first_reason,
            Some(_) => Reason::Tip,
        };
        if reason == Reason::Tip && self.spec.fees.tip_first {
            let Some(empty) = self.tip_empty(tip).await? else {
                return Ok(true);
            };
            // In the queue for the full build before the pair is reported: the place
            // goes to the right group the moment the last pair is out.
            let queued = self.round.queue_full(tip.hash());
            if !self.publish_on(tip, empty, Reason::Tip).await {
                return Ok(false);
            }
            let place = tokio::select! {
                _ = self.cancel.cancelled() => return Ok(true),
                _ = tips.changed() => return Ok(true), // the next tip first
                place = queued.place() => place,
            };
            let full = self.build(Kind::Full).await?;
            drop(place);
            let Some(full) = full else {
                return Ok(true);
            };
            // With nothing in the mempool the full template is the empty one again.
            if !full.data().tx_fees.is_empty() {
                self.publish_on(tip, full, Reason::Full).await;
            }
            return Ok(true);
        }
        // No pair of this tip's round from this group: its first template, a refresh, or
        // a full pair without tip-first. Its first may wait long (a client-call place,
        // the node's cooldown): nobody's full waits for it meanwhile.
        self.round.settle(tip.hash());
        let _away = (reason != Reason::Tip).then(|| self.round.away());
        let kind = match reason {
            Reason::Constraints => Kind::FullCooldown,
            _ => Kind::Full,
        };
        match self.build(kind).await? {
            Some(full) => Ok(self.publish_on(tip, full, reason).await),
            None => Ok(true),
        }
    }

    /// The tip's template without mempool transactions: the one all groups share, or,
    /// should the node have put transactions in it, one of the group's own. `None` when
    /// cancelled meanwhile.
    async fn tip_empty(&mut self, tip: NodeTip) -> Result<Option<Template>, NodeError> {
        let cell = self.round.empty_for(tip);
        let shared = cell
            .get_or_try_init(|| async {
                match self.build(Kind::Empty).await {
                    Ok(Some(template)) => Ok(template),
                    Ok(None) => Err(None),
                    Err(e) => Err(Some(e)),
                }
            })
            .await;
        match shared {
            Ok(template) if template.data().tx_fees.is_empty() => Ok(Some(template.clone())),
            Ok(_) => {
                debug!("the tip's template without mempool has transactions; building our own");
                self.build(Kind::Empty).await
            }
            Err(None) => Ok(None),
            Err(Some(e)) => Err(e),
        }
    }

    /// Builds a full template on the same tip and sends it when fees rose enough (or
    /// the difficulty changed, as testnet's 20-minute rule does).
    async fn check_fees(
        &mut self,
        last: Sent,
        tips: &mut watch::Receiver<Option<NodeTip>>,
    ) -> Result<(), NodeError> {
        let queued = self.round.queue_full(last.prev_hash);
        let place = tokio::select! {
            _ = self.cancel.cancelled() => return Ok(()),
            _ = tips.changed() => return Ok(()), // the new tip first
            place = queued.place() => place,
        };
        let started = Instant::now();
        let next = self.build(Kind::Full).await?;
        drop(place);
        let Some(next) = next else {
            return Ok(());
        };
        let data = next.data().clone();
        // The group's cadence, one interval on; later if this check had to wait its turn.
        let interval = self.spec.fees.interval;
        let checked = Sent {
            next_check: (last.next_check + interval).max(started + interval),
            ..last
        };
        if data.header.prev_blockhash != last.prev_hash {
            // The node moved on; the follower will say so.
            self.last = Some(checked);
            return Ok(());
        }
        let reason = if data.header.bits != last.bits {
            Some(Reason::Tip)
        } else if data.total_fees() >= last.fees + self.spec.fees.fee_delta {
            Some(Reason::Fees)
        } else {
            None
        };
        match reason {
            Some(reason) => {
                self.publish(next, reason, Instant::now()).await;
                if let (Reason::Fees, Some(sent)) = (reason, self.last.as_mut()) {
                    sent.next_check = checked.next_check;
                }
            }
            None => {
                debug!("no fee rise worth a template");
                self.last = Some(checked);
            }
        }
        Ok(())
    }

    /// Asks the node for a template; `None` when cancelled meanwhile.
    ///
    /// Not `Mining.interrupt()` on cancel: it is sticky, so it would cancel another
    /// group's next `createNewBlock`. A template made after we left is released by the
    /// IPC side as soon as its reply finds no one waiting.
    async fn build(&mut self, kind: Kind) -> Result<Option<Template>, NodeError> {
        if self.cancel.is_cancelled() {
            return Ok(None);
        }
        let mut options = create_options(self.spec.constraints);
        options.use_mempool = kind != Kind::Empty;
        options.cooldown = kind == Kind::FullCooldown;
        let label = if kind == Kind::Empty { "empty" } else { "full" };
        metrics()
            .node_template_builds
            .with_label_values(&[label])
            .inc();
        let Some(places) = self.first_place.take() else {
            return tokio::select! {
                _ = self.cancel.cancelled() => Ok(None),
                r = self.node.create_new_block(options) => r.map(Some),
            };
        };
        // The first template is what a client's constraints cost the node: it waits for
        // a place among the calls clients may cause at once, and keeps it until the node
        // has answered, even if the group is cancelled meanwhile (the call goes on).
        let place = tokio::select! {
            _ = self.cancel.cancelled() => return Ok(None),
            place = take_client_call(&places) => place.ok(),
        };
        let node = self.node.clone();
        let call = tokio::spawn(async move {
            let _place = place;
            node.create_new_block(options).await
        });
        tokio::select! {
            _ = self.cancel.cancelled() => Ok(None),
            // A task that died (a panic) is a failure to report and retry, not a lost node.
            r = call => r.map_err(|e| NodeError::Call {
                method: "createNewBlock",
                message: format!("the call's task failed: {e}"),
            })?.map(Some),
        }
    }

    /// Publishes `template` for `tip` if the node built it on that tip; `false` when not
    /// (the node moved on; the follower will report it).
    async fn publish_on(&mut self, tip: NodeTip, template: Template, reason: Reason) -> bool {
        if template.data().header.prev_blockhash != tip.hash() {
            return false;
        }
        // A tip's first template counts from the node's report; the rest from now.
        let since = match reason {
            Reason::Tip => tip.seen,
            _ => Instant::now(),
        };
        self.publish(template, reason, since).await;
        true
    }

    async fn publish(&mut self, template: Template, reason: Reason, received_at: Instant) {
        let data = template.data();
        // The fee checks start over, set off by the group's share of the interval so
        // the groups' checks do not coincide (a fee template keeps its cadence, see
        // `check_fees`).
        let interval = self.spec.fees.interval;
        let next_check = Instant::now() + interval + self.round.fee_offset(interval);
        // The empty template's fees are no baseline: its full one follows at once.
        self.last = Some(Sent {
            prev_hash: data.header.prev_blockhash,
            bits: data.header.bits,
            fees: data.total_fees(),
            next_check,
        });
        let report = GroupReport::Publish {
            serial: self.spec.serial,
            constraints: self.spec.constraints,
            template,
            reason,
            received_at,
        };
        let _ = self.reports.send(report).await;
    }
}

/// Takes a place among the node calls clients may cause, counting a wait when none is free.
pub(crate) async fn take_client_call(
    places: &Arc<Semaphore>,
) -> Result<OwnedSemaphorePermit, tokio::sync::AcquireError> {
    if places.available_permits() == 0 {
        metrics()
            .limit_waits
            .with_label_values(&["max_node_calls"])
            .inc();
    }
    places.clone().acquire_owned().await
}

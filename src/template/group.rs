//! Constraint groups: clients whose coinbase constraints are equal share one node
//! template per update. Each group's task (in [`super::build`]) builds its templates
//! when the tip follower reports a new tip, and looks at fees once per interval;
//! [`Groups`] keeps track of the running tasks.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bitcoin::Amount;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info_span, warn, Instrument};

use super::api::Constraints;
use super::build::{run_group, GroupSpec};
use super::tip::NodeTip;
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
}

impl Reason {
    /// Label for `sv2_tpd_templates_created_total`.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Tip => "tip",
            Reason::Full => "full",
            Reason::Fees => "fees",
            Reason::Constraints => "constraints",
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

/// A running group task.
#[derive(Debug)]
struct Running {
    cancel: CancellationToken,
    /// Whether the task builds templates (the standing group rests while clients are
    /// served by other groups).
    active: watch::Sender<bool>,
    /// Id of the group's newest published template.
    current: Option<u64>,
    /// Tells this task's reports from those of an earlier task for the same constraints.
    serial: u64,
}

/// The running group tasks, one per constraint set.
#[derive(Debug)]
pub(crate) struct Groups {
    running: HashMap<Constraints, Running>,
    next_serial: u64,
    fees: FeePolicy,
    reports: mpsc::Sender<GroupReport>,
    shutdown: CancellationToken,
}

impl Groups {
    /// No groups yet; tasks report to `reports` and stop with `shutdown`.
    pub fn new(
        fees: FeePolicy,
        reports: mpsc::Sender<GroupReport>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            running: HashMap::new(),
            next_serial: 1,
            fees,
            reports,
            shutdown,
        }
    }

    /// Starts a task for `constraints` on `node` unless one runs; `first` labels its
    /// first template; it builds for the tips `tips` names, while `active`.
    pub fn ensure(
        &mut self,
        node: &NodeClient,
        constraints: Constraints,
        first: Reason,
        tips: watch::Receiver<Option<NodeTip>>,
        active: bool,
    ) {
        if self.running.contains_key(&constraints) {
            return;
        }
        let (active_tx, active_rx) = watch::channel(active);
        let serial = self.next_serial;
        self.next_serial += 1;
        let cancel = self.shutdown.child_token();
        let span = info_span!(
            "group",
            size = constraints.max_additional_size,
            sigops = constraints.max_additional_sigops
        );
        let spec = GroupSpec {
            constraints,
            first_reason: first,
            fees: self.fees,
            serial,
        };
        let task = run_group(
            node.clone(),
            spec,
            (tips, active_rx),
            self.reports.clone(),
            cancel.clone(),
        );
        tokio::spawn(task.instrument(span));
        self.running.insert(
            constraints,
            Running {
                cancel,
                active: active_tx,
                current: None,
                serial,
            },
        );
    }

    /// Whether `serial` is the running task of the group for `constraints`.
    pub fn is_live(&self, constraints: Constraints, serial: u64) -> bool {
        self.running
            .get(&constraints)
            .is_some_and(|g| g.serial == serial)
    }

    /// Lets the group for `constraints` build templates, or makes it rest.
    pub fn set_active(&mut self, constraints: Constraints, active: bool) {
        if let Some(group) = self.running.get(&constraints) {
            group
                .active
                .send_if_modified(|a| std::mem::replace(a, active) != active);
        }
    }

    /// The node refused the call of task `serial` of the group for `constraints`: says
    /// so, and clients joining meanwhile wait for a fresh template.
    pub fn on_failed(&mut self, constraints: Constraints, serial: u64, error: &NodeError) {
        if self.is_live(constraints, serial) {
            warn!(
                error = %error,
                size = constraints.max_additional_size,
                sigops = constraints.max_additional_sigops,
                "the node refused a template group; retrying shortly"
            );
            self.clear_current(constraints);
        }
    }

    /// Records `id` as the group's newest template.
    pub fn set_current(&mut self, constraints: Constraints, id: u64) {
        if let Some(group) = self.running.get_mut(&constraints) {
            group.current = Some(id);
        }
    }

    /// Forgets the group's newest template (the node refused its next one): clients
    /// joining meanwhile wait for a fresh one.
    pub fn clear_current(&mut self, constraints: Constraints) {
        if let Some(group) = self.running.get_mut(&constraints) {
            group.current = None;
        }
    }

    /// The group's newest template.
    pub fn current(&self, constraints: Constraints) -> Option<u64> {
        self.running.get(&constraints).and_then(|g| g.current)
    }

    /// Every group's newest template.
    pub fn current_ids(&self) -> Vec<u64> {
        self.running.values().filter_map(|g| g.current).collect()
    }

    /// Stops the group for `constraints`.
    pub fn stop(&mut self, constraints: Constraints) {
        if let Some(group) = self.running.remove(&constraints) {
            group.cancel.cancel();
        }
    }

    /// Stops every group for which `keep` is false.
    pub fn retain(&mut self, mut keep: impl FnMut(Constraints) -> bool) {
        let unwanted: Vec<Constraints> =
            self.running.keys().copied().filter(|c| !keep(*c)).collect();
        for constraints in unwanted {
            self.stop(constraints);
        }
    }

    /// Stops every group.
    pub fn stop_all(&mut self) {
        self.retain(|_| false);
    }
}

//! Constraint groups: clients whose coinbase constraints are equal share one node
//! template per update. Each group's task (in `build`) builds its templates
//! when the tip follower reports a new tip, and looks at fees once per interval;
//! [`Groups`] keeps track of the running tasks and of what they share on a tip
//! ([`TipRounds`]: one empty template, the order of the full builds).

use std::collections::HashMap;
use std::sync::Arc;

use bitcoin::BlockHash;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info_span, warn, Instrument};

use super::api::Constraints;
use super::build::{run_group, FeePolicy, GroupReport, GroupSpec, Reason};
use super::tip::NodeTip;
use super::tip_round::TipRounds;
use crate::node::{NodeClient, NodeError};

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

/// How a group task starts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupStart {
    /// Labels its first template.
    pub first: Reason,
    /// A client caused it (not the standing group, nor a restart after a reconnect): its
    /// first template takes a client-call place.
    pub client_caused: bool,
    /// The tip its clients already have a template for (see [`GroupSpec::clients_tip`]).
    pub clients_tip: Option<BlockHash>,
}

/// The running group tasks, one per constraint set.
#[derive(Debug)]
pub(crate) struct Groups {
    running: HashMap<Constraints, Running>,
    next_serial: u64,
    fees: FeePolicy,
    /// Places for node calls clients cause; a group's first template takes one.
    client_calls: Arc<Semaphore>,
    /// What the tasks share on a tip.
    rounds: Arc<TipRounds>,
    reports: mpsc::Sender<GroupReport>,
    shutdown: CancellationToken,
}

impl Groups {
    /// No groups yet; tasks report to `reports` and stop with `shutdown`; a group's first
    /// template waits for a `client_calls` place.
    pub fn new(
        fees: FeePolicy,
        client_calls: Arc<Semaphore>,
        reports: mpsc::Sender<GroupReport>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            running: HashMap::new(),
            next_serial: 1,
            fees,
            client_calls,
            rounds: TipRounds::new(),
            reports,
            shutdown,
        }
    }

    /// Starts a task for `constraints` on `node` unless one runs, as `start` says; it
    /// builds for the tips `tips` names, while `active`.
    pub fn ensure(
        &mut self,
        node: &NodeClient,
        constraints: Constraints,
        start: GroupStart,
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
            first_reason: start.first,
            fees: self.fees,
            serial,
            client_calls: start.client_caused.then(|| self.client_calls.clone()),
            clients_tip: start.clients_tip,
        };
        // A member from now on: a tip's full builds wait for its pair.
        let membership = self.rounds.join(serial, active);
        let task = run_group(
            node.clone(),
            spec,
            ((tips, active_rx), membership),
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
            self.rounds.set_active(group.serial, active);
        }
    }

    /// The engine has published (or dropped) the tip pair of task `serial`, built on
    /// `tip`: the full builds no longer wait for it.
    pub fn pair_out(&self, serial: u64, tip: BlockHash) {
        self.rounds.settle(serial, tip);
    }

    /// Each group's number of clients, `clients(constraints)`: full builds go to the
    /// groups with the most first.
    pub fn set_clients(&self, clients: impl Fn(Constraints) -> usize) {
        for (constraints, group) in &self.running {
            self.rounds.set_clients(group.serial, clients(*constraints));
        }
    }

    /// The node refused the call of task `serial` of the group for `constraints`: says
    /// so, and forgets the group's newest template (clients joining meanwhile get the
    /// newest of its templates still on the tip, if any, else wait for a fresh one).
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
            self.rounds.leave(group.serial);
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

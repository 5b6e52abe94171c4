//! Constraint groups: clients whose coinbase constraints are equal share one node
//! template per update. Each group's task follows the node with `waitNext` and reports
//! what is worth sending; it never polls. [`Groups`] keeps track of the running tasks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::Amount;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, Instrument};

use super::api::Constraints;
use crate::node::{CreateOptions, NodeClient, NodeError, Template, TemplateData, WaitOptions};

/// Why a template was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A new chain tip (or the node came back).
    Tip,
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
        /// When the node's answer arrived.
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

/// The `createNewBlock` options for `constraints`.
pub fn create_options(constraints: Constraints) -> CreateOptions {
    CreateOptions {
        block_reserved_weight: block_reserved_weight(constraints),
        coinbase_output_max_additional_sigops: u64::from(constraints.max_additional_sigops),
        use_mempool: true,
    }
}

/// How long one `waitNext` may block when nothing is pending; the loop simply waits again.
const IDLE_WAIT: Duration = Duration::from_secs(60);

/// How every group follows fees.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FeePolicy {
    /// Minimum fee rise (sats) worth a new template on the same tip.
    pub fee_delta: Amount,
    /// Minimum time between two fee-driven templates of one group (tips never wait).
    pub interval: Duration,
}

/// What a group task is started with.
struct GroupSpec {
    constraints: Constraints,
    /// Labels the group's first template.
    first_reason: Reason,
    fees: FeePolicy,
    /// Which task for these constraints this is.
    serial: u64,
    /// Places for node calls clients cause (see [`Groups::new`]).
    client_calls: Arc<Semaphore>,
}

/// A running group task.
#[derive(Debug)]
struct Running {
    cancel: CancellationToken,
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
    /// Places for node calls clients cause; a group's first template takes one.
    client_calls: Arc<Semaphore>,
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
            reports,
            shutdown,
        }
    }

    /// Starts a task for `constraints` on `node` unless one runs; `first` labels its
    /// first template.
    pub fn ensure(&mut self, node: &NodeClient, constraints: Constraints, first: Reason) {
        if self.running.contains_key(&constraints) {
            return;
        }
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
            client_calls: self.client_calls.clone(),
        };
        tokio::spawn(
            run_group(node.clone(), spec, self.reports.clone(), cancel.clone()).instrument(span),
        );
        self.running.insert(
            constraints,
            Running {
                cancel,
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

/// Pause after a `waitNext` that returned null early (a node shutting down).
const SHUTDOWN_BACKOFF: Duration = Duration::from_millis(250);

/// Whether `next` must go out as a future template with its own `SetNewPrevHash`.
fn needs_new_prev_hash(current: &TemplateData, next: &TemplateData) -> bool {
    current.header.prev_blockhash != next.header.prev_blockhash
        || current.header.bits != next.header.bits
}

/// Pause before a group the node refused (e.g. constraints it cannot satisfy) tries
/// again: a node that refuses these constraints would refuse again at once.
const GROUP_RETRY: Duration = Duration::from_secs(5);

/// Runs one group until `cancel` fires or the connection ends; when the node refuses
/// its calls, reports it and starts over after [`GROUP_RETRY`].
async fn run_group(
    node: NodeClient,
    mut spec: GroupSpec,
    reports: mpsc::Sender<GroupReport>,
    cancel: CancellationToken,
) {
    loop {
        let Err(error) = follow(&node, &spec, &reports, &cancel).await else {
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
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(GROUP_RETRY) => {}
        }
        spec.first_reason = Reason::Constraints;
    }
}

/// Follows the node for one group: a first template, then `waitNext` for each next one.
/// `Ok` when cancelled.
async fn follow(
    node: &NodeClient,
    spec: &GroupSpec,
    reports: &mpsc::Sender<GroupReport>,
    cancel: &CancellationToken,
) -> Result<(), NodeError> {
    let GroupSpec {
        constraints,
        first_reason,
        fees: FeePolicy {
            fee_delta,
            interval,
        },
        serial,
        ref client_calls,
    } = *spec;
    let publish = |template, reason| {
        let report = GroupReport::Publish {
            serial,
            constraints,
            template,
            reason,
            received_at: Instant::now(),
        };
        async move {
            let _ = reports.send(report).await;
        }
    };

    // The first template is what a client's constraints cost the node: it waits for a
    // place among the calls clients may cause at once, and keeps it until the node has
    // answered, even if the group is cancelled meanwhile (the node's call goes on).
    // Not `Mining.interrupt()` on cancel: it is node-wide and sticky, so it would cancel
    // another group's next `createNewBlock`. A template made after we left is released
    // by the IPC side as soon as its reply finds no one waiting.
    let place = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        place = take_client_call(client_calls) => place,
    };
    let first = {
        let node = node.clone();
        tokio::spawn(async move {
            let _place = place;
            node.create_new_block(create_options(constraints)).await
        })
    };
    let mut current = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        r = first => r.map_err(|_| NodeError::Disconnected)??,
    };
    publish(current.clone(), first_reason).await;
    let mut sent_fees = current.data().total_fees();
    let mut last_sent = Instant::now();
    // A fee template held back until `interval` has passed since the last one.
    let mut pending: Option<Template> = None;

    loop {
        let base = pending.clone().unwrap_or_else(|| current.clone());
        let deadline = last_sent + interval;
        let timeout = match pending {
            Some(_) => deadline.saturating_duration_since(Instant::now()),
            None => IDLE_WAIT,
        };
        let options = WaitOptions {
            timeout: timeout.max(Duration::from_millis(1)),
            fee_threshold: fee_delta,
        };
        let waited_from = Instant::now();
        let next = tokio::select! {
            _ = cancel.cancelled() => {
                let _ = base.interrupt_wait().await;
                return Ok(());
            }
            r = base.wait_next(options) => r?,
        };
        let now = Instant::now();
        match next {
            // A new tip, or new difficulty on the same tip (testnet's 20-minute
            // minimum-difficulty rule): either way the pool needs a SetNewPrevHash with
            // the new nBits, or its solutions would not match the template's header.
            Some(next) if needs_new_prev_hash(current.data(), next.data()) => {
                pending = None;
                current = next;
                sent_fees = current.data().total_fees();
                last_sent = now;
                publish(current.clone(), Reason::Tip).await;
                continue;
            }
            Some(next) if next.data().total_fees() >= sent_fees + fee_delta => {
                pending = Some(next);
            }
            Some(_) => {
                // Same tip and no fee rise worth sending (e.g. regtest's one-second
                // ticks while the tip is old): drop it and keep waiting.
                debug!("node offered a template with no real change");
            }
            None if waited_from.elapsed() < options.timeout / 2 => {
                // Null long before the timeout: the node is shutting down (its waits
                // return at once then). Do not spin until the socket closes.
                tokio::time::sleep(SHUTDOWN_BACKOFF).await;
            }
            None => {}
        }
        if now >= deadline {
            if let Some(p) = pending.take() {
                current = p;
                sent_fees = current.data().total_fees();
                last_sent = now;
                publish(current.clone(), Reason::Fees).await;
            }
        }
    }
}

/// Takes a place among the node calls clients may cause, counting a wait when none is free.
pub(crate) async fn take_client_call(
    places: &Arc<Semaphore>,
) -> Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError> {
    if places.available_permits() == 0 {
        crate::metrics::metrics()
            .limit_waits
            .with_label_values(&["max_node_calls"])
            .inc();
    }
    places.clone().acquire_owned().await
}

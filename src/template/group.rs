//! One constraint group: clients whose coinbase constraints are equal share one node
//! template per update. Its task follows the node with `waitNext` and reports what is
//! worth sending; it never polls.

use std::time::{Duration, Instant};

use bitcoin::Amount;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::api::Constraints;
use super::engine::Internal;
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

/// What a group task tells the engine.
pub(crate) enum GroupReport {
    Publish {
        serial: u64,
        constraints: Constraints,
        template: Template,
        reason: Reason,
        received_at: Instant,
    },
    Failed {
        serial: u64,
        generation: u64,
        constraints: Constraints,
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

/// What a group task is started with.
pub(crate) struct GroupSpec {
    pub constraints: Constraints,
    /// Labels the group's first template.
    pub first_reason: Reason,
    pub fee_delta: Amount,
    /// Minimum time between fee-driven templates.
    pub interval: Duration,
    /// The connection generation its reports belong to.
    pub generation: u64,
    /// Which task of the engine's for these constraints this is.
    pub serial: u64,
}

/// Pause after a `waitNext` that returned null early (a node shutting down).
const SHUTDOWN_BACKOFF: Duration = Duration::from_millis(250);

/// Whether `next` must go out as a future template with its own `SetNewPrevHash`.
fn needs_new_prev_hash(current: &TemplateData, next: &TemplateData) -> bool {
    current.header.prev_blockhash != next.header.prev_blockhash
        || current.header.bits != next.header.bits
}

/// Runs one group until `cancel` fires or the node fails.
pub(crate) async fn run_group(
    node: NodeClient,
    spec: GroupSpec,
    engine: mpsc::Sender<Internal>,
    cancel: CancellationToken,
) {
    let GroupSpec {
        constraints,
        first_reason,
        fee_delta,
        interval,
        generation,
        serial,
    } = spec;
    let report = |r| {
        let engine = engine.clone();
        async move {
            let _ = engine.send(Internal::Group(r)).await;
        }
    };
    let fail = |error| GroupReport::Failed {
        serial,
        generation,
        constraints,
        error,
    };
    let publish = |template, reason| GroupReport::Publish {
        serial,
        constraints,
        template,
        reason,
        received_at: Instant::now(),
    };

    // Not `Mining.interrupt()` on cancel: it is node-wide and sticky, so it would cancel
    // another group's next `createNewBlock`. A template made after we left is released
    // by the IPC side as soon as its reply finds no one waiting.
    let first = tokio::select! {
        _ = cancel.cancelled() => return,
        r = node.create_new_block(create_options(constraints)) => r,
    };
    let mut current = match first {
        Ok(t) => t,
        Err(e) => return report(fail(e)).await,
    };
    report(publish(current.clone(), first_reason)).await;
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
                return;
            }
            r = base.wait_next(options) => r,
        };
        let next = match next {
            Ok(next) => next,
            Err(e) => return report(fail(e)).await,
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
                report(publish(current.clone(), Reason::Tip)).await;
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
                report(publish(current.clone(), Reason::Fees)).await;
            }
        }
    }
}

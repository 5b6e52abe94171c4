//! Following a node's chain tip: one task per connection keeps a `waitTipChanged`
//! pending (on a node thread of its own) and reports every tip the node moves to —
//! higher, lower (`invalidateblock`, a node restarted on an older chain state) or
//! sideways (a reorg). With one node, the node decides what the tip is; with several,
//! [`super::best_tip`] picks among their reports.
//!
//! Each tip goes to the engine, which records the served tip (so it knows it before any
//! template built on it arrives) and then hands it to the group tasks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::BlockHash;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::store::TemplateStore;
use super::tip_board::TipBoard;
use crate::node::{NodeClient, NodeError, Tip};

pub(crate) use super::best_tip::NodeTip;

/// What the follower tells the engine.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TipReport {
    /// Which node's follower reports (its index in the configured list).
    pub node: usize,
    /// Which follower (one per connection) reports; see [`TipFollower::serial`].
    pub serial: u64,
    /// The node's new tip.
    pub tip: NodeTip,
}

/// How long one `waitTipChanged` may wait; on timeout the node answers with the
/// unchanged tip and the follower simply waits again. Short enough that a wait left
/// behind by a stopped follower frees its node thread soon.
const WAIT: Duration = Duration::from_secs(10);

/// Pause after an answer that makes no sense to wait on at once (an error, or null
/// before the connection closed: the node is shutting down).
const BACKOFF: Duration = Duration::from_millis(250);

/// The follower of one connection.
#[derive(Debug)]
pub(crate) struct TipFollower {
    /// Tells this follower's reports from an earlier connection's.
    pub serial: u64,
    cancel: CancellationToken,
}

impl TipFollower {
    /// Starts following `node`'s tip; reports go to `reports` tagged with a serial of
    /// this follower's own.
    pub fn start(
        (index, name): (usize, &str),
        node: NodeClient,
        (board, reports): (Arc<TipBoard>, mpsc::Sender<TipReport>),
        cancel: CancellationToken,
    ) -> Self {
        static SERIALS: AtomicU64 = AtomicU64::new(1);
        let serial = SERIALS.fetch_add(1, Ordering::Relaxed);
        board.set_follower(index, Some(serial));
        let task = follow(node, (index, serial), (board, reports), cancel.clone());
        tokio::spawn(tracing::Instrument::instrument(
            task,
            tracing::info_span!("tip", node = name),
        ));
        Self { serial, cancel }
    }
}

impl Drop for TipFollower {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Makes `tip` the store's tip: from now on, templates are current when built on it.
pub(crate) fn record<T: Clone>(store: &mut TemplateStore<T>, tip: NodeTip) {
    let Tip { hash, height } = tip.tip;
    if store.tip() == Some(hash) {
        return; // a reconnect to the same tip
    }
    let previous = store.set_tip(hash, height, tip.seen);
    info!(tip = %hash, height, "new chain tip");
    if previous.is_some_and(|(_, old)| old >= height) {
        warn!(
            height,
            "the node's tip is not higher than the one before (an invalidated block, a \
             reorg or a restart); following it"
        );
    }
}

/// Reports the node's tip (from `getTip`), then every change (`waitTipChanged`), until
/// `cancel` fires or the connection ends.
async fn follow(
    node: NodeClient,
    (index, serial): (usize, u64),
    (board, reports): (Arc<TipBoard>, mpsc::Sender<TipReport>),
    cancel: CancellationToken,
) {
    let mut current: Option<BlockHash> = None;
    loop {
        let asked = match current {
            None => node.tip().await,
            Some(hash) => tokio::select! {
                _ = cancel.cancelled() => return,
                r = node.wait_tip_changed(hash, WAIT) => r,
            },
        };
        if cancel.is_cancelled() {
            return;
        }
        match asked {
            Ok(Some(tip)) if Some(tip.hash) != current => {
                current = Some(tip.hash);
                let tip = NodeTip {
                    tip,
                    seen: Instant::now(),
                };
                debug!(hash = %tip.tip.hash, height = tip.tip.height, "the node moved its tip");
                if !board.report(index, serial, tip) {
                    return; // a follower of an earlier connection
                }
                // The engine first: it must know the tip before templates built on it.
                let report = TipReport {
                    node: index,
                    serial,
                    tip,
                };
                if reports.send(report).await.is_err() {
                    return;
                }
                board.wake_groups();
                continue;
            }
            // The wait timed out with the tip unchanged.
            Ok(Some(_)) => continue,
            Err(e) if is_gone(&e, &node) => return,
            Err(e) => warn!(error = %e, "cannot follow the node's tip; retrying"),
            // Null: interrupted or the node is shutting down; the connection will say.
            Ok(None) if node.is_closed() => return,
            Ok(None) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = node.closed() => return,
            _ = tokio::time::sleep(BACKOFF) => {}
        }
    }
}

fn is_gone(e: &NodeError, node: &NodeClient) -> bool {
    e.is_disconnect() || node.is_closed()
}

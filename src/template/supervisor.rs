//! The node connection's lifecycle: connect (retrying with backoff), wait out initial
//! block download, report the connection, probe that the node still answers, notice when
//! it ends, and connect again.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::node::{Endpoint, ExpectedChain, NodeClient, NodeError};

/// What the supervisor of node `node` (its index in the configured list) tells the engine.
#[derive(Debug)]
pub(crate) struct NodeReport {
    /// Which node.
    pub node: usize,
    /// What happened to it.
    pub event: NodeEvent,
}

/// What happened to one node's connection.
#[derive(Debug)]
pub(crate) enum NodeEvent {
    /// A connection is up and the node is out of initial block download.
    Connected(NodeClient),
    /// The connection reported last ended; a new one is being made.
    Lost,
    /// The connected node missed the deadline of the periodic probe (hung, stopped, a
    /// stalled disk). The connection is kept: a node that answers again carries on.
    Unresponsive(NodeError),
    /// The node answers the probe again after [`NodeEvent::Unresponsive`].
    Responsive,
    /// The node cannot be driven by this version (e.g. a v30 node), is on another chain, or
    /// its socket is not to be trusted; the supervisor stops.
    Unusable(NodeError),
}

/// Pause before reconnecting after a connection ended.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// Longest pause between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How often a node that cannot be reached is mentioned in the log.
const WAITING_LOG_EVERY: Duration = Duration::from_secs(5);

/// Pause between two liveness probes (`getTip`, answered within the node call timeout).
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(2);

/// How one node is reached and checked.
#[derive(Clone, Debug)]
pub(crate) struct NodeTarget {
    /// Its index in the configured list (tags its reports).
    pub index: usize,
    /// Where it is.
    pub endpoint: Endpoint,
    /// The chain it must be on.
    pub chain: ExpectedChain,
    /// Deadline of calls that are not waits.
    pub call_timeout: Duration,
}

/// Where one node's supervisor reports: the engine's channel, each event tagged with
/// the node's index.
struct Reports {
    node: usize,
    tx: mpsc::Sender<NodeReport>,
}

impl Reports {
    /// Sends `event`; false when the engine is gone.
    async fn send(&self, event: NodeEvent) -> bool {
        let report = NodeReport {
            node: self.node,
            event,
        };
        self.tx.send(report).await.is_ok()
    }
}

/// Keeps a connection to `target` until `shutdown`, reporting to `reports`.
pub(crate) async fn supervise(
    target: NodeTarget,
    reports: mpsc::Sender<NodeReport>,
    shutdown: CancellationToken,
) {
    let events = Reports {
        node: target.index,
        tx: reports,
    };
    let call_timeout = target.call_timeout;
    let mut first_delay = Duration::ZERO;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(first_delay) => {}
        }
        let node = match connect(&target, &shutdown).await {
            Some(Ok(node)) => node,
            Some(Err(e)) => {
                events.send(NodeEvent::Unusable(e)).await;
                return;
            }
            None => return,
        };
        if !events.send(NodeEvent::Connected(node.clone())).await {
            return;
        }
        if !probe_until_closed(&node, call_timeout, &events, &shutdown).await {
            return;
        }
        if !events.send(NodeEvent::Lost).await {
            return;
        }
        first_delay = RECONNECT_DELAY;
    }
}

/// Connects, retrying with backoff and saying so every few seconds, checks the chain,
/// then waits out IBD. `None` on shutdown; `Some(Err)` only for a node this version
/// cannot use, one on another chain, or a socket that is not to be trusted.
async fn connect(
    target: &NodeTarget,
    shutdown: &CancellationToken,
) -> Option<Result<NodeClient, NodeError>> {
    let mut delay = Duration::from_millis(100);
    let mut last_said = None::<Instant>;
    loop {
        if shutdown.is_cancelled() {
            return None;
        }
        let connected = NodeClient::connect_with_timeout(&target.endpoint, target.call_timeout);
        let checked = async {
            let node = connected.await?;
            let is_test = node.is_test_chain().await?;
            target.chain.check(&target.endpoint, is_test)?;
            Ok(node)
        };
        match checked.await {
            Ok(node) => match wait_out_ibd(&node, shutdown).await {
                Ok(()) => return Some(Ok(node)),
                Err(e) => debug!(error = %e, "lost the node during IBD"),
            },
            Err(
                e @ (NodeError::UnsupportedVersion { .. }
                | NodeError::UntrustedSocket { .. }
                | NodeError::WrongChain { .. }),
            ) => return Some(Err(e)),
            Err(e) => {
                if last_said.is_none_or(|t| t.elapsed() >= WAITING_LOG_EVERY) {
                    warn!(error = %e, "waiting for the node");
                    last_said = Some(Instant::now());
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_BACKOFF);
    }
}

/// Waits while the node is in initial block download, saying so once.
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

/// Probes `node` every [`PROBE_EVERY`] until its connection ends (`true`) or `shutdown`
/// (`false`), reporting when it stops answering within `call_timeout` and when it answers
/// again — each change once. A probe that overran stays pending (one call, not one more
/// every round): its answer is the news that the node is back.
async fn probe_until_closed(
    node: &NodeClient,
    call_timeout: Duration,
    events: &Reports,
    shutdown: &CancellationToken,
) -> bool {
    let mut answering = true;
    let mut pending = None;
    loop {
        if pending.is_none() {
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = node.closed() => return true,
                _ = tokio::time::sleep(PROBE_EVERY) => {}
            }
        }
        let probe = pending.get_or_insert_with(|| Box::pin(node.tip_unbounded()));
        let deadline = match answering {
            true => call_timeout,
            false => PROBE_EVERY,
        };
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = node.closed() => return true,
            outcome = tokio::time::timeout(deadline, probe) => outcome,
        };
        let event = match outcome {
            Err(_) if answering => {
                answering = false;
                NodeEvent::Unresponsive(NodeError::Timeout {
                    method: "getTip",
                    after: call_timeout,
                })
            }
            Err(_) => continue,
            Ok(answer) => {
                pending = None;
                match answer {
                    Ok(_) if !answering => {
                        answering = true;
                        NodeEvent::Responsive
                    }
                    Err(e) if !e.is_disconnect() => {
                        debug!(error = %e, "liveness probe failed");
                        continue;
                    }
                    _ => continue,
                }
            }
        };
        if !events.send(event).await {
            return false;
        }
    }
}

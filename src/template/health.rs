//! The live node connection and what the operator sees of it: the flags `/health` reads,
//! the node gauges, and one log line per change (connected, lost, stopped answering,
//! answers again).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::api::EngineStatus;
use crate::metrics::metrics;
use crate::node::{NodeClient, NodeError};

/// The live connection, with [`EngineStatus`] and the node gauges kept in step with it.
#[derive(Debug)]
pub(crate) struct NodeLink {
    status: Arc<EngineStatus>,
    /// The live connection; solutions whose template died with an earlier one read it.
    current: watch::Sender<Option<NodeClient>>,
    /// Whether a connection was up before (templates after a reconnect count as `tip`).
    connected_before: bool,
}

impl NodeLink {
    /// No connection yet; reports into `status`.
    pub fn new(status: Arc<EngineStatus>) -> Self {
        Self {
            status,
            current: watch::channel(None).0,
            connected_before: false,
        }
    }

    /// The live connection.
    pub fn current(&self) -> Option<NodeClient> {
        self.current.borrow().clone()
    }

    /// Follows the live connection.
    pub fn subscribe(&self) -> watch::Receiver<Option<NodeClient>> {
        self.current.subscribe()
    }

    /// `node` is up and answering. Returns whether an earlier connection was.
    pub fn connected(&mut self, node: NodeClient) -> bool {
        let line = node.line();
        info!(interface = line.label(), "node ready; serving templates");
        let m = metrics();
        m.node_connected.set(1);
        m.node_responsive.set(1);
        m.node_connects.inc();
        m.node_info.reset();
        m.node_info.with_label_values(&[line.label()]).set(1);
        crate::status::node_facts().connected(line.label());
        self.status.node_connected.store(true, Ordering::Relaxed);
        self.status
            .node_unresponsive
            .store(false, Ordering::Relaxed);
        self.current.send_replace(Some(node));
        std::mem::replace(&mut self.connected_before, true)
    }

    /// The connection ended; a new one is being made.
    pub fn lost(&self) {
        warn!("lost the node; clients stay connected, reconnecting");
        self.current.send_replace(None);
        self.down();
        crate::status::node_facts().lost();
        self.status.has_template.store(false, Ordering::Relaxed);
        // `templates_held` is not zeroed here: the old connection's templates are counted
        // down as their handles drop (the IPC thread releases each one once), and zeroing
        // first would drive the gauge negative.
    }

    /// The connected node missed the probe's deadline: unhealthy until it answers again
    /// and a fresh template is made.
    pub fn unresponsive(&self, e: &NodeError) {
        error!(error = %e, "the node stopped answering; clients stay connected, /health answers 503 until it answers again");
        self.status.node_unresponsive.store(true, Ordering::Relaxed);
        self.status.has_template.store(false, Ordering::Relaxed);
        metrics().node_responsive.set(0);
    }

    /// The node answers the probe again.
    pub fn responsive(&self) {
        info!("the node answers again; refreshing templates");
        self.status
            .node_unresponsive
            .store(false, Ordering::Relaxed);
        metrics().node_responsive.set(1);
    }

    /// A template of the live connection was published.
    pub fn template_ready(&self) {
        self.status.has_template.store(true, Ordering::Relaxed);
    }

    /// The engine stops: releases what the node still holds for us (after a moment for
    /// the group tasks to interrupt their waits).
    pub async fn stop(&self) {
        if let Some(node) = self.current.send_replace(None) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            node.release_all().await;
        }
        self.down();
    }

    fn down(&self) {
        self.status.node_connected.store(false, Ordering::Relaxed);
        metrics().node_connected.set(0);
        metrics().node_responsive.set(0);
    }
}

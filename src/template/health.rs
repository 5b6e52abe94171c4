//! The node connections and what the operator sees of them: the flags `/health` reads,
//! the per-node gauges and status lines, and one log line per change (connected, lost,
//! stopped answering, answers again).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::api::EngineStatus;
use crate::metrics::metrics;
use crate::node::{NodeClient, NodeError, NodeSpec};
use crate::status::node_facts;

/// A connected node, as the solution pipeline sees it.
#[derive(Clone, Debug)]
pub(crate) struct LiveNode {
    /// The node's name.
    pub name: Arc<str>,
    /// Its live connection.
    pub client: NodeClient,
    /// Whether it answers the periodic probe.
    pub responsive: bool,
}

/// The connected nodes, in the configured order.
pub(crate) type LiveNodes = Arc<Vec<LiveNode>>;

/// One node's connection, with its gauges and status line kept in step with it.
#[derive(Debug)]
pub(crate) struct NodeLink {
    /// The operator's name for the node.
    pub name: Arc<str>,
    current: Option<NodeClient>,
    responsive: bool,
    /// Whether a connection was up before (templates after a reconnect count as `tip`).
    connected_before: bool,
}

impl NodeLink {
    fn new(spec: &NodeSpec) -> Self {
        node_facts().register(&spec.name, &spec.endpoint.to_string());
        metrics().add_node(&spec.name);
        Self {
            name: spec.name.as_str().into(),
            current: None,
            responsive: false,
            connected_before: false,
        }
    }

    /// The live connection.
    pub fn current(&self) -> Option<NodeClient> {
        self.current.clone()
    }

    /// Connected and answering.
    pub fn healthy(&self) -> bool {
        self.current.is_some() && self.responsive
    }

    fn gauges(&self) {
        let m = metrics();
        let name = &*self.name;
        m.node_connected
            .with_label_values(&[name])
            .set(i64::from(self.current.is_some()));
        m.node_responsive
            .with_label_values(&[name])
            .set(i64::from(self.healthy()));
    }
}

/// Sets `sv2_tpd_node_info` of node `name` to its interface `line`.
fn show_line(name: &str, line: crate::node::NodeLine) {
    let info = &metrics().node_info;
    for other in ["v31.0", "v31.99", "v32"] {
        let _ = info.remove_label_values(&[name, other]);
    }
    info.with_label_values(&[name, line.label()]).set(1);
}

/// Every configured node's link, the live set for solutions, and [`EngineStatus`].
#[derive(Debug)]
pub(crate) struct NodeLinks {
    links: Vec<NodeLink>,
    status: Arc<EngineStatus>,
    live: watch::Sender<LiveNodes>,
}

impl NodeLinks {
    /// No connection yet to any of `nodes`; reports into `status`.
    pub fn new(nodes: &[NodeSpec], status: Arc<EngineStatus>) -> Self {
        Self {
            links: nodes.iter().map(NodeLink::new).collect(),
            status,
            live: watch::channel(Arc::new(Vec::new())).0,
        }
    }

    /// Node `i`'s link.
    pub fn get(&self, i: usize) -> &NodeLink {
        &self.links[i]
    }

    /// Follows the connected nodes.
    pub fn subscribe(&self) -> watch::Receiver<LiveNodes> {
        self.live.subscribe()
    }

    /// Node `i` is up and answering. Returns whether an earlier connection of it was.
    pub fn connected(&mut self, i: usize, node: NodeClient) -> bool {
        let line = node.line();
        let link = &mut self.links[i];
        info!(node = &*link.name, interface = line.label(), "node ready");
        metrics()
            .node_connects
            .with_label_values(&[&link.name])
            .inc();
        show_line(&link.name, line);
        node_facts().connected(&link.name, line.label());
        // The line may change once more (v32 shows itself on the first submit).
        let (name, mut lines) = (link.name.clone(), node.lines());
        tokio::spawn(async move {
            while lines.changed().await.is_ok() {
                let line = *lines.borrow_and_update();
                show_line(&name, line);
                node_facts().interface(&name, line.label());
            }
        });
        link.current = Some(node);
        link.responsive = true;
        link.gauges();
        let before = std::mem::replace(&mut link.connected_before, true);
        self.publish_live();
        before
    }

    /// Node `i`'s connection ended; a new one is being made.
    pub fn lost(&mut self, i: usize) {
        let link = &mut self.links[i];
        warn!(node = &*link.name, "lost the node; reconnecting");
        link.current = None;
        link.responsive = false;
        link.gauges();
        metrics()
            .node_tip_height
            .with_label_values(&[&link.name])
            .set(0);
        node_facts().lost(&link.name, Some("the connection ended".into()));
        self.publish_live();
        // `templates_held` is not zeroed here: the old connection's templates are counted
        // down as their handles drop (the IPC thread releases each one once).
    }

    /// Node `i` cannot be used (wrong chain, version or socket): said once, and it stays
    /// down.
    pub fn refused(&mut self, i: usize, e: &NodeError) {
        let link = &mut self.links[i];
        error!(node = &*link.name, error = %e, "cannot use this node; leaving it out");
        node_facts().lost(&link.name, Some(e.to_string()));
    }

    /// Node `i` missed the probe's deadline.
    pub fn unresponsive(&mut self, i: usize, e: &NodeError) {
        let link = &mut self.links[i];
        error!(node = &*link.name, error = %e, "the node stopped answering; clients stay connected");
        link.responsive = false;
        link.gauges();
        node_facts().responsive(&link.name, Some(e.to_string()));
        self.publish_live();
    }

    /// Node `i` answers the probe again.
    pub fn responsive(&mut self, i: usize) {
        let link = &mut self.links[i];
        info!(node = &*link.name, "the node answers again");
        link.responsive = true;
        link.gauges();
        node_facts().responsive(&link.name, None);
        self.publish_live();
    }

    /// Node `i` is on `tip`.
    pub fn tip(&self, i: usize, tip: crate::node::Tip) {
        let name = &*self.links[i].name;
        metrics()
            .node_tip_height
            .with_label_values(&[name])
            .set(i64::from(tip.height));
        node_facts().tip(name, tip.hash, tip.height);
    }

    /// Templates come from node `serving` now (none: no node serves), and each node's
    /// tip is current or not against `served`.
    pub fn serving(&self, serving: Option<usize>, current: impl Fn(usize) -> bool) {
        let m = metrics();
        for (i, link) in self.links.iter().enumerate() {
            let name = &*link.name;
            m.node_serving
                .with_label_values(&[name])
                .set(i64::from(serving == Some(i)));
            m.node_tip_current
                .with_label_values(&[name])
                .set(i64::from(current(i)));
        }
        node_facts().serving(serving.map(|i| &*self.links[i].name));
        self.health(serving);
    }

    /// Sets what `/health` reads: the serving node connected and answering.
    pub fn health(&self, serving: Option<usize>) {
        let link = serving.map(|i| &self.links[i]);
        let connected = link.is_some_and(|l| l.current.is_some());
        let answering = link.is_some_and(NodeLink::healthy);
        self.status
            .node_connected
            .store(connected, Ordering::Relaxed);
        self.status
            .node_unresponsive
            .store(!answering, Ordering::Relaxed);
        if !answering {
            self.status.has_template.store(false, Ordering::Relaxed);
        }
    }

    /// A template of the serving node was published.
    pub fn template_ready(&self) {
        self.status.has_template.store(true, Ordering::Relaxed);
    }

    fn publish_live(&self) {
        let live: Vec<LiveNode> = self
            .links
            .iter()
            .filter_map(|l| {
                l.current.clone().map(|client| LiveNode {
                    name: l.name.clone(),
                    client,
                    responsive: l.responsive,
                })
            })
            .collect();
        self.live.send_replace(Arc::new(live));
    }

    /// The engine stops: releases what every node still holds for us (after a moment
    /// for the group tasks to interrupt their waits).
    pub async fn stop(&mut self) {
        let nodes: Vec<NodeClient> = self
            .links
            .iter_mut()
            .filter_map(|l| l.current.take())
            .collect();
        if !nodes.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            for node in nodes {
                node.release_all().await;
            }
        }
        for link in &mut self.links {
            link.responsive = false;
            link.gauges();
        }
        self.publish_live();
        self.health(None);
    }
}

//! The daemon's status as `GET /status` serves it and `sv2-tpd status` prints it.
//!
//! Two sources feed it:
//! - [`StatusBoard`], one per daemon: its chain and node socket, and the SV2 sessions,
//!   which the server registers on connect and which unregister themselves when dropped;
//! - [`node_facts()`], process-wide like [`crate::metrics::metrics()`]: what the template
//!   engine last saw of the node (connected or since when not, interface line, tip, newest
//!   template). The engine reports to it with one-line calls.
//!
//! [`StatusBoard::snapshot`] joins both, plus counters from the metrics, into a
//! serializable [`Status`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bitcoin::BlockHash;
use serde::{Deserialize, Serialize};

use crate::metrics::metrics;

/// Everything `/status` reports, at one moment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The daemon's version.
    pub version: String,
    /// True while the node is connected and a current template exists (as `/health`).
    pub healthy: bool,
    /// Seconds since the daemon started.
    pub uptime_seconds: f64,
    /// The chain served (`main`, `testnet4`, `signet`, `regtest`).
    pub chain: String,
    /// The node whose templates are served (else the first configured) as the engine
    /// sees it.
    pub node: NodeStatus,
    /// Every configured node, in the configured order.
    #[serde(default)]
    pub nodes: Vec<NodeStatus>,
    /// The chain tip of the newest template, once there is one.
    pub tip: Option<TipStatus>,
    /// Seconds since the newest template was made, once there is one.
    pub newest_template_age_seconds: Option<f64>,
    /// Templates the node keeps alive for us.
    pub templates_held: i64,
    /// SV2 clients past the Noise handshake, oldest first.
    pub clients: Vec<ClientStatus>,
    /// Solutions the node accepted as blocks.
    pub blocks_found: u64,
    /// Solutions the node rejected.
    pub solutions_rejected: u64,
    /// Blocks that could not be handed to the node and were given up (node unavailable;
    /// in the solutions directory), or refused for want of a place (throttled; named in
    /// the log).
    pub solutions_undelivered: u64,
    /// Block submits the node has not answered within `node_call_timeout` and that are
    /// still waited for (never sent again while one runs).
    #[serde(default)]
    pub submits_overdue: i64,
}

/// One node's connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's name (`default` for the one node at `ipc_socket`).
    #[serde(default)]
    pub name: String,
    /// Where it is reached (`unix:PATH`, `tcp:HOST:PORT`).
    #[serde(default)]
    pub endpoint: String,
    /// The node's IPC socket (its endpoint, for a TCP one).
    pub socket: PathBuf,
    /// Whether the node answers the periodic probe (false while it is not connected).
    #[serde(default)]
    pub responsive: bool,
    /// The node's tip, once it named one on this connection.
    #[serde(default)]
    pub tip: Option<TipStatus>,
    /// Whether its tip is the one served to clients.
    #[serde(default)]
    pub current: bool,
    /// Whether clients get templates built by this node.
    #[serde(default)]
    pub serving: bool,
    /// The last thing that went wrong with it (a lost connection, a missed probe).
    #[serde(default)]
    pub last_error: Option<String>,
    /// Whether the IPC connection is up.
    pub connected: bool,
    /// The node's interface line (`v31.0`, `v31.99`, `v32`), once it was connected.
    pub interface: Option<String>,
    /// Unix time (seconds) since which `connected` holds: the last connect or loss, or
    /// the daemon's start if the node was never reached.
    pub since_unix: u64,
    /// Seconds since `since_unix`.
    pub since_seconds: f64,
    /// Whether the node has been connected at least once.
    pub ever_connected: bool,
}

/// A chain tip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TipStatus {
    /// Its height.
    pub height: u32,
    /// Its hash, in the usual display byte order (as `bitcoin-cli getbestblockhash`).
    pub hash: String,
}

/// One SV2 client session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientStatus {
    /// The client's address.
    pub peer: SocketAddr,
    /// Its `CoinbaseOutputConstraints`, once sent.
    pub constraints: Option<ClientConstraints>,
    /// Seconds since its Noise handshake completed.
    pub connected_seconds: f64,
}

/// A client's `CoinbaseOutputConstraints`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConstraints {
    /// Bytes its coinbase outputs add.
    pub max_additional_size: u32,
    /// Signature operations they add.
    pub max_additional_sigops: u16,
}

/// Locks `mutex`, taking over a poisoned lock (the data is plain facts, still usable).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix_seconds(at: Instant) -> u64 {
    let wall = SystemTime::now()
        .checked_sub(at.elapsed())
        .unwrap_or(UNIX_EPOCH);
    wall.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the template engine last saw of each node, and of the tip it serves.
#[derive(Debug)]
pub struct NodeFacts {
    state: Mutex<FactsState>,
}

#[derive(Debug, Default)]
struct FactsState {
    /// Every node, in the configured order.
    nodes: Vec<NodeState>,
    /// The tip of the newest template.
    tip: Option<(BlockHash, u32)>,
    newest_template: Option<Instant>,
}

#[derive(Debug)]
struct NodeState {
    name: String,
    endpoint: String,
    connected: bool,
    responsive: bool,
    ever_connected: bool,
    interface: Option<String>,
    since: Instant,
    tip: Option<(BlockHash, u32)>,
    serving: bool,
    last_error: Option<String>,
}

/// The process-wide node facts the engine reports to.
pub fn node_facts() -> &'static NodeFacts {
    static FACTS: LazyLock<NodeFacts> = LazyLock::new(|| NodeFacts {
        state: Mutex::new(FactsState::default()),
    });
    &FACTS
}

impl NodeFacts {
    /// Lists node `name` at `endpoint` (once; a second engine in the process reuses it).
    pub fn register(&self, name: &str, endpoint: &str) {
        let mut s = lock(&self.state);
        if s.nodes.iter().all(|n| n.name != name) {
            s.nodes.push(NodeState {
                name: name.to_string(),
                endpoint: endpoint.to_string(),
                connected: false,
                responsive: false,
                ever_connected: false,
                interface: None,
                since: Instant::now(),
                tip: None,
                serving: false,
                last_error: None,
            });
        }
    }

    fn with(&self, name: &str, f: impl FnOnce(&mut NodeState)) {
        if let Some(node) = lock(&self.state).nodes.iter_mut().find(|n| n.name == name) {
            f(node);
        }
    }

    /// Node `name` is connected and speaks interface `line`.
    pub fn connected(&self, name: &str, line: &str) {
        self.with(name, |s| {
            s.connected = true;
            s.responsive = true;
            s.ever_connected = true;
            s.interface = Some(line.to_string());
            s.since = Instant::now();
        });
    }

    /// Node `name` speaks interface `line` (learnt after connecting).
    pub fn interface(&self, name: &str, line: &str) {
        self.with(name, |s| s.interface = Some(line.to_string()));
    }

    /// The connection to node `name` was lost (`why`, when known).
    pub fn lost(&self, name: &str, why: Option<String>) {
        self.with(name, |s| {
            if s.connected {
                s.connected = false;
                s.since = Instant::now();
            }
            s.responsive = false;
            s.tip = None;
            s.serving = false;
            if why.is_some() {
                s.last_error = why;
            }
        });
    }

    /// Node `name` answers the probe (`None`) or stopped answering (`Some(why)`).
    pub fn responsive(&self, name: &str, failure: Option<String>) {
        self.with(name, |s| {
            s.responsive = failure.is_none();
            if failure.is_some() {
                s.last_error = failure;
            }
        });
    }

    /// Node `name`'s tip.
    pub fn tip(&self, name: &str, hash: BlockHash, height: u32) {
        self.with(name, |s| s.tip = Some((hash, height)));
    }

    /// Templates come from node `name` now (none: from no node).
    pub fn serving(&self, name: Option<&str>) {
        for node in lock(&self.state).nodes.iter_mut() {
            node.serving = Some(node.name.as_str()) == name;
        }
    }

    /// A template was made on tip `prev_hash` at `tip_height`.
    pub fn template_made(&self, prev_hash: BlockHash, tip_height: u32) {
        let mut s = lock(&self.state);
        s.tip = Some((prev_hash, tip_height));
        s.newest_template = Some(Instant::now());
    }
}

impl NodeState {
    fn status(&self, started: Instant, served: Option<BlockHash>) -> NodeStatus {
        // Before this daemon's engine reported anything, "since" is its start.
        let since = match self.ever_connected {
            true => self.since,
            false => started,
        };
        NodeStatus {
            name: self.name.clone(),
            endpoint: self.endpoint.clone(),
            socket: PathBuf::from(
                self.endpoint
                    .strip_prefix("unix:")
                    .unwrap_or(&self.endpoint),
            ),
            connected: self.connected,
            responsive: self.connected && self.responsive,
            interface: self.interface.clone(),
            since_unix: unix_seconds(since),
            since_seconds: since.elapsed().as_secs_f64(),
            ever_connected: self.ever_connected,
            tip: self.tip.map(|(hash, height)| TipStatus {
                height,
                hash: hash.to_string(),
            }),
            current: self.tip.is_some() && self.tip.map(|t| t.0) == served,
            serving: self.serving,
            last_error: self.last_error.clone(),
        }
    }
}

/// One daemon's status: what it serves and its SV2 sessions.
#[derive(Debug)]
pub struct StatusBoard {
    chain: String,
    socket: PathBuf,
    started: Instant,
    sessions: Mutex<Sessions>,
}

#[derive(Debug, Default)]
struct Sessions {
    next_id: u64,
    open: BTreeMap<u64, Session>,
}

#[derive(Debug)]
struct Session {
    peer: SocketAddr,
    constraints: Option<ClientConstraints>,
    connected: Instant,
}

impl StatusBoard {
    /// A board for a daemon serving `chain` from the node at `socket`.
    pub fn new(chain: impl Into<String>, socket: impl Into<PathBuf>) -> Arc<Self> {
        Arc::new(StatusBoard {
            chain: chain.into(),
            socket: socket.into(),
            started: Instant::now(),
            sessions: Mutex::new(Sessions::default()),
        })
    }

    /// Registers a session with `peer`; it is listed until the returned entry is dropped.
    pub fn session_opened(self: &Arc<Self>, peer: SocketAddr) -> SessionEntry {
        let mut sessions = lock(&self.sessions);
        let id = sessions.next_id;
        sessions.next_id += 1;
        sessions.open.insert(
            id,
            Session {
                peer,
                constraints: None,
                connected: Instant::now(),
            },
        );
        SessionEntry {
            board: self.clone(),
            id,
        }
    }

    /// The status now; `healthy` is the daemon's health check.
    pub fn snapshot(&self, healthy: bool) -> Status {
        let clients = lock(&self.sessions)
            .open
            .values()
            .map(|s| ClientStatus {
                peer: s.peer,
                constraints: s.constraints,
                connected_seconds: s.connected.elapsed().as_secs_f64(),
            })
            .collect();
        let facts = lock(&node_facts().state);
        let served = facts.tip.map(|(hash, _)| hash);
        let nodes: Vec<NodeStatus> = facts
            .nodes
            .iter()
            .map(|n| n.status(self.started, served))
            .collect();
        let node = nodes
            .iter()
            .find(|n| n.serving)
            .or(nodes.first())
            .cloned()
            .unwrap_or_else(|| NodeStatus {
                name: String::new(),
                endpoint: self.socket.display().to_string(),
                socket: self.socket.clone(),
                connected: false,
                responsive: false,
                interface: None,
                since_unix: unix_seconds(self.started),
                since_seconds: self.started.elapsed().as_secs_f64(),
                ever_connected: false,
                tip: None,
                current: false,
                serving: false,
                last_error: None,
            });
        let m = metrics();
        let solutions = |result: &str| m.solutions.with_label_values(&[result]).get();
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            healthy,
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            chain: self.chain.clone(),
            node,
            nodes,
            tip: facts.tip.map(|(hash, height)| TipStatus {
                height,
                hash: hash.to_string(),
            }),
            newest_template_age_seconds: facts.newest_template.map(|at| at.elapsed().as_secs_f64()),
            templates_held: m.templates_held.get(),
            clients,
            blocks_found: m.blocks_found.get(),
            solutions_rejected: solutions("rejected"),
            solutions_undelivered: solutions("node-unavailable")
                + solutions("released")
                + solutions("throttled"),
            submits_overdue: submits_overdue(),
        }
    }
}

/// Block submits (`submitSolution`, `submitBlock`) past `node_call_timeout` and still
/// waited for.
pub fn submits_overdue() -> i64 {
    let overdue = &metrics().node_calls_overdue;
    ["submitSolution", "submitBlock"]
        .iter()
        .map(|method| overdue.with_label_values(&[method]).get())
        .sum()
}

/// A session's line on the [`StatusBoard`]; removed when dropped.
#[derive(Debug)]
pub struct SessionEntry {
    board: Arc<StatusBoard>,
    id: u64,
}

impl SessionEntry {
    /// Records the client's `CoinbaseOutputConstraints`.
    pub fn set_constraints(&self, constraints: ClientConstraints) {
        if let Some(session) = lock(&self.board.sessions).open.get_mut(&self.id) {
            session.constraints = Some(constraints);
        }
    }
}

impl Drop for SessionEntry {
    fn drop(&mut self) {
        lock(&self.board.sessions).open.remove(&self.id);
    }
}

/// Formats `seconds` as `3d 4h`, `2h 5m`, `4m 2s` or `7.3s`.
pub fn human_duration(seconds: f64) -> String {
    let d = Duration::from_secs_f64(seconds.max(0.0));
    let s = d.as_secs();
    match s {
        0..60 => format!("{:.1}s", d.as_secs_f64()),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

impl NodeStatus {
    /// Connected or not, and for how long.
    fn state_text(&self) -> String {
        let ago = human_duration(self.since_seconds);
        match (self.connected, self.ever_connected) {
            (true, _) if !self.responsive => format!("NOT ANSWERING (connected for {ago})"),
            (true, _) => format!("connected for {ago}"),
            (false, true) => format!("DISCONNECTED for {ago}"),
            (false, false) => format!("not connected yet (waiting {ago})"),
        }
    }

    /// The node as one indented line of the multi-node status.
    fn line(&self) -> String {
        let tip = match &self.tip {
            Some(tip) => format!("tip {}", tip.height),
            None => "no tip".into(),
        };
        let role = match (self.serving, self.current) {
            (true, _) => ", serving",
            (false, true) => ", current",
            (false, false) if self.tip.is_some() => ", NOT CURRENT",
            _ => "",
        };
        let error = match (&self.last_error, self.responsive) {
            (Some(e), false) => format!("; last error: {e}"),
            _ => String::new(),
        };
        format!(
            "  {:<12} {} {}, {}, {tip}{role}{error}\n",
            self.name,
            self.endpoint,
            self.interface.as_deref().unwrap_or("-"),
            self.state_text(),
        )
    }
}

impl Status {
    /// The status as aligned `name: value` lines, for a terminal.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        fn row(out: &mut String, name: &str, value: String) {
            out.push_str(&format!("{:<23}{value}\n", format!("{name}:")));
        }
        row(
            &mut out,
            "status",
            if self.healthy { "healthy" } else { "UNHEALTHY" }.to_string(),
        );
        row(
            &mut out,
            "version",
            format!(
                "{} (up {})",
                self.version,
                human_duration(self.uptime_seconds)
            ),
        );
        row(&mut out, "chain", self.chain.clone());
        match self.nodes.len() {
            0 | 1 => {
                row(
                    &mut out,
                    "node socket",
                    self.node.socket.display().to_string(),
                );
                row(
                    &mut out,
                    "node interface",
                    self.node.interface.clone().unwrap_or_else(|| "-".into()),
                );
                row(&mut out, "node", self.node.state_text());
            }
            n => {
                let up = self.nodes.iter().filter(|n| n.responsive).count();
                row(&mut out, "nodes", format!("{up} of {n} answering"));
                for node in &self.nodes {
                    out.push_str(&node.line());
                }
            }
        }
        row(
            &mut out,
            "tip",
            match &self.tip {
                Some(tip) => format!("{} {}", tip.height, tip.hash),
                None => "-".into(),
            },
        );
        row(
            &mut out,
            "newest template",
            match self.newest_template_age_seconds {
                Some(age) => format!("{} old", human_duration(age)),
                None => "none yet".into(),
            },
        );
        row(&mut out, "templates held", self.templates_held.to_string());
        row(&mut out, "blocks found", self.blocks_found.to_string());
        row(
            &mut out,
            "solutions rejected",
            self.solutions_rejected.to_string(),
        );
        row(
            &mut out,
            "solutions undelivered",
            self.solutions_undelivered.to_string(),
        );
        if self.submits_overdue > 0 {
            row(
                &mut out,
                "submits overdue",
                format!(
                    "{} (the node has not answered yet; still waiting, not sent again)",
                    self.submits_overdue
                ),
            );
        }
        row(&mut out, "clients", self.clients.len().to_string());
        for client in &self.clients {
            let constraints = match client.constraints {
                Some(c) => format!(
                    "constraints {} B / {} sigops",
                    c.max_additional_size, c.max_additional_sigops
                ),
                None => "no constraints yet".into(),
            };
            out.push_str(&format!(
                "  {:<22} {constraints}, connected {}\n",
                client.peer.to_string(),
                human_duration(client.connected_seconds)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_come_and_go_with_their_entries() {
        let board = StatusBoard::new("regtest", "/tmp/node.sock");
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let entry = board.session_opened(peer);
        entry.set_constraints(ClientConstraints {
            max_additional_size: 100,
            max_additional_sigops: 4,
        });
        let status = board.snapshot(false);
        assert_eq!(status.clients.len(), 1);
        assert_eq!(status.clients[0].peer, peer);
        assert_eq!(
            status.clients[0].constraints,
            Some(ClientConstraints {
                max_additional_size: 100,
                max_additional_sigops: 4
            })
        );
        assert!(status.to_text().contains("127.0.0.1:4000"));
        drop(entry);
        assert!(board.snapshot(false).clients.is_empty());
    }

    #[test]
    fn several_nodes_get_a_line_each() {
        let node = |name: &str, serving: bool, connected: bool| NodeStatus {
            name: name.into(),
            endpoint: format!("unix:/{name}/node.sock"),
            socket: format!("/{name}/node.sock").into(),
            connected,
            responsive: connected,
            interface: connected.then(|| "v31.99".into()),
            since_unix: 0,
            since_seconds: 12.0,
            ever_connected: true,
            tip: connected.then(|| TipStatus {
                height: 7,
                hash: "00ab".into(),
            }),
            current: connected,
            serving,
            last_error: (!connected).then(|| "the connection ended".into()),
        };
        let board = StatusBoard::new("regtest", "/a/node.sock");
        let mut status = board.snapshot(true);
        status.nodes = vec![node("a", true, true), node("b", false, false)];
        let text = status.to_text();
        assert!(text.contains("1 of 2 answering"), "{text}");
        assert!(text.contains("tip 7, serving"), "{text}");
        assert!(
            text.contains("DISCONNECTED for 12.0s, no tip; last error: the connection ended"),
            "{text}"
        );
    }

    #[test]
    fn durations_read_like_a_person_would_write_them() {
        assert_eq!(human_duration(7.04), "7.0s");
        assert_eq!(human_duration(242.0), "4m 2s");
        assert_eq!(human_duration(7500.0), "2h 5m");
        assert_eq!(human_duration(360_000.0), "4d 4h");
    }
}

//! Prometheus metrics, one process-wide set under the `sv2_tpd_` prefix.
//!
//! Every room of the daemon records into [`metrics()`]; the HTTP listener renders
//! [`Metrics::render`] at `/metrics`. The registry also carries the standard `process_*`
//! series (on Linux) and `sv2_tpd_build_info`.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Labels of `sv2_tpd_connections_refused_total` (the SV2 listener's refusal reasons),
/// listed here so every series exists from the first scrape.
pub const REFUSAL_REASONS: [&str; 5] = [
    "max_clients",
    "per_ip",
    "evicted",
    "handshake_timeout",
    "handshake_failed",
];

/// Labels of `sv2_tpd_node_block_submits_total`'s `result`: what one node made of a
/// found block.
pub const NODE_SUBMIT_RESULTS: [&str; 6] = [
    "accepted",
    "duplicate",
    "stale",
    "rejected",
    "no-verdict",
    "unsupported",
];

/// All of the daemon's metrics, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// 1 while the IPC connection to the node is up, by `node`.
    pub node_connected: IntGaugeVec,
    /// 1 while the connected node answers the periodic probe within `node_call_timeout`,
    /// by `node`.
    pub node_responsive: IntGaugeVec,
    /// Always 1, labelled with the `node` and its interface line (`v31.0`, `v31.99`, `v32`).
    pub node_info: IntGaugeVec,
    /// Successful connections to the node (the first and every reconnect), by `node`.
    pub node_connects: IntCounterVec,
    /// 1 for the node whose templates clients get (it reported the served tip first).
    pub node_serving: IntGaugeVec,
    /// The height of each node's tip, by `node`.
    pub node_tip_height: IntGaugeVec,
    /// 1 while a node's tip is the tip served to clients, by `node`.
    pub node_tip_current: IntGaugeVec,
    /// Found blocks handed to each node, by `node` and its verdict (`accepted`,
    /// `duplicate`, `stale`, `rejected`, `no-verdict`, `unsupported`).
    pub node_block_submits: IntCounterVec,
    /// IPC call duration by method.
    pub ipc_call_seconds: HistogramVec,
    /// Templates received from the node by reason (`tip`, `full`, `fees`, `constraints`).
    pub templates_created: IntCounterVec,
    /// Templates the daemon asked the node to build, by kind (`empty`: no mempool
    /// selection; `full`): what the daemon costs the node under `cs_main`.
    pub node_template_builds: IntCounterVec,
    /// Templates currently held in the node on our behalf.
    pub templates_held: IntGauge,
    /// Bytes of the transactions cached for held templates, a shared list counted once.
    pub template_bytes_held: IntGauge,
    /// SV2 messages sent by message type.
    pub messages_sent: IntCounterVec,
    /// SV2 messages received by message type.
    pub messages_received: IntCounterVec,
    /// Unknown or out-of-order SV2 messages.
    pub messages_unexpected: IntCounter,
    /// Connected SV2 clients (after the Noise handshake).
    pub clients_connected: IntGauge,
    /// Failed Noise handshakes.
    pub handshake_failures: IntCounter,
    /// Connections refused, evicted or failed before their setup was done, by reason
    /// (`max_clients`, `per_ip`, `evicted`, `handshake_timeout`, `handshake_failed`).
    pub connections_refused: IntCounterVec,
    /// Connections holding a setup place (Noise, `SetupConnection`, first constraints);
    /// those still waiting for one are not counted.
    pub handshakes_pending: IntGauge,
    /// Set-up clients disconnected by a limit, by reason (`bad_messages`).
    pub clients_disconnected: IntCounterVec,
    /// Times a client-caused piece of work had to wait for a limit (`max_node_calls`,
    /// `max_tx_data_bytes_in_flight`).
    pub limit_waits: IntCounterVec,
    /// `CoinbaseOutputConstraints` after the first, by what came of them (`applied`,
    /// `deferred`, `superseded`, and `resent`: the group's current template sent again).
    pub constraint_changes: IntCounterVec,
    /// `RequestTransactionData` by result (`success`, `template-id-not-found`, `stale-template-id`).
    pub tx_data_requests: IntCounterVec,
    /// Solutions by result: blocks (`accepted`, `stale`, `rejected`, `node-unavailable`,
    /// `released`, `throttled`) and what is no block (`bad-pow`, `malformed`, `unknown-template`,
    /// `duplicate`).
    pub solutions: IntCounterVec,
    /// Calls that must not be abandoned (`submitSolution`, `submitBlock`, `getBlock`) still
    /// waited for past `node_call_timeout`, by method.
    pub node_calls_overdue: IntGaugeVec,
    /// Solutions handed to the engine without awaiting their verdict (a client beyond
    /// `max_solutions_in_flight_per_client`).
    pub solutions_unawaited: IntCounter,
    /// Blocks found (solutions the node accepted).
    pub blocks_found: IntCounter,
    /// From the node reporting a new tip to `SetNewPrevHash` being queued to clients.
    pub new_tip_to_prevhash_seconds: Histogram,
    /// From a group's `NewTemplate(future)` + `SetNewPrevHash` being queued to its
    /// sessions until the last of them has written it.
    pub pair_fanout_seconds: Histogram,
    /// Always 1, labelled with this build's `version`.
    pub build_info: IntGaugeVec,
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let m = Metrics {
            node_connected: IntGaugeVec::new(
                Opts::new(
                    "sv2_tpd_node_connected",
                    "1 while the IPC connection to the node is up",
                ),
                &["node"],
            )
            .expect("metric"),
            node_responsive: IntGaugeVec::new(
                Opts::new(
                    "sv2_tpd_node_responsive",
                    "1 while the connected node answers the periodic probe within node_call_timeout",
                ),
                &["node"],
            )
            .expect("metric"),
            node_info: IntGaugeVec::new(
                Opts::new("sv2_tpd_node_info", "The node's IPC interface line"),
                &["node", "interface"],
            )
            .expect("metric"),
            node_connects: IntCounterVec::new(
                Opts::new(
                    "sv2_tpd_node_connects_total",
                    "Successful IPC connections to the node, reconnects included",
                ),
                &["node"],
            )
            .expect("metric"),
            node_serving: IntGaugeVec::new(
                Opts::new(
                    "sv2_tpd_node_serving",
                    "1 for the node whose templates clients get (the first to report the served tip)",
                ),
                &["node"],
            )
            .expect("metric"),
            node_tip_height: IntGaugeVec::new(
                Opts::new("sv2_tpd_node_tip_height", "Height of the node's tip"),
                &["node"],
            )
            .expect("metric"),
            node_tip_current: IntGaugeVec::new(
                Opts::new(
                    "sv2_tpd_node_tip_current",
                    "1 while the node's tip is the tip served to clients",
                ),
                &["node"],
            )
            .expect("metric"),
            node_block_submits: IntCounterVec::new(
                Opts::new(
                    "sv2_tpd_node_block_submits_total",
                    "Found blocks handed to each node, by the node's verdict",
                ),
                &["node", "result"],
            )
            .expect("metric"),
            ipc_call_seconds: HistogramVec::new(
                HistogramOpts::new("sv2_tpd_ipc_call_duration_seconds", "IPC call duration")
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
                        30.0,
                    ]),
                &["method"],
            )
            .expect("metric"),
            templates_created: IntCounterVec::new(
                Opts::new(
                    "sv2_tpd_templates_created_total",
                    "Templates obtained from the node",
                ),
                &["reason"],
            )
            .expect("metric"),
            node_template_builds: IntCounterVec::new(
                Opts::new(
                    "sv2_tpd_node_template_builds_total",
                    "Templates the daemon asked the node to build, empty (no mempool selection) or full",
                ),
                &["kind"],
            )
            .expect("metric"),
            templates_held: IntGauge::new(
                "sv2_tpd_templates_held",
                "Templates the node keeps alive for us",
            )
            .expect("metric"),
            template_bytes_held: IntGauge::new(
                "sv2_tpd_template_bytes_held",
                "Bytes of cached template transactions held (a list shared by templates counted once)",
            )
            .expect("metric"),
            messages_sent: IntCounterVec::new(
                Opts::new("sv2_tpd_messages_sent_total", "SV2 messages sent"),
                &["type"],
            )
            .expect("metric"),
            messages_received: IntCounterVec::new(
                Opts::new("sv2_tpd_messages_received_total", "SV2 messages received"),
                &["type"],
            )
            .expect("metric"),
            messages_unexpected: IntCounter::new(
                "sv2_tpd_messages_unexpected_total",
                "Unknown or out-of-order SV2 messages received",
            )
            .expect("metric"),
            clients_connected: IntGauge::new("sv2_tpd_clients_connected", "SV2 clients connected")
                .expect("metric"),
            handshake_failures: IntCounter::new(
                "sv2_tpd_handshake_failures_total",
                "Failed Noise handshakes",
            )
            .expect("metric"),
            connections_refused: IntCounterVec::new(
                Opts::new(
                    "sv2_tpd_connections_refused_total",
                    "Connections refused, evicted or failed before their setup was done",
                ),
                &["reason"],
            )
            .expect("metric"),
            handshakes_pending: IntGauge::new(
                "sv2_tpd_handshakes_pending",
                "Connections holding a setup place (Noise, SetupConnection, first constraints)",
            )
            .expect("metric"),
            clients_disconnected: IntCounterVec::new(
                Opts::new(
                    "sv2_tpd_clients_disconnected_total",
                    "Set-up clients disconnected by a limit",
                ),
                &["reason"],
            )
            .expect("metric"),
            limit_waits: IntCounterVec::new(
                Opts::new(
                    "sv2_tpd_limit_waits_total",
                    "Client-caused work that waited for a limit to free up",
                ),
                &["limit"],
            )
            .expect("metric"),
            constraint_changes: IntCounterVec::new(
                Opts::new(
                    "sv2_tpd_constraint_changes_total",
                    "CoinbaseOutputConstraints subscriptions applied, deferred by the rate limit, or superseded while deferred, and current templates resent in answer",
                ),
                &["result"],
            )
            .expect("metric"),
            tx_data_requests: IntCounterVec::new(
                Opts::new(
                    "sv2_tpd_tx_data_requests_total",
                    "RequestTransactionData by result",
                ),
                &["result"],
            )
            .expect("metric"),
            solutions: IntCounterVec::new(
                Opts::new("sv2_tpd_solutions_total", "SubmitSolution by result"),
                &["result"],
            )
            .expect("metric"),
            node_calls_overdue: IntGaugeVec::new(
                Opts::new(
                    "sv2_tpd_node_calls_overdue",
                    "Calls that are never abandoned (submits, block reads) still waited for past node_call_timeout",
                ),
                &["method"],
            )
            .expect("metric"),
            solutions_unawaited: IntCounter::new(
                "sv2_tpd_solutions_unawaited_total",
                "Solutions handed on without awaiting their verdict (max_solutions_in_flight_per_client)",
            )
            .expect("metric"),
            blocks_found: IntCounter::new(
                "sv2_tpd_blocks_found_total",
                "Solutions the node accepted as blocks",
            )
            .expect("metric"),
            new_tip_to_prevhash_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "sv2_tpd_new_tip_to_prevhash_seconds",
                    "From the node reporting a new tip to SetNewPrevHash queued to clients",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
            )
            .expect("metric"),
            pair_fanout_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "sv2_tpd_pair_fanout_seconds",
                    "From a group's NewTemplate(future) and SetNewPrevHash queued to its sessions until the last has written them",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
                ]),
            )
            .expect("metric"),
            build_info: IntGaugeVec::new(
                Opts::new(
                    "sv2_tpd_build_info",
                    "Always 1; the running sv2-tpd version",
                ),
                &["version"],
            )
            .expect("metric"),
            registry,
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 31] = [
            Box::new(m.node_serving.clone()),
            Box::new(m.node_tip_height.clone()),
            Box::new(m.node_tip_current.clone()),
            Box::new(m.node_block_submits.clone()),
            Box::new(m.node_calls_overdue.clone()),
            Box::new(m.solutions_unawaited.clone()),
            Box::new(m.limit_waits.clone()),
            Box::new(m.node_connected.clone()),
            Box::new(m.node_responsive.clone()),
            Box::new(m.node_info.clone()),
            Box::new(m.node_connects.clone()),
            Box::new(m.ipc_call_seconds.clone()),
            Box::new(m.templates_created.clone()),
            Box::new(m.node_template_builds.clone()),
            Box::new(m.templates_held.clone()),
            Box::new(m.template_bytes_held.clone()),
            Box::new(m.messages_sent.clone()),
            Box::new(m.messages_received.clone()),
            Box::new(m.messages_unexpected.clone()),
            Box::new(m.clients_connected.clone()),
            Box::new(m.handshake_failures.clone()),
            Box::new(m.connections_refused.clone()),
            Box::new(m.handshakes_pending.clone()),
            Box::new(m.clients_disconnected.clone()),
            Box::new(m.constraint_changes.clone()),
            Box::new(m.tx_data_requests.clone()),
            Box::new(m.solutions.clone()),
            Box::new(m.blocks_found.clone()),
            Box::new(m.new_tip_to_prevhash_seconds.clone()),
            Box::new(m.pair_fanout_seconds.clone()),
            Box::new(m.build_info.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("unique metric names");
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // The standard `process_*` series (memory, fds, CPU, start time), read from /proc
        // at each scrape.
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric names");
        // Label values known up front, so every series exists from the first scrape.
        for reason in ["tip", "full", "fees", "constraints", "refresh"] {
            m.templates_created.with_label_values(&[reason]);
        }
        for reason in REFUSAL_REASONS {
            m.connections_refused.with_label_values(&[reason]);
        }
        for reason in ["bad_messages", "bad_solutions"] {
            m.clients_disconnected.with_label_values(&[reason]);
        }
        for limit in ["max_node_calls", "max_tx_data_bytes_in_flight"] {
            m.limit_waits.with_label_values(&[limit]);
        }
        for kind in ["empty", "full"] {
            m.node_template_builds.with_label_values(&[kind]);
        }
        for result in ["applied", "deferred", "superseded", "resent"] {
            m.constraint_changes.with_label_values(&[result]);
        }
        for result in [
            "success",
            "template-id-not-found",
            "stale-template-id",
            "throttled",
        ] {
            m.tx_data_requests.with_label_values(&[result]);
        }
        for result in [
            "accepted",
            "rejected",
            "stale",
            "unknown-template",
            "node-unavailable",
            "released",
            "throttled",
            "bad-pow",
            "duplicate",
            "malformed",
        ] {
            m.solutions.with_label_values(&[result]);
        }
        for sent in [
            "SetupConnectionSuccess",
            "SetupConnectionError",
            "NewTemplate",
            "SetNewPrevHash",
            "RequestTransactionDataSuccess",
            "RequestTransactionDataError",
        ] {
            m.messages_sent.with_label_values(&[sent]);
        }
        for received in [
            "SetupConnection",
            "CoinbaseOutputConstraints",
            "RequestTransactionData",
            "SubmitSolution",
        ] {
            m.messages_received.with_label_values(&[received]);
        }
        for method in ["submitSolution", "submitBlock", "getBlock"] {
            m.node_calls_overdue.with_label_values(&[method]);
        }
        for method in [
            "createNewBlock",
            "waitTipChanged",
            "getBlock",
            "submitSolution",
            "destroy",
        ] {
            m.ipc_call_seconds.with_label_values(&[method]);
        }
        m
    }

    /// Creates the per-node series of `node`, so each exists from the first scrape.
    pub fn add_node(&self, node: &str) {
        self.node_connected.with_label_values(&[node]);
        self.node_responsive.with_label_values(&[node]);
        self.node_connects.with_label_values(&[node]);
        self.node_serving.with_label_values(&[node]);
        self.node_tip_current.with_label_values(&[node]);
        for result in NODE_SUBMIT_RESULTS {
            self.node_block_submits.with_label_values(&[node, result]);
        }
    }

    /// The metrics in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

//! Runs the daemon: node client, template engine, SV2 server and metrics endpoint, until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bitcoin::Amount;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::status::StatusBoard;
use crate::sv2::{serve, ServerConfig, ServerError};
use crate::template::{self, EngineConfig, EngineError, EngineStatus};
use crate::{keys, metrics_http};

/// How long shutdown waits for each part before giving up on it.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// A running daemon: the engine, the SV2 server and the metrics endpoint.
pub struct Daemon {
    /// Where SV2 clients connect.
    pub sv2_addr: SocketAddr,
    /// Where `/metrics` and `/health` are served, unless switched off.
    pub metrics_addr: Option<SocketAddr>,
    /// The public key pools verify our certificates with.
    pub authority_pubkey: key_utils::Secp256k1PublicKey,
    /// The engine's health, as `/health` reports it.
    pub status: Arc<EngineStatus>,
    shutdown: CancellationToken,
    engine_task: JoinHandle<Result<(), EngineError>>,
    server: JoinHandle<Result<(), ServerError>>,
    metrics_task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Daemon {
    /// Loads the key, binds the listeners and starts every part. Fails when the key is
    /// unusable or a port is taken; a missing node is waited for, not an error.
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        let keys = keys::load_or_generate(&config.authority_key_path)
            .context("cannot load the SV2 authority key")?;
        let listen = config.sv2_listen();
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen for SV2 clients on {listen}"))?;
        let sv2_addr = listener.local_addr().unwrap_or(listen);
        info!(
            version = env!("CARGO_PKG_VERSION"),
            chain = %config.chain,
            nodes = %config.node_list().iter().map(|n| format!("{}={}", n.name, n.endpoint)).collect::<Vec<_>>().join(","),
            listen = %sv2_addr,
            authority_pubkey = %keys.authority_pubkey_string(),
            "sv2-tpd starting"
        );

        let shutdown = CancellationToken::new();
        let board = StatusBoard::new(config.chain.to_string(), config.ipc_socket.clone());
        let (engine, status, engine_task) = template::spawn(
            EngineConfig {
                nodes: config.node_list(),
                chain: config.chain.expected(),
                fee_delta: Amount::from_sat(config.fee_delta),
                template_interval: config.template_interval,
                stale_grace: config.stale_template_grace,
                tip_first: config.tip_first,
                solutions_dir: config.datadir.join("solutions"),
                max_solutions_in_flight: config.max_solutions_in_flight,
                max_node_calls: config.max_node_calls,
                node_call_timeout: config.node_call_timeout,
                max_templates_held: config.max_templates_held,
                max_template_bytes_held: config.max_template_bytes_held,
            },
            shutdown.clone(),
        );

        let (metrics_addr, metrics_task) = match config.metrics_bind {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for metrics on {addr}"))?;
                let bound = listener.local_addr().unwrap_or(addr);
                let status = status.clone();
                let health: metrics_http::HealthCheck = Arc::new(move || status.healthy());
                let task = tokio::spawn(metrics_http::serve_with_status(
                    listener,
                    health,
                    Some(board.clone()),
                    shutdown.clone().cancelled_owned(),
                ));
                (Some(bound), Some(task))
            }
            None => (None, None),
        };

        let server_config = ServerConfig {
            board,
            ..ServerConfig::from_config(sv2_addr, config)
        };
        let server = tokio::spawn(serve(
            listener,
            server_config,
            keys,
            engine,
            shutdown.clone(),
        ));
        Ok(Self {
            sv2_addr,
            metrics_addr,
            authority_pubkey: keys.authority_pubkey(),
            status,
            shutdown,
            engine_task,
            server,
            metrics_task,
        })
    }

    /// Resolves only if a part stops on its own: the node cannot be used (e.g. a v30
    /// node) or the server failed.
    pub async fn failed(&mut self) -> anyhow::Error {
        tokio::select! {
            result = &mut self.engine_task => match result {
                Ok(Ok(())) => anyhow::anyhow!("template engine stopped"),
                Ok(Err(e)) => anyhow::Error::new(e),
                Err(e) => anyhow::anyhow!("template engine crashed: {e}"),
            },
            result = &mut self.server => match result {
                Ok(Ok(())) => anyhow::anyhow!("SV2 server stopped"),
                Ok(Err(e)) => anyhow::Error::new(e).context("SV2 server stopped"),
                Err(e) => anyhow::anyhow!("SV2 server crashed: {e}"),
            },
        }
    }

    /// Stops accepting, closes sessions, interrupts the node's pending waits and
    /// releases every template held in the node.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if !self.server.is_finished()
            && tokio::time::timeout(STOP_GRACE, &mut self.server)
                .await
                .is_err()
        {
            warn!("SV2 sessions did not close in time");
        }
        if !self.engine_task.is_finished()
            && tokio::time::timeout(STOP_GRACE, &mut self.engine_task)
                .await
                .is_err()
        {
            warn!("the template engine did not stop in time");
        }
        if let Some(task) = self.metrics_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        info!("stopped");
    }
}

/// Runs the daemon with `config` until SIGINT/SIGTERM (then exits cleanly), or until it
/// cannot go on (the node speaks an unsupported interface, a port is taken, …).
pub async fn run(config: Config) -> anyhow::Result<()> {
    let mut daemon = Daemon::start(&config).await?;
    let outcome = tokio::select! {
        signal = stop_signal() => {
            info!(signal, "shutting down");
            Ok(())
        }
        e = daemon.failed() => Err(e),
    };
    daemon.stop().await;
    outcome
}

/// Resolves on SIGINT or SIGTERM with the signal's name.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot watch SIGTERM; stop with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

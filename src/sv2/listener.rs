//! Accepts TCP connections, runs the Noise handshake, and starts one session task per client.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use stratum_core::noise_sv2::Responder;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    keys::ServerKeys,
    metrics::metrics,
    status::StatusBoard,
    sv2::{session, transport},
    template::EngineHandle,
};

/// Default Template Distribution port on mainnet.
pub const DEFAULT_PORT_MAIN: u16 = 8442;
/// Default Template Distribution port on testnet3.
pub const DEFAULT_PORT_TESTNET: u16 = 18442;
/// Default Template Distribution port on testnet4.
pub const DEFAULT_PORT_TESTNET4: u16 = 48442;
/// Default Template Distribution port on signet.
pub const DEFAULT_PORT_SIGNET: u16 = 38442;
/// Default Template Distribution port on regtest.
pub const DEFAULT_PORT_REGTEST: u16 = 18447;

/// The default Template Distribution port for `network`.
pub fn default_port(network: bitcoin::Network) -> u16 {
    match network {
        bitcoin::Network::Bitcoin => DEFAULT_PORT_MAIN,
        bitcoin::Network::Testnet => DEFAULT_PORT_TESTNET,
        bitcoin::Network::Testnet4 => DEFAULT_PORT_TESTNET4,
        bitcoin::Network::Signet => DEFAULT_PORT_SIGNET,
        bitcoin::Network::Regtest => DEFAULT_PORT_REGTEST,
    }
}

/// How the server accepts clients.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The address the listener was bound to (for logs; [`serve`] takes a bound listener).
    pub bind: SocketAddr,
    /// Validity of the Noise certificate issued in each handshake.
    pub cert_validity: Duration,
    /// Time a client gets to finish the Noise handshake, and then again to send
    /// `SetupConnection`.
    pub handshake_timeout: Duration,
    /// Connections (handshaking or set up) served at once; more are closed on accept.
    pub max_clients: usize,
    /// Where sessions are listed for `/status`.
    pub board: Arc<StatusBoard>,
}

impl ServerConfig {
    /// Defaults for `bind`: certificates valid one hour, 10 s handshake timeout, 100 clients,
    /// a status board of its own.
    pub fn new(bind: SocketAddr) -> Self {
        ServerConfig {
            bind,
            cert_validity: Duration::from_secs(3600),
            handshake_timeout: Duration::from_secs(10),
            max_clients: 100,
            board: StatusBoard::new("unknown", "unknown"),
        }
    }
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// `noise_sv2` refused the authority key pair.
    #[error("authority key pair rejected by the Noise responder: {0}")]
    InvalidAuthorityKey(String),
    /// The certificate validity does not fit the certificate's 32-bit seconds field.
    #[error("certificate validity {0:?} is out of range")]
    CertValidity(Duration),
}

/// Serves the Template Distribution Protocol on `listener` until `shutdown` is cancelled, then
/// closes every session and returns once they have all ended.
pub async fn serve(
    listener: TcpListener,
    cfg: ServerConfig,
    keys: ServerKeys,
    engine: EngineHandle,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    if cfg.cert_validity.as_secs() > u64::from(u32::MAX) {
        return Err(ServerError::CertValidity(cfg.cert_validity));
    }
    let public = keys.authority_pubkey().into_bytes();
    let secret = keys.authority_secret().into_bytes();
    // Fail at start rather than on every handshake.
    Responder::from_authority_kp(&public, &secret, cfg.cert_validity)
        .map_err(|e| ServerError::InvalidAuthorityKey(format!("{e:?}")))?;
    info!(
        bind = %cfg.bind,
        authority_pubkey = %keys.authority_pubkey_string(),
        "SV2 Template Distribution server listening"
    );
    let slots = Arc::new(Semaphore::new(cfg.max_clients));
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Per-connection failures and descriptor exhaustion: back off briefly.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    warn!(%peer, max_clients = cfg.max_clients, "refusing connection: too many clients");
                    drop(stream);
                    continue;
                };
                let client = Client {
                    stream,
                    peer,
                    public,
                    secret,
                    cfg: cfg.clone(),
                    engine: engine.clone(),
                    shutdown: shutdown.child_token(),
                };
                tasks.spawn(async move {
                    client.run().await;
                    drop(slot);
                });
            }
        }
    }
    info!(sessions = tasks.len(), "SV2 server shutting down");
    while tasks.join_next().await.is_some() {}
    Ok(())
}

struct Client {
    stream: TcpStream,
    peer: SocketAddr,
    public: [u8; 32],
    secret: [u8; 32],
    cfg: ServerConfig,
    engine: EngineHandle,
    shutdown: CancellationToken,
}

impl Client {
    async fn run(self) {
        let peer = self.peer;
        if let Err(e) = self.stream.set_nodelay(true) {
            debug!(%peer, error = %e, "could not set TCP_NODELAY");
        }
        let handshake = transport::accept(
            self.stream,
            self.public,
            self.secret,
            self.cfg.cert_validity,
            self.cfg.handshake_timeout,
            session::MAX_CLIENT_FRAME_BYTES,
        );
        let (reader, writer) = tokio::select! {
            _ = self.shutdown.cancelled() => return,
            result = handshake => match result {
                Ok(halves) => halves,
                Err(e) => {
                    metrics().handshake_failures.inc();
                    warn!(%peer, error = %e, "noise handshake failed");
                    return;
                }
            },
        };
        debug!(%peer, "noise handshake done");
        let entry = self.cfg.board.session_opened(peer);
        session::run(
            peer,
            reader,
            writer,
            self.engine,
            self.cfg.handshake_timeout,
            self.shutdown,
            entry,
        )
        .await;
    }
}

//! Accepts TCP connections, admits them (see [`crate::sv2::admission`]), runs the Noise
//! handshake, and starts one session task per client.

use std::{io, mem::MaybeUninit, net::SocketAddr, sync::Arc, time::Duration};

use socket2::SockRef;
use stratum_core::noise_sv2::{Responder, ELLSWIFT_ENCODING_SIZE};
use tokio::{
    io::Interest,
    net::{TcpListener, TcpStream},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    config::{Chain, Config},
    keys::ServerKeys,
    metrics::metrics,
    ratelog::LogBudget,
    status::StatusBoard,
    sv2::{
        admission::{Admission, AdmissionLimits, Refusal, Ticket},
        session::{self, ByteBudget, SessionLimits},
        transport::{self, TransportError},
    },
    template::EngineHandle,
};

/// How often refused and failed connections are summed up in the log.
pub const REFUSAL_SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// How the server accepts clients.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The address the listener was bound to (for logs; [`serve`] takes a bound listener).
    pub bind: SocketAddr,
    /// Validity of the Noise certificate issued in each handshake.
    pub cert_validity: Duration,
    /// Time a client gets for its whole setup: Noise, `SetupConnection` and its first
    /// `CoinbaseOutputConstraints`, counted from when it got a setup place; also the
    /// time a connection may stay silent after TCP accept.
    pub handshake_timeout: Duration,
    /// Set-up clients served at once; connections in their setup do not count.
    pub max_clients: usize,
    /// Where sessions are listed for `/status`.
    pub board: Arc<StatusBoard>,
    /// Setups in progress at once; more connections wait for a place, in turn (see
    /// [`crate::sv2::admission`], floods included).
    pub max_pending_handshakes: usize,
    /// Connections from one non-loopback IP address at once; 0 for no limit.
    pub max_clients_per_ip: usize,
    /// Unknown or out-of-order messages tolerated per session; one more disconnects.
    pub max_bad_messages: u32,
    /// Solutions of one session whose verdict is awaited at once; more are sent on unawaited.
    pub max_solutions_in_flight_per_client: usize,
    /// Least time between two subscriptions of one session (constraint changes coalesce).
    pub constraints_interval: Duration,
    /// Solutions missing their target tolerated per session; one more disconnects.
    pub max_bad_solutions: u32,
    /// `RequestTransactionData` of one session answered at once.
    pub max_tx_data_requests_per_client: usize,
    /// Bytes of transaction-data answers in flight, every session together.
    pub tx_data_bytes: ByteBudget,
    /// How often refused and failed connections are summed up in one log line.
    pub refusal_summary_interval: Duration,
}

impl ServerConfig {
    /// The configuration keys' defaults (src/config/keys.rs) for `bind`, with a status
    /// board of its own.
    pub fn new(bind: SocketAddr) -> Self {
        let (defaults, _) = Config::defaults(Chain::Main, std::path::Path::new("/"));
        ServerConfig::from_config(bind, &defaults)
    }

    /// The server's part of `config` for `bind`, with a status board of its own.
    pub fn from_config(bind: SocketAddr, config: &Config) -> Self {
        ServerConfig {
            bind,
            cert_validity: config.cert_validity,
            handshake_timeout: config.handshake_timeout,
            max_clients: config.max_clients,
            board: StatusBoard::new("unknown", "unknown"),
            max_pending_handshakes: config.max_pending_handshakes,
            max_clients_per_ip: config.max_clients_per_ip,
            max_bad_messages: config.max_bad_messages,
            max_solutions_in_flight_per_client: config.max_solutions_in_flight_per_client,
            constraints_interval: config.constraints_interval,
            refusal_summary_interval: REFUSAL_SUMMARY_INTERVAL,
            max_bad_solutions: config.max_bad_solutions,
            max_tx_data_requests_per_client: config.max_tx_data_requests_per_client,
            tx_data_bytes: ByteBudget::new(config.max_tx_data_bytes_in_flight),
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
    let admission = Admission::new(AdmissionLimits {
        max_clients: cfg.max_clients,
        max_pending: cfg.max_pending_handshakes,
        max_per_ip: cfg.max_clients_per_ip,
    });
    let mut summary = tokio::time::interval_at(
        Instant::now() + cfg.refusal_summary_interval,
        cfg.refusal_summary_interval,
    );
    let mut tasks = JoinSet::new();
    let mut flood_log = LogBudget::new(1, cfg.refusal_summary_interval);
    loop {
        // Always accepting: a full waiting list evicts from, or closes, the address with
        // the most waiting connections (see `admission`), so no address can stop it.
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = summary.tick() => log_summary(&admission, cfg.refusal_summary_interval),
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
                let accepted_at = Instant::now();
                if admission.flooded() {
                    note_flood(&mut flood_log, &admission);
                }
                let Ok(ticket) = admission.admit(peer.ip(), &shutdown) else {
                    // Counted for the summary; closing the socket is the whole answer.
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
                    ticket,
                    deadline: accepted_at + cfg.handshake_timeout,
                };
                tasks.spawn(client.run());
            }
        }
    }
    info!(sessions = tasks.len(), "SV2 server shutting down");
    while tasks.join_next().await.is_some() {}
    log_summary(&admission, cfg.refusal_summary_interval);
    Ok(())
}

/// Says (at most once per summary period) that the waiting list is full and newcomers
/// now evict connections of the address with the most of them, or are closed.
fn note_flood(budget: &mut LogBudget, admission: &Admission) {
    if budget.hit(std::time::Instant::now()).log {
        warn!(
            pending = admission.pending(),
            in_setup = admission.in_setup(),
            "too many connections waiting for a setup place; newcomers now evict \
             connections of the address with the most of them, silent ones first"
        );
    }
}

/// One log line with the connections refused or failed since the last one, if any.
fn log_summary(admission: &Admission, period: Duration) {
    let counts = admission.take_summary();
    if counts.is_empty() {
        return;
    }
    let count = |r: Refusal| counts.get(&r).copied().unwrap_or(0);
    warn!(
        period_secs = period.as_secs(),
        max_clients = count(Refusal::MaxClients),
        per_ip = count(Refusal::PerIp),
        evicted = count(Refusal::Evicted),
        handshake_timeout = count(Refusal::HandshakeTimeout),
        handshake_failed = count(Refusal::HandshakeFailed),
        pending = admission.pending(),
        established = admission.established(),
        "connections refused or dropped before their setup was done"
    );
}

struct Client {
    stream: TcpStream,
    peer: SocketAddr,
    public: [u8; 32],
    secret: [u8; 32],
    cfg: ServerConfig,
    engine: EngineHandle,
    ticket: Ticket,
    deadline: Instant,
}

impl Client {
    async fn run(mut self) {
        let peer = self.peer;
        if let Err(e) = self.stream.set_nodelay(true) {
            debug!(%peer, error = %e, "could not set TCP_NODELAY");
        }
        let cancel = self.ticket.token().clone();
        // Until its whole Noise act 1 has arrived the connection is silent, which a flood
        // evicts first (see `admission`); it has `handshake_timeout` to send it.
        let first = tokio::select! {
            _ = cancel.cancelled() => return,
            first = tokio::time::timeout_at(self.deadline, peek_act_one(&self.stream)) => first,
        };
        match first {
            Ok(Ok(true)) => self.ticket.heard_from(),
            // A part of act 1 and no more is a failed Noise handshake; nothing at all is not.
            Ok(_) => {
                if sent_something(&self.stream) {
                    metrics().handshake_failures.inc();
                }
                return self.ticket.record(Refusal::HandshakeFailed);
            }
            Err(_) => {
                if sent_something(&self.stream) {
                    metrics().handshake_failures.inc();
                }
                return self.ticket.record(Refusal::HandshakeTimeout);
            }
        }
        // Then a setup place, in turn; the setup's time counts from here.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = self.ticket.take_place() => {}
        }
        self.deadline = Instant::now() + self.cfg.handshake_timeout;
        let handshake = transport::accept(
            self.stream,
            self.public,
            self.secret,
            self.cfg.cert_validity,
            self.deadline.saturating_duration_since(Instant::now()),
            session::MAX_CLIENT_FRAME_BYTES,
        );
        let (reader, writer) = tokio::select! {
            // Shutdown or eviction (counted when it happened).
            _ = cancel.cancelled() => return,
            result = handshake => match result {
                Ok(halves) => halves,
                Err(e) => {
                    let refusal = match e {
                        TransportError::HandshakeTimeout(_) => Refusal::HandshakeTimeout,
                        _ => Refusal::HandshakeFailed,
                    };
                    metrics().handshake_failures.inc();
                    self.ticket.record(refusal);
                    debug!(%peer, error = %e, "noise handshake failed");
                    return;
                }
            },
        };
        debug!(%peer, "noise handshake done");
        let limits = SessionLimits {
            setup_deadline: self.deadline,
            max_bad_messages: self.cfg.max_bad_messages,
            max_solutions_in_flight: self.cfg.max_solutions_in_flight_per_client,
            constraints_interval: self.cfg.constraints_interval,
            max_bad_solutions: self.cfg.max_bad_solutions,
            max_tx_data_requests: self.cfg.max_tx_data_requests_per_client,
            tx_data_bytes: self.cfg.tx_data_bytes.clone(),
        };
        let entry = self.cfg.board.session_opened(peer);
        session::run(
            peer,
            reader,
            writer,
            self.engine,
            limits,
            self.ticket,
            entry,
        )
        .await;
    }
}

/// Waits until the client's whole first Noise message (its act 1: a 64-byte ElligatorSwift
/// key, no frame header) has arrived, without reading it. `Ok(false)` if the peer closed
/// its side before sending all of it.
async fn peek_act_one(stream: &TcpStream) -> io::Result<bool> {
    let mut act_one = [MaybeUninit::<u8>::uninit(); ELLSWIFT_ENCODING_SIZE];
    loop {
        let ready = stream.ready(Interest::READABLE).await?;
        let peeked = stream.try_io(Interest::READABLE, || {
            match SockRef::from(stream).peek(&mut act_one)? {
                ELLSWIFT_ENCODING_SIZE => Ok(true),
                0 => Ok(false),
                _ if ready.is_read_closed() => Ok(false),
                // Part of it: wait for more bytes (this clears the readiness).
                _ => Err(io::ErrorKind::WouldBlock.into()),
            }
        });
        match peeked {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            done => return done,
        }
    }
}

/// Whether bytes the server has not read yet wait on `stream` (without waiting for any).
fn sent_something(stream: &TcpStream) -> bool {
    let mut one = [MaybeUninit::<u8>::uninit(); 1];
    SockRef::from(stream).peek(&mut one).is_ok_and(|n| n > 0)
}

//! One Template Distribution client, from the end of its Noise handshake until it leaves.
//!
//! The session reads frames and acts on what [`protocol::Machine`] decides (see
//! [`crate::sv2::protocol`] for the rules), while forwarding the engine's template events in
//! the order the engine sent them. Its own limits, so that one client cannot make the daemon
//! do unbounded work:
//! - the setup (`SetupConnection` and the first `CoinbaseOutputConstraints`) must be done by
//!   the deadline the listener set when it accepted the connection (`handshake_timeout`);
//!   the first constraints take one of the `max_clients` places;
//! - bad messages are counted, logged a few at a time with a periodic summary, and more than
//!   `max_bad_messages` close the connection;
//! - at most `max_solutions_in_flight_per_client` solutions wait for the node at once; more
//!   are dropped and counted as `sv2_tpd_solutions_total{result="throttled"}`;
//! - constraint changes are applied at most once per [`SessionLimits::constraints_interval`];
//!   changes within that window are coalesced, the latest winning when it ends;
//! - a frame that fails to decrypt or is over [`MAX_CLIENT_FRAME_BYTES`] closes the
//!   connection.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use stratum_core::{
    binary_sv2::{Seq064K, Str0255Owned, B016M, B064K},
    codec_sv2::MessageFrame,
    common_messages_sv2::{SetupConnectionErrorOwned, SetupConnectionSuccess},
    parsers_sv2::{
        message_type_to_name, CommonMessagesOwned, TemplateDistribution, TemplateDistributionOwned,
    },
    template_distribution_sv2::{
        RequestTransactionDataErrorOwned, RequestTransactionDataSuccess, SubmitSolutionOwned,
    },
};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

pub use crate::sv2::protocol::PROTOCOL_VERSION;
use crate::{
    metrics::metrics,
    sv2::{
        admission::{Refusal, Ticket},
        protocol::{self, Action, BadMessage, CloseReason, SetupInfo},
        ratelog::LogBudget,
        transport::{Frame, FrameReader, FrameWriter, TransportError},
    },
    template::{Constraints, EngineHandle, SolutionOutcome, TemplateEvent, TransactionData},
};

/// Largest frame (encrypted bytes, header included) accepted from a client. The largest valid
/// client message, `SubmitSolution` with a 64 KiB coinbase, is about 65.6 KB encrypted.
pub const MAX_CLIENT_FRAME_BYTES: usize = 128 * 1024;

/// Full log lines per kind of misbehaviour per [`LOG_PERIOD`]; the rest are summed up.
const LOG_BURST: u32 = 3;
/// Period of the per-session log budget.
const LOG_PERIOD: Duration = Duration::from_secs(60);

/// What one session may make the daemon do.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    /// When the setup (through the first `CoinbaseOutputConstraints`) must be done.
    pub setup_deadline: tokio::time::Instant,
    /// Bad messages tolerated; one more closes the connection.
    pub max_bad_messages: u32,
    /// Solutions waiting for the node at once.
    pub max_solutions_in_flight: usize,
    /// Least time between two subscriptions of this session.
    pub constraints_interval: Duration,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The connection failed or the client sent something that ends it.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The client broke the protocol.
    #[error(transparent)]
    Protocol(#[from] CloseReason),
    /// The setup was not done in time.
    #[error("setup not done within handshake_timeout")]
    SetupTimeout,
    /// The client's `SetupConnection` was refused with this error code.
    #[error("SetupConnection refused: {0}")]
    SetupRefused(&'static str),
    /// All `max_clients` places were taken when the setup finished.
    #[error("no client place left (max_clients)")]
    NoPlace(Refusal),
    /// A message could not be encoded (a bug or an out-of-range value from the engine).
    #[error("could not encode {name}: {reason}")]
    Encode {
        /// The message name.
        name: &'static str,
        /// What the encoder said.
        reason: String,
    },
    /// The engine dropped this session's event stream (it fell too far behind) or stopped.
    #[error("template engine ended the subscription")]
    EngineGone,
}

/// Serves one client until it leaves, misbehaves, is evicted or the ticket's token fires.
/// Connections that end before their setup is done are counted in the admission summary
/// and logged at debug level only; set-up sessions log how they ended.
pub async fn run(
    peer: SocketAddr,
    reader: FrameReader,
    writer: FrameWriter,
    engine: EngineHandle,
    limits: SessionLimits,
    ticket: Ticket,
) {
    let span = tracing::info_span!("sv2_session", %peer);
    async move {
        metrics().clients_connected.inc();
        let cancel = ticket.token().clone();
        let mut session = Session {
            reader,
            writer,
            engine,
            events: None,
            machine: protocol::Machine::new(limits.max_bad_messages),
            limits,
            ticket,
            constraints: None,
            deferred: None,
            next_subscribe: tokio::time::Instant::now(),
            solution_slots: Arc::new(Semaphore::new(limits.max_solutions_in_flight)),
            bad_log: LogBudget::new(LOG_BURST, LOG_PERIOD),
            throttle_log: LogBudget::new(LOG_BURST, LOG_PERIOD),
        };
        let result = session.serve(&cancel).await;
        session.flush_logs();
        if session.ticket.is_established() {
            match result {
                Ok(()) => info!("session ended"),
                Err(SessionError::Transport(TransportError::Closed)) => {
                    info!("client disconnected")
                }
                Err(e) => warn!(error = %e, "session closed"),
            }
        } else {
            // Counted for the listener's periodic summary instead of a line each.
            match &result {
                Ok(()) | Err(SessionError::NoPlace(_)) => {}
                Err(SessionError::SetupTimeout) => session.ticket.record(Refusal::HandshakeTimeout),
                Err(_) => session.ticket.record(Refusal::HandshakeFailed),
            }
            debug!(result = ?result.err(), "connection closed before its setup was done");
        }
        metrics().clients_connected.dec();
    }
    .instrument(span)
    .await
}

struct Session {
    reader: FrameReader,
    writer: FrameWriter,
    engine: EngineHandle,
    events: Option<mpsc::Receiver<TemplateEvent>>,
    machine: protocol::Machine,
    limits: SessionLimits,
    ticket: Ticket,
    // The constraints subscribed with, and a newer value waiting for `next_subscribe`.
    constraints: Option<Constraints>,
    deferred: Option<Constraints>,
    next_subscribe: tokio::time::Instant,
    solution_slots: Arc<Semaphore>,
    bad_log: LogBudget,
    throttle_log: LogBudget,
}

/// What the main loop woke up for.
enum Wake {
    Shutdown,
    SetupTimeout,
    DeferredConstraints,
    Frame(Result<Frame, TransportError>),
    Event(Option<TemplateEvent>),
}

impl Session {
    async fn serve(&mut self, cancel: &CancellationToken) -> Result<(), SessionError> {
        loop {
            let established = self.ticket.is_established();
            let wake = tokio::select! {
                biased;
                _ = cancel.cancelled() => Wake::Shutdown,
                _ = tokio::time::sleep_until(self.limits.setup_deadline), if !established => {
                    Wake::SetupTimeout
                }
                event = next_event(&mut self.events) => Wake::Event(event),
                _ = tokio::time::sleep_until(self.next_subscribe), if self.deferred.is_some() => {
                    Wake::DeferredConstraints
                }
                frame = self.reader.read_frame() => Wake::Frame(frame),
            };
            match wake {
                Wake::Shutdown => return Ok(()),
                Wake::SetupTimeout => return Err(SessionError::SetupTimeout),
                Wake::Event(Some(event)) => self.forward(event).await?,
                Wake::Event(None) => return Err(SessionError::EngineGone),
                Wake::DeferredConstraints => {
                    if let Some(constraints) = self.deferred.take() {
                        self.subscribe(constraints).await?;
                    }
                }
                Wake::Frame(frame) => self.handle(frame.map_err(count_bad_frame)?).await?,
            }
        }
    }

    async fn handle(&mut self, mut frame: Frame) -> Result<(), SessionError> {
        let header = frame.header();
        let (msg_type, extension_type) = (header.msg_type(), header.ext_type_without_channel_msg());
        count_received(msg_type, extension_type);
        let action = self
            .machine
            .on_frame(extension_type, msg_type, frame.payload());
        if action.is_unexpected() {
            metrics().messages_unexpected.inc();
        }
        match action {
            Action::AcceptSetup(info) => self.accept_setup(info).await,
            Action::RefuseSetup(code) => self.refuse_setup(code).await,
            Action::Subscribe {
                constraints,
                first: true,
            } => {
                self.ticket.establish().map_err(SessionError::NoPlace)?;
                info!(
                    max_additional_size = constraints.max_additional_size,
                    max_additional_sigops = constraints.max_additional_sigops,
                    "setup done: CoinbaseOutputConstraints"
                );
                self.subscribe(constraints).await
            }
            Action::Subscribe {
                constraints,
                first: false,
            } => self.change_constraints(constraints).await,
            Action::TransactionData { template_id } => self.transaction_data(template_id).await,
            Action::SubmitSolution(solution) => {
                self.submit_solution(solution);
                Ok(())
            }
            Action::Ignore(bad) => {
                self.log_bad_message(bad);
                Ok(())
            }
            Action::Close(reason) => {
                if matches!(reason, CloseReason::TooManyBadMessages { .. }) {
                    metrics()
                        .clients_disconnected
                        .with_label_values(&["bad_messages"])
                        .inc();
                }
                Err(reason.into())
            }
        }
    }

    async fn accept_setup(&mut self, setup: SetupInfo) -> Result<(), SessionError> {
        debug!(
            vendor = %setup.vendor,
            hardware = %setup.hardware_version,
            firmware = %setup.firmware,
            "SetupConnection accepted"
        );
        let success = CommonMessagesOwned::SetupConnectionSuccess(SetupConnectionSuccess {
            used_version: PROTOCOL_VERSION,
            flags: 0,
        });
        self.send(success, "SetupConnectionSuccess").await
    }

    fn log_bad_message(&mut self, bad: BadMessage) {
        let verdict = self.bad_log.hit(Instant::now());
        if let Some(suppressed) = verdict.suppressed {
            warn!(suppressed, "more unexpected messages ignored");
        }
        if verdict.log {
            warn!(
                message = ?bad,
                count = self.machine.bad_messages(),
                limit = self.limits.max_bad_messages,
                "ignoring an unexpected message"
            );
        }
    }

    fn flush_logs(&mut self) {
        if let Some(suppressed) = self.bad_log.finish() {
            warn!(suppressed, "more unexpected messages ignored");
        }
        if let Some(suppressed) = self.throttle_log.finish() {
            warn!(suppressed, "more solutions dropped: too many in flight");
        }
    }

    /// A later `CoinbaseOutputConstraints`: applied at once if the session's last
    /// subscription is old enough, else kept (replacing any value already waiting) until
    /// it is.
    async fn change_constraints(&mut self, constraints: Constraints) -> Result<(), SessionError> {
        if self.constraints == Some(constraints) {
            // Back to what is subscribed: nothing to change, nothing waiting.
            if self.deferred.take().is_some() {
                count_constraints("superseded");
            }
            return Ok(());
        }
        if tokio::time::Instant::now() >= self.next_subscribe {
            return self.subscribe(constraints).await;
        }
        match self.deferred.replace(constraints) {
            Some(_) => count_constraints("superseded"),
            None => count_constraints("deferred"),
        }
        Ok(())
    }

    async fn subscribe(&mut self, constraints: Constraints) -> Result<(), SessionError> {
        debug!(
            max_additional_size = constraints.max_additional_size,
            max_additional_sigops = constraints.max_additional_sigops,
            "subscribing"
        );
        count_constraints("applied");
        self.constraints = Some(constraints);
        self.next_subscribe = tokio::time::Instant::now() + self.limits.constraints_interval;
        // Dropping the old receiver ends the old subscription.
        self.events = None;
        let events = self
            .engine
            .subscribe(constraints)
            .await
            .map_err(|_| SessionError::EngineGone)?;
        self.events = Some(events);
        Ok(())
    }

    async fn refuse_setup(&mut self, code: &'static str) -> Result<(), SessionError> {
        let error_code = Str0255Owned::try_from(code).map_err(|e| SessionError::Encode {
            name: "SetupConnectionError",
            reason: format!("{e:?}"),
        })?;
        let error = CommonMessagesOwned::SetupConnectionError(SetupConnectionErrorOwned {
            flags: 0,
            error_code,
        });
        self.send(error, "SetupConnectionError").await?;
        // Best effort: the connection is closed right after either way.
        let _ = self.writer.shutdown().await;
        Err(SessionError::SetupRefused(code))
    }

    async fn transaction_data(&mut self, template_id: u64) -> Result<(), SessionError> {
        let answer = self
            .engine
            .transaction_data(template_id)
            .await
            .map_err(|_| SessionError::EngineGone)?;
        match answer {
            Ok(data) => {
                metrics()
                    .tx_data_requests
                    .with_label_values(&["success"])
                    .inc();
                debug!(
                    template_id,
                    txs = data.transactions.len(),
                    "RequestTransactionData"
                );
                self.send_transaction_data(template_id, &data).await
            }
            Err(e) => {
                metrics()
                    .tx_data_requests
                    .with_label_values(&[e.code()])
                    .inc();
                debug!(
                    template_id,
                    error = e.code(),
                    "RequestTransactionData refused"
                );
                let error_code =
                    Str0255Owned::try_from(e.code()).map_err(|e| SessionError::Encode {
                        name: "RequestTransactionDataError",
                        reason: format!("{e:?}"),
                    })?;
                let msg = TemplateDistributionOwned::RequestTransactionDataError(
                    RequestTransactionDataErrorOwned {
                        template_id,
                        error_code,
                    },
                );
                self.send(msg, "RequestTransactionDataError").await
            }
        }
    }

    // Borrows the engine's transactions instead of copying them into owned message types.
    async fn send_transaction_data(
        &mut self,
        template_id: u64,
        data: &TransactionData,
    ) -> Result<(), SessionError> {
        const NAME: &str = "RequestTransactionDataSuccess";
        let encode_err = |e: stratum_core::binary_sv2::Error| SessionError::Encode {
            name: NAME,
            reason: format!("{e:?}"),
        };
        let transactions = data
            .transactions
            .iter()
            .map(|tx| B016M::new(tx))
            .collect::<Result<Vec<_>, _>>()
            .map_err(encode_err)?;
        let msg =
            TemplateDistribution::RequestTransactionDataSuccess(RequestTransactionDataSuccess {
                template_id,
                excess_data: B064K::new(&data.excess_data).map_err(encode_err)?,
                transaction_list: Seq064K::new(transactions).map_err(encode_err)?,
            });
        self.send(msg, NAME).await
    }

    // The node's verdict can take a while; the session keeps forwarding templates meanwhile.
    fn submit_solution(&mut self, solution: SubmitSolutionOwned) {
        let template_id = solution.template_id;
        let Ok(slot) = self.solution_slots.clone().try_acquire_owned() else {
            metrics().solutions.with_label_values(&["throttled"]).inc();
            let verdict = self.throttle_log.hit(Instant::now());
            if let Some(suppressed) = verdict.suppressed {
                warn!(suppressed, "more solutions dropped: too many in flight");
            }
            if verdict.log {
                warn!(
                    template_id,
                    limit = self.limits.max_solutions_in_flight,
                    "solution dropped: too many in flight"
                );
            }
            return;
        };
        info!(template_id, "SubmitSolution received");
        let engine = self.engine.clone();
        tokio::spawn(
            async move {
                match engine.submit_solution(solution).await {
                    Ok(SolutionOutcome::Accepted { block_hash }) => {
                        info!(template_id, %block_hash, "solution accepted by the node")
                    }
                    Ok(SolutionOutcome::Rejected { block_hash, reason }) => {
                        warn!(template_id, %block_hash, %reason, "solution rejected by the node")
                    }
                    Ok(SolutionOutcome::UnknownTemplate) => {
                        warn!(template_id, "solution for an unknown template")
                    }
                    Ok(SolutionOutcome::NodeUnavailable(reason)) => {
                        warn!(template_id, %reason, "solution could not reach the node")
                    }
                    Err(e) => warn!(template_id, error = %e, "solution not handed to the engine"),
                }
                drop(slot);
            }
            .in_current_span(),
        );
    }

    async fn forward(&mut self, event: TemplateEvent) -> Result<(), SessionError> {
        match event {
            TemplateEvent::NewTemplate(t) => {
                let msg = TemplateDistributionOwned::NewTemplate((*t).clone());
                self.send(msg, "NewTemplate").await
            }
            TemplateEvent::SetNewPrevHash(p) => {
                let msg = TemplateDistributionOwned::SetNewPrevHash((*p).clone());
                self.send(msg, "SetNewPrevHash").await
            }
            // Encoded once by the engine for every session: only encrypt and write.
            TemplateEvent::Encoded(frame) => {
                let name = frame.name();
                self.writer.write_frame(frame).await?;
                count_sent(name);
                Ok(())
            }
        }
    }

    /// Frames, encrypts and writes one message, counting it under `name`.
    async fn send<M>(&mut self, msg: M, name: &'static str) -> Result<(), SessionError>
    where
        MessageFrame<M>: TryFrom<M> + stratum_core::framing_sv2::framing::EncodableFrame,
        <MessageFrame<M> as TryFrom<M>>::Error: std::fmt::Display,
    {
        let frame = MessageFrame::<M>::try_from(msg).map_err(|e| SessionError::Encode {
            name,
            reason: e.to_string(),
        })?;
        self.writer.write_frame(frame).await?;
        count_sent(name);
        Ok(())
    }
}

async fn next_event(events: &mut Option<mpsc::Receiver<TemplateEvent>>) -> Option<TemplateEvent> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

fn count_constraints(result: &str) {
    metrics()
        .constraint_changes
        .with_label_values(&[result])
        .inc();
}

fn count_bad_frame(e: TransportError) -> TransportError {
    if matches!(
        e,
        TransportError::Codec(_) | TransportError::FrameTooLarge { .. }
    ) {
        metrics().messages_unexpected.inc();
    }
    e
}

fn count_received(msg_type: u8, extension_type: u16) {
    let name = if extension_type == 0 {
        message_type_to_name(msg_type)
    } else {
        "Extension"
    };
    metrics().messages_received.with_label_values(&[name]).inc();
}

fn count_sent(name: &str) {
    metrics().messages_sent.with_label_values(&[name]).inc();
}

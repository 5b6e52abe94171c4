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
//! - at most `max_solutions_in_flight_per_client` solutions have their verdict awaited at
//!   once; more still go to the engine, unawaited (`sv2_tpd_solutions_unawaited_total`);
//! - a solution whose header misses its target, whose coinbase does not decode or whose
//!   template is unknown is refused by the engine before it costs anything; more than
//!   `max_bad_solutions` of them within ten minutes close the connection;
//! - at most `max_tx_data_requests_per_client` `RequestTransactionData` are answered at
//!   once (more get `RequestTransactionData.Error` "throttled"); answers are built off the
//!   main loop, so a slow block read never delays a template, and their bytes count
//!   against `max_tx_data_bytes_in_flight` (all clients together) until written;
//! - every `CoinbaseOutputConstraints` after the first is answered with the current
//!   template of the session's group (`NewTemplate(future)` + `SetNewPrevHash`, from what
//!   the engine holds, no node call), one pair per message and one at a time; a *change*
//!   is applied at most once per [`SessionLimits::constraints_interval`]: changes within
//!   that window are coalesced, the latest winning when it ends, when the new group's
//!   pair follows;
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
    framing_sv2::framing::{EncodableFrame, SerializedFrame},
    parsers_sv2::{
        message_type_to_name, CommonMessagesOwned, TemplateDistribution, TemplateDistributionOwned,
    },
    template_distribution_sv2::{
        RequestTransactionDataErrorOwned, RequestTransactionDataSuccess, SubmitSolutionOwned,
    },
};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

pub use crate::sv2::protocol::PROTOCOL_VERSION;
use crate::{
    metrics::metrics,
    ratelog::LogBudget,
    status::{ClientConstraints, SessionEntry},
    sv2::{
        admission::{Refusal, Ticket},
        protocol::{self, Action, BadMessage, CloseReason, SetupInfo},
        transport::{Frame, FrameReader, FrameWriter, TransportError},
    },
    template::{
        Constraints, EngineHandle, PairFanout, SolutionOutcome, Subscription, TemplateEvent,
        TransactionData,
    },
};

/// Largest frame (encrypted bytes, header included) accepted from a client. The largest valid
/// client message, `SubmitSolution` with a 64 KiB coinbase, is about 65.6 KB encrypted.
pub const MAX_CLIENT_FRAME_BYTES: usize = 128 * 1024;

/// Template events written together at most: a tip is one event (a template with its
/// `SetNewPrevHash`) and its full template may already be queued behind it.
const EVENTS_PER_WRITE: usize = 4;

/// How long bogus solutions count against `max_bad_solutions`: a pool that now and then
/// sends a solution for a template already gone is not thrown out for it over weeks.
const BAD_SOLUTION_WINDOW: Duration = Duration::from_secs(600);

/// Full log lines per kind of misbehaviour per [`LOG_PERIOD`]; the rest are summed up.
const LOG_BURST: u32 = 3;
/// Period of the per-session log budget.
const LOG_PERIOD: Duration = Duration::from_secs(60);

/// What one session may make the daemon do.
#[derive(Clone, Debug)]
pub struct SessionLimits {
    /// When the setup (through the first `CoinbaseOutputConstraints`) must be done.
    pub setup_deadline: tokio::time::Instant,
    /// Bad messages tolerated; one more closes the connection.
    pub max_bad_messages: u32,
    /// Solutions waiting for the node at once.
    pub max_solutions_in_flight: usize,
    /// Least time between two subscriptions of this session.
    pub constraints_interval: Duration,
    /// Solutions whose header misses its target tolerated; one more closes the connection.
    pub max_bad_solutions: u32,
    /// `RequestTransactionData` answered at once.
    pub max_tx_data_requests: usize,
    /// Bytes of transaction-data answers in flight, shared by every session.
    pub tx_data_bytes: ByteBudget,
}

/// A number of bytes shared by every session, taken while an answer is on its way.
#[derive(Clone, Debug)]
pub struct ByteBudget {
    places: Arc<Semaphore>,
    total: usize,
}

impl ByteBudget {
    /// A budget of `total` bytes (at least one).
    pub fn new(total: usize) -> Self {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            places: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Waits until `bytes` are free and takes them; an answer larger than the whole
    /// budget takes all of it, so it still goes out, alone.
    pub async fn reserve(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let want = u32::try_from(bytes.min(self.total)).unwrap_or(u32::MAX);
        if self.places.available_permits() < want as usize {
            metrics()
                .limit_waits
                .with_label_values(&["max_tx_data_bytes_in_flight"])
                .inc();
        }
        self.places.clone().acquire_many_owned(want).await.ok()
    }

    /// Bytes taken now.
    pub fn in_use(&self) -> usize {
        self.total - self.places.available_permits()
    }
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
    /// The client sent more solutions whose header misses its target than tolerated.
    #[error("{0} solutions that miss their target")]
    BadSolutions(u32),
}

/// Serves one client until it leaves, misbehaves, is evicted or the ticket's token fires.
/// Connections that end before their setup is done are counted in the admission summary
/// and logged at debug level only; set-up sessions log how they ended.
/// `entry` is its line on the status board, removed when the session ends.
pub async fn run(
    peer: SocketAddr,
    reader: FrameReader,
    writer: FrameWriter,
    engine: EngineHandle,
    limits: SessionLimits,
    ticket: Ticket,
    entry: SessionEntry,
) {
    let span = tracing::info_span!("sv2_session", %peer);
    async move {
        metrics().clients_connected.inc();
        let cancel = ticket.token().clone();
        let (verdicts_tx, verdicts) = mpsc::channel(limits.max_solutions_in_flight.max(1));
        let (tx_answers_tx, tx_answers) = mpsc::channel(limits.max_tx_data_requests.max(1));
        let mut session = Session {
            reader,
            writer,
            engine,
            events: None,
            entry,
            ticket,
            constraints: None,
            deferred: None,
            next_subscribe: tokio::time::Instant::now(),
            solution_slots: Arc::new(Semaphore::new(limits.max_solutions_in_flight)),
            verdicts_tx,
            verdicts,
            bad_solutions: (Instant::now(), 0),
            tx_answers_tx,
            tx_answers,
            tx_data_pending: 0,
            tx_budget_turn: Arc::new(Semaphore::new(1)),
            bad_log: LogBudget::new(LOG_BURST, LOG_PERIOD),
            machine: protocol::Machine::new(limits.max_bad_messages),
            limits,
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
    events: Option<Subscription>,
    machine: protocol::Machine,
    limits: SessionLimits,
    ticket: Ticket,
    // The constraints subscribed with, and a newer value waiting for `next_subscribe`.
    constraints: Option<Constraints>,
    deferred: Option<Constraints>,
    next_subscribe: tokio::time::Instant,
    solution_slots: Arc<Semaphore>,
    // The node's verdicts on this session's solutions, and how many missed their target.
    verdicts_tx: mpsc::Sender<(u64, SolutionOutcome)>,
    verdicts: mpsc::Receiver<(u64, SolutionOutcome)>,
    /// Since when bogus solutions are counted, and how many.
    bad_solutions: (Instant, u32),
    // Transaction-data answers built off the main loop, and how many are on their way.
    tx_answers_tx: mpsc::Sender<Result<TxDataAnswer, SessionError>>,
    tx_answers: mpsc::Receiver<Result<TxDataAnswer, SessionError>>,
    tx_data_pending: usize,
    /// One permit: the answer of this session that may hold transaction-data budget.
    tx_budget_turn: Arc<Semaphore>,
    bad_log: LogBudget,
    entry: SessionEntry,
}

/// What the main loop woke up for.
enum Wake {
    Shutdown,
    SetupTimeout,
    DeferredConstraints,
    Frame(Result<Frame, TransportError>),
    Event(Option<TemplateEvent>),
    TxData(Result<TxDataAnswer, SessionError>),
    Verdict((u64, SolutionOutcome)),
}

/// A `RequestTransactionData` answer, encoded and waiting to be written.
struct TxDataAnswer {
    frame: SerializedFrame<Vec<u8>>,
    name: &'static str,
    /// Label for `sv2_tpd_tx_data_requests_total`, counted once written.
    result: &'static str,
    /// Its place within `max_tx_data_bytes_in_flight`, freed once written.
    _bytes: Option<OwnedSemaphorePermit>,
    /// This session's one turn to hold such a place, freed with it.
    _turn: Option<OwnedSemaphorePermit>,
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
                Some(answer) = self.tx_answers.recv() => Wake::TxData(answer),
                Some(verdict) = self.verdicts.recv() => Wake::Verdict(verdict),
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
                Wake::TxData(answer) => {
                    self.tx_data_pending -= 1;
                    let answer = answer?;
                    self.writer.write_frame(answer.frame).await?;
                    count_sent(answer.name);
                    metrics()
                        .tx_data_requests
                        .with_label_values(&[answer.result])
                        .inc();
                }
                Wake::Verdict((template_id, outcome)) => self.on_verdict(template_id, outcome)?,
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
            Action::RepeatSetup(info) => {
                self.log_bad_message(BadMessage::RepeatedSetup);
                self.accept_setup(info).await
            }
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
            Action::SubmitSolution(solution) => self.submit_solution(solution).await,
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
    }

    /// A later `CoinbaseOutputConstraints`. The client is saying it needs a template to
    /// mine on now (SRI's JDC sends its constraints again when it falls back to solo
    /// mining, and waits for a pair), so it always gets one: a change applied at once
    /// brings its new group's pair; the same constraints, or a change that must wait for
    /// the session's last subscription to be old enough (kept, replacing any value
    /// already waiting), bring the pair of the group it is in now.
    async fn change_constraints(&mut self, constraints: Constraints) -> Result<(), SessionError> {
        if self.constraints == Some(constraints) {
            // Back to what is subscribed: nothing waiting any more.
            if self.deferred.take().is_some() {
                count_constraints("superseded");
            }
        } else if tokio::time::Instant::now() >= self.next_subscribe {
            return self.subscribe(constraints).await;
        } else {
            match self.deferred.replace(constraints) {
                Some(_) => count_constraints("superseded"),
                None => count_constraints("deferred"),
            }
        }
        self.resend().await
    }

    /// Has the engine queue the current pair of this session's group again, and waits
    /// until it has: one message gets at most one pair, and a client sending constraints
    /// in a loop never has more than one on its way.
    async fn resend(&mut self) -> Result<(), SessionError> {
        let Some(subscription) = &self.events else {
            return Ok(());
        };
        let resent = self
            .engine
            .resend(subscription)
            .await
            .map_err(|_| SessionError::EngineGone)?;
        // Without a template on the tip yet, the group's next one is the answer.
        debug!(resent, "constraints answered with the current template");
        if resent {
            count_constraints("resent");
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
        self.entry.set_constraints(ClientConstraints {
            max_additional_size: constraints.max_additional_size,
            max_additional_sigops: constraints.max_additional_sigops,
        });
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

    /// Starts answering `RequestTransactionData` off the main loop; the answer is written
    /// when it is ready (see [`Wake::TxData`]).
    async fn transaction_data(&mut self, template_id: u64) -> Result<(), SessionError> {
        if self.tx_data_pending >= self.limits.max_tx_data_requests {
            metrics()
                .tx_data_requests
                .with_label_values(&["throttled"])
                .inc();
            let frame = encode(tx_data_error(template_id, "throttled")?, TX_DATA_ERROR)?;
            self.writer.write_frame(frame).await?;
            count_sent(TX_DATA_ERROR);
            return Ok(());
        }
        self.tx_data_pending += 1;
        let engine = self.engine.clone();
        let bytes = self.limits.tx_data_bytes.clone();
        let turn = self.tx_budget_turn.clone();
        let answers = self.tx_answers_tx.clone();
        tokio::spawn(
            async move {
                let answer = answer_tx_data(engine, template_id, bytes, turn).await;
                let _ = answers.send(answer).await;
            }
            .in_current_span(),
        );
        Ok(())
    }

    /// Hands a solution to the engine. The node's verdict can take a while: it is
    /// awaited in a task of its own (at most `max_solutions_in_flight` of them) and comes
    /// back to the main loop ([`Wake::Verdict`]), so the session keeps forwarding
    /// templates meanwhile. Beyond that many, solutions still go to the engine (which
    /// refuses bogus ones at once), only their verdict is not awaited: a client's real
    /// block is never dropped here.
    async fn submit_solution(&mut self, solution: SubmitSolutionOwned) -> Result<(), SessionError> {
        let template_id = solution.template_id;
        debug!(template_id, "SubmitSolution received");
        let Ok(slot) = self.solution_slots.clone().try_acquire_owned() else {
            metrics().solutions_unawaited.inc();
            return self
                .engine
                .submit_solution_unawaited(solution)
                .await
                .map_err(|_| SessionError::EngineGone);
        };
        let engine = self.engine.clone();
        let verdicts = self.verdicts_tx.clone();
        tokio::spawn(
            async move {
                let outcome = engine.submit_solution(solution).await;
                drop(slot);
                if let Ok(outcome) = outcome {
                    let _ = verdicts.send((template_id, outcome)).await;
                }
            }
            .in_current_span(),
        );
        Ok(())
    }

    /// Logs the node's verdict on one of this session's solutions (refusals within the
    /// log budget) and counts the bogus ones; more than `max_bad_solutions` within
    /// [`BAD_SOLUTION_WINDOW`] close the connection.
    fn on_verdict(
        &mut self,
        template_id: u64,
        outcome: SolutionOutcome,
    ) -> Result<(), SessionError> {
        match &outcome {
            SolutionOutcome::Accepted { block_hash } => {
                info!(template_id, %block_hash, "solution accepted by the node")
            }
            SolutionOutcome::Rejected { block_hash, reason } => {
                warn!(template_id, %block_hash, %reason, "solution rejected by the node")
            }
            SolutionOutcome::NodeUnavailable(reason) => {
                warn!(template_id, %reason, "solution could not reach the node yet; it is saved")
            }
            // The engine logs its refusals (within its own budget).
            _ => {}
        }
        if !outcome.is_bogus() {
            return Ok(());
        }
        let now = Instant::now();
        if now.saturating_duration_since(self.bad_solutions.0) > BAD_SOLUTION_WINDOW {
            self.bad_solutions = (now, 0);
        }
        self.bad_solutions.1 += 1;
        let count = self.bad_solutions.1;
        if count > self.limits.max_bad_solutions {
            metrics()
                .clients_disconnected
                .with_label_values(&["bad_solutions"])
                .inc();
            return Err(SessionError::BadSolutions(count));
        }
        Ok(())
    }

    /// Writes `event` and whatever else is already queued for this session (up to
    /// [`EVENTS_PER_WRITE`]) in one write: a `NewTemplate` and its `SetNewPrevHash` reach
    /// the client together, at the cost of one system call.
    async fn forward(&mut self, event: TemplateEvent) -> Result<(), SessionError> {
        let mut sent = Sent::default();
        self.queue(event, &mut sent)?;
        for _ in 1..EVENTS_PER_WRITE {
            let Some(Ok(event)) = self.events.as_mut().map(|sub| sub.events.try_recv()) else {
                break;
            };
            self.queue(event, &mut sent)?;
        }
        self.writer.flush().await?;
        sent.names.into_iter().for_each(count_sent);
        sent.pairs.iter().for_each(|pair| pair.written());
        Ok(())
    }

    /// Encrypts `event` into the writer's queue, noting what it holds in `sent` (for the
    /// sent-messages metric once written).
    fn queue(&mut self, event: TemplateEvent, sent: &mut Sent) -> Result<(), SessionError> {
        match event {
            TemplateEvent::NewTemplate(t) => {
                let msg = TemplateDistributionOwned::NewTemplate((*t).clone());
                sent.names.push(self.queue_message(msg, "NewTemplate")?);
            }
            TemplateEvent::SetNewPrevHash(p) => {
                let msg = TemplateDistributionOwned::SetNewPrevHash((*p).clone());
                sent.names.push(self.queue_message(msg, "SetNewPrevHash")?);
            }
            // Encoded once by the engine for every session: only encrypt.
            TemplateEvent::Encoded(frame) => {
                sent.names.push(frame.name());
                self.writer.queue_frame(frame)?;
            }
            TemplateEvent::EncodedTip(template, prev_hash, fanout) => {
                sent.names.extend([template.name(), prev_hash.name()]);
                self.writer.queue_frame(template)?;
                self.writer.queue_frame(prev_hash)?;
                sent.pairs.push(fanout);
            }
        }
        Ok(())
    }

    /// Frames and encrypts one message into the writer's queue; returns `name`.
    fn queue_message<M>(&mut self, msg: M, name: &'static str) -> Result<&'static str, SessionError>
    where
        MessageFrame<M>: TryFrom<M> + stratum_core::framing_sv2::framing::EncodableFrame,
        <MessageFrame<M> as TryFrom<M>>::Error: std::fmt::Display,
    {
        let frame = MessageFrame::<M>::try_from(msg).map_err(|e| SessionError::Encode {
            name,
            reason: e.to_string(),
        })?;
        self.writer.queue_frame(frame)?;
        Ok(name)
    }

    /// Frames, encrypts and writes one message, counting it under `name`.
    async fn send<M>(&mut self, msg: M, name: &'static str) -> Result<(), SessionError>
    where
        MessageFrame<M>: TryFrom<M> + stratum_core::framing_sv2::framing::EncodableFrame,
        <MessageFrame<M> as TryFrom<M>>::Error: std::fmt::Display,
    {
        self.queue_message(msg, name)?;
        self.writer.flush().await?;
        count_sent(name);
        Ok(())
    }
}

/// What one write holds: message names for the sent-messages metric, and the pairs whose
/// fan-out it ends for this session.
#[derive(Default)]
struct Sent {
    names: Vec<&'static str>,
    pairs: Vec<Arc<PairFanout>>,
}

async fn next_event(events: &mut Option<Subscription>) -> Option<TemplateEvent> {
    match events {
        Some(sub) => sub.events.recv().await,
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

const TX_DATA_SUCCESS: &str = "RequestTransactionDataSuccess";
const TX_DATA_ERROR: &str = "RequestTransactionDataError";

/// Asks the engine for template `template_id`'s transactions and encodes the answer,
/// holding its size in `bytes` until it is written. A session holds budget for one
/// answer at a time (`turn`), so clients that never read cannot take it all between them.
async fn answer_tx_data(
    engine: EngineHandle,
    template_id: u64,
    bytes: ByteBudget,
    turn: Arc<Semaphore>,
) -> Result<TxDataAnswer, SessionError> {
    let answer = engine
        .transaction_data(template_id)
        .await
        .map_err(|_| SessionError::EngineGone)?;
    let data = match answer {
        Ok(data) => data,
        Err(e) => {
            debug!(
                template_id,
                error = e.code(),
                "RequestTransactionData refused"
            );
            return Ok(TxDataAnswer {
                frame: encode(tx_data_error(template_id, e.code())?, TX_DATA_ERROR)?,
                name: TX_DATA_ERROR,
                result: e.code(),
                _bytes: None,
                _turn: None,
            });
        }
    };
    debug!(
        template_id,
        txs = data.transactions.len(),
        "RequestTransactionData"
    );
    let size: usize = data
        .transactions
        .iter()
        .map(|tx| tx.len() + 3)
        .sum::<usize>()
        + data.excess_data.len()
        + 64;
    let turn = turn.acquire_owned().await.ok();
    let place = bytes.reserve(size).await;
    Ok(TxDataAnswer {
        frame: encode_transaction_data(template_id, &data)?,
        name: TX_DATA_SUCCESS,
        result: "success",
        _bytes: place,
        _turn: turn,
    })
}

fn tx_data_error(template_id: u64, code: &str) -> Result<TemplateDistributionOwned, SessionError> {
    let error_code =
        Str0255Owned::try_from(code.to_string()).map_err(|e| SessionError::Encode {
            name: TX_DATA_ERROR,
            reason: format!("{e:?}"),
        })?;
    Ok(TemplateDistributionOwned::RequestTransactionDataError(
        RequestTransactionDataErrorOwned {
            template_id,
            error_code,
        },
    ))
}

/// `RequestTransactionData.Success`, borrowing the engine's shared transactions for as
/// long as the encoding takes.
fn encode_transaction_data(
    template_id: u64,
    data: &TransactionData,
) -> Result<SerializedFrame<Vec<u8>>, SessionError> {
    let encode_err = |e: stratum_core::binary_sv2::Error| SessionError::Encode {
        name: TX_DATA_SUCCESS,
        reason: format!("{e:?}"),
    };
    let transactions = data
        .transactions
        .iter()
        .map(|tx| B016M::new(tx))
        .collect::<Result<Vec<_>, _>>()
        .map_err(encode_err)?;
    let msg = TemplateDistribution::RequestTransactionDataSuccess(RequestTransactionDataSuccess {
        template_id,
        excess_data: B064K::new(&data.excess_data).map_err(encode_err)?,
        transaction_list: Seq064K::new(transactions).map_err(encode_err)?,
    });
    encode(msg, TX_DATA_SUCCESS)
}

/// Frames `msg` into plaintext bytes ready for the writer to encrypt.
fn encode<M>(msg: M, name: &'static str) -> Result<SerializedFrame<Vec<u8>>, SessionError>
where
    MessageFrame<M>: TryFrom<M> + EncodableFrame,
    <MessageFrame<M> as TryFrom<M>>::Error: std::fmt::Display,
{
    let encode_err = |reason: String| SessionError::Encode { name, reason };
    let frame = MessageFrame::<M>::try_from(msg).map_err(|e| encode_err(e.to_string()))?;
    let mut bytes = vec![0; frame.encoded_length()];
    frame
        .encode_into(&mut bytes)
        .map_err(|e| encode_err(format!("{e:?}")))?;
    SerializedFrame::from_bytes(bytes).map_err(|e| encode_err(format!("{e:?}")))
}

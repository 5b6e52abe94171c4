//! The template engine's public face: its settings and health for the daemon, and what
//! the SV2 sessions ask of it and get back.
//!
//! Sessions hold an [`EngineHandle`]; the engine owns the other end of its channel. Tests
//! may build a handle from a channel of their own with [`EngineHandle::from_channel`] and
//! answer [`EngineRequest`]s by hand.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::Amount;

use stratum_core::codec_sv2::MessageFrame;
use stratum_core::framing_sv2::framing::EncodableFrame;
use stratum_core::parsers_sv2::TemplateDistributionOwned;
use stratum_core::template_distribution_sv2::{
    NewTemplateOwned, SetNewPrevHashOwned, SubmitSolutionOwned,
};
use tokio::sync::{mpsc, oneshot};

use crate::node::NodeError;

/// The engine's settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The nodes templates come from, in the configured order (the first is preferred
    /// where the daemon has a choice).
    pub nodes: Vec<crate::node::NodeSpec>,
    /// The chain every node must be on.
    pub chain: crate::node::ExpectedChain,
    /// Minimum fee rise (sats) worth a new template on the same tip.
    pub fee_delta: Amount,
    /// Minimum time between two fee-driven templates of one group (tips never wait).
    pub template_interval: Duration,
    /// How long templates of the previous tip stay usable after a new tip.
    pub stale_grace: Duration,
    /// On a new tip, publish a template without mempool transactions at once and the
    /// full one after it.
    pub tip_first: bool,
    /// Where solved blocks are written before they go to the node.
    pub solutions_dir: PathBuf,
    /// Solutions (with valid proof of work) on their way to the node at once, all
    /// clients together.
    pub max_solutions_in_flight: usize,
    /// Node calls clients can cause at once, all together: the first template of a new
    /// constraint group and block reads for transaction data. Template updates for the
    /// groups that run and solutions never wait for these.
    pub max_node_calls: usize,
    /// Deadline of every node call that is not a wait; the periodic probe uses it too.
    pub node_call_timeout: Duration,
    /// Templates held at once, all constraint groups together (each group's current one
    /// is kept even beyond it).
    pub max_templates_held: usize,
    /// Bytes of cached template transactions held at once, a list shared by several
    /// templates counted once.
    pub max_template_bytes_held: usize,
}

/// What `/health` and the daemon read about the engine.
#[derive(Debug, Default)]
pub struct EngineStatus {
    pub(super) node_connected: AtomicBool,
    /// False while the connected node misses the deadline of the periodic probe.
    pub(super) node_unresponsive: AtomicBool,
    pub(super) has_template: AtomicBool,
}

impl EngineStatus {
    /// True while the node is connected and answering, and a current template exists
    /// (one made since the node last answered again).
    pub fn healthy(&self) -> bool {
        self.node_connected.load(Ordering::Relaxed)
            && !self.node_unresponsive.load(Ordering::Relaxed)
            && self.has_template.load(Ordering::Relaxed)
    }
}

/// The engine stopped for a reason the operator must act on.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The node cannot be driven by this version (e.g. a v30 node), or its socket is not
    /// to be trusted ([`NodeError::UntrustedSocket`]).
    #[error(transparent)]
    Unsupported(NodeError),
}

/// Room for template events queued to one session; a session that falls this far behind
/// is dropped by the engine rather than being sent a stale view.
pub const SESSION_EVENT_QUEUE: usize = 64;

/// The coinbase space and sigops a client reserves (`CoinbaseOutputConstraints`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Constraints {
    /// Bytes the client's coinbase outputs add beyond what the template already holds.
    pub max_additional_size: u32,
    /// Signature operations those outputs add.
    pub max_additional_sigops: u16,
}

/// One message the engine pushes to subscribed sessions, shared between all sessions
/// of a constraint group.
#[derive(Clone, Debug)]
pub enum TemplateEvent {
    /// A new template; when `future_template` is set a [`TemplateEvent::SetNewPrevHash`]
    /// for it follows at once.
    NewTemplate(Arc<NewTemplateOwned>),
    /// Activates a future template on a new chain tip.
    SetNewPrevHash(Arc<SetNewPrevHashOwned>),
    /// Either of the above, already encoded once for every session it goes to: a
    /// session only encrypts and writes it.
    Encoded(SharedFrame),
    /// A future template and the `SetNewPrevHash` that activates it, encoded once: one
    /// event, so a session wakes once and writes both together. The [`PairFanout`] is
    /// held until the pair is written.
    EncodedTip(SharedFrame, SharedFrame, Arc<PairFanout>),
}

/// One pair's way to a group's sessions: when the last session holding it has written
/// it (or let it go), the time since it was queued goes to
/// `sv2_tpd_pair_fanout_seconds` — what the daemon takes to tell all of a group's
/// clients.
#[derive(Debug)]
pub struct PairFanout {
    queued: Instant,
    written: AtomicBool,
}

impl PairFanout {
    /// A pair queued to sessions now.
    pub fn start() -> Arc<Self> {
        Arc::new(Self {
            queued: Instant::now(),
            written: AtomicBool::new(false),
        })
    }

    /// A session has written the pair.
    pub fn written(&self) {
        self.written.store(true, Ordering::Relaxed);
    }
}

impl Drop for PairFanout {
    fn drop(&mut self) {
        // A pair no session wrote (none subscribed) told nobody: not a fan-out.
        if *self.written.get_mut() {
            crate::metrics::metrics()
                .pair_fanout_seconds
                .observe(self.queued.elapsed().as_secs_f64());
        }
    }
}

/// A Template Distribution message encoded once as an SV2 frame (header and payload, not
/// yet encrypted), shared by every session it goes to.
#[derive(Clone, Debug)]
pub struct SharedFrame {
    name: &'static str,
    bytes: Arc<[u8]>,
}

impl SharedFrame {
    /// Encodes `message`, named `name` in the sent-messages metric.
    pub fn encode(
        message: TemplateDistributionOwned,
        name: &'static str,
    ) -> Result<Self, FrameEncodeError> {
        let frame = MessageFrame::<TemplateDistributionOwned>::try_from(message)
            .map_err(|e| FrameEncodeError(format!("{e:?}")))?;
        let mut bytes = vec![0; EncodableFrame::encoded_length(&frame)];
        frame
            .encode_into(&mut bytes)
            .map_err(|e| FrameEncodeError(format!("{e:?}")))?;
        Ok(Self {
            name,
            bytes: bytes.into(),
        })
    }

    /// The message's name (`NewTemplate`, `SetNewPrevHash`).
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl EncodableFrame for SharedFrame {
    fn encoded_length(&self) -> usize {
        self.bytes.len()
    }

    fn encode_into(self, dst: &mut [u8]) -> Result<(), stratum_core::framing_sv2::Error> {
        if dst.len() != self.bytes.len() {
            return Err(
                stratum_core::framing_sv2::Error::UnexpectedDestinationLength {
                    expected: self.bytes.len(),
                    actual: dst.len(),
                },
            );
        }
        dst.copy_from_slice(&self.bytes);
        Ok(())
    }
}

/// A template message could not be encoded as a frame.
#[derive(Clone, Debug, thiserror::Error)]
#[error("cannot encode the message: {0}")]
pub struct FrameEncodeError(String);

/// The non-coinbase transactions of a template, for `RequestTransactionData.Success`.
#[derive(Clone, Debug, Default)]
pub struct TransactionData {
    /// Consensus-serialized transactions (with witness), in block order, coinbase excluded.
    pub transactions: Arc<Vec<Vec<u8>>>,
    /// `excess_data`: the coinbase witness reserved value the block needs.
    pub excess_data: Vec<u8>,
}

/// Why transaction data could not be returned (the spec's error codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TxDataError {
    /// The id was never issued, or its template has been released.
    #[error("template-id-not-found")]
    TemplateIdNotFound,
    /// The template exists but no longer builds on the current tip.
    #[error("stale-template-id")]
    StaleTemplateId,
}

impl TxDataError {
    /// The error code string sent in `RequestTransactionData.Error`.
    pub fn code(self) -> &'static str {
        match self {
            TxDataError::TemplateIdNotFound => "template-id-not-found",
            TxDataError::StaleTemplateId => "stale-template-id",
        }
    }
}

/// What became of a `SubmitSolution`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SolutionOutcome {
    /// The node accepted the block.
    Accepted {
        /// Hash of the submitted block.
        block_hash: bitcoin::BlockHash,
    },
    /// The node refused the block.
    Rejected {
        /// Hash of the submitted block.
        block_hash: bitcoin::BlockHash,
        /// The node's reason, where it gave one.
        reason: String,
    },
    /// The node stored the block, valid, but another block is its tip.
    Stale {
        /// Hash of the submitted block.
        block_hash: bitcoin::BlockHash,
    },
    /// The header's hash misses the target: not a block. Neither saved nor submitted.
    BadProofOfWork {
        /// Hash of the header as sent.
        block_hash: bitcoin::BlockHash,
    },
    /// Too many solutions are on their way to the node already (`max_solutions_in_flight`).
    Throttled,
    /// The same block was handed to the node already.
    Duplicate {
        /// Hash of the block.
        block_hash: bitcoin::BlockHash,
    },
    /// `coinbase_tx` is not a transaction: nothing to build a block from.
    Malformed(String),
    /// No held template has this id.
    UnknownTemplate,
    /// A block on a template released since: it cannot be submitted (its header and
    /// coinbase are kept on disk).
    Released {
        /// Hash of the block.
        block_hash: bitcoin::BlockHash,
    },
    /// The solution could not reach the node (it is kept on disk).
    NodeUnavailable(String),
}

impl SolutionOutcome {
    /// Label for `sv2_tpd_solutions_total`.
    pub fn label(&self) -> &'static str {
        match self {
            SolutionOutcome::Accepted { .. } => "accepted",
            SolutionOutcome::Rejected { .. } => "rejected",
            SolutionOutcome::Stale { .. } => "stale",
            SolutionOutcome::BadProofOfWork { .. } => "bad-pow",
            SolutionOutcome::Throttled => "throttled",
            SolutionOutcome::Duplicate { .. } => "duplicate",
            SolutionOutcome::Malformed(_) => "malformed",
            SolutionOutcome::UnknownTemplate => "unknown-template",
            SolutionOutcome::NodeUnavailable(_) => "node-unavailable",
            SolutionOutcome::Released { .. } => "released",
        }
    }

    /// Whether this says the client sent something that is not a block it could have
    /// found: it counts against `max_bad_solutions`.
    pub fn is_bogus(&self) -> bool {
        matches!(
            self,
            SolutionOutcome::BadProofOfWork { .. }
                | SolutionOutcome::Malformed(_)
                | SolutionOutcome::UnknownTemplate
        )
    }
}

/// A request from a session to the engine.
#[derive(Debug)]
pub enum EngineRequest {
    /// Start receiving templates for these constraints. The current template (if any) is
    /// sent at once as `NewTemplate(future=true)` + `SetNewPrevHash`. Dropping the
    /// receiver ends the subscription.
    Subscribe {
        /// The session's constraints.
        constraints: Constraints,
        /// Where the engine sends this session's events.
        events: mpsc::Sender<TemplateEvent>,
    },
    /// Send the subscription's group's current template again, as
    /// `NewTemplate(future=true)` + `SetNewPrevHash`, into its event stream (behind
    /// whatever is queued there). No node call.
    Resend {
        /// The subscription, named by its event channel.
        subscription: mpsc::WeakSender<TemplateEvent>,
        /// Whether a pair was queued (false while the group has no template on the tip:
        /// the group's next one is on its way).
        reply: oneshot::Sender<bool>,
    },
    /// `RequestTransactionData`.
    TransactionData {
        /// The template asked about.
        template_id: u64,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<TransactionData, TxDataError>>,
    },
    /// `SubmitSolution`.
    SubmitSolution {
        /// The solution as received.
        solution: SubmitSolutionOwned,
        /// Where the outcome goes.
        reply: oneshot::Sender<SolutionOutcome>,
    },
}

/// One session's subscription: the engine's events for it, and the name the engine knows
/// it by (which does not keep the stream open: when the engine drops the session, its
/// stream ends).
#[derive(Debug)]
pub struct Subscription {
    /// The group's templates, in the order the engine sent them.
    pub events: mpsc::Receiver<TemplateEvent>,
    key: mpsc::WeakSender<TemplateEvent>,
}

/// The engine is gone (the daemon is shutting down).
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("template engine stopped")]
pub struct EngineStopped;

/// A cloneable, `Send` handle sessions use to talk to the engine.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    requests: mpsc::Sender<EngineRequest>,
}

impl EngineHandle {
    /// Wraps the sending side of an engine's request channel.
    pub fn from_channel(requests: mpsc::Sender<EngineRequest>) -> Self {
        Self { requests }
    }

    /// Subscribes a session with `constraints`; returns its event stream.
    pub async fn subscribe(&self, constraints: Constraints) -> Result<Subscription, EngineStopped> {
        let (events, receiver) = mpsc::channel(SESSION_EVENT_QUEUE);
        let key = events.downgrade();
        self.send(EngineRequest::Subscribe {
            constraints,
            events,
        })
        .await?;
        Ok(Subscription {
            events: receiver,
            key,
        })
    }

    /// Asks for `subscription`'s current pair again (see [`EngineRequest::Resend`]) and
    /// waits until the engine has queued it; returns whether there was one.
    pub async fn resend(&self, subscription: &Subscription) -> Result<bool, EngineStopped> {
        let (reply, answer) = oneshot::channel();
        self.send(EngineRequest::Resend {
            subscription: subscription.key.clone(),
            reply,
        })
        .await?;
        answer.await.map_err(|_| EngineStopped)
    }

    /// Asks for the transactions of template `template_id`.
    pub async fn transaction_data(
        &self,
        template_id: u64,
    ) -> Result<Result<TransactionData, TxDataError>, EngineStopped> {
        let (reply, answer) = oneshot::channel();
        self.send(EngineRequest::TransactionData { template_id, reply })
            .await?;
        answer.await.map_err(|_| EngineStopped)
    }

    /// Hands a solution to the engine and waits for the node's verdict.
    pub async fn submit_solution(
        &self,
        solution: SubmitSolutionOwned,
    ) -> Result<SolutionOutcome, EngineStopped> {
        let (reply, answer) = oneshot::channel();
        self.send(EngineRequest::SubmitSolution { solution, reply })
            .await?;
        answer.await.map_err(|_| EngineStopped)
    }

    /// Hands a solution to the engine without waiting for the verdict (the engine logs
    /// and counts it).
    pub async fn submit_solution_unawaited(
        &self,
        solution: SubmitSolutionOwned,
    ) -> Result<(), EngineStopped> {
        let (reply, _) = oneshot::channel();
        self.send(EngineRequest::SubmitSolution { solution, reply })
            .await
    }

    async fn send(&self, request: EngineRequest) -> Result<(), EngineStopped> {
        self.requests.send(request).await.map_err(|_| EngineStopped)
    }
}

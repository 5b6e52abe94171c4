//! One connected Template Distribution client, after its Noise handshake.
//!
//! The session waits for `SetupConnection`, then serves `CoinbaseOutputConstraints`,
//! `RequestTransactionData` and `SubmitSolution` while forwarding the engine's template events
//! in the order the engine sent them. What it does with input it does not expect:
//! - anything but `SetupConnection` as the first message: logged, counted, connection closed
//!   (the spec requires `SetupConnection` first);
//! - later, a message with a non-zero `extension_type`, an unknown message type, or a known
//!   message that a client has no business sending: logged, counted, ignored (the spec's rule
//!   for unknown extension messages processed locally);
//! - a frame that fails to decrypt, a known client message whose payload does not decode, or a
//!   frame over [`MAX_CLIENT_FRAME_BYTES`]: logged, counted, connection closed.

use std::{net::SocketAddr, time::Duration};

use stratum_core::{
    binary_sv2::{Seq064K, Str0255Owned, B016M, B064K},
    codec_sv2::MessageFrame,
    common_messages_sv2::{
        Protocol, SetupConnection, SetupConnectionErrorOwned, SetupConnectionSuccess,
        ERROR_CODE_SETUP_CONNECTION_PROTOCOL_VERSION_MISMATCH,
        ERROR_CODE_SETUP_CONNECTION_UNSUPPORTED_PROTOCOL, MESSAGE_TYPE_SETUP_CONNECTION,
        SV2_TEMPLATE_DISTRIBUTION_PROTOCOL_DISCRIMINANT,
    },
    parsers_sv2::{
        message_type_to_name, CommonMessagesOwned, TemplateDistribution, TemplateDistributionOwned,
    },
    template_distribution_sv2::{
        CoinbaseOutputConstraints, RequestTransactionData, RequestTransactionDataErrorOwned,
        RequestTransactionDataSuccess, SubmitSolution, MESSAGE_TYPE_COINBASE_OUTPUT_CONSTRAINTS,
        MESSAGE_TYPE_REQUEST_TRANSACTION_DATA, MESSAGE_TYPE_SUBMIT_SOLUTION,
    },
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::{
    metrics::metrics,
    status::SessionEntry,
    sv2::transport::{Frame, FrameReader, FrameWriter, TransportError},
    template::{Constraints, EngineHandle, SolutionOutcome, TemplateEvent, TransactionData},
};

/// The Template Distribution protocol version this server speaks.
pub const PROTOCOL_VERSION: u16 = 2;

/// Largest frame (encrypted bytes, header included) accepted from a client. The largest valid
/// client message, `SubmitSolution` with a 64 KiB coinbase, is about 65.6 KB encrypted.
pub const MAX_CLIENT_FRAME_BYTES: usize = 128 * 1024;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The connection failed or the client sent something that ends it.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The first message was not `SetupConnection`.
    #[error("expected SetupConnection, got message type {msg_type:#04x} (extension {extension_type:#06x})")]
    NotSetupConnection {
        /// The frame's message type.
        msg_type: u8,
        /// The frame's extension type.
        extension_type: u16,
    },
    /// `SetupConnection` did not arrive in time.
    #[error("no SetupConnection within {0:?}")]
    SetupTimeout(Duration),
    /// The client's `SetupConnection` was refused with this error code.
    #[error("SetupConnection refused: {0}")]
    SetupRefused(&'static str),
    /// A known message's payload did not decode.
    #[error("undecodable {name} payload: {reason}")]
    Undecodable {
        /// The message name.
        name: &'static str,
        /// What the decoder said.
        reason: String,
    },
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

/// Serves one client until it leaves, misbehaves, or `shutdown` fires. Logs how it ended.
/// `entry` is its line on the status board, removed when the session ends.
pub async fn run(
    peer: SocketAddr,
    reader: FrameReader,
    writer: FrameWriter,
    engine: EngineHandle,
    setup_timeout: Duration,
    shutdown: CancellationToken,
    entry: SessionEntry,
) {
    let span = tracing::info_span!("sv2_session", %peer);
    async move {
        metrics().clients_connected.inc();
        let mut session = Session {
            reader,
            writer,
            engine,
            events: None,
            entry,
        };
        match session.serve(setup_timeout, &shutdown).await {
            Ok(()) => info!("session ended"),
            Err(SessionError::Transport(TransportError::Closed)) => info!("client disconnected"),
            Err(e) => warn!(error = %e, "session closed"),
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
    entry: SessionEntry,
}

/// What the main loop woke up for.
enum Wake {
    Shutdown,
    Frame(Result<Frame, TransportError>),
    Event(Option<TemplateEvent>),
}

impl Session {
    async fn serve(
        &mut self,
        setup_timeout: Duration,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionError> {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            frame = tokio::time::timeout(setup_timeout, self.reader.read_frame()) => {
                frame.map_err(|_| SessionError::SetupTimeout(setup_timeout))?
            }
        };
        self.setup_connection(first.map_err(count_bad_frame)?)
            .await?;
        loop {
            let wake = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Wake::Shutdown,
                event = next_event(&mut self.events) => Wake::Event(event),
                frame = self.reader.read_frame() => Wake::Frame(frame),
            };
            match wake {
                Wake::Shutdown => return Ok(()),
                Wake::Event(Some(event)) => self.forward(event).await?,
                Wake::Event(None) => return Err(SessionError::EngineGone),
                Wake::Frame(frame) => self.handle(frame.map_err(count_bad_frame)?).await?,
            }
        }
    }

    async fn setup_connection(&mut self, mut frame: Frame) -> Result<(), SessionError> {
        let header = frame.header();
        count_received(header.msg_type(), header.ext_type_without_channel_msg());
        if header.ext_type_without_channel_msg() != 0
            || header.msg_type() != MESSAGE_TYPE_SETUP_CONNECTION
        {
            metrics().messages_unexpected.inc();
            return Err(SessionError::NotSetupConnection {
                msg_type: header.msg_type(),
                extension_type: header.ext_type(),
            });
        }
        let payload = frame.payload();
        // Checked before decoding so that a protocol number this library does not know still
        // gets the spec's answer rather than a decode failure.
        if payload.first() != Some(&SV2_TEMPLATE_DISTRIBUTION_PROTOCOL_DISCRIMINANT) {
            return self
                .refuse_setup(ERROR_CODE_SETUP_CONNECTION_UNSUPPORTED_PROTOCOL)
                .await;
        }
        let setup: SetupConnection = decode(payload, "SetupConnection")?;
        debug_assert_eq!(setup.protocol, Protocol::TemplateDistributionProtocol);
        if setup.min_version > PROTOCOL_VERSION || setup.max_version < PROTOCOL_VERSION {
            return self
                .refuse_setup(ERROR_CODE_SETUP_CONNECTION_PROTOCOL_VERSION_MISMATCH)
                .await;
        }
        info!(
            vendor = %setup.vendor.as_utf8_or_hex(),
            hardware = %setup.hardware_version.as_utf8_or_hex(),
            firmware = %setup.firmware.as_utf8_or_hex(),
            "SetupConnection accepted"
        );
        let success = CommonMessagesOwned::SetupConnectionSuccess(SetupConnectionSuccess {
            used_version: PROTOCOL_VERSION,
            flags: 0,
        });
        self.send(success, "SetupConnectionSuccess").await
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

    async fn handle(&mut self, mut frame: Frame) -> Result<(), SessionError> {
        let header = frame.header();
        let (msg_type, extension_type) = (header.msg_type(), header.ext_type_without_channel_msg());
        count_received(msg_type, extension_type);
        if extension_type != 0 {
            metrics().messages_unexpected.inc();
            warn!(
                msg_type,
                extension_type, "ignoring message of an extension that was not negotiated"
            );
            return Ok(());
        }
        let payload = frame.payload();
        match msg_type {
            MESSAGE_TYPE_COINBASE_OUTPUT_CONSTRAINTS => {
                let c: CoinbaseOutputConstraints = decode(payload, "CoinbaseOutputConstraints")?;
                self.subscribe(Constraints {
                    max_additional_size: c.coinbase_output_max_additional_size,
                    max_additional_sigops: c.coinbase_output_max_additional_sigops,
                })
                .await
            }
            MESSAGE_TYPE_REQUEST_TRANSACTION_DATA => {
                let r: RequestTransactionData = decode(payload, "RequestTransactionData")?;
                self.transaction_data(r.template_id).await
            }
            MESSAGE_TYPE_SUBMIT_SOLUTION => {
                let s: SubmitSolution = decode(payload, "SubmitSolution")?;
                self.submit_solution(s);
                Ok(())
            }
            _ => {
                metrics().messages_unexpected.inc();
                warn!(
                    msg_type,
                    name = message_type_to_name(msg_type),
                    "ignoring a message a Template Distribution client does not send"
                );
                Ok(())
            }
        }
    }

    async fn subscribe(&mut self, constraints: Constraints) -> Result<(), SessionError> {
        info!(
            max_additional_size = constraints.max_additional_size,
            max_additional_sigops = constraints.max_additional_sigops,
            "CoinbaseOutputConstraints"
        );
        // Dropping the old receiver ends the old subscription.
        self.events = None;
        let events = self
            .engine
            .subscribe(constraints)
            .await
            .map_err(|_| SessionError::EngineGone)?;
        self.events = Some(events);
        self.entry.set_constraints(constraints);
        Ok(())
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
    fn submit_solution(&self, solution: SubmitSolution<'_>) {
        let template_id = solution.template_id;
        info!(template_id, "SubmitSolution received");
        let engine = self.engine.clone();
        let solution = solution.into_owned();
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

fn decode<'a, T: stratum_core::binary_sv2::Decodable<'a>>(
    payload: &'a mut [u8],
    name: &'static str,
) -> Result<T, SessionError> {
    stratum_core::binary_sv2::from_bytes(payload).map_err(|e| {
        metrics().messages_unexpected.inc();
        SessionError::Undecodable {
            name,
            reason: format!("{e:?}"),
        }
    })
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

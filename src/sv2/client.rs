//! A Template Distribution client on SRI's crates: used by the tests, `sv2-tpd watch` and the
//! benchmarks.
//!
//! It verifies the server's Noise certificate against the authority public key it is given,
//! and can also send raw frames or raw bytes to exercise the server's error handling.

use std::{net::SocketAddr, time::Duration};

use key_utils::Secp256k1PublicKey;
use stratum_core::{
    binary_sv2::{self, Str0255Owned},
    codec_sv2::MessageFrame,
    common_messages_sv2::{
        Protocol, SetupConnectionOwned, SetupConnectionSuccess,
        MESSAGE_TYPE_SETUP_CONNECTION_ERROR, MESSAGE_TYPE_SETUP_CONNECTION_SUCCESS,
    },
    framing_sv2::framing::SerializedFrame,
    parsers_sv2::{CommonMessagesOwned, TemplateDistribution, TemplateDistributionOwned},
    template_distribution_sv2::{
        CoinbaseOutputConstraints, NewTemplateOwned, RequestTransactionData,
        RequestTransactionDataSuccessOwned, SetNewPrevHashOwned, SubmitSolutionOwned,
        MESSAGE_TYPE_NEW_TEMPLATE, MESSAGE_TYPE_REQUEST_TRANSACTION_DATA_ERROR,
        MESSAGE_TYPE_REQUEST_TRANSACTION_DATA_SUCCESS, MESSAGE_TYPE_SET_NEW_PREV_HASH,
    },
};
use tokio::net::{TcpSocket, TcpStream};

use crate::sv2::{
    session::PROTOCOL_VERSION,
    transport::{self, FrameReader, FrameWriter, TransportError},
};

/// Handshake timeout used by [`TdpClient::connect`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest frame accepted from the server: a full `RequestTransactionData.Success` (24-bit
/// length) plus its Noise overhead.
const MAX_SERVER_FRAME_BYTES: usize = 17 * 1024 * 1024;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect failed.
    #[error("cannot connect to the Template Provider at {addr}")]
    Connect {
        /// The server address.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The Noise connection failed (includes a certificate that does not verify).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The server refused `SetupConnection`.
    #[error("SetupConnection refused: {error_code}")]
    SetupRefused {
        /// The server's error code.
        error_code: String,
    },
    /// The server sent something other than the expected answer.
    #[error("unexpected message from the server: {0}")]
    Unexpected(String),
    /// A message could not be encoded or decoded.
    #[error("{0}")]
    Codec(String),
}

/// A message from the server, owned.
#[derive(Clone, Debug, PartialEq)]
pub enum TdpMessage {
    /// `SetupConnection.Success`.
    SetupConnectionSuccess(SetupConnectionSuccess),
    /// `SetupConnection.Error`.
    SetupConnectionError {
        /// Unsupported flags.
        flags: u32,
        /// The error code.
        error_code: String,
    },
    /// `NewTemplate`.
    NewTemplate(NewTemplateOwned),
    /// `SetNewPrevHash` (Template Distribution).
    SetNewPrevHash(SetNewPrevHashOwned),
    /// `RequestTransactionData.Success`.
    RequestTransactionDataSuccess(RequestTransactionDataSuccessOwned),
    /// `RequestTransactionData.Error`.
    RequestTransactionDataError {
        /// The template asked about.
        template_id: u64,
        /// The error code.
        error_code: String,
    },
    /// Any other frame, undecoded.
    Other {
        /// The frame's extension type.
        extension_type: u16,
        /// The frame's message type.
        msg_type: u8,
        /// The payload.
        payload: Vec<u8>,
    },
}

/// A Noise-encrypted Template Distribution connection to a server.
pub struct TdpClient {
    reader: FrameReader,
    writer: FrameWriter,
    server: SocketAddr,
}

impl TdpClient {
    /// Connects to `addr` and runs the Noise handshake, accepting only a certificate signed by
    /// `authority`.
    pub async fn connect(
        addr: SocketAddr,
        authority: Secp256k1PublicKey,
    ) -> Result<TdpClient, ClientError> {
        Self::connect_with_timeout(addr, authority, CONNECT_TIMEOUT).await
    }

    /// [`Self::connect`] with a handshake timeout of the caller's choice.
    pub async fn connect_with_timeout(
        addr: SocketAddr,
        authority: Secp256k1PublicKey,
        timeout: Duration,
    ) -> Result<TdpClient, ClientError> {
        Self::connect_over(TcpStream::connect(addr), addr, authority, timeout).await
    }

    /// [`Self::connect_with_timeout`] from the local address `local` (for example
    /// 127.0.0.2, to be another loopback address than other clients).
    pub async fn connect_from(
        local: std::net::IpAddr,
        addr: SocketAddr,
        authority: Secp256k1PublicKey,
        timeout: Duration,
    ) -> Result<TdpClient, ClientError> {
        let connect = async {
            let socket = match local {
                std::net::IpAddr::V4(_) => TcpSocket::new_v4(),
                std::net::IpAddr::V6(_) => TcpSocket::new_v6(),
            }?;
            socket.bind(SocketAddr::new(local, 0))?;
            socket.connect(addr).await
        };
        Self::connect_over(connect, addr, authority, timeout).await
    }

    /// Runs the Noise handshake on the stream `connect` opens to `addr`, both within
    /// `timeout`.
    async fn connect_over(
        connect: impl std::future::Future<Output = std::io::Result<TcpStream>>,
        addr: SocketAddr,
        authority: Secp256k1PublicKey,
        timeout: Duration,
    ) -> Result<TdpClient, ClientError> {
        let stream = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| ClientError::Connect {
                addr,
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| ClientError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let (reader, writer) = transport::connect(
            stream,
            authority.into_bytes(),
            timeout,
            MAX_SERVER_FRAME_BYTES,
        )
        .await?;
        Ok(TdpClient {
            reader,
            writer,
            server: addr,
        })
    }

    /// Sends `SetupConnection` for Template Distribution version 2 and waits for the answer.
    pub async fn setup_connection(&mut self) -> Result<SetupConnectionSuccess, ClientError> {
        self.send_setup_connection(
            Protocol::TemplateDistributionProtocol,
            PROTOCOL_VERSION,
            PROTOCOL_VERSION,
        )
        .await?;
        match self.recv().await? {
            TdpMessage::SetupConnectionSuccess(success) => Ok(success),
            TdpMessage::SetupConnectionError { error_code, .. } => {
                Err(ClientError::SetupRefused { error_code })
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends a `SetupConnection` with the given protocol and version range, without waiting.
    pub async fn send_setup_connection(
        &mut self,
        protocol: Protocol,
        min_version: u16,
        max_version: u16,
    ) -> Result<(), ClientError> {
        let text = |s: String| Str0255Owned::try_from(s).map_err(codec_err);
        let setup = SetupConnectionOwned {
            protocol,
            min_version,
            max_version,
            flags: 0,
            endpoint_host: text(self.server.ip().to_string())?,
            endpoint_port: self.server.port(),
            vendor: text("sv2-tpd".into())?,
            hardware_version: text(String::new())?,
            firmware: text(env!("CARGO_PKG_VERSION").into())?,
            device_id: text(String::new())?,
        };
        self.send_common(CommonMessagesOwned::SetupConnection(setup))
            .await
    }

    /// Sends `CoinbaseOutputConstraints`.
    pub async fn send_constraints(
        &mut self,
        max_additional_size: u32,
        max_additional_sigops: u16,
    ) -> Result<(), ClientError> {
        let msg = TemplateDistributionOwned::CoinbaseOutputConstraints(CoinbaseOutputConstraints {
            coinbase_output_max_additional_size: max_additional_size,
            coinbase_output_max_additional_sigops: max_additional_sigops,
        });
        self.send_tdp(msg).await
    }

    /// Sends `RequestTransactionData` for `template_id` (the answer comes through
    /// [`Self::recv`]).
    pub async fn request_tx_data(&mut self, template_id: u64) -> Result<(), ClientError> {
        let msg = TemplateDistributionOwned::RequestTransactionData(RequestTransactionData {
            template_id,
        });
        self.send_tdp(msg).await
    }

    /// Sends `SubmitSolution`.
    pub async fn submit_solution(
        &mut self,
        solution: SubmitSolutionOwned,
    ) -> Result<(), ClientError> {
        self.send_tdp(TemplateDistributionOwned::SubmitSolution(solution))
            .await
    }

    /// Receives the next message from the server. Cancel-safe.
    pub async fn recv(&mut self) -> Result<TdpMessage, ClientError> {
        let mut frame = self.reader.read_frame().await?;
        let header = frame.header();
        let (extension_type, msg_type) = (header.ext_type(), header.msg_type());
        let payload = frame.payload();
        if header.ext_type_without_channel_msg() != 0 {
            return Ok(other(extension_type, msg_type, payload));
        }
        Ok(match msg_type {
            MESSAGE_TYPE_SETUP_CONNECTION_SUCCESS => TdpMessage::SetupConnectionSuccess(
                binary_sv2::from_bytes(payload).map_err(codec_err)?,
            ),
            MESSAGE_TYPE_SETUP_CONNECTION_ERROR => {
                let e: stratum_core::common_messages_sv2::SetupConnectionError =
                    binary_sv2::from_bytes(payload).map_err(codec_err)?;
                TdpMessage::SetupConnectionError {
                    flags: e.flags,
                    error_code: e.error_code.as_utf8_or_hex(),
                }
            }
            MESSAGE_TYPE_NEW_TEMPLATE
            | MESSAGE_TYPE_SET_NEW_PREV_HASH
            | MESSAGE_TYPE_REQUEST_TRANSACTION_DATA_SUCCESS
            | MESSAGE_TYPE_REQUEST_TRANSACTION_DATA_ERROR => {
                match TemplateDistribution::try_from((msg_type, payload))
                    .map_err(|e| ClientError::Codec(e.to_string()))?
                {
                    TemplateDistribution::NewTemplate(m) => TdpMessage::NewTemplate(m.into_owned()),
                    TemplateDistribution::SetNewPrevHash(m) => {
                        TdpMessage::SetNewPrevHash(m.into_owned())
                    }
                    TemplateDistribution::RequestTransactionDataSuccess(m) => {
                        TdpMessage::RequestTransactionDataSuccess(m.into_owned())
                    }
                    TemplateDistribution::RequestTransactionDataError(m) => {
                        TdpMessage::RequestTransactionDataError {
                            template_id: m.template_id,
                            error_code: m.error_code.as_utf8_or_hex(),
                        }
                    }
                    m => return Err(ClientError::Unexpected(m.to_string())),
                }
            }
            _ => other(extension_type, msg_type, payload),
        })
    }

    /// Sends one encrypted frame with an arbitrary header and payload (negative tests).
    pub async fn send_raw_frame(
        &mut self,
        extension_type: u16,
        msg_type: u8,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|len| *len < 1 << 24)
            .ok_or_else(|| ClientError::Codec("payload longer than a frame holds".into()))?;
        let mut bytes = Vec::with_capacity(6 + payload.len());
        bytes.extend_from_slice(&extension_type.to_le_bytes());
        bytes.push(msg_type);
        bytes.extend_from_slice(&len.to_le_bytes()[..3]);
        bytes.extend_from_slice(payload);
        let frame = SerializedFrame::from_bytes(bytes)
            .map_err(|e| ClientError::Codec(format!("raw frame: {e}")))?;
        self.writer.write_frame(frame).await?;
        Ok(())
    }

    /// Writes bytes to the socket unencrypted (negative tests).
    #[cfg(feature = "mock")]
    pub async fn send_raw_bytes(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.writer.write_unencrypted(bytes).await?;
        Ok(())
    }

    /// The server address.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    async fn send_tdp(&mut self, msg: TemplateDistributionOwned) -> Result<(), ClientError> {
        let frame = MessageFrame::try_from(msg).map_err(|e| ClientError::Codec(e.to_string()))?;
        self.writer.write_frame(frame).await?;
        Ok(())
    }

    async fn send_common(&mut self, msg: CommonMessagesOwned) -> Result<(), ClientError> {
        let frame = MessageFrame::try_from(msg).map_err(|e| ClientError::Codec(e.to_string()))?;
        self.writer.write_frame(frame).await?;
        Ok(())
    }
}

fn other(extension_type: u16, msg_type: u8, payload: &[u8]) -> TdpMessage {
    TdpMessage::Other {
        extension_type,
        msg_type,
        payload: payload.to_vec(),
    }
}

fn codec_err(e: binary_sv2::Error) -> ClientError {
    ClientError::Codec(format!("{e:?}"))
}

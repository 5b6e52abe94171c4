//! Noise-encrypted SV2 frames over TCP, on SRI's `codec_sv2` encoder/decoder and `noise_sv2`
//! handshake roles.
//!
//! [`accept`] runs the responder side (the server), [`connect`] the initiator side (the client);
//! both return a [`FrameReader`] and a [`FrameWriter`] that can live in different tasks.

use std::time::Duration;

use stratum_core::{
    codec_sv2::{
        self, state::ExpectsHandshakeMessage, Decoded, Decrypted, EncodableFrame, Handshake,
        HandshakeMessage, InitiatorSent, NoiseDecoder, NoiseEncoder, SerializedFrame, Transport,
        TransportDecryptState, TransportEncryptState,
    },
    noise_sv2::{self, Initiator, Responder, ELLSWIFT_ENCODING_SIZE},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};
use tokio_util::either::Either;

/// How long one frame may take to leave; a peer that reads nothing for this long is
/// dropped.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Bytes a client reads from the socket at a time after the handshake: a few small frames
/// (a `NewTemplate` with its `SetNewPrevHash`) arrive in one read instead of two per frame.
/// The server reads unbuffered: clients send little, and a thousand idle sessions would
/// hold a buffer each.
const CLIENT_READ_BUFFER_BYTES: usize = 2048;

/// Why a Noise connection failed or ended.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer did not finish its part of the handshake in time.
    #[error("noise handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
    /// The peer's handshake message was not acceptable (for the client: the server's
    /// certificate did not verify against the authority key).
    #[error("noise handshake failed: {0}")]
    Handshake(String),
    /// The peer closed the connection.
    #[error("connection closed by peer")]
    Closed,
    /// Reading or writing the socket failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// A frame failed to decrypt or decode; the cipher state is lost with it.
    #[error("undecodable frame: {0}")]
    Codec(String),
    /// The peer sent a frame larger than this side accepts.
    #[error("frame exceeds the {limit}-byte limit")]
    FrameTooLarge {
        /// The limit in encrypted bytes.
        limit: usize,
    },
}

impl From<codec_sv2::Error> for TransportError {
    fn from(e: codec_sv2::Error) -> Self {
        TransportError::Codec(e.to_string())
    }
}

/// A decrypted SV2 frame (header and payload).
pub type Frame = SerializedFrame;

/// The decrypting half of a Noise connection.
pub struct FrameReader {
    socket: Either<OwnedReadHalf, BufReader<OwnedReadHalf>>,
    frames: FrameDecoder,
}

/// Turns the bytes of a Noise transport stream into decrypted frames, without I/O: the
/// caller writes received bytes into [`FrameDecoder::buffer`] and reports them with
/// [`FrameDecoder::advance`]. Frames whose encrypted size exceeds the limit are refused as
/// soon as their bytes pass it, whatever length their header announces.
pub struct FrameDecoder {
    decoder: NoiseDecoder,
    state: Option<TransportDecryptState>,
    // The decoder's current read window and how much of it has been received; kept across
    // calls so that a reader can be cancelled at its await point without losing data.
    window: Vec<u8>,
    filled: usize,
    // Encrypted bytes of the frame being assembled, checked against `max_frame_bytes`.
    frame_bytes: usize,
    max_frame_bytes: usize,
}

/// The encrypting half of a Noise connection.
pub struct FrameWriter {
    socket: OwnedWriteHalf,
    encoder: NoiseEncoder,
    state: TransportEncryptState,
    // Encrypted frames queued by [`FrameWriter::queue_frame`], written by the next flush.
    queued: Vec<u8>,
}

/// Runs the Noise NX responder handshake on `stream` with a certificate signed by the authority
/// key pair, valid for `cert_validity`. The whole handshake must finish within `timeout`.
/// Frames larger than `max_frame_bytes` (encrypted) are refused by the returned reader.
pub async fn accept(
    stream: TcpStream,
    authority_public: [u8; 32],
    authority_secret: [u8; 32],
    cert_validity: Duration,
    timeout: Duration,
    max_frame_bytes: usize,
) -> Result<(FrameReader, FrameWriter), TransportError> {
    let responder =
        Responder::from_authority_kp(&authority_public, &authority_secret, cert_validity)
            .map_err(|e| TransportError::Handshake(format!("authority key pair: {e:?}")))?;
    let (mut reader, mut writer) = stream.into_split();
    let mut decoder = NoiseDecoder::new();
    let mut encoder = NoiseEncoder::new();
    let handshake = async {
        let first = read_handshake::<Responder>(&mut reader, &mut decoder).await?;
        let ephemeral: [u8; ELLSWIFT_ENCODING_SIZE] = first
            .payload()
            .try_into()
            .map_err(|_| TransportError::Handshake("short initiator message".into()))?;
        let (reply, transport) = Handshake::responder(responder).step_1(ephemeral)?;
        writer
            .write_all(encoder.encode_handshake(reply).as_ref())
            .await?;
        Ok::<_, TransportError>(transport)
    };
    let transport = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| TransportError::HandshakeTimeout(timeout))??;
    Ok(halves(
        (reader, 0),
        writer,
        decoder,
        encoder,
        transport,
        max_frame_bytes,
    ))
}

/// Runs the Noise NX initiator handshake on `stream`, verifying the server's certificate
/// against `authority_public` (x-only key bytes). The whole handshake must finish within
/// `timeout`.
pub async fn connect(
    stream: TcpStream,
    authority_public: [u8; 32],
    timeout: Duration,
    max_frame_bytes: usize,
) -> Result<(FrameReader, FrameWriter), TransportError> {
    let initiator = Initiator::from_raw_k(authority_public)
        .map_err(|e| TransportError::Handshake(format!("authority public key: {e:?}")))?;
    let (mut reader, mut writer) = stream.into_split();
    let mut decoder = NoiseDecoder::new();
    let mut encoder = NoiseEncoder::new();
    let handshake = async {
        let (first, handshake) = Handshake::initiator(initiator).step_0()?;
        writer
            .write_all(encoder.encode_handshake(first).as_ref())
            .await?;
        let second = read_handshake::<InitiatorSent>(&mut reader, &mut decoder).await?;
        let message = second
            .payload()
            .try_into()
            .map_err(|_| TransportError::Handshake("short responder message".into()))?;
        handshake.step_2(message).map_err(|e| match e {
            codec_sv2::Error::NoiseSv2Error(noise_sv2::Error::InvalidCertificate(_)) => {
                TransportError::Handshake(
                    "server certificate does not verify against the authority key".into(),
                )
            }
            other => TransportError::Handshake(other.to_string()),
        })
    };
    let transport = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| TransportError::HandshakeTimeout(timeout))??;
    Ok(halves(
        (reader, CLIENT_READ_BUFFER_BYTES),
        writer,
        decoder,
        encoder,
        transport,
        max_frame_bytes,
    ))
}

/// The two halves of an established connection; `read_buffer` bytes are read at a time
/// (0: unbuffered).
fn halves(
    (reader, read_buffer): (OwnedReadHalf, usize),
    writer: OwnedWriteHalf,
    decoder: NoiseDecoder,
    encoder: NoiseEncoder,
    transport: Transport,
    max_frame_bytes: usize,
) -> (FrameReader, FrameWriter) {
    let (encrypt, decrypt) = transport.split();
    (
        FrameReader {
            socket: match read_buffer {
                0 => Either::Left(reader),
                capacity => Either::Right(BufReader::with_capacity(capacity, reader)),
            },
            frames: FrameDecoder::with_decoder(decoder, decrypt, max_frame_bytes),
        },
        FrameWriter {
            socket: writer,
            encoder,
            state: encrypt,
            queued: Vec::new(),
        },
    )
}

async fn read_handshake<R: ExpectsHandshakeMessage>(
    reader: &mut OwnedReadHalf,
    decoder: &mut NoiseDecoder,
) -> Result<HandshakeMessage, TransportError> {
    loop {
        let mut buffer = vec![0u8; decoder.writable_len()];
        if !buffer.is_empty() {
            read_exact(reader, &mut buffer).await?;
            decoder.writable().copy_from_slice(&buffer);
        }
        match decoder.next_handshake_frame::<R>()? {
            Decoded::Frame(frame) => return Ok(frame),
            Decoded::Incomplete(_) => continue,
        }
    }
}

async fn read_exact(reader: &mut OwnedReadHalf, buf: &mut [u8]) -> Result<(), TransportError> {
    match reader.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(TransportError::Closed),
        Err(e) => Err(e.into()),
    }
}

/// Writes `bytes`, failing when the peer has not taken them within [`WRITE_TIMEOUT`]: a
/// peer that stops reading must not hold its session (and what is queued for it) forever.
async fn write_within_timeout(
    socket: &mut OwnedWriteHalf,
    bytes: &[u8],
) -> Result<(), TransportError> {
    tokio::time::timeout(WRITE_TIMEOUT, socket.write_all(bytes))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok(())
}

impl FrameReader {
    /// Reads and decrypts the next frame.
    ///
    /// Cancel-safe: bytes already read are kept for the next call. After an error the
    /// connection is unusable and must be dropped.
    pub async fn read_frame(&mut self) -> Result<Frame, TransportError> {
        loop {
            let buffer = self.frames.buffer();
            let n = if buffer.is_empty() {
                0
            } else {
                match self.socket.read(buffer).await? {
                    0 => return Err(TransportError::Closed),
                    n => n,
                }
            };
            if let Some(frame) = self.frames.advance(n)? {
                return Ok(frame);
            }
        }
    }
}

impl FrameDecoder {
    /// A decoder for a stream that starts right after the handshake, decrypting with
    /// `state` and refusing frames over `max_frame_bytes` encrypted bytes.
    pub fn new(state: TransportDecryptState, max_frame_bytes: usize) -> Self {
        Self::with_decoder(NoiseDecoder::new(), state, max_frame_bytes)
    }

    fn with_decoder(
        decoder: NoiseDecoder,
        state: TransportDecryptState,
        max_frame_bytes: usize,
    ) -> Self {
        let mut frames = FrameDecoder {
            decoder,
            state: Some(state),
            window: Vec::new(),
            filled: 0,
            frame_bytes: 0,
            max_frame_bytes,
        };
        frames.open_window();
        frames
    }

    /// Where the next received bytes go. When it is empty the decoder already holds what it
    /// needs: call [`FrameDecoder::advance`] with 0.
    pub fn buffer(&mut self) -> &mut [u8] {
        &mut self.window[self.filled..]
    }

    /// Takes note of `n` bytes written at the start of [`FrameDecoder::buffer`]; returns a
    /// frame once one is complete. After an error the stream is unusable.
    pub fn advance(&mut self, n: usize) -> Result<Option<Frame>, TransportError> {
        self.filled = (self.filled + n).min(self.window.len());
        if self.filled < self.window.len() {
            return Ok(None);
        }
        self.frame_bytes += self.window.len();
        if self.frame_bytes > self.max_frame_bytes {
            return Err(TransportError::FrameTooLarge {
                limit: self.max_frame_bytes,
            });
        }
        self.decoder.writable().copy_from_slice(&self.window);
        let state = self
            .state
            .take()
            .ok_or_else(|| TransportError::Codec("decryption state lost".into()))?;
        let frame = match self.decoder.next_transport_frame(state)? {
            Decrypted::Frame(frame, state) => {
                self.state = Some(state);
                self.frame_bytes = 0;
                Some(frame)
            }
            Decrypted::Incomplete(_, state) => {
                self.state = Some(state);
                None
            }
        };
        self.open_window();
        Ok(frame)
    }

    /// Sizes the window to what the decoder wants next.
    fn open_window(&mut self) {
        let expected = self.decoder.writable_len();
        self.window.resize(expected, 0);
        self.filled = 0;
    }
}

impl FrameWriter {
    /// Encrypts and writes one frame (after any queued ones). Not cancel-safe: a cancelled
    /// write leaves the connection unusable.
    pub async fn write_frame<F: EncodableFrame>(&mut self, frame: F) -> Result<(), TransportError> {
        if !self.queued.is_empty() {
            self.queue_frame(frame)?;
            return self.flush().await;
        }
        // Straight from the encoder's buffer: a large answer is not copied again.
        let bytes = self.encoder.encode_transport(frame, &mut self.state)?;
        write_within_timeout(&mut self.socket, bytes.as_ref()).await
    }

    /// Encrypts one frame and keeps it for the next [`FrameWriter::flush`], so frames that
    /// go out together (a `NewTemplate` and its `SetNewPrevHash`) take one write.
    pub fn queue_frame<F: EncodableFrame>(&mut self, frame: F) -> Result<(), TransportError> {
        let bytes = self.encoder.encode_transport(frame, &mut self.state)?;
        self.queued.extend_from_slice(bytes.as_ref());
        Ok(())
    }

    /// Writes the queued frames. Not cancel-safe.
    pub async fn flush(&mut self) -> Result<(), TransportError> {
        if self.queued.is_empty() {
            return Ok(());
        }
        let written = write_within_timeout(&mut self.socket, &self.queued).await;
        self.queued.clear();
        written
    }

    /// Writes bytes to the socket as they are, outside the encryption (for negative tests).
    #[cfg(feature = "mock")]
    pub async fn write_unencrypted(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        self.socket.write_all(bytes).await?;
        Ok(())
    }

    /// Closes the sending direction of the socket.
    pub async fn shutdown(&mut self) -> Result<(), TransportError> {
        self.socket.shutdown().await?;
        Ok(())
    }
}

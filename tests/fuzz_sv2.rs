//! Fuzzing on the stable toolchain: the frame decoder, the Template Distribution message
//! decoder and the session state machine, driven with generated input from a seeded PRNG.
//!
//! Every test runs `FUZZ_ITERATIONS` executions (default 20,000; 2,000 for the frame decoder
//! in a debug build, whose ciphers are slow there), a few seconds each, so CI runs them;
//! `FUZZ_SEED` changes the input. The long run recorded in
//! docs/robustness.md:
//!
//! ```sh
//! FUZZ_ITERATIONS=1000000 cargo test --release --test fuzz_sv2 -- --nocapture --test-threads=3
//! ```
//!
//! Each target checks properties beyond "does not panic": frames that were encrypted whole
//! come out equal, corrupted ones end the stream with an error, a frame over the limit is
//! refused before its announced length is buffered, every decoded message re-encodes to the
//! same value, and the state machine only moves forward.

use std::time::{Duration, Instant};

use stratum_core::{
    binary_sv2::{to_bytes, B064KOwned, Str0255Owned},
    codec_sv2::{Handshake, NoiseEncoder, TransportEncryptState},
    common_messages_sv2::{Protocol, SetupConnection, SetupConnectionOwned},
    framing_sv2::{self, framing::EncodableFrame},
    noise_sv2::{Initiator, Responder},
    template_distribution_sv2::{
        CoinbaseOutputConstraints, RequestTransactionData, SubmitSolution, SubmitSolutionOwned,
    },
};
use sv2_tpd::{
    keys::ServerKeys,
    sv2::{
        protocol::{decode, Action, CloseReason, Machine, Phase},
        session::MAX_CLIENT_FRAME_BYTES,
        transport::{FrameDecoder, TransportError},
    },
};

/// Executions per target when `FUZZ_ITERATIONS` is not set.
const DEFAULT_ITERATIONS: u64 = 20_000;
/// The frame target's default in a debug build, where its ciphers run ~30 times slower.
const DEFAULT_FRAME_ITERATIONS_DEBUG: u64 = 2_000;

// --- Deterministic input -------------------------------------------------------------------

/// SplitMix64: small, fast, and the same sequence on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// A length biased towards small values and the edges of the SV2 length fields.
    fn len(&mut self, max: usize) -> usize {
        match self.below(10) {
            0 => 0,
            1..=5 => self.below(64) as usize,
            6 | 7 => self.below(1024) as usize,
            8 => [1, 2, 31, 32, 33, 255, 256, 65535, 65536][self.below(9) as usize],
            _ => self.below(max as u64 + 1) as usize,
        }
        .min(max)
    }

    fn string(&mut self) -> Str0255Owned {
        let len = self.len(255);
        let text: String = (0..len)
            .map(|_| (b'a' + self.below(26) as u8) as char)
            .collect();
        Str0255Owned::try_from(text).expect("at most 255 bytes")
    }
}

/// Runs `one` for `FUZZ_ITERATIONS` iterations; prints the figures and, on a panic, what
/// reproduces it.
fn fuzz(name: &str, default_seed: u64, mut one: impl FnMut(&mut Rng, u64)) {
    let default = if name == "frame_decoder" && cfg!(debug_assertions) {
        DEFAULT_FRAME_ITERATIONS_DEBUG
    } else {
        DEFAULT_ITERATIONS
    };
    let iterations = env_u64("FUZZ_ITERATIONS").unwrap_or(default);
    let seed = env_u64("FUZZ_SEED").unwrap_or(default_seed);
    let mut rng = Rng(seed);
    let started = Instant::now();
    for i in 0..iterations {
        let guard = Reproduce { name, seed, i };
        one(&mut rng, i);
        std::mem::forget(guard);
    }
    let took = started.elapsed();
    eprintln!(
        "fuzz {name}: {iterations} executions in {:.2} s ({:.0}/s), seed {seed:#x}, 0 crashes",
        took.as_secs_f64(),
        iterations as f64 / took.as_secs_f64().max(1e-9),
    );
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    let value = value.trim();
    match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => value.parse().ok(),
    }
}

/// Prints the seed and iteration when a target panics.
struct Reproduce<'a> {
    name: &'a str,
    seed: u64,
    i: u64,
}

impl Drop for Reproduce<'_> {
    fn drop(&mut self) {
        eprintln!(
            "fuzz {} failed at iteration {}; reproduce with FUZZ_SEED={:#x} FUZZ_ITERATIONS={}",
            self.name,
            self.i,
            self.seed,
            self.i + 1
        );
    }
}

// --- Valid messages and mutations ----------------------------------------------------------

fn setup_connection(rng: &mut Rng) -> Vec<u8> {
    let protocol = match rng.below(4) {
        0 => Protocol::MiningProtocol,
        1 => Protocol::JobDeclarationProtocol,
        _ => Protocol::TemplateDistributionProtocol,
    };
    let version = |rng: &mut Rng| match rng.below(4) {
        0 => rng.next() as u16,
        _ => 1 + rng.below(3) as u16,
    };
    to_bytes(SetupConnectionOwned {
        protocol,
        min_version: version(rng),
        max_version: version(rng),
        flags: rng.next() as u32,
        endpoint_host: rng.string(),
        endpoint_port: rng.next() as u16,
        vendor: rng.string(),
        hardware_version: rng.string(),
        firmware: rng.string(),
        device_id: rng.string(),
    })
    .expect("encodes")
}

fn constraints(rng: &mut Rng) -> Vec<u8> {
    to_bytes(CoinbaseOutputConstraints {
        coinbase_output_max_additional_size: rng.next() as u32,
        coinbase_output_max_additional_sigops: rng.next() as u16,
    })
    .expect("encodes")
}

fn request_tx_data(rng: &mut Rng) -> Vec<u8> {
    to_bytes(RequestTransactionData {
        template_id: rng.next(),
    })
    .expect("encodes")
}

fn submit_solution(rng: &mut Rng) -> Vec<u8> {
    let len = rng.len(65535);
    to_bytes(SubmitSolutionOwned {
        template_id: rng.next(),
        version: rng.next() as u32,
        header_timestamp: rng.next() as u32,
        header_nonce: rng.next() as u32,
        coinbase_tx: B064KOwned::new(rng.bytes(len)).expect("fits"),
    })
    .expect("encodes")
}

/// Flips, truncates, extends or overwrites parts of `bytes`.
fn mutate(rng: &mut Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.below(3) {
        match rng.below(5) {
            0 if !bytes.is_empty() => {
                let at = rng.below(bytes.len() as u64) as usize;
                bytes[at] ^= 1 << rng.below(8);
            }
            1 => {
                let keep = rng.below(bytes.len() as u64 + 1) as usize;
                bytes.truncate(keep);
            }
            2 => {
                let extra = rng.len(64);
                bytes.extend(rng.bytes(extra));
            }
            3 if !bytes.is_empty() => {
                let at = rng.below(bytes.len() as u64) as usize;
                bytes[at] = [0, 0xff, 0x7f, 0x80][rng.below(4) as usize];
            }
            _ => {}
        }
    }
    bytes
}

/// A client frame: a known message (valid or mutated) or anything at all.
fn any_frame(rng: &mut Rng) -> RawMessage {
    let (msg_type, valid) = match rng.below(6) {
        0 => (0x00, setup_connection(rng)),
        1 => (0x70, constraints(rng)),
        2 => (0x73, request_tx_data(rng)),
        3 => (0x76, submit_solution(rng)),
        4 => {
            let len = rng.len(300);
            (rng.next() as u8, rng.bytes(len))
        }
        _ => {
            let len = rng.len(300);
            (
                [0x71, 0x72, 0x74, 0x75, 0x01, 0x02][rng.below(6) as usize],
                rng.bytes(len),
            )
        }
    };
    let payload = if rng.chance(30) {
        mutate(rng, valid)
    } else {
        valid
    };
    let extension = match rng.below(10) {
        0 => rng.next() as u16,
        1 => 0x8000,
        _ => 0,
    };
    (extension, msg_type, payload)
}

// --- (a) The frame decoder -----------------------------------------------------------------

/// A decoded frame's extension type, message type and payload.
type RawMessage = (u16, u8, Vec<u8>);

/// A frame written exactly as given: a 6-byte header that may lie about the payload length.
struct RawFrame(Vec<u8>);

impl EncodableFrame for RawFrame {
    fn encoded_length(&self) -> usize {
        self.0.len()
    }

    fn encode_into(self, dst: &mut [u8]) -> Result<(), framing_sv2::Error> {
        dst.copy_from_slice(&self.0);
        Ok(())
    }
}

fn raw_frame(extension: u16, msg_type: u8, announced: usize, payload: &[u8]) -> RawFrame {
    let mut bytes = Vec::with_capacity(6 + payload.len());
    bytes.extend_from_slice(&extension.to_le_bytes());
    bytes.push(msg_type);
    bytes.extend_from_slice(&(announced as u32).to_le_bytes()[..3]);
    bytes.extend_from_slice(payload);
    RawFrame(bytes)
}

/// Both ends of a fresh Noise session, handshaken in memory.
struct Stream {
    encoder: NoiseEncoder,
    encrypt: TransportEncryptState,
    decoder: FrameDecoder,
}

impl Stream {
    fn new(keys: &ServerKeys) -> Self {
        let public = keys.authority_pubkey().into_bytes();
        let secret = keys.authority_secret().into_bytes();
        let responder = Responder::from_authority_kp(&public, &secret, Duration::from_secs(3600))
            .expect("responder");
        let initiator = Initiator::from_raw_k(public).expect("initiator");
        let (first, sent) = Handshake::initiator(initiator).step_0().expect("step 0");
        let (reply, server) = Handshake::responder(responder)
            .step_1(first.payload().try_into().expect("ephemeral key"))
            .expect("step 1");
        let client = sent
            .step_2(reply.payload().try_into().expect("reply"))
            .expect("step 2");
        let (encrypt, _) = client.split();
        let (_, decrypt) = server.split();
        Stream {
            encoder: NoiseEncoder::new(),
            encrypt,
            decoder: FrameDecoder::new(decrypt, MAX_CLIENT_FRAME_BYTES),
        }
    }

    fn encrypt(&mut self, frame: RawFrame) -> Vec<u8> {
        let bytes = self
            .encoder
            .encode_transport(frame, &mut self.encrypt)
            .expect("encrypts");
        AsRef::<[u8]>::as_ref(&bytes).to_vec()
    }

    /// Feeds `bytes` in random pieces; returns the frames decoded, and the error that ended
    /// the stream if one did (the rest of `bytes` is then not fed).
    fn feed(
        &mut self,
        rng: &mut Rng,
        mut bytes: &[u8],
    ) -> (Vec<RawMessage>, Option<TransportError>) {
        let mut frames = Vec::new();
        loop {
            let buffer = self.decoder.buffer();
            let n = if buffer.is_empty() {
                0
            } else if bytes.is_empty() {
                return (frames, None);
            } else {
                let piece = 1 + rng.below(buffer.len().min(bytes.len()) as u64) as usize;
                buffer[..piece].copy_from_slice(&bytes[..piece]);
                bytes = &bytes[piece..];
                piece
            };
            match self.decoder.advance(n) {
                Ok(Some(mut frame)) => {
                    let header = frame.header();
                    let ext = header.ext_type();
                    let msg_type = header.msg_type();
                    frames.push((ext, msg_type, frame.payload().to_vec()));
                }
                Ok(None) => {}
                Err(e) => return (frames, Some(e)),
            }
        }
    }
}

/// One case against the current stream; returns whether the stream is still usable.
fn frame_case(rng: &mut Rng, stream: &mut Stream) -> bool {
    let extension = rng.next() as u16;
    let msg_type = rng.next() as u8;
    // Cases that end the stream cost a new handshake, so they are the rarer ones.
    match rng.below(100) {
        // A well-formed frame, possibly empty, possibly spanning several chunks: comes out
        // equal, or is refused for its size.
        0..=96 => {
            let len = if rng.below(1000) < 3 {
                70_000 + rng.below(70_000) as usize
            } else {
                rng.len(4096)
            };
            let payload = rng.bytes(len);
            let bytes = stream.encrypt(raw_frame(extension, msg_type, len, &payload));
            let (frames, error) = stream.feed(rng, &bytes);
            if bytes.len() > MAX_CLIENT_FRAME_BYTES {
                assert!(frames.is_empty());
                assert!(matches!(error, Some(TransportError::FrameTooLarge { .. })));
                return false;
            }
            assert!(error.is_none(), "a valid frame failed: {error:?}");
            assert_eq!(frames, vec![(extension, msg_type, payload)]);
            true
        }
        // (Rarely, as it is the costliest case.) A header announcing up to 16 MB, followed by validly encrypted chunks: refused once
        // its bytes pass the limit, whatever it announced.
        97 if rng.chance(10) => {
            let announced = 0xff_ffff - rng.below(1024) as usize;
            let real = MAX_CLIENT_FRAME_BYTES + rng.below(4096) as usize;
            let payload = rng.bytes(real);
            let bytes = stream.encrypt(raw_frame(extension, msg_type, announced, &payload));
            let (frames, error) = stream.feed(rng, &bytes);
            assert!(frames.is_empty());
            assert!(
                matches!(error, Some(TransportError::FrameTooLarge { .. })),
                "{error:?}"
            );
            false
        }
        // A header that lies about its length, then more bytes: never a panic; the stream
        // ends in an error or waits for more.
        97 => {
            let len = rng.len(512);
            let announced = rng.len(0xff_ffff);
            let payload = rng.bytes(len);
            let mut bytes = stream.encrypt(raw_frame(extension, msg_type, announced, &payload));
            let most = if rng.chance(5) { 70_000 } else { 600 };
            let extra = rng.len(most);
            bytes.extend(rng.bytes(extra));
            let (frames, _) = stream.feed(rng, &bytes);
            assert!(frames.len() <= 1);
            false
        }
        // A valid frame with bytes flipped: authentication fails.
        98 => {
            let len = rng.len(1024);
            let payload = rng.bytes(len);
            let mut bytes = stream.encrypt(raw_frame(extension, msg_type, len, &payload));
            let at = rng.below(bytes.len() as u64) as usize;
            bytes[at] ^= 1 + rng.below(255) as u8;
            let (frames, error) = stream.feed(rng, &bytes);
            assert!(frames.is_empty(), "a corrupted frame was accepted");
            assert!(error.is_some(), "a corrupted frame was not refused");
            false
        }
        // Random bytes.
        _ => {
            let most = if rng.chance(2) { 200_000 } else { 600 };
            let len = rng.len(most);
            let bytes = rng.bytes(len);
            let (frames, error) = stream.feed(rng, &bytes);
            assert!(frames.is_empty(), "random bytes made a frame");
            if len >= 22 {
                assert!(error.is_some(), "a random header was accepted");
            }
            false
        }
    }
}

#[test]
fn fuzz_frame_decoder() {
    let keys = ServerKeys::ephemeral();
    let mut stream = Stream::new(&keys);
    fuzz("frame_decoder", 0x5eed_f4a3, |rng, _| {
        if !frame_case(rng, &mut stream) {
            stream = Stream::new(&keys);
        }
    });
}

// --- (b) The TDP message decoder -----------------------------------------------------------

/// Decodes `$payload` as `$ty` and, if it decodes, checks the value (made comparable by
/// `$owned`) re-encodes with `$encode` to bytes that decode to the same value.
macro_rules! roundtrip {
    ($payload:expr, $ty:ty, $owned:expr, $encode:expr) => {{
        let owned = $owned;
        let encode = $encode;
        let mut copy = $payload.to_vec();
        if let Ok(decoded) = decode::<$ty>(&mut copy, "fuzz") {
            let value = owned(decoded);
            let mut again: Vec<u8> = encode(value.clone());
            let second =
                owned(decode::<$ty>(&mut again, "fuzz").expect("re-encoded value decodes"));
            assert_eq!(second, value, "re-encoding changed the value");
        }
    }};
}

#[test]
fn fuzz_tdp_decoder() {
    fuzz("tdp_decoder", 0x7d9_dec0, |rng, _| {
        let (_, _, payload) = any_frame(rng);
        roundtrip!(
            payload,
            CoinbaseOutputConstraints,
            |c: CoinbaseOutputConstraints| {
                (
                    c.coinbase_output_max_additional_size,
                    c.coinbase_output_max_additional_sigops,
                )
            },
            |(size, sigops)| {
                to_bytes(CoinbaseOutputConstraints {
                    coinbase_output_max_additional_size: size,
                    coinbase_output_max_additional_sigops: sigops,
                })
                .unwrap()
            }
        );
        roundtrip!(
            payload,
            RequestTransactionData,
            |r: RequestTransactionData| r.template_id,
            |template_id| to_bytes(RequestTransactionData { template_id }).unwrap()
        );
        roundtrip!(
            payload,
            SubmitSolution,
            |s: SubmitSolution| s.into_owned(),
            |s: SubmitSolutionOwned| to_bytes(s).unwrap()
        );
        roundtrip!(
            payload,
            SetupConnection,
            |s: SetupConnection| {
                (
                    s.protocol as u8,
                    s.min_version,
                    s.max_version,
                    s.flags,
                    s.vendor.as_utf8_or_hex(),
                    s.device_id.as_utf8_or_hex(),
                )
            },
            |_| payload.to_vec()
        );
        // And through the session's own dispatch, once set up.
        let mut machine = set_up_machine();
        let mut copy = payload.clone();
        let msg_type = [0x70, 0x73, 0x76, 0x00][rng.below(4) as usize];
        match machine.on_frame(0, msg_type, &mut copy) {
            Action::Subscribe { .. }
            | Action::TransactionData { .. }
            | Action::SubmitSolution(_)
            | Action::RepeatSetup(_)
            | Action::RefuseSetup(_)
            | Action::Close(CloseReason::Undecodable { .. }) => {}
            other => panic!("type {msg_type:#x} gave {other:?}"),
        }
    });
}

fn set_up_machine() -> Machine {
    let mut machine = Machine::new(16);
    let mut setup = to_bytes(SetupConnectionOwned {
        protocol: Protocol::TemplateDistributionProtocol,
        min_version: 2,
        max_version: 2,
        flags: 0,
        endpoint_host: Str0255Owned::try_from(String::new()).unwrap(),
        endpoint_port: 0,
        vendor: Str0255Owned::try_from(String::new()).unwrap(),
        hardware_version: Str0255Owned::try_from(String::new()).unwrap(),
        firmware: Str0255Owned::try_from(String::new()).unwrap(),
        device_id: Str0255Owned::try_from(String::new()).unwrap(),
    })
    .unwrap();
    assert!(matches!(
        machine.on_frame(0, 0x00, &mut setup),
        Action::AcceptSetup(_)
    ));
    machine
}

// --- (c) The session state machine ---------------------------------------------------------

#[test]
fn fuzz_session_machine() {
    fuzz("session_machine", 0x5e55_1011, |rng, _| {
        let max_bad = rng.below(20) as u32;
        let mut machine = Machine::new(max_bad);
        let mut subscribed_first = false;
        for _ in 0..1 + rng.below(40) {
            let before = machine.phase();
            let (extension, msg_type, mut payload) = any_frame(rng);
            let action = machine.on_frame(extension & 0x7fff, msg_type, &mut payload);
            let after = machine.phase();
            assert!(after >= before, "{before:?} -> {after:?} on {action:?}");
            assert!(machine.bad_messages() <= max_bad + 1);
            match &action {
                Action::AcceptSetup(_) => {
                    assert_eq!(
                        (before, after),
                        (Phase::AwaitingSetup, Phase::AwaitingConstraints)
                    )
                }
                // The first SetupConnection, or a second one for another protocol.
                Action::RefuseSetup(_) => assert_eq!(after, Phase::Closed),
                Action::RepeatSetup(_) => {
                    assert!(before >= Phase::AwaitingConstraints && before < Phase::Closed);
                    assert_eq!(before, after);
                    assert!(machine.bad_messages() <= max_bad);
                }
                Action::Subscribe { first, .. } => {
                    assert_eq!(*first, before == Phase::AwaitingConstraints);
                    assert!(!(*first && subscribed_first), "two first subscriptions");
                    subscribed_first |= *first;
                    assert_eq!(after, Phase::Serving);
                }
                Action::TransactionData { .. } | Action::SubmitSolution(_) => {
                    assert!(before >= Phase::AwaitingConstraints && before < Phase::Closed);
                    assert_eq!(before, after);
                }
                Action::Ignore(_) => {
                    assert!(before >= Phase::AwaitingConstraints && before < Phase::Closed);
                    assert!(machine.bad_messages() <= max_bad);
                }
                Action::Close(reason) => {
                    assert_eq!(after, Phase::Closed);
                    if let CloseReason::TooManyBadMessages { limit } = reason {
                        assert_eq!(*limit, max_bad);
                        assert_eq!(machine.bad_messages(), max_bad + 1);
                    }
                }
            }
            if before == Phase::AwaitingSetup {
                assert!(matches!(
                    action,
                    Action::AcceptSetup(_) | Action::RefuseSetup(_) | Action::Close(_)
                ));
            }
            if after == Phase::Closed {
                break;
            }
        }
    });
}

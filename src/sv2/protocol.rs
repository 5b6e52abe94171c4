//! What a Template Distribution session does with each frame a client sends, decided
//! without any I/O so that it can be driven by tests and the fuzzer as well as by the
//! session task.
//!
//! A connection goes through three phases: it must open with `SetupConnection`, its setup
//! ends with its first `CoinbaseOutputConstraints`, and then it is served. [`Machine`] keeps
//! the phase and the count of bad messages; [`Machine::on_frame`] turns one frame into one
//! [`Action`]. The rules:
//! - before `SetupConnection`: anything else closes the connection (the spec requires
//!   `SetupConnection` first);
//! - a `SetupConnection` for another protocol or without version 2 in its range is answered
//!   with `SetupConnection.Error` and the connection closed;
//! - a known client message whose payload does not decode closes the connection (the client
//!   is broken and nothing it sends next can be trusted);
//! - a message of an extension that was not negotiated or a message type a Template
//!   Distribution client does not send is a *bad message*: ignored and counted; the one
//!   that takes the count past `max_bad_messages` closes the connection;
//! - a second `SetupConnection` counts as a bad message too, but is answered as the first
//!   was (`SetupConnection.Success`, or `.Error` and close for another protocol or
//!   version): a client that sends one waits for its answer.

use stratum_core::{
    binary_sv2::{self, Decodable},
    common_messages_sv2::{
        SetupConnection, ERROR_CODE_SETUP_CONNECTION_PROTOCOL_VERSION_MISMATCH,
        ERROR_CODE_SETUP_CONNECTION_UNSUPPORTED_PROTOCOL, MESSAGE_TYPE_SETUP_CONNECTION,
        SV2_TEMPLATE_DISTRIBUTION_PROTOCOL_DISCRIMINANT,
    },
    template_distribution_sv2::{
        CoinbaseOutputConstraints, RequestTransactionData, SubmitSolution, SubmitSolutionOwned,
        MESSAGE_TYPE_COINBASE_OUTPUT_CONSTRAINTS, MESSAGE_TYPE_REQUEST_TRANSACTION_DATA,
        MESSAGE_TYPE_SUBMIT_SOLUTION,
    },
};

use crate::template::Constraints;

/// The Template Distribution protocol version this server speaks.
pub const PROTOCOL_VERSION: u16 = 2;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Noise is done; `SetupConnection` has not arrived.
    AwaitingSetup,
    /// `SetupConnection` was accepted; the first `CoinbaseOutputConstraints` has not arrived.
    AwaitingConstraints,
    /// Set up and subscribed.
    Serving,
    /// The connection is to be closed; nothing more is accepted.
    Closed,
}

/// Who the client says it is, from its `SetupConnection` (for the logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetupInfo {
    /// Device vendor.
    pub vendor: String,
    /// Hardware version.
    pub hardware_version: String,
    /// Firmware version.
    pub firmware: String,
}

/// A message that is ignored but counts against the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadMessage {
    /// A message of an extension that was not negotiated.
    UnknownExtension {
        /// The frame's extension type (without the channel bit).
        extension_type: u16,
        /// The frame's message type.
        msg_type: u8,
    },
    /// A message type a Template Distribution client does not send.
    NotAClientMessage {
        /// The frame's message type.
        msg_type: u8,
    },
    /// `SetupConnection` on a connection that is already set up.
    RepeatedSetup,
}

/// Why a connection is closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// The first message was not `SetupConnection`.
    #[error("expected SetupConnection, got message type {msg_type:#04x} (extension {extension_type:#06x})")]
    NotSetupConnection {
        /// The frame's message type.
        msg_type: u8,
        /// The frame's extension type (without the channel bit).
        extension_type: u16,
    },
    /// A known message's payload did not decode.
    #[error("undecodable {name} payload: {reason}")]
    Undecodable {
        /// The message name.
        name: &'static str,
        /// What the decoder said.
        reason: String,
    },
    /// The client sent more bad messages than allowed.
    #[error("more than {limit} unexpected messages")]
    TooManyBadMessages {
        /// The limit that was passed.
        limit: u32,
    },
    /// A frame arrived after the connection was already to be closed.
    #[error("message after the connection was closed")]
    AlreadyClosed,
}

/// What the session does with one frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Answer `SetupConnection.Success`.
    AcceptSetup(SetupInfo),
    /// Answer a second `SetupConnection` with `SetupConnection.Success` again; it counted
    /// against the client as [`BadMessage::RepeatedSetup`].
    RepeatSetup(SetupInfo),
    /// Answer `SetupConnection.Error` with this code, then close.
    RefuseSetup(&'static str),
    /// Subscribe with these constraints; `first` ends the connection's setup.
    Subscribe {
        /// The client's constraints.
        constraints: Constraints,
        /// Whether these are the connection's first constraints.
        first: bool,
    },
    /// Answer `RequestTransactionData` for this template.
    TransactionData {
        /// The template asked about.
        template_id: u64,
    },
    /// Hand this solution on.
    SubmitSolution(SubmitSolutionOwned),
    /// Ignore the message; it counted against the client.
    Ignore(BadMessage),
    /// Close the connection.
    Close(CloseReason),
}

impl Action {
    /// Whether the frame was unknown, undecodable or out of order (what
    /// `sv2_tpd_messages_unexpected_total` counts).
    pub fn is_unexpected(&self) -> bool {
        matches!(
            self,
            Action::Ignore(_) | Action::RepeatSetup(_) | Action::Close(_)
        )
    }
}

/// A connection's protocol state: its phase and how many bad messages it sent.
#[derive(Clone, Debug)]
pub struct Machine {
    phase: Phase,
    bad_messages: u32,
    max_bad_messages: u32,
}

impl Machine {
    /// A connection that just finished Noise; more than `max_bad_messages` bad messages
    /// close it.
    pub fn new(max_bad_messages: u32) -> Self {
        Machine {
            phase: Phase::AwaitingSetup,
            bad_messages: 0,
            max_bad_messages,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Bad messages received so far.
    pub fn bad_messages(&self) -> u32 {
        self.bad_messages
    }

    /// Decides what to do with a frame of `msg_type` and `extension_type` (channel bit
    /// already removed) carrying `payload`, and moves to the next phase. The payload may be
    /// modified in place by the decoder.
    pub fn on_frame(&mut self, extension_type: u16, msg_type: u8, payload: &mut [u8]) -> Action {
        let action = self.decide(extension_type, msg_type, payload);
        match &action {
            Action::AcceptSetup(_) => self.phase = Phase::AwaitingConstraints,
            Action::Subscribe { .. } => self.phase = Phase::Serving,
            Action::RefuseSetup(_) | Action::Close(_) => self.phase = Phase::Closed,
            Action::Ignore(_) | Action::RepeatSetup(_) => {
                self.bad_messages = self.bad_messages.saturating_add(1);
                if self.bad_messages > self.max_bad_messages {
                    self.phase = Phase::Closed;
                    return Action::Close(CloseReason::TooManyBadMessages {
                        limit: self.max_bad_messages,
                    });
                }
            }
            Action::TransactionData { .. } | Action::SubmitSolution(_) => {}
        }
        action
    }

    fn decide(&self, extension_type: u16, msg_type: u8, payload: &mut [u8]) -> Action {
        match self.phase {
            Phase::Closed => Action::Close(CloseReason::AlreadyClosed),
            Phase::AwaitingSetup => {
                if extension_type != 0 || msg_type != MESSAGE_TYPE_SETUP_CONNECTION {
                    return Action::Close(CloseReason::NotSetupConnection {
                        msg_type,
                        extension_type,
                    });
                }
                setup_connection(payload)
            }
            Phase::AwaitingConstraints | Phase::Serving => {
                if extension_type != 0 {
                    return Action::Ignore(BadMessage::UnknownExtension {
                        extension_type,
                        msg_type,
                    });
                }
                self.client_message(msg_type, payload)
            }
        }
    }

    fn client_message(&self, msg_type: u8, payload: &mut [u8]) -> Action {
        let result = match msg_type {
            MESSAGE_TYPE_COINBASE_OUTPUT_CONSTRAINTS => {
                decode::<CoinbaseOutputConstraints>(payload, "CoinbaseOutputConstraints").map(|c| {
                    Action::Subscribe {
                        constraints: Constraints {
                            max_additional_size: c.coinbase_output_max_additional_size,
                            max_additional_sigops: c.coinbase_output_max_additional_sigops,
                        },
                        first: self.phase == Phase::AwaitingConstraints,
                    }
                })
            }
            MESSAGE_TYPE_REQUEST_TRANSACTION_DATA => {
                decode::<RequestTransactionData>(payload, "RequestTransactionData").map(|r| {
                    Action::TransactionData {
                        template_id: r.template_id,
                    }
                })
            }
            MESSAGE_TYPE_SUBMIT_SOLUTION => decode::<SubmitSolution>(payload, "SubmitSolution")
                .map(|s| Action::SubmitSolution(s.into_owned())),
            MESSAGE_TYPE_SETUP_CONNECTION => Ok(match setup_connection(payload) {
                Action::AcceptSetup(info) => Action::RepeatSetup(info),
                refused_or_broken => refused_or_broken,
            }),
            _ => Ok(Action::Ignore(BadMessage::NotAClientMessage { msg_type })),
        };
        result.unwrap_or_else(Action::Close)
    }
}

/// Checks `SetupConnection`: the protocol byte is read before decoding so that a protocol
/// number this library does not know still gets the spec's answer, not a decode failure.
fn setup_connection(payload: &mut [u8]) -> Action {
    if payload.first() != Some(&SV2_TEMPLATE_DISTRIBUTION_PROTOCOL_DISCRIMINANT) {
        return Action::RefuseSetup(ERROR_CODE_SETUP_CONNECTION_UNSUPPORTED_PROTOCOL);
    }
    let setup: SetupConnection = match decode(payload, "SetupConnection") {
        Ok(setup) => setup,
        Err(reason) => return Action::Close(reason),
    };
    if setup.min_version > PROTOCOL_VERSION || setup.max_version < PROTOCOL_VERSION {
        return Action::RefuseSetup(ERROR_CODE_SETUP_CONNECTION_PROTOCOL_VERSION_MISMATCH);
    }
    Action::AcceptSetup(SetupInfo {
        vendor: setup.vendor.as_utf8_or_hex(),
        hardware_version: setup.hardware_version.as_utf8_or_hex(),
        firmware: setup.firmware.as_utf8_or_hex(),
    })
}

/// Decodes a client message's payload.
pub fn decode<'a, T: Decodable<'a>>(
    payload: &'a mut [u8],
    name: &'static str,
) -> Result<T, CloseReason> {
    binary_sv2::from_bytes(payload).map_err(|e| CloseReason::Undecodable {
        name,
        reason: format!("{e:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratum_core::{
        binary_sv2::{to_bytes, B064KOwned, Str0255Owned},
        common_messages_sv2::{Protocol, SetupConnectionOwned},
    };

    fn setup_bytes(protocol: Protocol, min: u16, max: u16) -> Vec<u8> {
        let s = |v: &str| Str0255Owned::try_from(v.to_string()).unwrap();
        to_bytes(SetupConnectionOwned {
            protocol,
            min_version: min,
            max_version: max,
            flags: 0,
            endpoint_host: s("127.0.0.1"),
            endpoint_port: 8442,
            vendor: s("test"),
            hardware_version: s("hw"),
            firmware: s("fw"),
            device_id: s("id"),
        })
        .unwrap()
    }

    fn constraints_bytes(size: u32, sigops: u16) -> Vec<u8> {
        to_bytes(CoinbaseOutputConstraints {
            coinbase_output_max_additional_size: size,
            coinbase_output_max_additional_sigops: sigops,
        })
        .unwrap()
    }

    fn set_up(max_bad: u32) -> Machine {
        let mut m = Machine::new(max_bad);
        let mut setup = setup_bytes(Protocol::TemplateDistributionProtocol, 2, 2);
        assert!(matches!(
            m.on_frame(0, MESSAGE_TYPE_SETUP_CONNECTION, &mut setup),
            Action::AcceptSetup(_)
        ));
        m
    }

    #[test]
    fn setup_then_constraints_then_serving() {
        let mut m = set_up(4);
        assert_eq!(m.phase(), Phase::AwaitingConstraints);
        let action = m.on_frame(
            0,
            MESSAGE_TYPE_COINBASE_OUTPUT_CONSTRAINTS,
            &mut constraints_bytes(100, 3),
        );
        let constraints = Constraints {
            max_additional_size: 100,
            max_additional_sigops: 3,
        };
        assert_eq!(
            action,
            Action::Subscribe {
                constraints,
                first: true
            }
        );
        let again = m.on_frame(
            0,
            MESSAGE_TYPE_COINBASE_OUTPUT_CONSTRAINTS,
            &mut constraints_bytes(100, 3),
        );
        assert_eq!(
            again,
            Action::Subscribe {
                constraints,
                first: false
            }
        );
        assert_eq!(m.phase(), Phase::Serving);
    }

    #[test]
    fn anything_before_setup_connection_closes() {
        let mut m = Machine::new(16);
        let action = m.on_frame(0, MESSAGE_TYPE_REQUEST_TRANSACTION_DATA, &mut [0; 8]);
        assert!(matches!(
            action,
            Action::Close(CloseReason::NotSetupConnection { .. })
        ));
        assert_eq!(m.phase(), Phase::Closed);
        assert_eq!(
            m.on_frame(0, MESSAGE_TYPE_SETUP_CONNECTION, &mut []),
            Action::Close(CloseReason::AlreadyClosed)
        );
    }

    #[test]
    fn other_protocols_and_versions_are_refused() {
        let mut mining = setup_bytes(Protocol::MiningProtocol, 2, 2);
        assert_eq!(
            Machine::new(1).on_frame(0, MESSAGE_TYPE_SETUP_CONNECTION, &mut mining),
            Action::RefuseSetup(ERROR_CODE_SETUP_CONNECTION_UNSUPPORTED_PROTOCOL)
        );
        let mut v3 = setup_bytes(Protocol::TemplateDistributionProtocol, 3, 4);
        assert_eq!(
            Machine::new(1).on_frame(0, MESSAGE_TYPE_SETUP_CONNECTION, &mut v3),
            Action::RefuseSetup(ERROR_CODE_SETUP_CONNECTION_PROTOCOL_VERSION_MISMATCH)
        );
        // An unknown protocol byte is refused, not reported as undecodable.
        assert_eq!(
            Machine::new(1).on_frame(0, MESSAGE_TYPE_SETUP_CONNECTION, &mut [0x77]),
            Action::RefuseSetup(ERROR_CODE_SETUP_CONNECTION_UNSUPPORTED_PROTOCOL)
        );
    }

    #[test]
    fn bad_messages_are_ignored_until_the_limit_is_passed() {
        let mut m = set_up(2);
        assert!(matches!(
            m.on_frame(0x4001, 1, &mut []),
            Action::Ignore(BadMessage::UnknownExtension { .. })
        ));
        assert!(matches!(
            m.on_frame(0, 0x7f, &mut [1, 2]),
            Action::Ignore(BadMessage::NotAClientMessage { msg_type: 0x7f })
        ));
        assert_eq!(m.bad_messages(), 2);
        let mut setup = setup_bytes(Protocol::TemplateDistributionProtocol, 2, 2);
        assert_eq!(
            m.on_frame(0, MESSAGE_TYPE_SETUP_CONNECTION, &mut setup),
            Action::Close(CloseReason::TooManyBadMessages { limit: 2 })
        );
        assert_eq!(m.phase(), Phase::Closed);
    }

    #[test]
    fn a_second_setup_connection_is_answered_and_counted() {
        let mut m = set_up(4);
        let mut again = setup_bytes(Protocol::TemplateDistributionProtocol, 2, 2);
        assert!(matches!(
            m.on_frame(0, MESSAGE_TYPE_SETUP_CONNECTION, &mut again),
            Action::RepeatSetup(_)
        ));
        assert_eq!(m.bad_messages(), 1);
        assert_eq!(m.phase(), Phase::AwaitingConstraints);
        let mut mining = setup_bytes(Protocol::MiningProtocol, 2, 2);
        assert_eq!(
            m.on_frame(0, MESSAGE_TYPE_SETUP_CONNECTION, &mut mining),
            Action::RefuseSetup(ERROR_CODE_SETUP_CONNECTION_UNSUPPORTED_PROTOCOL)
        );
        assert_eq!(m.phase(), Phase::Closed);
    }

    #[test]
    fn an_undecodable_known_message_closes() {
        let mut m = set_up(16);
        assert!(matches!(
            m.on_frame(0, MESSAGE_TYPE_COINBASE_OUTPUT_CONSTRAINTS, &mut [1]),
            Action::Close(CloseReason::Undecodable { .. })
        ));
    }

    #[test]
    fn requests_and_solutions_are_served_after_setup() {
        let mut m = set_up(16);
        let mut request = to_bytes(RequestTransactionData { template_id: 9 }).unwrap();
        assert_eq!(
            m.on_frame(0, MESSAGE_TYPE_REQUEST_TRANSACTION_DATA, &mut request),
            Action::TransactionData { template_id: 9 }
        );
        let solution = SubmitSolutionOwned {
            template_id: 3,
            version: 0x2000_0000,
            header_timestamp: 5,
            header_nonce: 6,
            coinbase_tx: B064KOwned::new(vec![1, 2, 3]).unwrap(),
        };
        let mut bytes = to_bytes(solution.clone()).unwrap();
        assert_eq!(
            m.on_frame(0, MESSAGE_TYPE_SUBMIT_SOLUTION, &mut bytes),
            Action::SubmitSolution(solution)
        );
        assert_eq!(m.phase(), Phase::AwaitingConstraints);
    }
}

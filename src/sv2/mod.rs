//! The SV2 Template Distribution server: Noise listener, per-client sessions, and a client.

pub mod admission;
pub mod client;
pub mod listener;
pub mod protocol;
pub mod session;
pub mod transport;

pub use client::{ClientError, TdpClient, TdpMessage};
pub use listener::{serve, ServerConfig, ServerError};

//! sv2-tpd: a Stratum V2 Template Provider fed by Bitcoin Core's IPC `Mining` interface.
//!
//! Data flows one way: [`node`] (IPC client) → [`template`] (engine) → [`sv2`] (server).

pub mod config;
pub mod daemon;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod metrics_http;
#[cfg(feature = "mock")]
pub mod mock;
pub mod node;
pub mod ratelog;
pub mod sv2;
pub mod template;
pub mod watch;

//! sv2-tpd: a Stratum V2 Template Provider fed by Bitcoin Core's IPC `Mining` interface.
//!
//! Data flows one way: [`node`] (IPC client) → [`template`] (engine) → [`sv2`] (server).

pub mod keys;
pub mod metrics;
pub mod node;
pub mod sv2;
pub mod template;
pub mod watch;

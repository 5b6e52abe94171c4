//! Client for Bitcoin Core's IPC `Mining` interface.

pub mod schema;

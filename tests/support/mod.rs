//! Shared helpers for integration tests.
//!
//! Include with `mod support;` from a file in `tests/`. Each test crate uses only part of
//! these helpers, hence the crate-wide allowances below.
#![allow(dead_code, unused_imports)]

pub mod bitcoin_node;
pub mod daemon_proc;
pub mod deploy_check;
pub mod grind;
pub mod op_true;
pub mod sri;

pub use bitcoin_node::{bitcoin_node_binary, BitcoinNode, NodeError};
pub use op_true::{
    op_true_address, op_true_script, op_true_witness_script, spend_op_true, OpTrueCoin,
};
pub mod tp;

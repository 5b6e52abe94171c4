//! Shared helpers for integration tests.
//!
//! Include with `mod support;` from a file in `tests/`. Each test crate uses only part of
//! these helpers, hence the crate-wide allowances below.
#![allow(dead_code, unused_imports)]

pub mod alert_series;
pub mod bitcoin_node;
pub mod daemon_proc;
pub mod deploy_check;
pub mod grind;
pub mod op_true;
pub mod proc_status;
pub mod sri;
pub mod stream_check;

pub use bitcoin_node::{bitcoin_node_binary, BitcoinNode, NodeError};
pub use op_true::{
    op_true_address, op_true_script, op_true_witness_script, spend_op_true, OpTrueCoin,
};
pub mod tp;

/// Starts a real node for the test named `$test`, or ends the test (returning `$skipped`,
/// `()` when not given) when there is none; under CI a missing node fails instead (see
/// [`bitcoin_node_binary`]).
#[macro_export]
macro_rules! node_or_skip {
    ($test:expr) => {
        $crate::node_or_skip!($test, ())
    };
    ($test:expr, $skipped:expr) => {
        match $crate::support::BitcoinNode::start_if_available($test).expect("bitcoin-node starts")
        {
            Some(node) => node,
            None => return $skipped,
        }
    };
}

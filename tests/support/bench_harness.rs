//! The parts of the test harness the benchmark (`examples/bench/`) shares: everything
//! but what exists only inside a test binary.
#![allow(dead_code, unused_imports)]

#[path = "bitcoin_node.rs"]
pub mod bitcoin_node;
#[path = "grind.rs"]
pub mod grind;
#[path = "op_true.rs"]
pub mod op_true;
#[path = "proc_status.rs"]
pub mod proc_status;
#[path = "stream_check.rs"]
pub mod stream_check;
#[path = "tp.rs"]
pub mod tp;

pub use bitcoin_node::{bitcoin_node_binary, BitcoinNode};

//! Plain data the node hands out, in rust-bitcoin types.

use bitcoin::{block::Header, Amount, BlockHash, TxMerkleNode, TxOut};

/// The node's IPC interface line, detected at connect time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeLine {
    /// Bitcoin Core v31.0: no `getTransactionsByTxID`, `submitSolution @7`.
    V31_0,
    /// Bitcoin Core 31.99 (master before v32): `submitSolution @7`.
    V31_99,
    /// The v32 line: `submitSolution @10`; `@7` throws without submitting.
    V32,
}

impl NodeLine {
    /// The label used in logs and the `sv2_tpd_node_info` metric.
    pub fn label(self) -> &'static str {
        match self {
            NodeLine::V31_0 => "v31.0",
            NodeLine::V31_99 => "v31.99",
            NodeLine::V32 => "v32",
        }
    }
}

/// A chain tip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tip {
    /// Block hash.
    pub hash: BlockHash,
    /// Block height.
    pub height: u32,
}

/// Options for `createNewBlock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CreateOptions {
    /// Weight kept free for the coinbase (the node refuses less than 2000).
    pub block_reserved_weight: u64,
    /// Sigops kept free for the coinbase outputs.
    pub coinbase_output_max_additional_sigops: u64,
    /// Include mempool transactions.
    pub use_mempool: bool,
    /// Let the node wait out initial block download and headers running ahead of the
    /// tip before building (`createNewBlock`'s `cooldown`); off for a tip the node just
    /// reported.
    pub cooldown: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            block_reserved_weight: 8000,
            coinbase_output_max_additional_sigops: 400,
            use_mempool: true,
            cooldown: true,
        }
    }
}

/// What the node requires of the coinbase transaction (`getCoinbaseTx`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoinbaseTemplate {
    /// Transaction version.
    pub version: u32,
    /// The coinbase input's sequence.
    pub sequence: u32,
    /// Start of the scriptSig: the BIP34 height push.
    pub script_sig_prefix: Vec<u8>,
    /// The coinbase input's witness (the witness reserved value), when the block commits
    /// to witnesses.
    pub witness: Option<Vec<u8>>,
    /// Subsidy plus fees, for the outputs the client adds.
    pub block_reward_remaining: Amount,
    /// Outputs that must come last (today the witness commitment).
    pub required_outputs: Vec<TxOut>,
    /// Transaction lock time.
    pub lock_time: u32,
}

/// Everything a `NewTemplate` / `SetNewPrevHash` pair needs, read in one round trip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateData {
    /// The header, with a zero merkle root.
    pub header: Header,
    /// Coinbase requirements.
    pub coinbase: CoinbaseTemplate,
    /// Merkle siblings of the coinbase, deepest first.
    pub merkle_path: Vec<TxMerkleNode>,
    /// Fees of the non-coinbase transactions, in block order.
    pub tx_fees: Vec<Amount>,
}

impl TemplateData {
    /// Sum of the template's transaction fees.
    pub fn total_fees(&self) -> Amount {
        self.tx_fees.iter().copied().sum()
    }

    /// Height of the block this template builds.
    pub fn height(&self) -> u32 {
        self.coinbase.lock_time.saturating_add(1)
    }
}

/// The node's verdict on a solution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubmitVerdict {
    /// The node accepted the block (on v31 also true for a duplicate).
    pub accepted: bool,
    /// The node's reason when it refused (v32 line only).
    pub reason: String,
}

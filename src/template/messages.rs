//! From the node's template data to Template Distribution messages, and from a
//! `SubmitSolution` back to a block.

use bitcoin::consensus::{deserialize, serialize};
use bitcoin::hashes::{sha256d, Hash};
use bitcoin::{Block, Target, Transaction, TxMerkleNode, Witness};
use stratum_core::binary_sv2::{B0255Owned, B064KOwned, Seq0255Owned, U256Owned};
use stratum_core::template_distribution_sv2::{
    NewTemplateOwned, SetNewPrevHashOwned, SubmitSolutionOwned,
};

use crate::node::TemplateData;

/// A template's data could not be expressed in SV2 types (a node bug or a future
/// format this version does not know).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode template field {field}: {reason}")]
pub struct EncodeError {
    field: &'static str,
    reason: String,
}

fn encode_err(field: &'static str) -> impl FnOnce(stratum_core::binary_sv2::Error) -> EncodeError {
    move |e| EncodeError {
        field,
        reason: format!("{e:?}"),
    }
}

fn u256(bytes: [u8; 32], field: &'static str) -> Result<U256Owned, EncodeError> {
    U256Owned::new(bytes.to_vec()).map_err(encode_err(field))
}

/// `NewTemplate` for `data`.
pub fn new_template(
    template_id: u64,
    future_template: bool,
    data: &TemplateData,
) -> Result<NewTemplateOwned, EncodeError> {
    let cb = &data.coinbase;
    let outputs: Vec<u8> = cb.required_outputs.iter().flat_map(serialize).collect();
    let merkle_path = data
        .merkle_path
        .iter()
        .map(|node| u256(node.to_byte_array(), "merkle_path"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NewTemplateOwned {
        template_id,
        future_template,
        version: data.header.version.to_consensus() as u32,
        coinbase_tx_version: cb.version,
        coinbase_prefix: B0255Owned::new(cb.script_sig_prefix.clone())
            .map_err(encode_err("coinbase_prefix"))?,
        coinbase_tx_input_sequence: cb.sequence,
        coinbase_tx_value_remaining: cb.block_reward_remaining.to_sat(),
        coinbase_tx_outputs_count: cb.required_outputs.len() as u32,
        coinbase_tx_outputs: B064KOwned::new(outputs).map_err(encode_err("coinbase_tx_outputs"))?,
        coinbase_tx_locktime: cb.lock_time,
        merkle_path: Seq0255Owned::new(merkle_path).map_err(encode_err("merkle_path"))?,
    })
}

/// `SetNewPrevHash` activating template `template_id`.
pub fn set_new_prev_hash(
    template_id: u64,
    data: &TemplateData,
) -> Result<SetNewPrevHashOwned, EncodeError> {
    let header = &data.header;
    Ok(SetNewPrevHashOwned {
        template_id,
        prev_hash: u256(header.prev_blockhash.to_byte_array(), "prev_hash")?,
        header_timestamp: header.time,
        n_bits: header.bits.to_consensus(),
        target: u256(Target::from_compact(header.bits).to_le_bytes(), "target")?,
    })
}

/// Why a solution could not be turned into a block.
#[derive(Debug, thiserror::Error)]
pub enum SolutionError {
    /// `coinbase_tx` is not a transaction.
    #[error("coinbase_tx does not decode: {0}")]
    BadCoinbase(String),
}

/// A solution turned back into a header and coinbase.
#[derive(Clone, Debug)]
pub struct SolvedBlock {
    /// The solved header.
    pub header: bitcoin::block::Header,
    /// The coinbase, with the witness reserved value filled in when the client left the
    /// witness out (the block commits to witnesses, so the node needs it).
    pub coinbase: Transaction,
}

impl SolvedBlock {
    /// Rebuilds the header and coinbase of `solution` on `data`.
    pub fn new(data: &TemplateData, solution: &SubmitSolutionOwned) -> Result<Self, SolutionError> {
        let mut coinbase: Transaction = deserialize(solution.coinbase_tx.as_bytes())
            .map_err(|e| SolutionError::BadCoinbase(e.to_string()))?;
        if let (Some(reserved), Some(input)) = (&data.coinbase.witness, coinbase.input.first_mut())
        {
            if input.witness.is_empty() {
                input.witness = Witness::from_slice(&[reserved.as_slice()]);
            }
        }
        let mut root = coinbase.compute_txid().to_raw_hash();
        for sibling in &data.merkle_path {
            let mut engine = sha256d::Hash::engine();
            bitcoin::hashes::HashEngine::input(&mut engine, root.as_byte_array());
            bitcoin::hashes::HashEngine::input(&mut engine, sibling.as_byte_array());
            root = sha256d::Hash::from_engine(engine);
        }
        let mut header = data.header;
        header.version = bitcoin::block::Version::from_consensus(solution.version as i32);
        header.time = solution.header_timestamp;
        header.nonce = solution.header_nonce;
        header.merkle_root = TxMerkleNode::from_raw_hash(root);
        Ok(Self { header, coinbase })
    }

    /// Whether the header's hash meets the target its own `nBits` encode: the proof of work
    /// every block needs, checked before a solution costs a disk write or a node call.
    ///
    /// `nBits` comes from the template (the solution cannot change it), so a header that
    /// fails here can never become a block.
    pub fn meets_target(&self) -> bool {
        self.header.target().is_met_by(self.header.block_hash())
    }

    /// The full block, given the template's block (whose coinbase is a placeholder).
    pub fn block(&self, template_block: &Block) -> Block {
        let mut txdata = Vec::with_capacity(template_block.txdata.len().max(1));
        txdata.push(self.coinbase.clone());
        txdata.extend(template_block.txdata.iter().skip(1).cloned());
        Block {
            header: self.header,
            txdata,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::block::{Header, Version};
    use bitcoin::{BlockHash, CompactTarget};

    /// Regtest's `nBits`: about every other hash meets it.
    const REGTEST_BITS: u32 = 0x207f_ffff;

    fn solved(bits: u32, nonce: u32) -> SolvedBlock {
        SolvedBlock {
            header: Header {
                version: Version::from_consensus(0x2000_0000),
                prev_blockhash: BlockHash::from_byte_array([0x11; 32]),
                merkle_root: TxMerkleNode::from_byte_array([0x22; 32]),
                time: 1_700_000_000,
                bits: CompactTarget::from_consensus(bits),
                nonce,
            },
            coinbase: Transaction {
                version: bitcoin::transaction::Version::TWO,
                lock_time: bitcoin::absolute::LockTime::ZERO,
                input: vec![],
                output: vec![],
            },
        }
    }

    /// The first nonce from 0 whose header meets (`want`) or misses the target.
    fn first_nonce(bits: u32, want: bool) -> SolvedBlock {
        (0..u32::MAX)
            .map(|nonce| solved(bits, nonce))
            .find(|block| {
                let target = Target::from_compact(block.header.bits);
                target.is_met_by(block.header.block_hash()) == want
            })
            .expect("a nonce within a few tries")
    }

    #[test]
    fn a_header_that_meets_the_regtest_target_passes() {
        let block = first_nonce(REGTEST_BITS, true);
        assert!(block.meets_target());
        // The hash, read as a little-endian number, is at most the target.
        let hash = block.header.block_hash().to_byte_array();
        let target = Target::from_compact(block.header.bits).to_le_bytes();
        assert!(hash.iter().rev().le(target.iter().rev()));
    }

    #[test]
    fn a_header_above_the_regtest_target_fails() {
        let block = first_nonce(REGTEST_BITS, false);
        assert!(!block.meets_target());
    }

    #[test]
    fn a_mainnet_difficulty_header_with_an_arbitrary_nonce_fails() {
        // Genesis-era difficulty 1: a random header meets it about once in 2^32 tries.
        for nonce in 0..64 {
            assert!(!solved(0x1d00_ffff, nonce).meets_target(), "nonce {nonce}");
        }
    }

    #[test]
    fn changing_the_nonce_of_a_solved_header_changes_the_verdict_somewhere() {
        let block = first_nonce(REGTEST_BITS, true);
        let misses = (1..64)
            .map(|delta| solved(REGTEST_BITS, block.header.nonce.wrapping_add(delta)))
            .any(|other| !other.meets_target());
        assert!(misses, "the check depends on the header's hash");
    }

    #[test]
    fn the_mainnet_genesis_header_meets_its_target() {
        let genesis = bitcoin::blockdata::constants::genesis_block(bitcoin::Network::Bitcoin);
        let block = SolvedBlock {
            header: genesis.header,
            coinbase: genesis.txdata[0].clone(),
        };
        assert!(block.meets_target());
    }
}

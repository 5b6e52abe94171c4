//! From the node's template data to Template Distribution messages, and from a
//! `SubmitSolution` back to a block.

use bitcoin::consensus::{deserialize, serialize};
use bitcoin::hashes::{sha256d, Hash};
use bitcoin::{Block, Target, Transaction, TxMerkleNode, Witness};
use stratum_core::binary_sv2::{B0255Owned, B064KOwned, Seq0255Owned, U256Owned};
use stratum_core::template_distribution_sv2::{
    NewTemplateOwned, SetNewPrevHashOwned, SubmitSolutionOwned,
};

use super::cache::TemplateTxs;
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

/// The `NewTemplate` and `SetNewPrevHash` announcing `data` as template `template_id`.
pub fn announce(
    template_id: u64,
    future_template: bool,
    data: &TemplateData,
) -> Result<(NewTemplateOwned, SetNewPrevHashOwned), EncodeError> {
    Ok((
        new_template(template_id, future_template, data)?,
        set_new_prev_hash(template_id, data)?,
    ))
}

/// Why a solution could not be turned into a block.
#[derive(Debug, thiserror::Error)]
pub enum SolutionError {
    /// `coinbase_tx` is not a transaction.
    #[error("coinbase_tx does not decode: {0}")]
    BadCoinbase(String),
}

/// The coinbase a solution carries, decoded.
pub fn decode_coinbase(solution: &SubmitSolutionOwned) -> Result<Transaction, SolutionError> {
    deserialize(solution.coinbase_tx.as_bytes())
        .map_err(|e| SolutionError::BadCoinbase(e.to_string()))
}

/// The header `solution` makes on `data` with a coinbase whose txid is `coinbase_txid`
/// (the witness is not in the txid, so it does not matter here).
pub fn header_on(
    data: &TemplateData,
    solution: &SubmitSolutionOwned,
    coinbase_txid: bitcoin::Txid,
) -> bitcoin::block::Header {
    let mut root = coinbase_txid.to_raw_hash();
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
    header
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
        let mut coinbase = decode_coinbase(solution)?;
        if let (Some(reserved), Some(input)) = (&data.coinbase.witness, coinbase.input.first_mut())
        {
            if input.witness.is_empty() {
                input.witness = Witness::from_slice(&[reserved.as_slice()]);
            }
        }
        let header = header_on(data, solution, coinbase.compute_txid());
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

    /// The full block's consensus bytes, given the template's cached transactions.
    pub(crate) fn block_bytes(&self, template_txs: &TemplateTxs) -> Vec<u8> {
        template_txs.block_bytes(&self.header, &self.coinbase)
    }

    /// The full block, given the template's cached transactions (decoded from
    /// [`SolvedBlock::block_bytes`]; only the cache's own serialization, so it decodes).
    pub(crate) fn block(
        &self,
        template_txs: &TemplateTxs,
    ) -> Result<Block, bitcoin::consensus::encode::Error> {
        deserialize(&self.block_bytes(template_txs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::CoinbaseTemplate;
    use bitcoin::{
        absolute::LockTime, transaction::Version, Amount, OutPoint, ScriptBuf, Sequence, TxIn,
        TxOut,
    };

    fn data(merkle_path: Vec<TxMerkleNode>, witness: Option<Vec<u8>>) -> TemplateData {
        let mut header = bitcoin::constants::genesis_block(bitcoin::Network::Regtest).header;
        header.merkle_root = TxMerkleNode::all_zeros();
        TemplateData {
            header,
            coinbase: CoinbaseTemplate {
                version: 2,
                sequence: 0xffff_fffe,
                script_sig_prefix: vec![0x51],
                witness,
                block_reward_remaining: Amount::from_sat(5_000_000_000),
                required_outputs: vec![TxOut {
                    value: Amount::ZERO,
                    script_pubkey: ScriptBuf::from_bytes(vec![0x6a, 0x24, 0xaa]),
                }],
                lock_time: 0,
            },
            merkle_path,
            tx_fees: vec![Amount::from_sat(300), Amount::from_sat(200)],
        }
    }

    fn coinbase() -> Transaction {
        Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint::null(),
                script_sig: ScriptBuf::from_bytes(vec![0x51, 0x00]),
                sequence: Sequence(0xffff_fffe),
                witness: Witness::new(),
            }],
            output: vec![TxOut {
                value: Amount::from_sat(5_000_000_000),
                script_pubkey: ScriptBuf::new_op_return([1u8; 4]),
            }],
        }
    }

    fn solution(template_id: u64, coinbase: &Transaction) -> SubmitSolutionOwned {
        SubmitSolutionOwned {
            template_id,
            version: 0x2000_0004,
            header_timestamp: 1_700_000_000,
            header_nonce: 42,
            coinbase_tx: B064KOwned::new(serialize(coinbase)).expect("coinbase fits"),
        }
    }

    #[test]
    fn new_template_carries_the_coinbase_requirements() {
        let d = data(vec![TxMerkleNode::from_byte_array([3; 32])], None);
        let t = new_template(9, true, &d).unwrap();
        assert_eq!(t.template_id, 9);
        assert!(t.future_template);
        assert_eq!(t.version, d.header.version.to_consensus() as u32);
        assert_eq!(t.coinbase_prefix.as_ref(), [0x51u8].as_slice());
        assert_eq!(t.coinbase_tx_input_sequence, 0xffff_fffe);
        assert_eq!(t.coinbase_tx_value_remaining, 5_000_000_000);
        assert_eq!(t.coinbase_tx_outputs_count, 1);
        assert_eq!(
            t.coinbase_tx_outputs.as_ref(),
            serialize(&d.coinbase.required_outputs[0]).as_slice()
        );
        assert_eq!(t.merkle_path.len(), 1);
        assert_eq!(t.merkle_path.as_slice()[0].as_ref(), [3u8; 32].as_slice());
    }

    #[test]
    fn set_new_prev_hash_carries_the_tip_and_its_target() {
        let d = data(vec![], None);
        let p = set_new_prev_hash(4, &d).unwrap();
        assert_eq!(p.template_id, 4);
        assert_eq!(
            p.prev_hash.as_ref(),
            d.header.prev_blockhash.as_byte_array().as_slice()
        );
        assert_eq!(p.n_bits, d.header.bits.to_consensus());
        assert_eq!(p.header_timestamp, d.header.time);
        let target = Target::from_le_bytes(p.target.as_ref().try_into().unwrap());
        assert_eq!(target, Target::from_compact(d.header.bits));
        let (nt, snph) = announce(4, false, &d).unwrap();
        assert_eq!((nt.template_id, nt.future_template), (4, false));
        assert_eq!(snph, p);
    }

    #[test]
    fn a_solution_rebuilds_header_and_merkle_root() {
        let sibling = TxMerkleNode::from_byte_array([5; 32]);
        let d = data(vec![sibling], Some(vec![0; 32]));
        let solved = SolvedBlock::new(&d, &solution(1, &coinbase())).unwrap();
        assert_eq!(solved.header.version.to_consensus(), 0x2000_0004);
        assert_eq!(solved.header.time, 1_700_000_000);
        assert_eq!(solved.header.nonce, 42);
        assert_eq!(solved.header.prev_blockhash, d.header.prev_blockhash);
        assert_eq!(
            solved.coinbase.input[0].witness.to_vec(),
            vec![vec![0u8; 32]],
            "the witness reserved value is filled in"
        );
        // Two leaves: the coinbase and its sibling.
        let leaves = [
            solved.coinbase.compute_txid().to_raw_hash(),
            sibling.to_raw_hash(),
        ];
        let root = bitcoin::merkle_tree::calculate_root(leaves.into_iter()).unwrap();
        assert_eq!(solved.header.merkle_root, TxMerkleNode::from_raw_hash(root));

        let template_block = Block {
            header: d.header,
            txdata: vec![coinbase(), coinbase()],
        };
        let txs = TemplateTxs::from_block(&template_block);
        let block = solved.block(&txs).unwrap();
        assert_eq!(block.txdata[0], solved.coinbase);
        assert_eq!(block.txdata.len(), 2);
        assert_eq!(block.txdata[1], template_block.txdata[1]);
        assert_eq!(block.header, solved.header);
        assert_eq!(serialize(&block), solved.block_bytes(&txs));
    }

    #[test]
    fn a_coinbase_that_does_not_decode_is_refused() {
        let d = data(vec![], None);
        let mut bad = solution(1, &coinbase());
        bad.coinbase_tx = B064KOwned::new(vec![1, 2, 3]).unwrap();
        assert!(matches!(
            SolvedBlock::new(&d, &bad),
            Err(SolutionError::BadCoinbase(_))
        ));
    }
}

#[cfg(test)]
mod pow_tests {
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

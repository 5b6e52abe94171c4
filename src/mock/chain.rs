//! The simulated regtest chain behind the mock node: blocks, mempool and block templates
//! built the way Bitcoin Core's `BlockAssembler` builds them.

use std::time::{SystemTime, UNIX_EPOCH};

use bitcoin::absolute::LockTime;
use bitcoin::block::{Header, Version as BlockVersion};
use bitcoin::consensus::encode::serialize;
use bitcoin::hashes::{sha256d, Hash};
use bitcoin::script::Builder;
use bitcoin::transaction::Version as TxVersion;
use bitcoin::{
    Amount, Block, BlockHash, CompactTarget, OutPoint, ScriptBuf, Sequence, Target, Transaction,
    TxIn, TxMerkleNode, TxOut, Txid, Witness, Wtxid,
};

/// Regtest's proof-of-work limit, used as every block's `nBits`.
pub(crate) const REGTEST_BITS: u32 = 0x207f_ffff;
/// Block version Bitcoin Core sets when no soft fork is signalling.
pub(crate) const TEMPLATE_VERSION: i32 = 0x2000_0000;
/// Consensus maximum block weight.
pub(crate) const MAX_BLOCK_WEIGHT: u64 = 4_000_000;
/// Consensus maximum sigops cost per block.
pub(crate) const MAX_BLOCK_SIGOPS_COST: u64 = 80_000;
/// Smallest `blockReservedWeight` Bitcoin Core accepts.
pub(crate) const MIN_BLOCK_RESERVED_WEIGHT: u64 = 2_000;
/// Bitcoin Core's `MAX_MONEY`, the "no fee threshold" value of `waitNext`.
pub(crate) const MAX_MONEY: i64 = 2_100_000_000_000_000;
/// Coinbase sequence: `CTxIn::MAX_SEQUENCE_NONFINAL`.
const COINBASE_SEQUENCE: u32 = 0xffff_fffe;
/// Regtest halving interval.
const REGTEST_HALVING_INTERVAL: u32 = 150;
/// Sigops cost the mock charges for each of its made-up mempool transactions (one P2WPKH spend).
const MEMPOOL_TX_SIGOPS: i64 = 1;
/// Bitcoin Core accepts block times up to two hours ahead of its clock.
const MAX_FUTURE_BLOCK_TIME: u32 = 2 * 60 * 60;

/// Options of one template, from `Mining.createNewBlock`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TemplateOptions {
    pub use_mempool: bool,
    pub block_reserved_weight: u64,
    pub coinbase_output_max_additional_sigops: u64,
}

/// What the node requires of the coinbase (Bitcoin Core's `CoinbaseTx`).
#[derive(Clone, Debug)]
pub(crate) struct CoinbaseRequirements {
    pub version: u32,
    pub sequence: u32,
    pub script_sig_prefix: Vec<u8>,
    pub witness: Option<[u8; 32]>,
    pub block_reward_remaining: Amount,
    pub required_outputs: Vec<TxOut>,
    pub lock_time: u32,
}

/// A block template as Bitcoin Core's `CBlockTemplate` holds it.
#[derive(Clone, Debug)]
pub(crate) struct TemplateData {
    /// Header with a zero merkle root, dummy coinbase first, then the packed transactions.
    pub block: Block,
    pub tx_fees: Vec<i64>,
    pub tx_sigops: Vec<i64>,
    pub coinbase: CoinbaseRequirements,
    pub total_fees: Amount,
    pub options: TemplateOptions,
}

impl TemplateData {
    /// The 80-byte header (merkle root zero).
    pub fn header_bytes(&self) -> Vec<u8> {
        serialize(&self.block.header)
    }

    /// Sibling hashes of the coinbase up the merkle tree, deepest first.
    pub fn coinbase_merkle_path(&self) -> Vec<[u8; 32]> {
        let leaves: Vec<[u8; 32]> = self
            .block
            .txdata
            .iter()
            .map(|tx| tx.compute_txid().to_byte_array())
            .collect();
        coinbase_merkle_path(leaves)
    }
}

/// Sibling hashes of leaf 0, deepest first (Bitcoin Core's `TransactionMerklePath(block, 0)`).
pub(crate) fn coinbase_merkle_path(mut level: Vec<[u8; 32]>) -> Vec<[u8; 32]> {
    let mut path = Vec::new();
    while level.len() > 1 {
        path.push(level[1]);
        if level.len() % 2 == 1 {
            let last = level[level.len() - 1];
            level.push(last);
        }
        level = level
            .chunks(2)
            .map(|pair| {
                let mut concat = [0u8; 64];
                concat[..32].copy_from_slice(&pair[0]);
                concat[32..].copy_from_slice(&pair[1]);
                sha256d::Hash::hash(&concat).to_byte_array()
            })
            .collect();
    }
    path
}

/// A transaction waiting in the mock's mempool.
#[derive(Clone, Debug)]
pub(crate) struct MempoolEntry {
    pub tx: Transaction,
    pub fee: Amount,
}

/// Why a block was not accepted (Bitcoin Core's reject reason and debug message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub reason: String,
    pub debug: String,
}

impl Rejection {
    fn new(reason: &str, debug: &str) -> Self {
        Rejection {
            reason: reason.to_string(),
            debug: debug.to_string(),
        }
    }
}

/// Outcome of handing a block to the chain, mirroring Bitcoin Core's `SubmitBlock`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SubmitOutcome {
    /// Valid and now the tip.
    NewTip,
    /// Already known.
    Duplicate,
    /// Valid but built on a block that is no longer the tip: stored, tip unchanged.
    Stale,
    /// Invalid.
    Rejected(Rejection),
}

/// The simulated chain and mempool.
#[derive(Debug)]
pub(crate) struct Chain {
    blocks: Vec<Block>,
    mempool: Vec<MempoolEntry>,
    accepted: Vec<Block>,
    /// Blocks taken off the tip by `invalidate_tip`, the most recent last.
    invalidated: Vec<Block>,
    next_fake_outpoint: u64,
    /// nBits of new templates (and required of solutions).
    pub(crate) bits: u32,
}

/// Seconds since the epoch, as Bitcoin Core's block times use.
pub(crate) fn unix_now() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// Regtest block subsidy at `height`.
pub(crate) fn block_subsidy(height: u32) -> Amount {
    let halvings = height / REGTEST_HALVING_INTERVAL;
    if halvings >= 64 {
        return Amount::ZERO;
    }
    Amount::from_sat((50 * 100_000_000u64) >> halvings)
}

/// The BIP34 height push Bitcoin Core puts first in the coinbase scriptSig.
pub(crate) fn bip34_height_push(height: u32) -> Vec<u8> {
    Builder::new()
        .push_int(i64::from(height))
        .into_script()
        .into_bytes()
}

/// The witness commitment output script (38 bytes) over `block`'s wtxids with a zero
/// reserved value.
fn witness_commitment_script(block: &Block) -> ScriptBuf {
    let witness_root = block
        .witness_root()
        .unwrap_or_else(|| Wtxid::all_zeros().to_raw_hash().into());
    let commitment = Block::compute_witness_commitment(&witness_root, &[0u8; 32]);
    let mut bytes = vec![0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed];
    bytes.extend_from_slice(&commitment.to_byte_array());
    ScriptBuf::from_bytes(bytes)
}

impl Chain {
    /// Regtest genesis plus `initial_blocks` blocks mined one second apart, ending now.
    pub fn new(initial_blocks: u32) -> Self {
        let mut chain = Chain {
            blocks: vec![bitcoin::constants::genesis_block(bitcoin::Network::Regtest)],
            mempool: Vec::new(),
            accepted: Vec::new(),
            invalidated: Vec::new(),
            next_fake_outpoint: 0,
            bits: REGTEST_BITS,
        };
        let start = unix_now().saturating_sub(initial_blocks);
        for i in 0..initial_blocks {
            chain.mine_at(start + i + 1, true);
        }
        chain
    }

    /// The chain's blocks above `height`, lowest first.
    pub fn blocks_above(&self, height: u32) -> Vec<Block> {
        self.blocks
            .iter()
            .skip(
                usize::try_from(height)
                    .unwrap_or(usize::MAX)
                    .saturating_add(1),
            )
            .cloned()
            .collect()
    }

    /// Hash and height of the tip.
    pub fn tip(&self) -> (BlockHash, u32) {
        let height = u32::try_from(self.blocks.len() - 1).unwrap_or(u32::MAX);
        (self.tip_block().block_hash(), height)
    }

    fn tip_block(&self) -> &Block {
        // `blocks` always holds at least the genesis block.
        &self.blocks[self.blocks.len() - 1]
    }

    /// Median time of the last 11 blocks.
    pub fn median_time_past(&self) -> u32 {
        let mut times: Vec<u32> = self
            .blocks
            .iter()
            .rev()
            .take(11)
            .map(|b| b.header.time)
            .collect();
        times.sort_unstable();
        times[times.len() / 2]
    }

    /// Blocks accepted through `submitSolution` / `submitBlock`.
    pub fn accepted_blocks(&self) -> &[Block] {
        &self.accepted
    }

    /// A mempool transaction by txid or wtxid, serialized with witness.
    pub fn mempool_tx(&self, id: &[u8]) -> Option<&Transaction> {
        self.mempool.iter().map(|e| &e.tx).find(|tx| {
            tx.compute_txid().to_byte_array() == id || tx.compute_wtxid().to_byte_array() == id
        })
    }

    /// Adds a made-up transaction paying `fee`: it spends an invented outpoint with a
    /// P2WPKH-style witness, so it is real and unique but never validated against a UTXO set.
    pub fn add_mempool_tx(&mut self, fee: Amount) -> Txid {
        self.next_fake_outpoint += 1;
        let seed = sha256d::Hash::hash(&self.next_fake_outpoint.to_le_bytes());
        let mut signature = vec![0x30; 71];
        signature.push(0x01);
        let mut pubkey = vec![0x02];
        pubkey.extend_from_slice(&seed.to_byte_array());
        let tx = Transaction {
            version: TxVersion::TWO,
            lock_time: LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint {
                    txid: Txid::from_byte_array(seed.to_byte_array()),
                    vout: 0,
                },
                script_sig: ScriptBuf::new(),
                sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                witness: Witness::from_slice(&[signature, pubkey]),
            }],
            output: vec![TxOut {
                value: Amount::from_sat(10_000),
                script_pubkey: ScriptBuf::from_bytes(
                    [&[0x00, 0x14][..], &seed.to_byte_array()[..20]].concat(),
                ),
            }],
        };
        let txid = tx.compute_txid();
        self.mempool.push(MempoolEntry { tx, fee });
        txid
    }

    /// Builds a template on the current tip, like `BlockAssembler::CreateNewBlock`.
    pub fn build_template(&self, options: TemplateOptions) -> TemplateData {
        let (tip_hash, tip_height) = self.tip();
        let height = tip_height + 1;

        let mut packed: Vec<&MempoolEntry> = Vec::new();
        if options.use_mempool {
            let mut candidates: Vec<&MempoolEntry> = self.mempool.iter().collect();
            // Highest feerate first; ties keep arrival order (stable sort).
            candidates.sort_by(|a, b| {
                let rate = |e: &MempoolEntry| e.fee.to_sat() as f64 / e.tx.weight().to_wu() as f64;
                rate(b).total_cmp(&rate(a))
            });
            let max_weight = MAX_BLOCK_WEIGHT.saturating_sub(options.block_reserved_weight);
            let max_sigops =
                MAX_BLOCK_SIGOPS_COST.saturating_sub(options.coinbase_output_max_additional_sigops);
            let (mut weight, mut sigops) = (0u64, 0u64);
            for entry in candidates {
                let tx_weight = entry.tx.weight().to_wu();
                let tx_sigops = MEMPOOL_TX_SIGOPS as u64;
                if weight + tx_weight > max_weight || sigops + tx_sigops > max_sigops {
                    continue;
                }
                weight += tx_weight;
                sigops += tx_sigops;
                packed.push(entry);
            }
        }

        let total_fees: Amount = packed.iter().map(|e| e.fee).sum();
        let reward = block_subsidy(height) + total_fees;
        let script_sig_prefix = bip34_height_push(height);
        let mut script_sig = script_sig_prefix.clone();
        if height <= 16 {
            script_sig.push(0x00); // OP_0: consensus wants a scriptSig of at least 2 bytes.
        }
        let coinbase = Transaction {
            version: TxVersion::TWO,
            lock_time: LockTime::from_consensus(height - 1),
            input: vec![TxIn {
                previous_output: OutPoint::null(),
                script_sig: ScriptBuf::from_bytes(script_sig),
                sequence: Sequence(COINBASE_SEQUENCE),
                witness: Witness::from_slice(&[[0u8; 32]]),
            }],
            output: vec![TxOut {
                value: reward,
                script_pubkey: ScriptBuf::from_bytes(vec![0x51]), // OP_TRUE
            }],
        };
        let mut txdata = vec![coinbase];
        txdata.extend(packed.iter().map(|e| e.tx.clone()));
        let header = Header {
            version: BlockVersion::from_consensus(TEMPLATE_VERSION),
            prev_blockhash: tip_hash,
            merkle_root: TxMerkleNode::all_zeros(),
            time: unix_now().max(self.median_time_past() + 1),
            bits: CompactTarget::from_consensus(self.bits),
            nonce: 0,
        };
        let mut block = Block { header, txdata };
        let commitment = TxOut {
            value: Amount::ZERO,
            script_pubkey: witness_commitment_script(&block),
        };
        block.txdata[0].output.push(commitment.clone());

        TemplateData {
            block,
            tx_fees: packed.iter().map(|e| e.fee.to_sat() as i64).collect(),
            tx_sigops: packed.iter().map(|_| MEMPOOL_TX_SIGOPS).collect(),
            coinbase: CoinbaseRequirements {
                version: 2,
                sequence: COINBASE_SEQUENCE,
                script_sig_prefix,
                witness: Some([0u8; 32]),
                block_reward_remaining: reward,
                required_outputs: vec![commitment],
                lock_time: height - 1,
            },
            total_fees,
            options,
        }
    }

    /// Mines a block on the tip, with the whole mempool (like `generatetoaddress`) or
    /// with none of it (like `generateblock` with an empty list: the mempool stays).
    pub fn mine_block(&mut self, use_mempool: bool) -> BlockHash {
        let time = unix_now().max(self.median_time_past() + 1);
        self.mine_at(time, use_mempool)
    }

    /// Takes the tip off the chain, like `invalidateblock` of the tip: its parent is the
    /// tip again (its transactions do not return to the mempool). `None` at genesis.
    pub fn invalidate_tip(&mut self) -> Option<BlockHash> {
        if self.blocks.len() < 2 {
            return None;
        }
        let block = self.blocks.pop()?;
        let hash = block.block_hash();
        self.invalidated.push(block);
        Some(hash)
    }

    /// Puts every invalidated block back on the chain, like `reconsiderblock`; returns the
    /// tip.
    pub fn reconsider(&mut self) -> BlockHash {
        while let Some(block) = self.invalidated.pop() {
            self.connect(block);
        }
        self.tip().0
    }

    fn mine_at(&mut self, time: u32, use_mempool: bool) -> BlockHash {
        let template = self.build_template(TemplateOptions {
            use_mempool,
            block_reserved_weight: 8_000,
            coinbase_output_max_additional_sigops: 400,
        });
        let mut block = template.block;
        block.header.time = time.max(self.median_time_past() + 1);
        block.header.merkle_root = block
            .compute_merkle_root()
            .unwrap_or(block.header.merkle_root);
        grind(&mut block.header);
        let hash = block.block_hash();
        self.connect(block);
        hash
    }

    fn connect(&mut self, block: Block) {
        let mined: Vec<Txid> = block.txdata.iter().map(|tx| tx.compute_txid()).collect();
        self.mempool
            .retain(|e| !mined.contains(&e.tx.compute_txid()));
        self.blocks.push(block);
    }

    fn is_known(&self, hash: &BlockHash) -> bool {
        self.blocks.iter().any(|b| b.block_hash() == *hash)
            || self.accepted.iter().any(|b| b.block_hash() == *hash)
    }

    /// Checks `block` as validation would for the parts a miner controls and, when valid,
    /// stores it (and makes it the tip when it extends the tip).
    pub fn submit(&mut self, block: Block, check_pow: bool, check_merkle: bool) -> SubmitOutcome {
        let hash = block.block_hash();
        if self.is_known(&hash) {
            return SubmitOutcome::Duplicate;
        }
        if let Err(rejection) = self.check(&block, check_pow, check_merkle) {
            return SubmitOutcome::Rejected(rejection);
        }
        self.accepted.push(block.clone());
        if block.header.prev_blockhash == self.tip().0 {
            self.connect(block);
            SubmitOutcome::NewTip
        } else {
            SubmitOutcome::Stale
        }
    }

    /// Validity checks; `Err` carries Bitcoin Core's reject reason.
    pub fn check(
        &self,
        block: &Block,
        check_pow: bool,
        check_merkle: bool,
    ) -> Result<(), Rejection> {
        let header = &block.header;
        if check_pow
            && header
                .validate_pow(Target::from_compact(header.bits))
                .is_err()
        {
            return Err(Rejection::new("high-hash", "proof of work failed"));
        }
        let Some(parent_height) = self
            .blocks
            .iter()
            .position(|b| b.block_hash() == header.prev_blockhash)
        else {
            return Err(Rejection::new("prev-blk-not-found", ""));
        };
        if header.bits.to_consensus() != self.bits {
            return Err(Rejection::new("bad-diffbits", "incorrect proof of work"));
        }
        if check_merkle && !block.check_merkle_root() {
            return Err(Rejection::new("bad-txnmrklroot", "hashMerkleRoot mismatch"));
        }
        let Some(coinbase) = block.txdata.first().filter(|tx| tx.is_coinbase()) else {
            return Err(Rejection::new("bad-cb-missing", "first tx is not coinbase"));
        };
        let script_sig = coinbase.input[0].script_sig.as_bytes();
        if !(2..=100).contains(&script_sig.len()) {
            return Err(Rejection::new("bad-cb-length", ""));
        }
        let height = u32::try_from(parent_height + 1).unwrap_or(u32::MAX);
        if !script_sig.starts_with(&bip34_height_push(height)) {
            return Err(Rejection::new(
                "bad-cb-height",
                "block height mismatch in coinbase",
            ));
        }
        if block.txdata[1..].iter().any(|tx| tx.is_coinbase()) {
            return Err(Rejection::new("bad-cb-multiple", "more than one coinbase"));
        }
        let mtp = self.median_time_past_at(parent_height);
        if header.time <= mtp {
            return Err(Rejection::new(
                "time-too-old",
                "block's timestamp is too early",
            ));
        }
        if header.time > unix_now().saturating_add(MAX_FUTURE_BLOCK_TIME) {
            return Err(Rejection::new(
                "time-too-new",
                "block timestamp too far in the future",
            ));
        }
        let fees: Amount = block.txdata[1..]
            .iter()
            .map(|tx| {
                let id = tx.compute_txid();
                self.mempool
                    .iter()
                    .find(|e| e.tx.compute_txid() == id)
                    .map_or(Amount::ZERO, |e| e.fee)
            })
            .sum();
        let paid: Amount = coinbase.output.iter().map(|o| o.value).sum();
        if paid > block_subsidy(height) + fees {
            return Err(Rejection::new("bad-cb-amount", "coinbase pays too much"));
        }
        if !block.check_witness_commitment() {
            return Err(Rejection::new(
                "bad-witness-merkle-match",
                "witness merkle commitment mismatch",
            ));
        }
        if block.weight().to_wu() > MAX_BLOCK_WEIGHT {
            return Err(Rejection::new("bad-blk-weight", "weight limit failed"));
        }
        Ok(())
    }

    fn median_time_past_at(&self, height: usize) -> u32 {
        let start = height.saturating_sub(10);
        let mut times: Vec<u32> = self.blocks[start..=height]
            .iter()
            .map(|b| b.header.time)
            .collect();
        times.sort_unstable();
        times[times.len() / 2]
    }
}

/// Finds a nonce meeting the header's target (regtest: about two tries).
pub(crate) fn grind(header: &mut Header) {
    let target = Target::from_compact(header.bits);
    while header.validate_pow(target).is_err() {
        header.nonce = header.nonce.wrapping_add(1);
        if header.nonce == 0 {
            header.time += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_options() -> TemplateOptions {
        TemplateOptions {
            use_mempool: true,
            block_reserved_weight: 8_000,
            coinbase_output_max_additional_sigops: 400,
        }
    }

    #[test]
    fn initial_chain_has_requested_height() {
        let chain = Chain::new(101);
        assert_eq!(chain.tip().1, 101);
    }

    #[test]
    fn template_coinbase_matches_core_shape() {
        let mut chain = Chain::new(5);
        chain.add_mempool_tx(Amount::from_sat(1_000));
        let t = chain.build_template(default_options());
        assert_eq!(t.coinbase.script_sig_prefix, vec![0x56]); // OP_6
        assert_eq!(t.coinbase.lock_time, 5);
        assert_eq!(serialize(&t.coinbase.required_outputs[0]).len(), 47);
        assert_eq!(
            t.coinbase.block_reward_remaining,
            Amount::from_int_btc(50) + Amount::from_sat(1_000)
        );
        assert_eq!(t.header_bytes().len(), 80);
        assert_eq!(t.block.header.merkle_root, TxMerkleNode::all_zeros());
        assert_eq!(t.tx_fees, vec![1_000]);
    }

    #[test]
    fn merkle_path_recomputes_root() {
        let mut chain = Chain::new(3);
        for fee in 1..=4 {
            chain.add_mempool_tx(Amount::from_sat(fee * 100));
        }
        let t = chain.build_template(default_options());
        let mut node = t.block.txdata[0].compute_txid().to_byte_array();
        for sibling in t.coinbase_merkle_path() {
            let mut concat = [0u8; 64];
            concat[..32].copy_from_slice(&node);
            concat[32..].copy_from_slice(&sibling);
            node = sha256d::Hash::hash(&concat).to_byte_array();
        }
        let root = t.block.compute_merkle_root().map(|r| r.to_byte_array());
        assert_eq!(Some(node), root);
    }

    #[test]
    fn mined_template_is_accepted_and_clears_mempool() {
        let mut chain = Chain::new(3);
        chain.add_mempool_tx(Amount::from_sat(500));
        let t = chain.build_template(default_options());
        let mut block = t.block.clone();
        block.header.merkle_root = block.compute_merkle_root().expect("txs");
        grind(&mut block.header);
        assert_eq!(
            chain.submit(block.clone(), true, true),
            SubmitOutcome::NewTip
        );
        assert_eq!(chain.tip().0, block.block_hash());
        assert_eq!(chain.submit(block, true, true), SubmitOutcome::Duplicate);
        assert!(chain.build_template(default_options()).tx_fees.is_empty());
    }
}

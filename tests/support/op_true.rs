//! Keyless funding for tests: coins locked to P2WSH(`OP_TRUE`), spendable by anyone.
//!
//! The node runs without a wallet. Blocks are mined to the OP_TRUE address and their
//! coinbases spent by transactions whose only witness item is the witness script itself,
//! so tests can put fee-paying transactions in the mempool without signing anything.
#![allow(dead_code)]

use std::collections::{HashSet, VecDeque};

use bitcoin::absolute::LockTime;
use bitcoin::opcodes::OP_TRUE;
use bitcoin::transaction::Version;
use bitcoin::{
    Address, Amount, BlockHash, Network, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut,
    Txid, Witness,
};
use serde_json::json;

use super::bitcoin_node::{BitcoinNode, NodeError, Result};

/// Blocks on top of a coinbase's own block before it may be spent in the next block.
const COINBASE_MATURITY: u64 = 100;
/// Blocks `fund_op_true` mines: the first coinbase is spendable afterwards, and the tip is
/// recent, so the node leaves initial block download.
const FUNDING_BLOCKS: u64 = 101;

/// Outputs of one transaction that splits a coin for [`BitcoinNode::fill_mempool`]: about
/// 65 kvB, under the node's 100 kvB standardness limit.
const SPLIT_OUTPUTS: usize = 1_500;

/// An unspent output locked to [`op_true_script`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OpTrueCoin {
    /// Where the coin is.
    pub outpoint: OutPoint,
    /// What it is worth.
    pub value: Amount,
}

/// The witness script `OP_TRUE`: always succeeds, needs no signature.
pub fn op_true_witness_script() -> ScriptBuf {
    ScriptBuf::from_bytes(vec![OP_TRUE.to_u8()])
}

/// The P2WSH(`OP_TRUE`) `script_pubkey` every test coin is locked to.
pub fn op_true_script() -> ScriptBuf {
    ScriptBuf::new_p2wsh(&op_true_witness_script().wscript_hash())
}

/// The regtest address of [`op_true_script`].
pub fn op_true_address() -> Address {
    Address::p2wsh(&op_true_witness_script(), Network::Regtest)
}

/// A version-2 transaction spending the OP_TRUE coin at `outpoint` (worth `value`) back to
/// [`op_true_script`], paying `fee`. Signals replaceability, so tests can bump it.
///
/// # Panics
/// If `fee` is not below `value`.
pub fn spend_op_true(outpoint: OutPoint, value: Amount, fee: Amount) -> Transaction {
    let change = value
        .checked_sub(fee)
        .filter(|change| *change > Amount::ZERO)
        .unwrap_or_else(|| panic!("fee {fee} must be below the coin's value {value}"));
    Transaction {
        version: Version::TWO,
        lock_time: LockTime::ZERO,
        input: vec![TxIn {
            previous_output: outpoint,
            script_sig: ScriptBuf::new(),
            sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
            witness: Witness::from_slice(&[op_true_witness_script().as_bytes()]),
        }],
        output: vec![TxOut {
            value: change,
            script_pubkey: op_true_script(),
        }],
    }
}

/// OP_TRUE coins this node has seen: coinbases found in scanned blocks and the change of
/// transactions made by [`BitcoinNode::send_fee_tx`].
#[derive(Debug, Default)]
pub(super) struct CoinTracker {
    /// Blocks up to this height have been scanned for OP_TRUE coinbase outputs.
    scanned_height: u64,
    /// The block scanned last, to notice when a reorganisation replaced it.
    scanned_tip: Option<BlockHash>,
    /// OP_TRUE coinbase outputs, oldest first.
    coinbases: Vec<OpTrueCoin>,
    /// Outputs of our own fee transactions, oldest first.
    change: VecDeque<OpTrueCoin>,
    /// Coins our own transactions spent.
    spent: HashSet<OutPoint>,
}

/// What the node's UTXO set (with the mempool applied) says about a coin.
enum CoinState {
    /// Spent, or no longer in the active chain.
    Gone,
    /// Unspent with this many confirmations (0 = in the mempool).
    Unspent { confirmations: u64 },
}

impl BitcoinNode {
    /// Mines 101 blocks to the OP_TRUE address, which matures the first of their
    /// coinbases and takes the node out of initial block download; returns every mature,
    /// unspent OP_TRUE coinbase coin.
    pub fn fund_op_true(&self) -> Result<Vec<OpTrueCoin>> {
        self.generate(FUNDING_BLOCKS)?;
        self.mature_op_true_coins()
    }

    /// Every OP_TRUE coinbase coin in the active chain that is mature (spendable in the
    /// next block) and unspent, also by the mempool; oldest first.
    pub fn mature_op_true_coins(&self) -> Result<Vec<OpTrueCoin>> {
        let mut tracker = self.coin_tracker();
        self.scan_new_blocks(&mut tracker)?;
        let mut mature = Vec::new();
        for coin in &tracker.coinbases {
            if let CoinState::Unspent { confirmations } = self.coin_state(coin.outpoint)? {
                if confirmations >= COINBASE_MATURITY {
                    mature.push(*coin);
                }
            }
        }
        Ok(mature)
    }

    /// Puts a transaction paying `fee` into the mempool and returns its id.
    ///
    /// Spends the oldest mature OP_TRUE coinbase not yet spent, or else the change of an
    /// earlier fee transaction (chaining in the mempool). Errors with
    /// [`NodeError::NoSpendableCoin`] when neither exists: call [`Self::fund_op_true`]
    /// first, or [`Self::generate`] more blocks.
    pub fn send_fee_tx(&self, fee: Amount) -> Result<Txid> {
        let mut tracker = self.coin_tracker();
        let coin = self.pick_spendable_coin(&mut tracker)?;
        let tx = spend_op_true(coin.outpoint, coin.value, fee);
        let txid = self.send_raw_transaction(&tx)?;
        tracker.spent.insert(coin.outpoint);
        tracker.change.push_back(OpTrueCoin {
            outpoint: OutPoint { txid, vout: 0 },
            value: tx.output[0].value,
        });
        Ok(txid)
    }

    /// Mines a block with no mempool transaction (`generateblock` with an empty list), so
    /// the mempool stays as it is; returns its hash.
    pub fn generate_empty(&self) -> Result<BlockHash> {
        let method = "generateblock";
        let answer = self.rpc(method, json!([op_true_address().to_string(), []]))?;
        answer["hash"]
            .as_str()
            .and_then(|h| h.parse().ok())
            .ok_or_else(|| NodeError::BadResponse {
                method: method.to_owned(),
                detail: format!("no block hash in {answer}"),
            })
    }

    /// Puts `count` independent transactions in the mempool, each spending an output of
    /// its own, with fees that differ (the node has something to select by): mature
    /// OP_TRUE coinbases are split into `count` outputs (mined in one block, which also
    /// takes whatever the mempool held), then each output is spent on its own.
    pub fn fill_mempool(&self, count: usize) -> Result<()> {
        let splits = count.div_ceil(SPLIT_OUTPUTS);
        let mut coins = self.mature_op_true_coins()?;
        if coins.len() < splits {
            // A young chain first needs its first coinbase to mature; after that, each
            // block makes one more spendable.
            let young = FUNDING_BLOCKS.saturating_sub(self.block_count()?);
            self.generate(young + (splits - coins.len()) as u64)?;
            coins = self.mature_op_true_coins()?;
        }
        if coins.len() < splits {
            return Err(NodeError::NoSpendableCoin);
        }
        let mut outputs = Vec::with_capacity(count);
        for (coin, first) in coins.iter().zip((0..count).step_by(SPLIT_OUTPUTS)) {
            let n = SPLIT_OUTPUTS.min(count - first);
            let each = Amount::from_sat((coin.value.to_sat() - 100_000) / n as u64);
            let split = Transaction {
                version: Version::TWO,
                lock_time: LockTime::ZERO,
                input: vec![TxIn {
                    previous_output: coin.outpoint,
                    script_sig: ScriptBuf::new(),
                    sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                    witness: Witness::from_slice(&[op_true_witness_script().as_bytes()]),
                }],
                output: vec![
                    TxOut {
                        value: each,
                        script_pubkey: op_true_script(),
                    };
                    n
                ],
            };
            let txid = self.send_raw_transaction(&split)?;
            self.coin_tracker().spent.insert(coin.outpoint);
            outputs.extend((0..n as u32).map(|vout| (OutPoint { txid, vout }, each)));
        }
        self.generate(1)?;
        for (i, (outpoint, value)) in outputs.into_iter().enumerate() {
            let fee = Amount::from_sat(1_000 + i as u64 * 10);
            self.send_raw_transaction(&spend_op_true(outpoint, value, fee))?;
        }
        let pooled = self.mempool_txids()?.len();
        if pooled < count {
            return Err(NodeError::BadResponse {
                method: "getrawmempool".to_owned(),
                detail: format!("{pooled} transactions in the mempool, {count} sent"),
            });
        }
        Ok(())
    }

    fn coin_tracker(&self) -> std::sync::MutexGuard<'_, CoinTracker> {
        self.coins
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn pick_spendable_coin(&self, tracker: &mut CoinTracker) -> Result<OpTrueCoin> {
        self.scan_new_blocks(tracker)?;
        let mut gone = Vec::new();
        let mut picked = None;
        for coin in &tracker.coinbases {
            if tracker.spent.contains(&coin.outpoint) {
                continue;
            }
            match self.coin_state(coin.outpoint)? {
                CoinState::Gone => gone.push(coin.outpoint),
                // Later coinbases are younger still.
                CoinState::Unspent { confirmations } if confirmations < COINBASE_MATURITY => break,
                CoinState::Unspent { .. } => {
                    picked = Some(*coin);
                    break;
                }
            }
        }
        tracker.spent.extend(gone);
        if let Some(coin) = picked {
            return Ok(coin);
        }
        while let Some(coin) = tracker.change.pop_front() {
            if let CoinState::Unspent { .. } = self.coin_state(coin.outpoint)? {
                return Ok(coin);
            }
        }
        Err(NodeError::NoSpendableCoin)
    }

    /// Records the OP_TRUE coinbase outputs of blocks mined since the last scan (of the
    /// whole chain again if a reorganisation replaced the block scanned last).
    fn scan_new_blocks(&self, tracker: &mut CoinTracker) -> Result<()> {
        if let Some(scanned_tip) = tracker.scanned_tip {
            let still_active = self
                .block_hash(tracker.scanned_height)
                .is_ok_and(|hash| hash == scanned_tip);
            if !still_active {
                tracker.scanned_height = 0;
                tracker.scanned_tip = None;
                tracker.coinbases.clear();
            }
        }
        let tip = self.block_count()?;
        let script = op_true_script();
        for height in tracker.scanned_height + 1..=tip {
            let hash = self.block_hash(height)?;
            let block = self.get_block(&hash)?;
            tracker.scanned_height = height;
            tracker.scanned_tip = Some(hash);
            let Some(coinbase) = block.txdata.first() else {
                continue;
            };
            let txid = coinbase.compute_txid();
            for (vout, output) in coinbase.output.iter().enumerate() {
                if output.script_pubkey == script {
                    let outpoint = OutPoint {
                        txid,
                        vout: vout as u32,
                    };
                    let coin = OpTrueCoin {
                        outpoint,
                        value: output.value,
                    };
                    tracker.coinbases.push(coin);
                }
            }
        }
        Ok(())
    }

    fn coin_state(&self, outpoint: OutPoint) -> Result<CoinState> {
        let method = "gettxout";
        let entry = self.rpc(
            method,
            json!([outpoint.txid.to_string(), outpoint.vout, true]),
        )?;
        if entry.is_null() {
            return Ok(CoinState::Gone);
        }
        let confirmations =
            entry["confirmations"]
                .as_u64()
                .ok_or_else(|| NodeError::BadResponse {
                    method: method.to_owned(),
                    detail: format!("no confirmations in {entry}"),
                })?;
        Ok(CoinState::Unspent { confirmations })
    }
}

//! A miner's side of a raw [`TemplateData`] (what `sv2_tpd::node` reads from the node):
//! build the coinbase the node asks for, fold it up the merkle path, grind the regtest
//! nonce.

use bitcoin::absolute::LockTime;
use bitcoin::block::Header;
use bitcoin::hashes::{sha256d, Hash, HashEngine};
use bitcoin::transaction::Version;
use bitcoin::{
    OutPoint, ScriptBuf, Sequence, Target, Transaction, TxIn, TxMerkleNode, TxOut, Witness,
};
use sv2_tpd::node::{CoinbaseTemplate, Template, TemplateData};

/// Bytes appended to the template's scriptSig prefix, standing in for a pool's extranonce.
/// They keep the scriptSig within 2..=100 bytes even when the prefix is a single `OP_N`.
pub const EXTRANONCE: [u8; 5] = [0x04, 0x73, 0x76, 0x32, 0x21];

/// A regtest block's header solved for a template, with the coinbase it commits to.
#[derive(Clone, Debug)]
pub struct Solved {
    /// The header, merkle root and nonce filled in; its hash meets the target.
    pub header: Header,
    /// The coinbase, serialized with witness when handed to `submit_solution`.
    pub coinbase: Transaction,
}

impl Solved {
    /// The header version as `submit_solution` takes it.
    pub fn version(&self) -> u32 {
        self.header.version.to_consensus() as u32
    }
}

/// The coinbase a miner builds from `cb`: the scriptSig prefix plus [`EXTRANONCE`], one
/// output paying `payout` all of `block_reward_remaining`, then the required outputs; the
/// input's witness is the template's (the witness reserved value).
pub fn build_coinbase(cb: &CoinbaseTemplate, payout: &ScriptBuf) -> Transaction {
    let mut script_sig = cb.script_sig_prefix.clone();
    script_sig.extend_from_slice(&EXTRANONCE);
    let mut output = vec![TxOut {
        value: cb.block_reward_remaining,
        script_pubkey: payout.clone(),
    }];
    output.extend(cb.required_outputs.iter().cloned());
    Transaction {
        version: Version(cb.version as i32),
        lock_time: LockTime::from_consensus(cb.lock_time),
        input: vec![TxIn {
            previous_output: OutPoint::null(),
            script_sig: ScriptBuf::from_bytes(script_sig),
            sequence: Sequence(cb.sequence),
            witness: match &cb.witness {
                Some(reserved) => Witness::from_slice(&[reserved.as_slice()]),
                None => Witness::new(),
            },
        }],
        output,
    }
}

/// The merkle root of a block whose coinbase is `coinbase` and whose coinbase merkle
/// siblings are `path` (deepest first).
pub fn merkle_root(coinbase: &Transaction, path: &[TxMerkleNode]) -> TxMerkleNode {
    let mut node = coinbase.compute_txid().to_raw_hash();
    for sibling in path {
        let mut engine = sha256d::Hash::engine();
        engine.input(node.as_byte_array());
        engine.input(sibling.as_byte_array());
        node = sha256d::Hash::from_engine(engine);
    }
    TxMerkleNode::from_raw_hash(node)
}

/// Grinds the nonce of `data`'s header with `coinbase`'s merkle root until the hash meets
/// the target (about two tries at regtest difficulty).
pub fn solve_with(data: &TemplateData, coinbase: Transaction) -> Solved {
    let mut header = data.header;
    header.merkle_root = merkle_root(&coinbase, &data.merkle_path);
    header.nonce = 0;
    let target = Target::from_compact(header.bits);
    while !target.is_met_by(header.block_hash()) {
        header.nonce = header
            .nonce
            .checked_add(1)
            .expect("regtest target met long before the nonce wraps");
    }
    Solved { header, coinbase }
}

/// [`build_coinbase`] paying `payout`, then [`solve_with`].
pub fn solve(data: &TemplateData, payout: &ScriptBuf) -> Solved {
    solve_with(data, build_coinbase(&data.coinbase, payout))
}

/// Solves `template` paying `payout` and submits it; returns the node's acceptance and
/// the solution.
pub async fn mine(template: &Template, payout: &ScriptBuf) -> (bool, Solved) {
    let solved = solve(template.data(), payout);
    let verdict = template
        .submit_solution(
            solved.version(),
            solved.header.time,
            solved.header.nonce,
            &solved.coinbase,
        )
        .await
        .expect("submitSolution");
    if !verdict.accepted {
        eprintln!("the node refused the block: {:?}", verdict.reason);
    }
    (verdict.accepted, solved)
}

//! Solutions for templates this daemon does not hold: a pool that outlived a daemon
//! restart, or a template released long ago. Without its template the block cannot be
//! rebuilt for sure, so the header is tried on the tip's templates (after a restart one
//! may have the same transactions). Where it meets its target on one, the block *is* that
//! template's block — the header commits to its transactions through the merkle root — and
//! it is handed to the node like any other. A bogus or stale solution never passes: it
//! costs no disk write and no node call.

use stratum_core::template_distribution_sv2::SubmitSolutionOwned;

use super::messages::{decode_coinbase, header_on};
use crate::node::TemplateData;

/// The first of `candidates` (templates of the tip, each with its data) on which
/// `solution`'s header, rebuilt with the candidate's merkle path, meets its target, with
/// a coinbase that starts with the candidate's height push. The coinbase is decoded and
/// hashed once; each candidate costs a merkle fold and a header hash, and candidates with
/// the merkle path of one tried before are skipped.
pub(crate) fn proven_on<'a, T>(
    candidates: impl IntoIterator<Item = (T, &'a TemplateData)>,
    solution: &SubmitSolutionOwned,
) -> Option<T> {
    let coinbase = decode_coinbase(solution).ok()?;
    let txid = coinbase.compute_txid();
    let script_sig = coinbase.input.first()?.script_sig.as_bytes();
    let mut tried: Vec<&[bitcoin::TxMerkleNode]> = Vec::new();
    candidates.into_iter().find_map(|(candidate, data)| {
        if tried.contains(&data.merkle_path.as_slice()) {
            return None;
        }
        tried.push(&data.merkle_path);
        let header = header_on(data, solution, txid);
        let proven = script_sig.starts_with(&data.coinbase.script_sig_prefix)
            && header.target().is_met_by(header.block_hash());
        proven.then_some(candidate)
    })
}

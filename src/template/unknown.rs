//! Solutions for templates this daemon does not hold: a pool that outlived a daemon
//! restart, or a template released long ago. Without its template the block cannot be
//! rebuilt for sure, so the header is tried on the tip's templates (after a restart one
//! may have the same transactions). Where it meets its target on one, the block *is* that
//! template's block — the header commits to its transactions through the merkle root — and
//! it is handed to the node like any other. A bogus or stale solution never passes: it
//! costs no disk write and no node call.

use stratum_core::template_distribution_sv2::SubmitSolutionOwned;

use super::messages::SolvedBlock;
use crate::node::TemplateData;

/// The first of `candidates` (templates of the tip, each with its data) on which
/// `solution`'s header, rebuilt with the candidate's merkle path, meets its target, with
/// a coinbase that starts with the candidate's height push.
pub(crate) fn proven_on<'a, T>(
    candidates: impl IntoIterator<Item = (T, &'a TemplateData)>,
    solution: &SubmitSolutionOwned,
) -> Option<T> {
    candidates.into_iter().find_map(|(candidate, data)| {
        let solved = SolvedBlock::new(data, solution).ok()?;
        let prefix = &data.coinbase.script_sig_prefix;
        let script_sig = solved
            .coinbase
            .input
            .first()
            .map(|i| i.script_sig.as_bytes());
        let proven = script_sig.is_some_and(|b| b.starts_with(prefix)) && solved.meets_target();
        proven.then_some(candidate)
    })
}

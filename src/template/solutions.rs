//! The solution pipeline: a `SubmitSolution` becomes a block that is written to disk and
//! handed to the node at once; one the node did not take goes on to
//! [`super::resubmit`].

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::hex::DisplayHex;
use bitcoin::BlockHash;
use stratum_core::template_distribution_sv2::SubmitSolutionOwned;
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{error, info, info_span, warn, Instrument};

use super::api::SolutionOutcome;
use super::cache::TemplateTxs;
use super::messages::SolvedBlock;
use super::resubmit::{self, Pending};
use crate::metrics::metrics;
use crate::node::{NodeClient, Template, TemplateData};
use crate::ratelog::LogBudget;

/// A solution on its way to the node, with what it needs to get there.
pub(crate) struct Submission {
    /// The template it solves.
    pub template: Template,
    /// The template's transactions, when cached (all its block needs beside the
    /// solution's header and coinbase).
    pub cached_block: Option<TemplateTxs>,
    /// The solution, rebuilt and checked by [`check`].
    pub solved: SolvedBlock,
    /// Where solved blocks are saved.
    pub dir: PathBuf,
    /// The live connection, for a template whose own connection died.
    pub nodes: watch::Receiver<Option<NodeClient>>,
    /// This solution's place among those in flight; freed when it is done.
    pub slot: OwnedSemaphorePermit,
}

/// Full log lines about refused solutions per [`REFUSAL_LOG_PERIOD`]; the rest are summed up.
const REFUSAL_LOG_BURST: u32 = 5;
/// Period of the refusal log budget.
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(60);

/// Block hashes remembered to answer a repeated solution without work.
const RECENT_BLOCKS: usize = 256;

/// What a solution must pass before it costs anything: a rebuildable header whose hash
/// meets its target and has not been seen before, and a free place among the solutions
/// in flight.
#[derive(Debug)]
pub(crate) struct Gate {
    slots: Arc<Semaphore>,
    log: LogBudget,
    /// The newest [`RECENT_BLOCKS`] block hashes admitted, oldest first.
    recent: VecDeque<BlockHash>,
}

impl Gate {
    /// A gate letting at most `max_in_flight` solutions be on their way to the node.
    pub fn new(max_in_flight: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_in_flight)),
            log: LogBudget::new(REFUSAL_LOG_BURST, REFUSAL_LOG_PERIOD),
            recent: VecDeque::with_capacity(RECENT_BLOCKS),
        }
    }

    /// Rebuilds the header of `solution` on `data` and checks its proof of work. What fails
    /// costs no disk write, no node call and no task: a client cannot turn cheap bogus
    /// solutions (or replays of a block already handed over) into work, and a real block
    /// never queues behind them. Refusals are counted, and logged at a limited rate — all
    /// but a real block refused for want of a place, which is an error every time.
    pub fn admit(
        &mut self,
        data: &TemplateData,
        solution: &SubmitSolutionOwned,
    ) -> Result<(SolvedBlock, OwnedSemaphorePermit), SolutionOutcome> {
        let template_id = solution.template_id;
        let solved = match SolvedBlock::new(data, solution) {
            Ok(solved) => solved,
            Err(e) => {
                return Err(self.refuse(template_id, SolutionOutcome::Malformed(e.to_string())))
            }
        };
        let block_hash = solved.header.block_hash();
        if !solved.meets_target() {
            return Err(self.refuse(template_id, SolutionOutcome::BadProofOfWork { block_hash }));
        }
        if self.recent.contains(&block_hash) {
            return Err(self.refuse(template_id, SolutionOutcome::Duplicate { block_hash }));
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            metrics().solutions.with_label_values(&["throttled"]).inc();
            error!(
                template_id,
                %block_hash,
                "a solution that meets its target was refused: max_solutions_in_flight \
                 solutions are on their way to the node already"
            );
            return Err(SolutionOutcome::Throttled);
        };
        if self.recent.len() == RECENT_BLOCKS {
            self.recent.pop_front();
        }
        self.recent.push_back(block_hash);
        Ok((solved, slot))
    }

    /// Answers a solution whose template is not held.
    pub fn refuse_unknown(&mut self, template_id: u64) -> SolutionOutcome {
        self.refuse(template_id, SolutionOutcome::UnknownTemplate)
    }

    /// Counts and (within the log budget) logs a refusal.
    fn refuse(&mut self, template_id: u64, outcome: SolutionOutcome) -> SolutionOutcome {
        metrics()
            .solutions
            .with_label_values(&[outcome.label()])
            .inc();
        let verdict = self.log.hit(Instant::now());
        if let Some(suppressed) = verdict.suppressed {
            warn!(
                suppressed,
                "more solutions refused before reaching the node"
            );
        }
        if verdict.log {
            warn!(
                template_id,
                ?outcome,
                "solution refused before reaching the node"
            );
        }
        outcome
    }
}

/// Hands `job` to a task of its own, which sends the outcome to `reply`.
pub(crate) fn spawn(job: Submission, reply: oneshot::Sender<SolutionOutcome>) {
    let span = info_span!("solution", block_hash = %job.solved.header.block_hash());
    tokio::spawn(
        async move {
            let _ = reply.send(submit(job).await);
        }
        .instrument(span),
    );
}

/// Writes the block to disk, then hands the solution to the node.
async fn submit(job: Submission) -> SolutionOutcome {
    let Submission {
        template,
        cached_block,
        solved,
        dir,
        nodes,
        slot: _slot,
    } = job;
    let m = metrics();
    let block_hash = solved.header.block_hash();
    let height = template.data().height();
    let to_node = template.submit_solution(
        solved.header.version.to_consensus() as u32,
        solved.header.time,
        solved.header.nonce,
        &solved.coinbase,
    );
    // The block goes to disk and to the node at once: neither waits for the other (a
    // slow disk must not delay a block). Without a cached template block, the node is
    // asked for it only after the submit (a getBlock may not overlap a submit).
    let (verdict, template_block, file) = match cached_block {
        Some(block) => {
            let (verdict, file) =
                tokio::join!(to_node, save_solution(&dir, height, &solved, Some(&block)));
            (verdict, Some(block), file)
        }
        None => {
            let verdict = to_node.await;
            let block = template
                .block()
                .await
                .ok()
                .map(|b| TemplateTxs::from_block(&b));
            let file = save_solution(&dir, height, &solved, block.as_ref()).await;
            (verdict, block, file)
        }
    };
    let verdict = match verdict {
        Err(e) => {
            let pending = Pending {
                template,
                solved,
                template_block,
                nodes,
                file,
            };
            resubmit::until_settled(pending, e).await
        }
        verdict => verdict,
    };
    match verdict {
        Ok(v) if v.accepted => {
            info!(%block_hash, "block accepted by the node");
            m.solutions.with_label_values(&["accepted"]).inc();
            m.blocks_found.inc();
            SolutionOutcome::Accepted { block_hash }
        }
        Ok(v) => {
            warn!(%block_hash, reason = %v.reason, "block rejected by the node");
            m.solutions.with_label_values(&["rejected"]).inc();
            SolutionOutcome::Rejected {
                block_hash,
                reason: v.reason,
            }
        }
        Err(e) => {
            error!(%block_hash, error = %e, "could not submit the block; it is saved in the solutions directory");
            m.solutions.with_label_values(&["node-unavailable"]).inc();
            SolutionOutcome::NodeUnavailable(e.to_string())
        }
    }
}

/// Saves the solved block as hex (ready for `bitcoin-cli submitblock`), or, when the
/// template's transactions could not be read, the header and coinbase; returns the file.
async fn save_solution(
    dir: &Path,
    height: u32,
    solved: &SolvedBlock,
    template_block: Option<&TemplateTxs>,
) -> Option<PathBuf> {
    let hash = solved.header.block_hash();
    let (path, contents) = match template_block {
        Some(block) => (
            dir.join(format!("{height}-{hash}.block.hex")),
            solved.block_bytes(block).to_lower_hex_string(),
        ),
        None => (
            dir.join(format!("{height}-{hash}.solution.json")),
            serde_json::json!({
                "header": bitcoin::consensus::encode::serialize_hex(&solved.header),
                "coinbase": bitcoin::consensus::encode::serialize_hex(&solved.coinbase),
            })
            .to_string(),
        ),
    };
    let result = async {
        tokio::fs::create_dir_all(dir).await?;
        tokio::fs::write(&path, contents).await
    }
    .await;
    match result {
        Ok(()) => {
            info!(path = %path.display(), "solution saved");
            Some(path)
        }
        Err(e) => {
            error!(path = %path.display(), error = %e, "cannot save the solution");
            None
        }
    }
}

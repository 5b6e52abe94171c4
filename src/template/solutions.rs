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
use crate::node::{NodeClient, NodeError, SubmitVerdict, Template, TemplateData};
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
    /// This solution's place among those admitted (in flight or waiting for a place);
    /// freed when it is done.
    pub admitted: OwnedSemaphorePermit,
    /// The places among the solutions in flight to the node; it waits for one.
    pub in_flight: Arc<Semaphore>,
}

/// Full log lines about refused solutions per [`REFUSAL_LOG_PERIOD`]; the rest are summed up.
const REFUSAL_LOG_BURST: u32 = 5;
/// Period of the refusal log budget.
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(60);

/// Block hashes remembered to answer a repeated solution without work.
const RECENT_BLOCKS: usize = 256;

/// Blocks admitted per place in flight: beyond `max_solutions_in_flight` on their way to
/// the node, this many times as many wait (saved to disk already) for a place. Each holds
/// a block in memory while it is saved, so the room is kept small: on a chain where
/// proof of work is not cheap, two distinct blocks at once are already rare.
const WAITING_PER_PLACE: usize = 1;

/// What a solution must pass before it costs anything: a rebuildable header whose hash
/// meets its target and has not been seen before, and a place among the blocks admitted.
#[derive(Debug)]
pub(crate) struct Gate {
    /// Blocks on their way to the node at once.
    in_flight: Arc<Semaphore>,
    /// Blocks admitted: in flight, or saved and waiting for a place in flight.
    admitted: Arc<Semaphore>,
    log: LogBudget,
    /// The newest [`RECENT_BLOCKS`] block hashes admitted, oldest first.
    recent: VecDeque<BlockHash>,
}

/// A solution let through the [`Gate`]: a block, with its places.
pub(crate) struct Admitted {
    /// The rebuilt block's header and coinbase.
    pub solved: SolvedBlock,
    /// Its place among the blocks admitted.
    pub admitted: OwnedSemaphorePermit,
    /// The places in flight it waits for.
    pub in_flight: Arc<Semaphore>,
}

impl Gate {
    /// A gate letting at most `max_in_flight` blocks be on their way to the node, and
    /// [`WAITING_PER_PLACE`] times as many wait for a place.
    pub fn new(max_in_flight: usize) -> Self {
        Self {
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            admitted: Arc::new(Semaphore::new(
                max_in_flight.saturating_mul(WAITING_PER_PLACE + 1),
            )),
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
    ) -> Result<Admitted, SolutionOutcome> {
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
        let Ok(admitted) = self.admitted.clone().try_acquire_owned() else {
            metrics().solutions.with_label_values(&["throttled"]).inc();
            error!(
                template_id,
                %block_hash,
                "a solution that meets its target was refused: max_solutions_in_flight \
                 blocks are on their way to the node and as many again \
                 wait for a place"
            );
            return Err(SolutionOutcome::Throttled);
        };
        if self.recent.len() == RECENT_BLOCKS {
            self.recent.pop_front();
        }
        self.recent.push_back(block_hash);
        Ok(Admitted {
            solved,
            admitted,
            in_flight: self.in_flight.clone(),
        })
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

/// A block found on a template released since (its transactions are gone): saves its
/// header and coinbase, says so at error level and counts it `released`, in a task of its
/// own, which sends the outcome to `reply`.
pub(crate) fn spawn_released(
    solved: SolvedBlock,
    height: u32,
    dir: PathBuf,
    reply: oneshot::Sender<SolutionOutcome>,
) {
    let block_hash = solved.header.block_hash();
    let span = info_span!("solution", %block_hash);
    tokio::spawn(
        async move {
            let file = save_solution(&dir, height, &solved, None).await;
            let file = file
                .map(|f| f.display().to_string())
                .unwrap_or_else(|| "(not saved)".into());
            error!(
                %block_hash,
                %file,
                "a block was found on a template this daemon had already released: its \
                 transactions are gone, so it cannot be submitted; its header and coinbase \
                 are saved (raise max_templates_held or stale_template_grace)"
            );
            metrics().solutions.with_label_values(&["released"]).inc();
            let _ = reply.send(SolutionOutcome::Released { block_hash });
        }
        .instrument(span),
    );
}

/// Writes the block to disk and hands the solution to the node (once a place in flight
/// is free), then tells what the node made of it.
async fn submit(job: Submission) -> SolutionOutcome {
    let Submission {
        template,
        cached_block,
        solved,
        dir,
        nodes,
        admitted: _admitted,
        in_flight,
    } = job;
    let block_hash = solved.header.block_hash();
    let height = template.data().height();
    let to_node = async {
        let _place = in_flight.acquire_owned().await;
        template
            .submit_solution(
                solved.header.version.to_consensus() as u32,
                solved.header.time,
                solved.header.nonce,
                &solved.coinbase,
            )
            .await
    };
    // The block goes to disk and to the node at once: neither waits for the other (a
    // slow disk must not delay a block, nor a slow node its file). Without a cached
    // template block, the header and coinbase are saved at once, and the node is asked for
    // the block only after the submit (a getBlock may not overlap a submit); the whole
    // block then replaces them.
    let (verdict, template_block, file) = match cached_block {
        Some(block) => {
            let (verdict, file) =
                tokio::join!(to_node, save_solution(&dir, height, &solved, Some(&block)));
            (verdict, Some(block), file)
        }
        None => {
            let (verdict, partial) =
                tokio::join!(to_node, save_solution(&dir, height, &solved, None));
            let block = template
                .block()
                .await
                .ok()
                .map(|b| TemplateTxs::from_block(&b));
            let whole = match &block {
                Some(block) => save_solution(&dir, height, &solved, Some(block)).await,
                None => None,
            };
            let file = match (whole, partial) {
                (Some(whole), Some(partial)) => {
                    let _ = tokio::fs::remove_file(&partial).await;
                    Some(whole)
                }
                (whole, partial) => whole.or(partial),
            };
            (verdict, block, file)
        }
    };
    let verdict = match verdict {
        Err(e) => {
            let pending = Pending {
                template,
                solved,
                template_block,
                nodes: nodes.clone(),
                file,
            };
            resubmit::until_settled(pending, e).await
        }
        verdict => verdict,
    };
    let settled = match verdict {
        Ok(v) if node_has_block(&v) => Settled::Taken(v),
        Ok(v) if is_stale(&v) => Settled::Stale(v),
        // The node may have the block as its tip though it says no (a v31 node answers a
        // bare `false`): its tip is the last word.
        Ok(v) if tip_is(&nodes, block_hash).await => Settled::Taken(v),
        Ok(v) => Settled::Refused(v),
        Err(e) => Settled::Undelivered(e),
    };
    settle(block_hash, settled)
}

/// What became of a block handed to the node.
enum Settled {
    /// The node has it: it accepted it, already had it, or has it as its tip.
    Taken(SubmitVerdict),
    /// The node stored it, valid, but another block is its tip: the block lost a race
    /// (or solves a template of the tip before last). Not refused, not found.
    Stale(SubmitVerdict),
    /// The node refused it.
    Refused(SubmitVerdict),
    /// It never got a verdict (the block is saved in the solutions directory).
    Undelivered(NodeError),
}

/// Logs and counts what became of block `block_hash`, once: `blocks_found` counts it only
/// when the node has it.
fn settle(block_hash: BlockHash, settled: Settled) -> SolutionOutcome {
    let m = metrics();
    match settled {
        Settled::Taken(v) => {
            let note = match v.accepted {
                true => "",
                false => "it had the block already",
            };
            info!(%block_hash, reason = %v.reason, note, "block accepted by the node");
            m.solutions.with_label_values(&["accepted"]).inc();
            m.blocks_found.inc();
            SolutionOutcome::Accepted { block_hash }
        }
        Settled::Stale(v) => {
            warn!(%block_hash, reason = %v.reason, "the node stored the block but another block is its tip (a stale block)");
            m.solutions.with_label_values(&["stale"]).inc();
            SolutionOutcome::Stale { block_hash }
        }
        Settled::Refused(v) => {
            error!(%block_hash, reason = %v.reason, "block rejected by the node");
            m.solutions.with_label_values(&["rejected"]).inc();
            SolutionOutcome::Rejected {
                block_hash,
                reason: v.reason,
            }
        }
        Settled::Undelivered(e) => {
            error!(%block_hash, error = %e, "could not submit the block; it is saved in the solutions directory");
            m.solutions.with_label_values(&["node-unavailable"]).inc();
            SolutionOutcome::NodeUnavailable(e.to_string())
        }
    }
}

/// The node's reason for a block it already has: it is not lost, and not refused.
const ALREADY_HAVE: &str = "duplicate";

/// The node's reasons for a valid block it stored but did not connect.
const STORED_NOT_CONNECTED: [&str; 2] = ["inconclusive", "duplicate-inconclusive"];

/// Whether `verdict` says the node has the block: it took it, or already had it.
pub(crate) fn node_has_block(verdict: &SubmitVerdict) -> bool {
    verdict.accepted || verdict.reason == ALREADY_HAVE
}

/// Whether `verdict` says the node stored the block as valid without connecting it.
fn is_stale(verdict: &SubmitVerdict) -> bool {
    STORED_NOT_CONNECTED.contains(&verdict.reason.as_str())
}

/// Whether the live node's tip is `block_hash`.
async fn tip_is(nodes: &watch::Receiver<Option<NodeClient>>, block_hash: BlockHash) -> bool {
    let node = nodes.borrow().clone();
    match node {
        Some(node) => matches!(node.tip().await, Ok(Some(tip)) if tip.hash == block_hash),
        None => false,
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

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
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{error, info, info_span, warn, Instrument};

use super::api::SolutionOutcome;
use super::cache::TemplateTxs;
use super::health::{LiveNode, LiveNodes};
use super::messages::SolvedBlock;
use super::resubmit::{self, Pending};
use crate::metrics::metrics;
use crate::node::{NodeError, SubmitVerdict, Template, TemplateData};
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
    /// The connected nodes: every one but the template's gets the whole block too, and
    /// they take it when the template's own connection died.
    pub nodes: watch::Receiver<LiveNodes>,
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

/// Writes the block to disk and hands the solution to the template's node (once a place
/// in flight is free) and, as a whole block, to every other answering node at the same
/// time; then tells what the nodes made of it: the first that has it settles it as found.
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
    let live = nodes.borrow().clone();
    let own = live.iter().find(|n| n.client.made(&template)).cloned();
    let mut relays = Relays::new(
        live.iter()
            .filter(|n| n.responsive && !n.client.made(&template))
            .cloned()
            .collect(),
        height,
    );
    if let Some(block) = cached_block.as_ref().and_then(|txs| solved.block(txs).ok()) {
        relays.start(block);
    }
    // The template's connection is gone, but other nodes take the block whole: they
    // settle it, unless none gives a verdict — then it waits for a node like any block
    // whose connection died (one that comes back, say).
    if own.is_none() && relays.started() {
        let (file, settled) = tokio::join!(
            save_solution(&dir, height, &solved, cached_block.as_ref()),
            relays.settle(None),
        );
        if settled.has_verdict() {
            return settle(block_hash, settled);
        }
        let pending = Pending {
            template,
            solved,
            template_block: cached_block,
            nodes: nodes.clone(),
            file,
            exclude: relays.sent_to(),
        };
        let (answer, from) = resubmit::until_settled(pending, NodeError::Disconnected).await;
        return settle(
            block_hash,
            verdict_of(answer, from.as_ref(), block_hash).await,
        );
    }
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
    if let Some(block) = template_block
        .as_ref()
        .and_then(|txs| solved.block(txs).ok())
    {
        relays.start(block);
    }
    // The template's own node's answer, or (when it gave none) the answer of the node the
    // block was handed to next, never one with a relay of its own.
    let (answer, from) = match verdict {
        Err(e) => {
            let pending = Pending {
                template,
                solved,
                template_block,
                nodes: nodes.clone(),
                file,
                exclude: relays.sent_to(),
            };
            // Handed on, and the relays heard at the same time: the first node that has
            // the block settles it, even while no other node is left to hand it to.
            let resubmit = resubmit::until_settled(pending, e);
            tokio::pin!(resubmit);
            let answer = tokio::select! {
                answer = &mut resubmit => answer,
                relayed = relays.settle(None) => match relayed.has_verdict() {
                    true => return settle(block_hash, relayed),
                    false => resubmit.await,
                },
            };
            match answer {
                (answer, None) => (answer, own),
                (answer, from) => (answer, from),
            }
        }
        verdict => (verdict, own),
    };
    let settled = verdict_of(answer, from.as_ref(), block_hash).await;
    settle(block_hash, relays.settle(Some(settled)).await)
}

/// What `node`'s answer means for the block (see [`classify`]), counted under the node
/// it came from.
async fn verdict_of(
    answer: Result<SubmitVerdict, NodeError>,
    node: Option<&LiveNode>,
    block_hash: BlockHash,
) -> Settled {
    let settled = classify(answer, node, block_hash).await;
    if let Some(node) = node {
        count_node(&node.name, &settled);
    }
    settled
}

/// What `node`'s answer means for the block: its own tip has the last word on a refusal
/// (a v31 node answers a bare `false` for a block it took).
async fn classify(
    verdict: Result<SubmitVerdict, NodeError>,
    node: Option<&LiveNode>,
    block_hash: BlockHash,
) -> Settled {
    match verdict {
        Ok(v) if node_has_block(&v) => Settled::Taken(v),
        Ok(v) if is_stale(&v) => Settled::Stale(v),
        Ok(v) if tip_is(node, block_hash).await => Settled::Taken(v),
        Ok(v) => Settled::Refused(v),
        Err(e) => Settled::Undelivered(e),
    }
}

/// The whole block on its way to every node but the template's, one task per node.
struct Relays {
    to: Vec<LiveNode>,
    /// The connections a relay was started on.
    sent: Vec<crate::node::NodeClient>,
    height: u32,
    results: mpsc::UnboundedReceiver<Settled>,
    tx: Option<mpsc::UnboundedSender<Settled>>,
    running: usize,
}

impl Relays {
    fn new(to: Vec<LiveNode>, height: u32) -> Self {
        let (tx, results) = mpsc::unbounded_channel();
        Self {
            to,
            sent: Vec::new(),
            height,
            results,
            tx: Some(tx),
            running: 0,
        }
    }

    fn started(&self) -> bool {
        self.running > 0
    }

    /// The connections that have (or had) a relay of this block.
    fn sent_to(&self) -> Vec<crate::node::NodeClient> {
        self.sent.clone()
    }

    /// Hands `block` to each node, once (later calls do nothing). Each task logs and
    /// counts its node's verdict, and is not abandoned when the block is settled.
    fn start(&mut self, block: bitcoin::Block) {
        let Some(tx) = self.tx.take() else {
            return;
        };
        let block = Arc::new(block);
        for node in std::mem::take(&mut self.to) {
            self.running += 1;
            self.sent.push(node.client.clone());
            let (block, tx, height) = (block.clone(), tx.clone(), self.height);
            let span = info_span!("relay", node = &*node.name);
            tokio::spawn(
                async move {
                    let settled = match resubmit::relay(&node, &block, height).await {
                        Err(NodeError::Unimplemented { .. }) => {
                            say_no_submit_block(&node.name);
                            count_node(&node.name, &Settled::Skipped);
                            Settled::Skipped
                        }
                        verdict => {
                            let hash = block.block_hash();
                            let settled = verdict_of(verdict, Some(&node), hash).await;
                            log_node(&node.name, &settled);
                            settled
                        }
                    };
                    let _ = tx.send(settled);
                }
                .instrument(span),
            );
        }
    }

    /// The block's fate: the first node that has it settles it; otherwise the template's
    /// node's verdict (`own`) once the relays answered or [`RELAY_PATIENCE`] passed (they
    /// go on, and log and count their nodes' verdicts themselves); without one, the best
    /// verdict of the relays once all have ended.
    async fn settle(&mut self, own: Option<Settled>) -> Settled {
        if let Some(own @ Settled::Taken(_)) = own {
            return own;
        }
        self.tx = None;
        let deadline = own
            .as_ref()
            .map(|_| tokio::time::Instant::now() + RELAY_PATIENCE);
        let mut best: Option<Settled> = None;
        while self.running > 0 {
            let next = match deadline {
                Some(at) => tokio::time::timeout_at(at, self.results.recv()).await,
                None => Ok(self.results.recv().await),
            };
            let Ok(Some(settled)) = next else {
                break;
            };
            self.running -= 1;
            if matches!(settled, Settled::Taken(_)) {
                return settled;
            }
            if best.as_ref().is_none_or(|b| settled.rank() > b.rank()) {
                best = Some(settled);
            }
        }
        own.or(best).unwrap_or(Settled::Skipped)
    }
}

/// How long a block the template's node did not take waits for another node to have it,
/// before its verdict is told.
const RELAY_PATIENCE: Duration = Duration::from_secs(10);

/// Says, once per node name, that a node cannot take whole blocks.
fn say_no_submit_block(name: &str) {
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
    if !said.iter().any(|n| n == name) {
        said.push(name.to_string());
        warn!(
            node = name,
            "this node has no submitBlock (v31.0): found blocks of other nodes' templates \
             reach it only over the network"
        );
    }
}

/// Counts what node `name` made of a block.
fn count_node(name: &str, settled: &Settled) {
    let result = match settled {
        Settled::Taken(v) if v.accepted => "accepted",
        Settled::Taken(_) => "duplicate",
        Settled::Stale(_) => "stale",
        Settled::Refused(_) => "rejected",
        Settled::Undelivered(_) => "no-verdict",
        Settled::Skipped => "unsupported",
    };
    metrics()
        .node_block_submits
        .with_label_values(&[name, result])
        .inc();
}

/// Logs what relayed node `name` made of a block.
fn log_node(name: &str, settled: &Settled) {
    match settled {
        Settled::Taken(v) => info!(node = name, reason = %v.reason, "the node has the block"),
        Settled::Stale(v) => {
            warn!(node = name, reason = %v.reason, "the node stored the block but another block is its tip")
        }
        Settled::Refused(v) => {
            error!(node = name, reason = %v.reason, "the node rejected the block")
        }
        Settled::Undelivered(e) => {
            warn!(node = name, error = %e, "the block did not reach the node")
        }
        Settled::Skipped => {}
    }
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
    /// The node could not be asked (it has no `submitBlock`).
    Skipped,
}

impl Settled {
    /// Whether a node answered with a verdict (took, stored or refused the block).
    fn has_verdict(&self) -> bool {
        matches!(
            self,
            Settled::Taken(_) | Settled::Stale(_) | Settled::Refused(_)
        )
    }

    /// How much a verdict says: a node that has the block beats one that stored it,
    /// which beats a refusal, which beats no verdict.
    fn rank(&self) -> u8 {
        match self {
            Settled::Taken(_) => 4,
            Settled::Stale(_) => 3,
            Settled::Refused(_) => 2,
            Settled::Undelivered(_) => 1,
            Settled::Skipped => 0,
        }
    }
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
        Settled::Skipped => {
            error!(%block_hash, "no node could take the whole block (none has submitBlock); it is saved in the solutions directory");
            m.solutions.with_label_values(&["node-unavailable"]).inc();
            SolutionOutcome::NodeUnavailable("no node has submitBlock".into())
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

/// Whether `node`'s tip is `block_hash`.
async fn tip_is(node: Option<&LiveNode>, block_hash: BlockHash) -> bool {
    match node {
        Some(node) => matches!(node.client.tip().await, Ok(Some(tip)) if tip.hash == block_hash),
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

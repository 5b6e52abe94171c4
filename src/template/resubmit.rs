//! Found blocks are never dropped quietly. A block whose `submitSolution` did not come back
//! with a verdict (the template's connection died under it, or the node threw) is handed
//! to the node again, whole, with `submitBlock` over the live connection, until the node
//! gives a verdict or its chain has moved past the block's parent, which makes the block
//! worthless. A submit is never sent while another one for the block may still run in the
//! node: every submit is waited for to its end (see `Session::call_patient`), so the next
//! attempt only follows an answer or a connection that is gone. Where no way to submit is
//! left, the log says so with the command that submits the saved file.

use std::path::PathBuf;
use std::time::Duration;

use bitcoin::Block;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::cache::TemplateTxs;
use super::health::{LiveNode, LiveNodes};
use super::messages::SolvedBlock;
use crate::node::{NodeClient, NodeError, SubmitVerdict, Template};

/// Pause between two attempts that both got an answer (or a connection that failed).
pub(crate) const RETRY_EVERY: Duration = Duration::from_secs(2);

/// Answers without a verdict a relay takes before it gives a node up (about a minute):
/// a node that does not learn the block's parent by then is not where the block lands.
const RELAY_ATTEMPTS: u32 = 30;

/// The reject reason of a block whose parent the node does not know (yet).
const PARENT_UNKNOWN: &str = "prev-blk-not-found";

/// A block the node has not taken yet.
pub(crate) struct Pending {
    /// The template it solves (held, so the node keeps it while its connection lives).
    pub template: Template,
    /// The solved header and coinbase.
    pub solved: SolvedBlock,
    /// The template's cached transactions, which complete the solved block.
    pub template_block: Option<TemplateTxs>,
    /// The connected nodes.
    pub nodes: watch::Receiver<LiveNodes>,
    /// Where the block (or, without the template's block, its header and coinbase) was
    /// saved.
    pub file: Option<PathBuf>,
    /// Connections that have a submit of their own for the block (relays): never sent it
    /// again from here, so no node gets a second submit while one may run.
    pub exclude: Vec<NodeClient>,
}

/// A node's answer, and the node it came from when not the template's own.
pub(crate) type Answer = (Result<SubmitVerdict, NodeError>, Option<LiveNode>);

/// Hands the block to the node until it gives a verdict, after its first submit ended in
/// `first`; `Err` with the reason when the block had to be given up (the log says why and
/// what the operator can do).
pub(crate) async fn until_settled(pending: Pending, first: NodeError) -> Answer {
    let Pending {
        template,
        solved,
        template_block,
        mut nodes,
        file,
        exclude,
    } = pending;
    let file = file
        .map(|f| f.display().to_string())
        .unwrap_or_else(|| "(not saved)".into());
    let block = template_block.and_then(|txs| solved.block(&txs).ok());
    let parent = solved.header.prev_blockhash;
    let height = template.data().height();
    // A template whose connection is gone cannot take a submit again; one whose node threw
    // can, once that submit has ended (it has: `first` is its end).
    let mut template_alive = !first.is_disconnect();
    warn!(error = %first, %file, "the node gave no verdict on the block; handing it over again until the chain moves past its parent");
    let mut last = first;
    loop {
        let Some(node) = live(&mut nodes, &exclude).await else {
            return (Err(last), None);
        };
        let whole = match &block {
            Some(block) => match node.client.submit_block(block).await {
                Err(NodeError::Unimplemented { .. }) => None,
                answer => Some(answer),
            },
            None => None,
        };
        let from = whole.is_some().then(|| node.clone());
        let answer = match whole {
            Some(answer) => answer,
            // No whole block to hand over (a v31.0 node, or the template's transactions
            // were never read): only the template's own connection can take it.
            None if template_alive => {
                let header = &solved.header;
                let version = header.version.to_consensus() as u32;
                let answer = template
                    .submit_solution(version, header.time, header.nonce, &solved.coinbase)
                    .await;
                template_alive = !matches!(&answer, Err(e) if e.is_disconnect());
                answer
            }
            None => {
                explain_no_way_left(&file, block.is_some());
                return (Err(last), None);
            }
        };
        match answer {
            Ok(verdict) if verdict.reason != PARENT_UNKNOWN => return (Ok(verdict), from),
            Ok(_) => info!("the node does not know the block's parent (yet)"),
            Err(e) => last = e,
        }
        if let Ok(Some(tip)) = node.client.tip().await {
            if tip.hash != parent && tip.height >= height {
                error!(
                    %file,
                    tip = %tip.hash,
                    tip_height = tip.height,
                    "giving the block up: the node's chain has moved past its parent"
                );
                return (Err(last), None);
            }
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// Logs why a block cannot be handed to the node any more, and what the operator can do.
fn explain_no_way_left(file: &str, have_block: bool) {
    if have_block {
        error!(
            %file,
            command = format!("bitcoin-cli submitblock $(cat {file})"),
            "the node has no submitBlock (v31.0) and the template died with its connection: submit the saved block yourself: bitcoin-cli submitblock $(cat {file})"
        );
    } else {
        error!(%file, "the template died with its connection and its block could not be read: the solution cannot be submitted; its header and coinbase are saved");
    }
}

/// A live connection not in `exclude` (an answering one first, in the configured
/// order), waiting for one; `None` when the engine is gone.
async fn live(nodes: &mut watch::Receiver<LiveNodes>, exclude: &[NodeClient]) -> Option<LiveNode> {
    loop {
        let found = {
            let now = nodes.borrow_and_update();
            let open = || {
                now.iter().filter(|n| {
                    !n.client.is_closed() && !exclude.iter().any(|x| x.same_connection(&n.client))
                })
            };
            open()
                .find(|n| n.responsive)
                .or_else(|| open().next())
                .cloned()
        };
        if found.is_some() {
            return found;
        }
        nodes.changed().await.ok()?;
    }
}

/// Hands the whole `block` (at `height`) to one more node, `node`, with `submitBlock`:
/// once, and again only after an answer without a verdict (its parent not known yet, an
/// error), until the node's chain has moved past the block's parent. `Err` when the node
/// has no `submitBlock` (v31.0) or its connection ended first.
pub(crate) async fn relay(
    node: &LiveNode,
    block: &Block,
    height: u32,
) -> Result<SubmitVerdict, NodeError> {
    let parent = block.header.prev_blockhash;
    let mut last = Err(NodeError::Disconnected);
    for _ in 0..RELAY_ATTEMPTS {
        last = match node.client.submit_block(block).await {
            Ok(verdict) if verdict.reason != PARENT_UNKNOWN => return Ok(verdict),
            Ok(verdict) => {
                info!(
                    node = &*node.name,
                    "the node does not know the block's parent (yet)"
                );
                Ok(verdict)
            }
            Err(e @ (NodeError::Unimplemented { .. } | NodeError::Disconnected)) => return Err(e),
            Err(e) => Err(e),
        };
        let moved_on = matches!(
            node.client.tip().await,
            Ok(Some(tip)) if tip.hash != parent && tip.height >= height
        );
        if moved_on || node.client.is_closed() {
            return last;
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
    last
}

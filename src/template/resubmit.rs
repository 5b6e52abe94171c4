//! Found blocks are never dropped quietly. A block the node did not take at once (its
//! connection died, or the node did not answer in time) is handed to it again and again —
//! `submitSolution` on its template while that template's connection lives, `submitBlock`
//! with the whole block over a later one — until the node gives a verdict, or until the
//! node's chain has moved past the block's parent, which makes the block worthless. Where
//! no way to submit is left, the log says so with the command that submits the saved file.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::cache::TemplateTxs;
use super::messages::SolvedBlock;
use crate::node::{NodeClient, NodeError, SubmitVerdict, Template};

/// Pause between two attempts.
pub(crate) const RETRY_EVERY: Duration = Duration::from_secs(2);

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
    /// The live connection.
    pub nodes: watch::Receiver<Option<NodeClient>>,
    /// Where the block (or, without the template's block, its header and coinbase) was
    /// saved.
    pub file: Option<PathBuf>,
}

/// Hands the block to the node until it gives a verdict; `Err` with the reason when the
/// block had to be given up (the log says why and what the operator can do).
pub(crate) async fn until_settled(
    pending: Pending,
    first: NodeError,
) -> Result<SubmitVerdict, NodeError> {
    let Pending {
        template,
        solved,
        template_block,
        mut nodes,
        file,
    } = pending;
    let file = file
        .map(|f| f.display().to_string())
        .unwrap_or_else(|| "(not saved)".into());
    let block = template_block.and_then(|txs| solved.block(&txs).ok());
    let parent = solved.header.prev_blockhash;
    let height = template.data().height();
    warn!(error = %first, %file, "the node did not take the block; trying again until the chain moves past its parent");
    let mut last = first;
    loop {
        let Some(node) = live(&mut nodes).await else {
            return Err(last);
        };
        // The template's own connection first: `submitSolution` works on every line.
        let header = &solved.header;
        let version = header.version.to_consensus() as u32;
        match template
            .submit_solution(version, header.time, header.nonce, &solved.coinbase)
            .await
        {
            Ok(verdict) => return Ok(verdict),
            Err(e @ NodeError::Timeout { .. }) => {
                last = e;
                tokio::time::sleep(RETRY_EVERY).await;
                continue;
            }
            Err(e) => last = e,
        }
        // Its connection is gone: the whole block over the live one.
        let Some(block) = &block else {
            error!(%file, "the template died with its connection and its block could not be read: the solution cannot be submitted; its header and coinbase are saved");
            return Err(last);
        };
        match node.submit_block(block).await {
            Ok(verdict) if verdict.reason != PARENT_UNKNOWN => return Ok(verdict),
            Ok(_) => info!("the node does not know the block's parent (yet)"),
            Err(e @ NodeError::Unimplemented { .. }) => {
                error!(
                    %file,
                    command = format!("bitcoin-cli submitblock $(cat {file})"),
                    "the node has no submitBlock (v31.0) and the template died with its connection: submit the saved block yourself: bitcoin-cli submitblock $(cat {file})"
                );
                return Err(e);
            }
            Err(e) => last = e,
        }
        if let Ok(Some(tip)) = node.tip().await {
            if tip.hash != parent && tip.height >= height {
                error!(
                    %file,
                    tip = %tip.hash,
                    tip_height = tip.height,
                    "giving the block up: the node's chain has moved past its parent"
                );
                return Err(last);
            }
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// The live connection, waiting for one; `None` when the engine is gone.
async fn live(nodes: &mut watch::Receiver<Option<NodeClient>>) -> Option<NodeClient> {
    loop {
        if let Some(node) = nodes.borrow_and_update().clone().filter(|n| !n.is_closed()) {
            return Some(node);
        }
        nodes.changed().await.ok()?;
    }
}

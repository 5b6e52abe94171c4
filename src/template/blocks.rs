//! Reading a template's block from the node in the background: right after the template
//! is published (so transaction data and solutions need no IPC later, and a solution can
//! be saved even if the node is gone by then) and for transaction data not cached.

use std::sync::Arc;

use bitcoin::Block;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::api::{TransactionData, TxDataError};
use super::store::transactions;
use crate::node::Template;

/// A block read from the node, for the store's cache.
#[derive(Debug)]
pub(crate) struct FetchedBlock {
    /// The template it belongs to.
    pub template_id: u64,
    /// The node's block, with a placeholder coinbase.
    pub block: Arc<Block>,
}

/// Someone waiting for a template's transactions.
pub(crate) struct TxDataReply {
    /// `excess_data` for the answer.
    pub excess_data: Vec<u8>,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<TransactionData, TxDataError>>,
}

/// Reads template `template_id`'s block, answers `waiting` (if any) with its
/// transactions, and sends the block to `fetched`.
pub(crate) fn fetch(
    template_id: u64,
    template: Template,
    waiting: Option<TxDataReply>,
    fetched: mpsc::Sender<FetchedBlock>,
) {
    tokio::spawn(async move {
        let block = template.block().await.map(Arc::new);
        // The cache first: once a client has its answer, the engine has the block too.
        match &block {
            Ok(block) => {
                let block = block.clone();
                let _ = fetched.send(FetchedBlock { template_id, block }).await;
            }
            Err(e) => debug!(template_id, error = %e, "fetching the block failed"),
        }
        if let Some(TxDataReply { excess_data, reply }) = waiting {
            let answer = match &block {
                Ok(block) => Ok(TransactionData {
                    transactions: Arc::new(transactions(block)),
                    excess_data,
                }),
                Err(e) => {
                    warn!(template_id, error = %e, "cannot read the template's transactions");
                    Err(TxDataError::TemplateIdNotFound)
                }
            };
            let _ = reply.send(answer);
        }
    });
}

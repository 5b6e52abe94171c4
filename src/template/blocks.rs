//! Reading template blocks from the node in the background: right after a template is
//! published (so transaction data and solutions need no IPC later, and a solution can be
//! saved even if the node is gone by then) and for transaction data not cached yet.
//!
//! One read per template at a time: requests for a block already on its way wait for it
//! and share its one transaction list. Reads clients cause take a place among the
//! node calls clients may cause at once.

use std::collections::HashMap;
use std::sync::Arc;

use bitcoin::Block;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{debug, warn};

use super::api::{TransactionData, TxDataError};
use super::group::take_client_call;
use crate::node::Template;

/// A block read from the node (or why not), for the store's cache.
#[derive(Debug)]
pub(crate) struct FetchedBlock {
    /// The template it belongs to.
    pub template_id: u64,
    /// The node's block, with a placeholder coinbase.
    pub block: Option<Arc<Block>>,
}

/// Someone waiting for a template's transactions.
#[derive(Debug)]
pub(crate) struct TxDataReply {
    /// `excess_data` for the answer.
    pub excess_data: Vec<u8>,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<TransactionData, TxDataError>>,
}

/// The block reads in flight, with who waits for each.
#[derive(Debug)]
pub(crate) struct BlockReads {
    in_flight: HashMap<u64, Vec<TxDataReply>>,
    fetched: mpsc::Sender<FetchedBlock>,
    client_calls: Arc<Semaphore>,
}

impl BlockReads {
    /// Reads deliver to `fetched`; reads for clients wait for a `client_calls` place.
    pub fn new(fetched: mpsc::Sender<FetchedBlock>, client_calls: Arc<Semaphore>) -> Self {
        Self {
            in_flight: HashMap::new(),
            fetched,
            client_calls,
        }
    }

    /// Reads template `id`'s block for the cache, unless a read is on its way.
    pub fn prefetch(&mut self, id: u64, template: Template) {
        if let std::collections::hash_map::Entry::Vacant(entry) = self.in_flight.entry(id) {
            entry.insert(Vec::new());
            self.spawn(id, template, None);
        }
    }

    /// Answers `waiting` once template `id`'s block is read (starting a read if none is
    /// on its way).
    pub fn read_for(&mut self, id: u64, template: Template, waiting: TxDataReply) {
        match self.in_flight.get_mut(&id) {
            Some(waiters) => waiters.push(waiting),
            None => {
                self.in_flight.insert(id, vec![waiting]);
                self.spawn(id, template, Some(self.client_calls.clone()));
            }
        }
    }

    /// A read ended: answers its waiters with `transactions` (the template's one shared
    /// list), or with an error when the block could not be read.
    pub fn done(&mut self, id: u64, transactions: Option<Arc<Vec<Vec<u8>>>>) {
        for TxDataReply { excess_data, reply } in self.in_flight.remove(&id).unwrap_or_default() {
            let answer = match &transactions {
                Some(transactions) => Ok(TransactionData {
                    transactions: transactions.clone(),
                    excess_data,
                }),
                None => Err(TxDataError::TemplateIdNotFound),
            };
            let _ = reply.send(answer);
        }
    }

    fn spawn(&self, template_id: u64, template: Template, place: Option<Arc<Semaphore>>) {
        let fetched = self.fetched.clone();
        tokio::spawn(async move {
            let _place = match place {
                Some(places) => take_client_call(&places).await.ok(),
                None => None,
            };
            let block = match template.block().await {
                Ok(block) => Some(Arc::new(block)),
                Err(e) => {
                    warn!(template_id, error = %e, "cannot read the template's block");
                    None
                }
            };
            debug!(template_id, read = block.is_some(), "block read");
            let _ = fetched.send(FetchedBlock { template_id, block }).await;
        });
    }
}

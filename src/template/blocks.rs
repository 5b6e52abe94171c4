//! Reading a template's block from the node in the background: after the template is
//! published (so transaction data and solutions need no IPC later, and a solution can
//! be saved even if the node is gone by then) and for transaction data not cached.
//!
//! Prefetches run one at a time, for each group's newest template only, so they never
//! pile up on the node beside the templates clients wait for. A template without
//! transactions needs no read at all: its block is made here.

use std::collections::HashMap;
use std::sync::Arc;

use bitcoin::{absolute::LockTime, transaction::Version, Block, Transaction};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::api::{Constraints, TransactionData, TxDataError};
use super::store::{transactions, TxLookup};
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

/// Answers a request for template `template_id`'s transactions from the store's
/// `lookup`: at once when cached, or once its block is read (`template` names the node's
/// template in the store's payload).
pub(crate) fn answer<T>(
    template_id: u64,
    lookup: Result<TxLookup<T>, TxDataError>,
    template: impl FnOnce(T) -> Template,
    reply: oneshot::Sender<Result<TransactionData, TxDataError>>,
    fetched: mpsc::Sender<FetchedBlock>,
) {
    match lookup {
        Err(e) => {
            let _ = reply.send(Err(e));
        }
        Ok(TxLookup::Ready(data)) => {
            let _ = reply.send(Ok(data));
        }
        Ok(TxLookup::Fetch {
            payload,
            excess_data,
        }) => {
            let waiting = TxDataReply { excess_data, reply };
            fetch(template_id, template(payload), Some(waiting), fetched)
        }
    }
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

/// The block of a template without transactions: its header and a placeholder coinbase
/// (as the node's `getBlock` has one; solutions replace it).
pub(crate) fn coinbase_only_block(template: &Template) -> Option<Block> {
    let data = template.data();
    data.tx_fees.is_empty().then(|| Block {
        header: data.header,
        txdata: vec![Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input: Vec::new(),
            output: Vec::new(),
        }],
    })
}

/// One template whose block is worth reading ahead.
pub(crate) struct Prefetch {
    /// The template's id.
    pub template_id: u64,
    /// Its group: only the group's newest queued template is read.
    pub group: Constraints,
    /// The node's template.
    pub template: Template,
}

/// Starts the prefetch worker; it delivers to `fetched` and stops when the returned
/// sender is dropped.
pub(crate) fn prefetcher(fetched: mpsc::Sender<FetchedBlock>) -> mpsc::UnboundedSender<Prefetch> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Prefetch>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            // What queued up meanwhile: only each group's newest is still worth a read.
            let mut newest: HashMap<Constraints, Prefetch> = HashMap::new();
            newest.insert(first.group, first);
            while let Ok(job) = rx.try_recv() {
                newest.insert(job.group, job);
            }
            let mut jobs: Vec<Prefetch> = newest.into_values().collect();
            jobs.sort_by_key(|j| j.template_id);
            for Prefetch {
                template_id,
                template,
                ..
            } in jobs
            {
                match template.block().await {
                    Ok(block) => {
                        let block = Arc::new(block);
                        let _ = fetched.send(FetchedBlock { template_id, block }).await;
                    }
                    Err(e) => debug!(template_id, error = %e, "prefetching the block failed"),
                }
            }
        }
    });
    tx
}

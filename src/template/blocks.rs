//! Reading template blocks from the node in the background: right after a template is
//! published (so transaction data and solutions need no IPC later, and a solution can be
//! saved even if the node is gone by then) and for transaction data not cached yet.
//!
//! Prefetches run one at a time on one worker, newest first, so they never pile up on the
//! node beside the templates clients wait for; every published template is read (every
//! held template keeps its transactions, see [`super::cache`]). A template without
//! transactions needs no read at all. Reads for transaction data
//! not cached: one per template at a time, requests for a block already on its way wait
//! for it and share its one transaction list, and each takes a place among the node
//! calls clients may cause at once.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{debug, warn};

use super::api::{TransactionData, TxDataError};
use super::build::take_client_call;
use super::cache::TemplateTxs;
use super::store::TxLookup;
use crate::node::Template;

/// A block read from the node (or why not), for the store's cache.
#[derive(Debug)]
pub(crate) struct FetchedBlock {
    /// The template it belongs to.
    pub template_id: u64,
    /// The block's non-coinbase transactions, serialized by the read task (not by the
    /// engine); the parsed block is not kept.
    pub txs: Option<TemplateTxs>,
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
    /// The prefetch worker's queue.
    prefetch: mpsc::UnboundedSender<Prefetch>,
}

impl BlockReads {
    /// Reads deliver to `fetched`; reads for clients wait for a `client_calls` place.
    pub fn new(fetched: mpsc::Sender<FetchedBlock>, client_calls: Arc<Semaphore>) -> Self {
        Self {
            in_flight: HashMap::new(),
            prefetch: prefetcher(fetched.clone()),
            fetched,
            client_calls,
        }
    }

    /// Reads published template `id` ahead, on the prefetch worker. A template without
    /// transactions needs no read: its (empty) list is returned at once.
    pub fn prefetch(&mut self, id: u64, template: Template) -> Option<TemplateTxs> {
        if template.data().tx_fees.is_empty() {
            return Some(TemplateTxs::new(Vec::new()));
        }
        let job = Prefetch {
            template_id: id,
            template,
        };
        let _ = self.prefetch.send(job);
        None
    }

    /// Answers a request for template `id`'s transactions from the store's `lookup`: at
    /// once when cached, or once its block is read (`template` names the node's template
    /// in the store's payload).
    pub fn answer<T>(
        &mut self,
        id: u64,
        lookup: Result<TxLookup<T>, TxDataError>,
        template: impl FnOnce(T) -> Template,
        reply: oneshot::Sender<Result<TransactionData, TxDataError>>,
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
            }) => self.read_for(id, template(payload), TxDataReply { excess_data, reply }),
        }
    }

    /// Answers `waiting` once template `id`'s block is read (starting a read if none is
    /// on its way).
    fn read_for(&mut self, id: u64, template: Template, waiting: TxDataReply) {
        match self.in_flight.get_mut(&id) {
            Some(waiters) => waiters.push(waiting),
            None => {
                self.in_flight.insert(id, vec![waiting]);
                self.spawn(id, template, Some(self.client_calls.clone()));
            }
        }
    }

    /// A read ended: answers its waiters with the template's one shared transaction
    /// list (or an error when the block could not be read), and returns the list for the
    /// store's cache. Waiters get the list even if the store does not keep it (pruned
    /// meanwhile, or too old to be worth keeping).
    pub fn done(&mut self, read: FetchedBlock) -> Option<(u64, TemplateTxs)> {
        let FetchedBlock { template_id, txs } = read;
        let waiters = self.in_flight.remove(&template_id).unwrap_or_default();
        for TxDataReply { excess_data, reply } in waiters {
            let answer = match &txs {
                Some(txs) => Ok(TransactionData {
                    transactions: txs.list().clone(),
                    excess_data,
                }),
                None => Err(TxDataError::TemplateIdNotFound),
            };
            let _ = reply.send(answer);
        }
        txs.map(|txs| (template_id, txs))
    }

    fn spawn(&self, template_id: u64, template: Template, place: Option<Arc<Semaphore>>) {
        let fetched = self.fetched.clone();
        tokio::spawn(async move {
            let _place = match place {
                Some(places) => take_client_call(&places).await.ok(),
                None => None,
            };
            let txs = read(&template).await;
            if let Err(e) = &txs {
                warn!(template_id, error = %e, "cannot read the template's block");
            }
            debug!(template_id, read = txs.is_ok(), "block read");
            let txs = txs.ok();
            let _ = fetched.send(FetchedBlock { template_id, txs }).await;
        });
    }
}

/// Reads `template`'s block and serializes its transactions (here, not in the engine).
async fn read(template: &Template) -> Result<TemplateTxs, crate::node::NodeError> {
    let block = template.block().await?;
    Ok(TemplateTxs::from_block(&block))
}

/// One template whose block is worth reading ahead.
pub(crate) struct Prefetch {
    /// The template's id.
    pub template_id: u64,
    /// The node's template.
    pub template: Template,
}

/// Starts the prefetch worker; it delivers to `fetched` and stops when the returned
/// sender is dropped.
fn prefetcher(fetched: mpsc::Sender<FetchedBlock>) -> mpsc::UnboundedSender<Prefetch> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Prefetch>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            // What queued up meanwhile, newest first: the templates clients most likely
            // mine get their transactions first; the older ones follow (every held
            // template keeps its transactions).
            let mut jobs = vec![first];
            while let Ok(job) = rx.try_recv() {
                jobs.push(job);
            }
            jobs.sort_by_key(|j| std::cmp::Reverse(j.template_id));
            for Prefetch {
                template_id,
                template,
            } in jobs
            {
                match read(&template).await {
                    Ok(txs) => {
                        let txs = Some(txs);
                        let _ = fetched.send(FetchedBlock { template_id, txs }).await;
                    }
                    Err(e) => debug!(template_id, error = %e, "prefetching the block failed"),
                }
            }
        }
    });
    tx
}

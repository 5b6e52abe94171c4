//! The templates handed out to clients: their ids, which tip they build on, how long they
//! are kept, and the blocks cached for transaction data and solutions.
//!
//! Pure bookkeeping with no I/O: the engine passes the time in and does the node calls
//! (fetching a block, releasing a template) that the answers here call for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::consensus::serialize;
use bitcoin::{Block, BlockHash};

use super::api::{Constraints, TransactionData, TxDataError};

/// Templates of the current tip kept per group beyond those younger than the grace
/// period. Each one holds a whole block in the node's memory, and a tip can last hours on
/// test networks; solutions for anything but the newest few are not expected.
pub(crate) const MAX_TEMPLATES_PER_GROUP: usize = 16;

/// One template handed out to clients. `T` is what the engine keeps with it (the node's
/// template handle and the messages sent for it); the store only moves it around.
#[derive(Debug)]
pub(crate) struct Held<T> {
    /// The engine's part.
    pub payload: T,
    /// The constraint group it was made for.
    pub group: Constraints,
    /// The tip it builds on.
    pub prev_hash: BlockHash,
    /// When it was made.
    pub made: Instant,
    /// The coinbase witness reserved value (`excess_data` of transaction data).
    pub excess_data: Vec<u8>,
    /// The node's block for it (with a placeholder coinbase), once fetched.
    pub block: Option<Arc<Block>>,
    /// Its non-coinbase transactions, serialized once for every client that asks.
    pub tx_data: Option<Arc<Vec<Vec<u8>>>>,
}

impl<T> Held<T> {
    /// A template made at `made`, with no block fetched yet.
    pub fn new(
        payload: T,
        group: Constraints,
        prev_hash: BlockHash,
        made: Instant,
        excess_data: Vec<u8>,
    ) -> Self {
        Self {
            payload,
            group,
            prev_hash,
            made,
            excess_data,
            block: None,
            tx_data: None,
        }
    }
}

/// Where the transactions of a template come from.
#[derive(Debug)]
pub(crate) enum TxLookup<T> {
    /// Already cached.
    Ready(TransactionData),
    /// Not cached: read the block from the node with this payload, then
    /// [`TemplateStore::set_block`].
    Fetch {
        /// The template's payload (the node handle).
        payload: T,
        /// `excess_data` for the answer.
        excess_data: Vec<u8>,
    },
}

/// Every template clients may still refer to, by id.
#[derive(Debug)]
pub(crate) struct TemplateStore<T> {
    templates: BTreeMap<u64, Held<T>>,
    next_id: u64,
    /// The node's tip, with its height.
    tip: Option<(BlockHash, u32)>,
    /// The tip before `tip`, and when it was replaced.
    previous_tip: Option<(BlockHash, Instant)>,
    /// How long templates of the previous tip stay usable after a new tip.
    grace: Duration,
}

impl<T: Clone> TemplateStore<T> {
    /// An empty store whose first template gets id `first_id`.
    pub fn new(grace: Duration, first_id: u64) -> Self {
        Self {
            templates: BTreeMap::new(),
            next_id: first_id,
            tip: None,
            previous_tip: None,
            grace,
        }
    }

    /// The node's tip: templates built on it are current.
    pub fn tip(&self) -> Option<BlockHash> {
        self.tip.map(|(hash, _)| hash)
    }

    /// Records the node's new tip (at `height`, reported at `now`) and returns the one
    /// it replaces. The node decides: the new tip may be lower than the old one. The old
    /// tip's templates stay usable for the grace period.
    pub fn set_tip(
        &mut self,
        hash: BlockHash,
        height: u32,
        now: Instant,
    ) -> Option<(BlockHash, u32)> {
        let old = self.tip.replace((hash, height));
        if let Some((old_hash, _)) = old.filter(|(h, _)| *h != hash) {
            self.previous_tip = Some((old_hash, now));
        }
        old
    }

    /// The id the next [`TemplateStore::insert`] assigns.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Records `held` under [`TemplateStore::next_id`] and returns that id. Every held
    /// template keeps its cached block (see [`super::cache`]), so a solution for any of
    /// them can be saved and submitted whole.
    pub fn insert(&mut self, held: Held<T>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.templates.insert(id, held);
        id
    }

    /// The template with `id`, while held.
    pub fn get(&self, id: u64) -> Option<&Held<T>> {
        self.templates.get(&id)
    }

    /// The held templates of the current tip, newest first.
    pub fn on_tip(&self) -> impl Iterator<Item = &Held<T>> {
        let tip = self.tip();
        self.templates
            .values()
            .rev()
            .filter(move |h| Some(h.prev_hash) == tip)
    }

    /// Caches the node's block for template `id` with its serialized `transactions`, if
    /// still held, sharing the block and transaction list of a held template with the
    /// same transactions.
    pub fn set_block(&mut self, id: u64, block: Arc<Block>, transactions: Arc<Vec<Vec<u8>>>) {
        let Some(prev_hash) = self.templates.get(&id).map(|h| h.prev_hash) else {
            return;
        };
        let cached = self
            .templates
            .values()
            .filter(|h| h.prev_hash == prev_hash)
            .filter_map(|h| Some((h.block.clone()?, h.tx_data.clone())));
        let (block, tx_data) = super::cache::share(block, cached);
        if let Some(held) = self.templates.get_mut(&id) {
            held.block = Some(block);
            held.tx_data = Some(tx_data.unwrap_or(transactions));
        }
    }

    /// The transactions of template `id`: cached, or what to read them with. Only
    /// templates of the current tip are served.
    pub fn transaction_data(&mut self, id: u64) -> Result<TxLookup<T>, TxDataError> {
        let tip = self.tip();
        let held = self
            .templates
            .get(&id)
            .ok_or(TxDataError::TemplateIdNotFound)?;
        if Some(held.prev_hash) != tip {
            return Err(TxDataError::StaleTemplateId);
        }
        let (payload, excess_data) = (held.payload.clone(), held.excess_data.clone());
        Ok(match self.transactions(id) {
            Some(transactions) => TxLookup::Ready(TransactionData {
                transactions,
                excess_data,
            }),
            None => TxLookup::Fetch {
                payload,
                excess_data,
            },
        })
    }

    /// Template `id`'s non-coinbase transactions, serialized once (when its block was
    /// read) and shared from then on.
    pub fn transactions(&self, id: u64) -> Option<Arc<Vec<Vec<u8>>>> {
        self.templates.get(&id)?.tx_data.clone()
    }

    /// Drops templates of tips before the previous one, of the previous tip once its
    /// grace period is over, and of the current tip beyond [`MAX_TEMPLATES_PER_GROUP`]
    /// per group (unless younger than the grace period). `current` (each group's newest)
    /// are always kept. Dropping a payload releases the node's copy.
    pub fn prune(&mut self, current: &[u64], now: Instant) {
        let grace_over = self
            .previous_tip
            .is_none_or(|(_, since)| now.saturating_duration_since(since) >= self.grace);
        let tip = self.tip();
        let previous = self.previous_tip.map(|(hash, _)| hash);
        // Newest first, so the per-group cap keeps the latest.
        let mut per_group: HashMap<Constraints, usize> = HashMap::new();
        let mut keep = HashSet::new();
        for (id, held) in self.templates.iter().rev() {
            let kept = per_group.entry(held.group).or_default();
            let young = now.saturating_duration_since(held.made) < self.grace;
            let recent = Some(held.prev_hash) == tip && (*kept < MAX_TEMPLATES_PER_GROUP || young);
            if current.contains(id) || recent || (!grace_over && Some(held.prev_hash) == previous) {
                *kept += 1;
                keep.insert(*id);
            }
        }
        self.templates.retain(|id, _| keep.contains(id));
    }

    /// Drops every template (shutdown).
    pub fn clear(&mut self) {
        self.templates.clear();
    }

    /// How many templates are held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.templates.len()
    }
}

/// The non-coinbase transactions of `block`, serialized with witness.
pub(crate) fn transactions(block: &Block) -> Vec<Vec<u8>> {
    block.txdata.iter().skip(1).map(serialize).collect()
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;

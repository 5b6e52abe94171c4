//! The templates handed out to clients: their ids, which tip they build on, how long they
//! are kept, and the transactions cached for transaction data and solutions.
//!
//! One budget bounds what is held across every constraint group: a number of templates
//! (each one is a block the node keeps for us) and the bytes of their cached transactions
//! (a list shared by several templates counted once). Each group's current template is
//! always kept; beyond that, the oldest templates go first, those of older tips before
//! those of the node's tip.
//!
//! Pure bookkeeping with no I/O: the engine passes the time in and does the node calls
//! (fetching a block, releasing a template) that the answers here call for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use bitcoin::BlockHash;

use super::api::{Constraints, TransactionData, TxDataError};
use super::cache::{self, ListKey, TemplateTxs, TxList};

/// What the store may hold, all constraint groups together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TemplateBudget {
    /// Templates held (each one a block the node keeps for us).
    pub templates: usize,
    /// Bytes of cached transactions, a list shared by several templates counted once.
    pub bytes: usize,
}

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
    /// The coinbase witness reserved value (`excess_data` of transaction data).
    pub excess_data: Vec<u8>,
    /// Its non-coinbase transactions, once read from the node: the one copy kept, shared
    /// with held templates whose transactions are the same.
    pub txs: Option<TemplateTxs>,
}

impl<T> Held<T> {
    /// A template of `group` on `prev_hash`, with no transactions read yet.
    pub fn new(payload: T, group: Constraints, prev_hash: BlockHash, excess_data: Vec<u8>) -> Self {
        Self {
            payload,
            group,
            prev_hash,
            excess_data,
            txs: None,
        }
    }
}

/// Where the transactions of a template come from.
#[derive(Debug)]
pub(crate) enum TxLookup<T> {
    /// Already cached.
    Ready(TransactionData),
    /// Not cached: read the block from the node with this payload, then
    /// [`TemplateStore::set_txs`].
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
    /// What may be held.
    budget: TemplateBudget,
}

impl<T: Clone> TemplateStore<T> {
    /// An empty store whose first template gets id `first_id`, holding at most `budget`.
    pub fn new(grace: Duration, first_id: u64, budget: TemplateBudget) -> Self {
        Self {
            templates: BTreeMap::new(),
            next_id: first_id,
            tip: None,
            previous_tip: None,
            grace,
            budget,
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
    /// template keeps its cached transactions (see [`super::cache`]), so a solution for
    /// any of them can be saved and submitted whole. The caller then fits the store into
    /// its budget ([`TemplateStore::fit_budget`] or [`TemplateStore::prune`]).
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

    /// Caches the transactions of template `id`, if still held, sharing the list of a
    /// held template of the same tip with the same transactions.
    pub fn set_txs(&mut self, id: u64, txs: TemplateTxs) {
        let Some(prev_hash) = self.templates.get(&id).map(|h| h.prev_hash) else {
            return;
        };
        let cached = self
            .templates
            .values()
            .filter(|h| h.prev_hash == prev_hash)
            .filter_map(|h| h.txs.as_ref());
        let txs = cache::share(txs, cached);
        if let Some(held) = self.templates.get_mut(&id) {
            held.txs = Some(txs);
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
    pub fn transactions(&self, id: u64) -> Option<TxList> {
        Some(self.templates.get(&id)?.txs.as_ref()?.list().clone())
    }

    /// Drops templates of tips before the previous one and of the previous tip once its
    /// grace period is over, then fits the rest into the budget
    /// ([`TemplateStore::fit_budget`]). `current` (each group's newest) are always kept.
    /// Dropping a payload releases the node's copy.
    pub fn prune(&mut self, current: &[u64], now: Instant) {
        let grace_over = self
            .previous_tip
            .is_none_or(|(_, since)| now.saturating_duration_since(since) >= self.grace);
        let tip = self.tip();
        let previous = self.previous_tip.map(|(hash, _)| hash);
        self.templates.retain(|id, held| {
            current.contains(id)
                || Some(held.prev_hash) == tip
                || (!grace_over && Some(held.prev_hash) == previous)
        });
        self.fit_budget(current);
    }

    /// Drops templates until the store is within its budget (count and bytes): the
    /// oldest first, those of other tips (the previous tip's, in its grace period) before
    /// those of the node's tip. `current` (each group's newest) are always kept, even
    /// beyond the budget, and so is each group's newest template on the node's tip (what
    /// its clients mine while the group starts over, after a reconnect or a node that
    /// answers again); for the bytes alone, neither is a template whose release frees
    /// none (no transactions cached, or a list a kept template holds too).
    pub fn fit_budget(&mut self, current: &[u64]) {
        let mut holders = self.lists();
        let mut bytes: usize = holders.values().map(|(_, b)| b).sum();
        let budget = self.budget;
        if self.templates.len() <= budget.templates && bytes <= budget.bytes {
            return;
        }
        let tip = self.tip();
        let mut kept: HashSet<u64> = current.iter().copied().collect();
        let mut newest_on_tip: HashMap<Constraints, u64> = HashMap::new();
        for (id, held) in self
            .templates
            .iter()
            .filter(|(_, h)| Some(h.prev_hash) == tip)
        {
            newest_on_tip.insert(held.group, *id);
        }
        kept.extend(newest_on_tip.into_values());
        let pinned: HashSet<ListKey> = kept
            .iter()
            .filter_map(|id| Some(self.templates.get(id)?.txs.as_ref()?.key()))
            .collect();
        let mut candidates: Vec<(bool, u64)> = self
            .templates
            .iter()
            .filter(|(id, _)| !kept.contains(id))
            .map(|(id, held)| (Some(held.prev_hash) == tip, *id))
            .collect();
        candidates.sort_unstable();
        for (_, id) in candidates {
            let over_count = self.templates.len() > budget.templates;
            if !over_count && bytes <= budget.bytes {
                break;
            }
            let txs = self.templates.get(&id).and_then(|h| h.txs.as_ref());
            let frees = txs.is_some_and(|t| t.bytes() > 0 && !pinned.contains(&t.key()));
            let list = txs.map(TemplateTxs::key);
            if !over_count && !frees {
                continue;
            }
            self.templates.remove(&id);
            if let Some(entry) = list.and_then(|key| holders.get_mut(&key)) {
                entry.0 -= 1;
                if entry.0 == 0 {
                    bytes -= entry.1;
                }
            }
        }
    }

    /// Bytes of the cached transactions held, a list shared by several templates counted
    /// once.
    pub fn bytes_held(&self) -> usize {
        self.lists().values().map(|(_, bytes)| bytes).sum()
    }

    /// Every distinct cached list, with how many templates hold it and its bytes.
    fn lists(&self) -> HashMap<ListKey, (usize, usize)> {
        let mut lists: HashMap<ListKey, (usize, usize)> = HashMap::new();
        for txs in self.templates.values().filter_map(|h| h.txs.as_ref()) {
            let entry = lists.entry(txs.key()).or_default();
            *entry = (entry.0 + 1, txs.bytes());
        }
        lists
    }

    /// How many templates are held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.templates.len()
    }

    /// Drops every template (shutdown).
    pub fn clear(&mut self) {
        self.templates.clear();
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;

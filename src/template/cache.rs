//! The one copy the daemon keeps of a template's transactions: its non-coinbase
//! transactions serialized with witness, exactly what `RequestTransactionData` answers
//! with. A whole block — for a solution saved or submitted whole — is made from a
//! solution's header and coinbase and this list, so no parsed block is kept beside it.
//!
//! Templates whose lists are the same (equal constraint groups' templates on one tip, a
//! same-tip template whose fees did not change) share one reference-counted list instead
//! of a copy each; the store's byte budget counts a shared list once.

use std::sync::Arc;

use bitcoin::consensus::encode::{serialize, VarInt};
use bitcoin::{block::Header, Block, Transaction};

/// A template's non-coinbase transactions, serialized with witness: one list per
/// template, shared by every answer.
pub(crate) type TxList = Arc<Vec<Vec<u8>>>;

/// Tells shared lists apart (the list's address; never dereferenced).
pub(crate) type ListKey = *const Vec<Vec<u8>>;

/// A template's transactions as cached: the shared list and its size in bytes.
#[derive(Clone, Debug)]
pub(crate) struct TemplateTxs {
    list: TxList,
    bytes: usize,
}

impl TemplateTxs {
    /// `transactions`, serialized with witness, as one list.
    pub fn new(transactions: Vec<Vec<u8>>) -> Self {
        let bytes = transactions.iter().map(Vec::len).sum();
        Self {
            list: Arc::new(transactions),
            bytes,
        }
    }

    /// The transactions after `block`'s coinbase (the node's block has a placeholder one).
    pub fn from_block(block: &Block) -> Self {
        Self::new(block.txdata.iter().skip(1).map(serialize).collect())
    }

    /// The list, for transaction-data answers.
    pub fn list(&self) -> &TxList {
        &self.list
    }

    /// Serialized bytes of the transactions (what the store's byte budget counts).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether `self` and `other` are one shared list (not merely equal ones).
    pub fn is_shared_with(&self, other: &TemplateTxs) -> bool {
        Arc::ptr_eq(&self.list, &other.list)
    }

    /// The same for every template sharing this list, different for every other list.
    pub fn key(&self) -> ListKey {
        Arc::as_ptr(&self.list)
    }

    /// Whether `self` and `other` hold the same transactions, byte for byte.
    fn same_transactions(&self, other: &TemplateTxs) -> bool {
        self.is_shared_with(other)
            || (self.bytes == other.bytes
                && self.list.len() == other.list.len()
                && self.list == other.list)
    }

    /// The consensus serialization of the block with `header`, `coinbase` and these
    /// transactions: what `submitblock` and the saved `.block.hex` file take.
    pub fn block_bytes(&self, header: &Header, coinbase: &Transaction) -> Vec<u8> {
        let coinbase = serialize(coinbase);
        let count = serialize(&VarInt(self.list.len() as u64 + 1));
        let mut block = Vec::with_capacity(80 + count.len() + coinbase.len() + self.bytes);
        block.extend_from_slice(&serialize(header));
        block.extend_from_slice(&count);
        block.extend_from_slice(&coinbase);
        for tx in self.list.iter() {
            block.extend_from_slice(tx);
        }
        block
    }
}

/// What to cache for a freshly read `fresh` list: the first of `cached` with the same
/// transactions, or `fresh` itself.
pub(crate) fn share<'a>(
    fresh: TemplateTxs,
    cached: impl IntoIterator<Item = &'a TemplateTxs>,
) -> TemplateTxs {
    let mut seen: Vec<&TemplateTxs> = Vec::new();
    for other in cached {
        if seen.iter().any(|s| s.is_shared_with(other)) {
            continue;
        }
        seen.push(other);
        if fresh.same_transactions(other) {
            return other.clone();
        }
    }
    fresh
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::consensus::deserialize;

    fn block(extra: usize) -> Block {
        let genesis = bitcoin::constants::genesis_block(bitcoin::Network::Regtest);
        let mut tx = genesis.txdata[0].clone();
        let mut txdata = vec![tx.clone()];
        for n in 0..extra {
            tx.lock_time = bitcoin::absolute::LockTime::from_consensus(n as u32);
            txdata.push(tx.clone());
        }
        Block {
            header: genesis.header,
            txdata,
        }
    }

    #[test]
    fn equal_transactions_share_one_list() {
        let first = TemplateTxs::from_block(&block(2));
        let mut again = block(2);
        again.txdata[0].lock_time = bitcoin::absolute::LockTime::from_consensus(99);
        again.header.nonce = 7;
        let shared = share(TemplateTxs::from_block(&again), [&first]);
        assert!(
            shared.is_shared_with(&first),
            "another coinbase and header still share"
        );
    }

    #[test]
    fn other_transactions_keep_their_own_list() {
        let first = TemplateTxs::from_block(&block(2));
        let fresh = TemplateTxs::from_block(&block(3));
        let kept = share(fresh.clone(), [&first]);
        assert!(kept.is_shared_with(&fresh));
        assert!(!kept.is_shared_with(&first));
    }

    #[test]
    fn the_block_bytes_are_the_blocks_serialization() {
        let mut whole = block(300);
        whole.txdata[0].lock_time = bitcoin::absolute::LockTime::from_consensus(42);
        let txs = TemplateTxs::from_block(&whole);
        let bytes = txs.block_bytes(&whole.header, &whole.txdata[0]);
        assert_eq!(
            bytes,
            serialize(&whole),
            "more than 252 transactions: a 3-byte count"
        );
        let decoded: Block = deserialize(&bytes).unwrap();
        assert_eq!(decoded, whole);
        assert_eq!(txs.bytes(), txs.list().iter().map(Vec::len).sum::<usize>());
    }
}

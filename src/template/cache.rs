//! The block cache's sharing rule: templates whose non-coinbase transactions are the same
//! (equal constraint groups' templates on one tip, a same-tip template whose fees did not
//! change) share one reference-counted block and one serialized transaction list, instead
//! of a copy each. Every held template keeps its block, so any of them can become a full
//! block — for a solution saved or submitted whole — without asking the node.
//!
//! Only a cached block's transactions are ever used (a solution brings its own header and
//! coinbase), so one template's block serves another with the same transactions.

use std::sync::Arc;

use bitcoin::Block;

/// A block and its serialized transactions, as the store caches them.
pub(crate) type Cached = (Arc<Block>, Option<Arc<Vec<Vec<u8>>>>);

/// What to cache for a freshly read `block`: the first of `cached` whose transactions are
/// the same, or `block` itself.
pub(crate) fn share(block: Arc<Block>, cached: impl IntoIterator<Item = Cached>) -> Cached {
    let mut seen: Vec<*const Block> = Vec::new();
    for (other, tx_data) in cached {
        let ptr = Arc::as_ptr(&other);
        if seen.contains(&ptr) {
            continue;
        }
        seen.push(ptr);
        if same_transactions(&block, &other) {
            return (other, tx_data);
        }
    }
    (block, None)
}

/// Whether `a` and `b` hold the same transactions after their coinbases.
fn same_transactions(a: &Block, b: &Block) -> bool {
    a.txdata.len() == b.txdata.len() && a.txdata.iter().skip(1).eq(b.txdata.iter().skip(1))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn equal_transactions_share_one_block_and_list() {
        let first = Arc::new(block(2));
        let list = Arc::new(vec![vec![1u8]]);
        let mut again = block(2);
        again.txdata[0].lock_time = bitcoin::absolute::LockTime::from_consensus(99);
        again.header.nonce = 7;
        let (shared, tx_data) = share(Arc::new(again), [(first.clone(), Some(list.clone()))]);
        assert!(
            Arc::ptr_eq(&shared, &first),
            "another coinbase and header still share"
        );
        assert!(tx_data.is_some_and(|t| Arc::ptr_eq(&t, &list)));
    }

    #[test]
    fn other_transactions_keep_their_own_block() {
        let first = Arc::new(block(2));
        let fresh = Arc::new(block(3));
        let (kept, tx_data) = share(fresh.clone(), [(first, None)]);
        assert!(Arc::ptr_eq(&kept, &fresh));
        assert!(tx_data.is_none());
    }
}

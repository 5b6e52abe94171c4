//! Unit tests of the template store (kept beside it so `store.rs` stays readable).

use super::*;
use bitcoin::hashes::Hash;

const GRACE: Duration = Duration::from_secs(10);
const A: Constraints = Constraints {
    max_additional_size: 100,
    max_additional_sigops: 10,
};
const B: Constraints = Constraints {
    max_additional_size: 200,
    max_additional_sigops: 10,
};

fn tip(n: u8) -> BlockHash {
    BlockHash::from_byte_array([n; 32])
}

fn held(group: Constraints, prev: u8, made: Instant) -> Held<&'static str> {
    Held::new("t", group, tip(prev), made, vec![0; 32])
}

/// Inserts a template of `group` on tip `prev`, first making `prev` the node's tip
/// (at height `prev`) when it is not.
fn at(store: &mut TemplateStore<&'static str>, group: Constraints, prev: u8, made: Instant) -> u64 {
    if store.tip() != Some(tip(prev)) {
        store.set_tip(tip(prev), u32::from(prev), made);
    }
    store.insert(held(group, prev, made))
}

fn ids(store: &TemplateStore<&'static str>) -> Vec<u64> {
    store.templates.keys().copied().collect()
}

fn cache(store: &mut TemplateStore<&'static str>, id: u64, block: &Arc<Block>) {
    store.set_block(id, block.clone(), Arc::new(transactions(block)));
}

/// A block with a coinbase and one other transaction.
fn one_tx_block() -> Block {
    let genesis = bitcoin::constants::genesis_block(bitcoin::Network::Regtest);
    let tx = genesis.txdata[0].clone();
    Block {
        header: genesis.header,
        txdata: vec![tx.clone(), tx],
    }
}

#[test]
fn ids_count_up_from_one_and_are_never_reused() {
    let t0 = Instant::now();
    let mut store = TemplateStore::new(GRACE, 1);
    assert_eq!(store.next_id(), 1);
    assert_eq!(at(&mut store, A, 1, t0), 1);
    assert_eq!(at(&mut store, A, 1, t0), 2);
    store.clear();
    assert_eq!(at(&mut store, B, 1, t0), 3);
}

#[test]
fn the_node_decides_the_tip_even_a_lower_one() {
    let t0 = Instant::now();
    let mut store = TemplateStore::new(GRACE, 1);
    assert_eq!(store.tip(), None);
    assert_eq!(store.set_tip(tip(2), 11, t0), None);
    let higher = at(&mut store, A, 2, t0);
    assert_eq!(
        store.set_tip(tip(1), 10, t0),
        Some((tip(2), 11)),
        "lower: followed"
    );
    assert_eq!(store.tip(), Some(tip(1)));
    assert_eq!(
        store.transaction_data(higher).err(),
        Some(TxDataError::StaleTemplateId),
        "the invalidated tip's templates are stale"
    );
    store.prune(&[], t0 + Duration::from_secs(1));
    assert!(store.get(higher).is_some(), "but kept for the grace period");
    store.set_tip(tip(2), 11, t0 + Duration::from_secs(2));
    assert!(
        matches!(store.transaction_data(higher), Ok(TxLookup::Fetch { .. })),
        "back"
    );
}

#[test]
fn previous_tip_templates_live_through_the_grace_period_only() {
    let t0 = Instant::now();
    let mut store = TemplateStore::new(GRACE, 1);
    let old = at(&mut store, A, 1, t0);
    let new = at(&mut store, A, 2, t0 + Duration::from_secs(1));
    store.prune(&[new], t0 + Duration::from_secs(5));
    assert_eq!(ids(&store), vec![old, new], "within the grace period");
    store.prune(&[new], t0 + Duration::from_secs(11));
    assert_eq!(ids(&store), vec![new], "grace period over");
}

#[test]
fn tips_before_the_previous_one_go_at_once() {
    let t0 = Instant::now();
    let mut store = TemplateStore::new(GRACE, 1);
    at(&mut store, A, 1, t0);
    let previous = at(&mut store, A, 2, t0);
    let current = at(&mut store, A, 3, t0);
    store.prune(&[current], t0);
    assert_eq!(ids(&store), vec![previous, current]);
}

#[test]
fn the_current_tip_keeps_at_most_the_cap_per_group_once_old() {
    let t0 = Instant::now();
    let mut store = TemplateStore::new(GRACE, 1);
    let total = MAX_TEMPLATES_PER_GROUP + 4;
    let mut last = 0;
    for _ in 0..total {
        last = at(&mut store, A, 1, t0);
    }
    let other_group = at(&mut store, B, 1, t0);
    store.prune(&[last, other_group], t0 + Duration::from_secs(1));
    assert_eq!(store.len(), total + 1, "young templates are all kept");
    store.prune(&[last, other_group], t0 + GRACE);
    assert_eq!(store.len(), MAX_TEMPLATES_PER_GROUP + 1);
    let kept = ids(&store);
    assert!(kept.contains(&last) && kept.contains(&other_group));
    assert!(!kept.contains(&1), "the oldest of the group went first");
}

#[test]
fn a_groups_current_template_is_kept_whatever_its_tip() {
    let t0 = Instant::now();
    let mut store = TemplateStore::new(GRACE, 1);
    let stuck = at(&mut store, B, 1, t0);
    at(&mut store, A, 2, t0);
    at(&mut store, A, 3, t0);
    store.prune(&[stuck], t0 + GRACE * 2);
    assert!(ids(&store).contains(&stuck));
}

#[test]
fn every_template_keeps_its_block_and_equal_ones_share_it() {
    let t0 = Instant::now();
    let mut store = TemplateStore::new(GRACE, 1);
    let mut all = Vec::new();
    for group in [A, A, A, A, A, B] {
        let id = at(&mut store, group, 1, t0);
        cache(&mut store, id, &Arc::new(one_tx_block()));
        all.push(id);
    }
    let first = store.get(all[0]).and_then(|h| h.block.clone()).unwrap();
    for id in &all {
        let block = store.get(*id).and_then(|h| h.block.clone());
        assert!(block.is_some_and(|b| Arc::ptr_eq(&b, &first)), "{id}");
    }
    let lists: Vec<_> = all
        .iter()
        .map(|id| store.transactions(*id).unwrap())
        .collect();
    assert!(lists.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
}

#[test]
fn transaction_data_is_served_for_current_tip_templates_only() {
    let t0 = Instant::now();
    let mut store = TemplateStore::new(GRACE, 1);
    let old = at(&mut store, A, 1, t0);
    let new = at(&mut store, A, 2, t0);
    assert_eq!(
        store.transaction_data(99).err(),
        Some(TxDataError::TemplateIdNotFound)
    );
    assert_eq!(
        store.transaction_data(old).err(),
        Some(TxDataError::StaleTemplateId)
    );
    match store.transaction_data(new) {
        Ok(TxLookup::Fetch { excess_data, .. }) => assert_eq!(excess_data, vec![0; 32]),
        other => panic!("expected a fetch, got {other:?}"),
    }
    cache(&mut store, new, &Arc::new(one_tx_block()));
    let Ok(TxLookup::Ready(first)) = store.transaction_data(new) else {
        panic!("cached block not served");
    };
    assert_eq!(first.transactions.len(), 1, "the coinbase is left out");
    let Ok(TxLookup::Ready(second)) = store.transaction_data(new) else {
        panic!("cached block not served twice");
    };
    assert!(
        Arc::ptr_eq(&first.transactions, &second.transactions),
        "one shared list, not a copy per request"
    );
}

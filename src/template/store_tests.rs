//! Unit tests of the template store (kept beside it so `store.rs` stays readable).

use std::sync::Arc;

use super::*;
use bitcoin::hashes::Hash;

const GRACE: Duration = Duration::from_secs(10);
/// A budget the tests that are not about it never reach.
const ROOMY: TemplateBudget = TemplateBudget {
    templates: 1_000,
    bytes: usize::MAX,
};

/// The group of the templates [`at`] makes.
const A: Constraints = Constraints {
    max_additional_size: 100,
    max_additional_sigops: 10,
};

fn tip(n: u8) -> BlockHash {
    BlockHash::from_byte_array([n; 32])
}

fn store(budget: TemplateBudget) -> TemplateStore<&'static str> {
    TemplateStore::new(GRACE, 1, budget)
}

/// Inserts a template of group [`A`] on tip `prev` (see [`at_in`]).
fn at(store: &mut TemplateStore<&'static str>, prev: u8, now: Instant) -> u64 {
    at_in(store, A, prev, now)
}

/// Inserts a template of `group` on tip `prev`, first making `prev` the node's tip (at
/// height `prev`, at `now`) when it is not.
fn at_in(
    store: &mut TemplateStore<&'static str>,
    group: Constraints,
    prev: u8,
    now: Instant,
) -> u64 {
    if store.tip() != Some(tip(prev)) {
        store.set_tip(tip(prev), u32::from(prev), now);
    }
    store.insert(Held::new("t", group, tip(prev), vec![0; 32]))
}

/// `n` templates on tip `prev` (see [`at`]), oldest first.
fn several(store: &mut TemplateStore<&'static str>, n: usize, prev: u8, now: Instant) -> Vec<u64> {
    (0..n).map(|_| at(store, prev, now)).collect()
}

fn ids(store: &TemplateStore<&'static str>) -> Vec<u64> {
    store.templates.keys().copied().collect()
}

fn count(templates: usize) -> TemplateBudget {
    TemplateBudget {
        templates,
        bytes: usize::MAX,
    }
}

fn bytes(bytes: usize) -> TemplateBudget {
    TemplateBudget {
        templates: 1_000,
        bytes,
    }
}

/// `n` transactions of `size` bytes each, all made of `byte`.
fn txs(n: usize, size: usize, byte: u8) -> TemplateTxs {
    TemplateTxs::new(vec![vec![byte; size]; n])
}

#[test]
fn ids_count_up_from_one_and_are_never_reused() {
    let t0 = Instant::now();
    let mut store = store(ROOMY);
    assert_eq!(store.next_id(), 1);
    assert_eq!(at(&mut store, 1, t0), 1);
    assert_eq!(at(&mut store, 1, t0), 2);
    store.clear();
    assert_eq!(at(&mut store, 1, t0), 3);
}

#[test]
fn the_node_decides_the_tip_even_a_lower_one() {
    let t0 = Instant::now();
    let mut store = store(ROOMY);
    assert_eq!(store.tip(), None);
    assert_eq!(store.set_tip(tip(2), 11, t0), None);
    let higher = at(&mut store, 2, t0);
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
    let mut store = store(ROOMY);
    let old = at(&mut store, 1, t0);
    let new = at(&mut store, 2, t0 + Duration::from_secs(1));
    store.prune(&[new], t0 + Duration::from_secs(5));
    assert_eq!(ids(&store), vec![old, new], "within the grace period");
    store.prune(&[new], t0 + Duration::from_secs(11));
    assert_eq!(ids(&store), vec![new], "grace period over");
}

#[test]
fn tips_before_the_previous_one_go_at_once() {
    let t0 = Instant::now();
    let mut store = store(ROOMY);
    at(&mut store, 1, t0);
    let previous = at(&mut store, 2, t0);
    let current = at(&mut store, 3, t0);
    store.prune(&[current], t0);
    assert_eq!(ids(&store), vec![previous, current]);
}

#[test]
fn a_groups_current_template_is_kept_whatever_its_tip() {
    let t0 = Instant::now();
    let mut store = store(ROOMY);
    let stuck = at(&mut store, 1, t0);
    at(&mut store, 2, t0);
    at(&mut store, 3, t0);
    store.prune(&[stuck], t0 + GRACE * 2);
    assert!(ids(&store).contains(&stuck));
}

#[test]
fn equal_transactions_share_one_list() {
    let t0 = Instant::now();
    let mut store = store(ROOMY);
    let mut all = Vec::new();
    for _ in 0..6 {
        let id = at(&mut store, 1, t0);
        store.set_txs(id, txs(3, 100, 1));
        all.push(id);
    }
    let other = at(&mut store, 1, t0);
    store.set_txs(other, txs(3, 100, 2));
    let lists: Vec<_> = all
        .iter()
        .map(|id| store.transactions(*id).unwrap())
        .collect();
    assert!(lists.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
    assert!(!Arc::ptr_eq(&lists[0], &store.transactions(other).unwrap()));
    assert_eq!(store.bytes_held(), 600, "each distinct list counted once");
}

#[test]
fn transaction_data_is_served_for_current_tip_templates_only() {
    let t0 = Instant::now();
    let mut store = store(ROOMY);
    let old = at(&mut store, 1, t0);
    let new = at(&mut store, 2, t0);
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
    store.set_txs(new, txs(1, 60, 1));
    let Ok(TxLookup::Ready(first)) = store.transaction_data(new) else {
        panic!("cached transactions not served");
    };
    assert_eq!(first.transactions.len(), 1, "the coinbase is left out");
    let Ok(TxLookup::Ready(second)) = store.transaction_data(new) else {
        panic!("cached transactions not served twice");
    };
    assert!(
        Arc::ptr_eq(&first.transactions, &second.transactions),
        "one shared list, not a copy per request"
    );
}

#[test]
fn beyond_the_count_the_oldest_go_first_and_current_ones_stay() {
    let t0 = Instant::now();
    let mut store = store(count(4));
    let all = several(&mut store, 7, 1, t0);
    // The oldest one is a group's current template (a group that made nothing since).
    store.fit_budget(&[all[0], all[6]]);
    assert_eq!(ids(&store), vec![all[0], all[4], all[5], all[6]]);
    store.prune(&[all[0], all[6]], t0 + GRACE * 10);
    assert_eq!(
        store.len(),
        4,
        "templates of the tip stay while within the budget"
    );
}

#[test]
fn current_templates_are_kept_even_beyond_the_budget() {
    let t0 = Instant::now();
    let mut store = store(count(2));
    let spare = at(&mut store, 1, t0);
    let current = several(&mut store, 5, 1, t0);
    store.fit_budget(&current);
    assert_eq!(ids(&store), current, "all but the one not current");
    assert!(store.get(spare).is_none());
}

#[test]
fn other_tips_templates_go_before_older_ones_of_the_tip() {
    let t0 = Instant::now();
    let mut store = store(count(2));
    let first = at(&mut store, 1, t0);
    at(&mut store, 2, t0);
    // The node goes back to tip 1 (tip 2 was invalidated): tip 2 is the previous tip,
    // in its grace period, and its template is newer than tip 1's first one.
    let current = at(&mut store, 1, t0);
    store.prune(&[current], t0);
    assert_eq!(
        ids(&store),
        vec![first, current],
        "the previous tip's went first"
    );
}

#[test]
fn the_previous_tip_in_its_grace_period_yields_to_the_budget() {
    let t0 = Instant::now();
    let mut store = store(count(3));
    let old = several(&mut store, 3, 1, t0);
    let new = several(&mut store, 2, 2, t0);
    store.fit_budget(&[new[1]]);
    assert_eq!(ids(&store), vec![old[2], new[0], new[1]]);
}

#[test]
fn beyond_the_bytes_the_oldest_go_first() {
    let t0 = Instant::now();
    let mut store = store(bytes(1_000));
    let all: Vec<u64> = (0..3u8)
        .map(|n| {
            let id = at(&mut store, 1, t0);
            store.set_txs(id, txs(4, 100, n));
            id
        })
        .collect();
    assert_eq!(store.bytes_held(), 1_200);
    store.fit_budget(&[all[2]]);
    assert_eq!(ids(&store), vec![all[1], all[2]]);
    assert_eq!(store.bytes_held(), 800);
}

#[test]
fn a_shared_list_counts_once_against_the_bytes() {
    let t0 = Instant::now();
    let mut store = store(bytes(500));
    let shared: Vec<u64> = (0..5)
        .map(|_| {
            let id = at(&mut store, 1, t0);
            store.set_txs(id, txs(4, 100, 1));
            id
        })
        .collect();
    store.fit_budget(&[shared[4]]);
    assert_eq!(ids(&store), shared, "400 bytes once, not 2,000");
    assert_eq!(store.bytes_held(), 400);

    // Another list pushes it over: templates go, oldest first, until a list is freed.
    let other = at(&mut store, 1, t0);
    store.set_txs(other, txs(2, 100, 2));
    store.fit_budget(&[other]);
    assert_eq!(
        ids(&store),
        vec![other],
        "the shared list went with its last holder"
    );
    assert_eq!(store.bytes_held(), 200);
}

#[test]
fn templates_without_cached_transactions_cost_no_bytes() {
    let t0 = Instant::now();
    let mut store = store(bytes(100));
    let all = several(&mut store, 3, 1, t0);
    store.fit_budget(&[]);
    assert_eq!(ids(&store), all);
    assert_eq!(store.bytes_held(), 0);
}

#[test]
fn for_the_bytes_only_templates_that_free_some_go() {
    let t0 = Instant::now();
    let mut store = store(bytes(300));
    let other = at(&mut store, 1, t0);
    store.set_txs(other, txs(1, 100, 2));
    let empty = at(&mut store, 1, t0);
    store.set_txs(empty, txs(0, 0, 0));
    let same = at(&mut store, 1, t0);
    store.set_txs(same, txs(4, 100, 1));
    // The current template's list alone is over the budget.
    let current = at(&mut store, 1, t0);
    store.set_txs(current, txs(4, 100, 1));
    store.fit_budget(&[current]);
    assert_eq!(
        ids(&store),
        vec![empty, same, current],
        "an empty template and one sharing the current list cost nothing"
    );
    assert_eq!(store.bytes_held(), 400);
}

#[test]
fn each_groups_newest_on_the_tip_stays_while_the_groups_start_over() {
    let t0 = Instant::now();
    let mut store = store(count(2));
    let b = Constraints {
        max_additional_size: 200,
        ..A
    };
    at_in(&mut store, A, 1, t0);
    at_in(&mut store, b, 1, t0);
    let newest_a = at_in(&mut store, A, 1, t0);
    let newest_b = at_in(&mut store, b, 1, t0);
    // No group has a current template (they were stopped and not yet republished).
    store.fit_budget(&[]);
    assert_eq!(ids(&store), vec![newest_a, newest_b]);
}

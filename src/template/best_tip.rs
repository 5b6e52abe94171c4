//! Which tip the pools mine on when several nodes report theirs, and which node builds
//! its templates. No I/O: the engine feeds it what the nodes say.
//!
//! The rules: only healthy nodes (connected and answering) count. The highest tip among
//! them wins; at the same height the tip served already stands, and otherwise the one
//! reported first. The node that reported the winning tip first builds its templates;
//! when it goes away, another node on the same tip takes over (the first configured),
//! or else the best tip among the rest is served, lower if it must be. A serving node
//! that is still connected but misses its probes is not "away" for a lower tip: its tip
//! is held until it answers or its connection ends. With one node
//! this is simply "the node decides": whatever it reports is served, up, down or
//! sideways.

use std::time::Instant;

use bitcoin::BlockHash;

use crate::node::Tip;

/// A tip the node reported, and when the report arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NodeTip {
    /// The node's tip.
    pub tip: Tip,
    /// When the follower learnt it.
    pub seen: Instant,
}

impl NodeTip {
    /// The tip's block hash.
    pub fn hash(&self) -> BlockHash {
        self.tip.hash
    }
}

/// The tip served and the node that builds its templates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Served {
    /// The node (its index in the configured list).
    pub node: usize,
    /// Its report of the tip (`seen` is when that node reported it).
    pub tip: NodeTip,
}

/// What a change of what a node says did to the choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Choice {
    /// The same tip from the same node.
    Same,
    /// Another tip or another node (or, `None`, no node serves any more).
    Changed(Option<Served>),
}

/// What each node says, and what is served.
#[derive(Debug)]
pub(crate) struct BestTip {
    nodes: Vec<NodeView>,
    served: Option<Served>,
}

#[derive(Clone, Copy, Debug, Default)]
struct NodeView {
    healthy: bool,
    tip: Option<NodeTip>,
}

impl BestTip {
    /// `nodes` nodes, none heard from yet.
    pub fn new(nodes: usize) -> Self {
        Self {
            nodes: vec![NodeView::default(); nodes],
            served: None,
        }
    }

    /// What is served now.
    pub fn served(&self) -> Option<Served> {
        self.served
    }

    /// The tip node `node` reported last (while connected).
    pub fn tip_of(&self, node: usize) -> Option<NodeTip> {
        self.nodes[node].tip
    }

    /// Node `node` reported `tip`.
    pub fn report(&mut self, node: usize, tip: NodeTip) -> Choice {
        self.nodes[node].tip = Some(tip);
        self.choose()
    }

    /// Node `node` is healthy (connected and answering) or not any more.
    pub fn set_healthy(&mut self, node: usize, healthy: bool) -> Choice {
        self.nodes[node].healthy = healthy;
        self.choose()
    }

    /// Node `node`'s connection ended: its tip is forgotten.
    pub fn lost(&mut self, node: usize) -> Choice {
        self.nodes[node] = NodeView::default();
        self.choose()
    }

    /// Recomputes the choice. With no healthy node on any tip, the choice stays (nothing
    /// better is known) unless its node is gone.
    fn choose(&mut self) -> Choice {
        let next = match (self.best(), self.served) {
            // The serving node is still connected (it only misses probes, e.g. busy
            // connecting a block) on a tip no answering node matches: hold it rather than
            // pull the pools back. A node that is gone forgets its tip, so this ends then.
            (next, Some(served)) if !self.nodes[served.node].healthy => {
                match self.nodes[served.node].tip {
                    Some(own) if next.is_none_or(|n| !outranks_or_is(&n.tip.tip, &own.tip)) => {
                        Some(Served {
                            node: served.node,
                            tip: own,
                        })
                    }
                    _ => next,
                }
            }
            (next, _) => next,
        };
        if next == self.served {
            return Choice::Same;
        }
        self.served = next;
        Choice::Changed(next)
    }

    fn best(&self) -> Option<Served> {
        let candidates = || {
            self.nodes
                .iter()
                .enumerate()
                .filter(|(_, v)| v.healthy)
                .filter_map(|(i, v)| v.tip.map(|tip| (i, tip)))
        };
        let height = candidates().map(|(_, t)| t.tip.height).max()?;
        let at_top = || candidates().filter(move |(_, t)| t.tip.height == height);
        // The tip served stands at the top height while a healthy node still has it.
        let hash: BlockHash = match self.served {
            Some(s) if at_top().any(|(_, t)| t.hash() == s.tip.hash()) => s.tip.hash(),
            _ => at_top().min_by_key(|(i, t)| (t.seen, *i))?.1.hash(),
        };
        // Its builder: the serving node while it has the tip, else the first configured
        // among those that do.
        let node = match self.served {
            Some(s) if at_top().any(|(i, t)| i == s.node && t.hash() == hash) => s.node,
            Some(s) if s.tip.hash() == hash => at_top().find(|(_, t)| t.hash() == hash)?.0,
            _ => {
                at_top()
                    .filter(|(_, t)| t.hash() == hash)
                    .min_by_key(|(i, t)| (t.seen, *i))?
                    .0
            }
        };
        let tip = self.nodes[node].tip?;
        Some(Served { node, tip })
    }
}

/// Whether `candidate` is worth leaving a held tip for: higher, or the very same block.
fn outranks_or_is(candidate: &crate::node::Tip, held: &crate::node::Tip) -> bool {
    candidate.height > held.height || candidate.hash == held.hash
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use bitcoin::hashes::Hash;

    use super::*;

    fn tip(n: u8, height: u32, seen: Instant) -> NodeTip {
        NodeTip {
            tip: Tip {
                hash: BlockHash::from_byte_array([n; 32]),
                height,
            },
            seen,
        }
    }

    fn served(c: Choice) -> Option<(usize, u8)> {
        match c {
            Choice::Changed(s) => s.map(|s| (s.node, s.tip.hash().to_byte_array()[0])),
            Choice::Same => panic!("expected a change"),
        }
    }

    fn healthy(nodes: usize) -> BestTip {
        let mut best = BestTip::new(nodes);
        for i in 0..nodes {
            assert_eq!(best.set_healthy(i, true), Choice::Same);
        }
        best
    }

    #[test]
    fn one_node_decides_up_down_and_sideways() {
        let t0 = Instant::now();
        let mut best = healthy(1);
        assert_eq!(served(best.report(0, tip(1, 10, t0))), Some((0, 1)));
        assert_eq!(served(best.report(0, tip(2, 9, t0))), Some((0, 2)));
        assert_eq!(served(best.report(0, tip(3, 9, t0))), Some((0, 3)));
    }

    #[test]
    fn the_first_to_report_a_higher_tip_serves_it_and_the_second_changes_nothing() {
        let t0 = Instant::now();
        let mut best = healthy(2);
        assert_eq!(served(best.report(0, tip(1, 10, t0))), Some((0, 1)));
        assert_eq!(
            best.report(1, tip(1, 10, t0 + Duration::from_millis(5))),
            Choice::Same
        );
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(served(best.report(1, tip(2, 11, t1))), Some((1, 2)));
        assert_eq!(
            best.report(0, tip(2, 11, t1 + Duration::from_millis(100))),
            Choice::Same
        );
    }

    #[test]
    fn a_lower_or_sibling_tip_from_one_node_does_not_pull_the_pools_back() {
        let t0 = Instant::now();
        let mut best = healthy(2);
        served(best.report(0, tip(1, 10, t0)));
        assert_eq!(best.report(1, tip(1, 10, t0)), Choice::Same);
        // Node 1 invalidates the tip, or restarts lower.
        assert_eq!(best.report(1, tip(9, 9, t0)), Choice::Same);
        // A sibling at the same height, seen later.
        assert_eq!(
            best.report(1, tip(7, 10, t0 + Duration::from_secs(1))),
            Choice::Same
        );
    }

    #[test]
    fn at_the_same_height_the_first_seen_wins() {
        let t0 = Instant::now();
        let mut best = BestTip::new(2);
        best.set_healthy(0, true);
        best.set_healthy(1, true);
        // Both report siblings at once (e.g. at start): the earlier report wins.
        best.nodes[0].tip = Some(tip(5, 10, t0 + Duration::from_millis(3)));
        best.nodes[1].tip = Some(tip(6, 10, t0));
        assert_eq!(served(best.choose()), Some((1, 6)));
    }

    #[test]
    fn losing_the_serving_node_serves_the_best_of_the_rest_even_lower() {
        let t0 = Instant::now();
        let mut best = healthy(3);
        served(best.report(0, tip(1, 12, t0)));
        best.report(1, tip(2, 10, t0));
        best.report(2, tip(3, 11, t0));
        assert_eq!(served(best.lost(0)), Some((2, 3)));
        // Node 2 misses its probes: its higher tip is held, not traded for node 1's
        // lower one, nor for a sibling.
        assert_eq!(best.set_healthy(2, false), Choice::Same);
        assert_eq!(best.report(1, tip(4, 11, t0)), Choice::Same);
        assert_eq!(served(best.lost(2)), Some((1, 4)));
        // The last one goes: nothing is served.
        assert_eq!(served(best.lost(1)), None);
        // It comes back on a tip.
        best.set_healthy(1, true);
        assert_eq!(served(best.report(1, tip(2, 10, t0))), Some((1, 2)));
    }

    #[test]
    fn another_node_on_the_same_tip_takes_over_the_first_configured_first() {
        let t0 = Instant::now();
        let mut best = healthy(3);
        served(best.report(2, tip(1, 10, t0)));
        best.report(1, tip(1, 10, t0 + Duration::from_millis(2)));
        best.report(0, tip(1, 10, t0 + Duration::from_millis(9)));
        assert_eq!(served(best.lost(2)), Some((0, 1)));
    }

    #[test]
    fn a_slow_serving_node_that_reports_a_new_tip_keeps_serving() {
        let t0 = Instant::now();
        let mut best = healthy(2);
        served(best.report(0, tip(1, 10, t0)));
        best.report(1, tip(1, 10, t0));
        best.report(1, tip(9, 9, t0));
        best.set_healthy(0, false);
        // Its stall ends with the block it was connecting: served, not node 1's lower tip.
        assert_eq!(served(best.report(0, tip(2, 11, t0))), Some((0, 2)));
    }

    #[test]
    fn an_unresponsive_only_node_keeps_its_tip_served() {
        let t0 = Instant::now();
        let mut best = healthy(1);
        served(best.report(0, tip(1, 10, t0)));
        assert_eq!(best.set_healthy(0, false), Choice::Same);
        assert_eq!(best.set_healthy(0, true), Choice::Same);
    }
}

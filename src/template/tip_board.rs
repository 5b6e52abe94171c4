//! The served tip, shared by the tip followers and the engine. A follower that hears a
//! new tip that the serving node builds hands it to the group tasks itself, right after
//! telling the engine, instead of waiting for the engine to pass it on: one task wake-up
//! less in front of every `SetNewPrevHash`. Everything else — another node serving, a
//! node lost or not answering — goes through the engine, which reads the choice here.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::best_tip::{BestTip, NodeTip, Served};

/// The tip choice ([`BestTip`]), which followers may report to, and where the group
/// tasks of the serving node take their tips from.
#[derive(Debug)]
pub(crate) struct TipBoard(Mutex<Board>);

#[derive(Debug)]
struct Board {
    best: BestTip,
    /// Each node's live follower (its serial), so a stopped one's late report is ignored.
    followers: Vec<Option<u64>>,
    /// The serving node and its groups' tips.
    groups: Option<(usize, watch::Sender<Option<NodeTip>>)>,
}

impl Board {
    /// Gives the groups `served`'s tip when they are the serving node's.
    fn hand_over(&self, served: Served) {
        if let Some((node, tips)) = &self.groups {
            if served.node == *node {
                send_tip(tips, served.tip);
            }
        }
    }
}

impl TipBoard {
    /// `nodes` nodes, none heard from yet.
    pub fn new(nodes: usize) -> Arc<Self> {
        Arc::new(Self(Mutex::new(Board {
            best: BestTip::new(nodes),
            followers: vec![None; nodes],
            groups: None,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Board> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follower `serial` now follows `node` (`None`: none does).
    pub fn set_follower(&self, node: usize, serial: Option<u64>) {
        self.lock().followers[node] = serial;
    }

    /// Follower `serial` of `node` heard `tip`; false when it is not the live follower.
    pub fn report(&self, node: usize, serial: u64, tip: NodeTip) -> bool {
        let mut board = self.lock();
        if board.followers[node] != Some(serial) {
            return false;
        }
        board.best.report(node, tip);
        true
    }

    /// Hands the served tip to the groups when the node that serves it is theirs (the
    /// engine does the rest).
    pub fn wake_groups(&self) {
        let board = self.lock();
        if let Some(served) = board.best.served() {
            board.hand_over(served);
        }
    }

    /// Hands `served` to the groups if it is still the choice (the engine, after it
    /// recorded that tip; a follower may have moved the board on meanwhile, and then
    /// its own hand-over follows its report to the engine).
    pub fn wake_groups_with(&self, served: Served) {
        let board = self.lock();
        if board.best.served() == Some(served) {
            board.hand_over(served);
        }
    }

    /// `node` is healthy (connected and answering) or not any more.
    pub fn set_healthy(&self, node: usize, healthy: bool) {
        self.lock().best.set_healthy(node, healthy);
    }

    /// `node`'s connection ended.
    pub fn lost(&self, node: usize) {
        let mut board = self.lock();
        board.best.lost(node);
        board.followers[node] = None;
    }

    /// What is served now.
    pub fn served(&self) -> Option<Served> {
        self.lock().best.served()
    }

    /// Whether each node's tip is `hash`'s, in the configured order.
    pub fn on_tip(&self, hash: bitcoin::BlockHash) -> Vec<bool> {
        let board = self.lock();
        (0..board.followers.len())
            .map(|i| board.best.tip_of(i).is_some_and(|t| t.hash() == hash))
            .collect()
    }

    /// The groups of `node` take their tips from `tips` now (`None`: no groups run).
    pub fn serve_to(&self, groups: Option<(usize, watch::Sender<Option<NodeTip>>)>) {
        self.lock().groups = groups;
    }
}

/// Gives `tips` the tip `tip`, unless it has that block already (a new report of the
/// same tip, e.g. from a restarted follower, must not interrupt the groups' builds).
fn send_tip(tips: &watch::Sender<Option<NodeTip>>, tip: NodeTip) {
    tips.send_if_modified(|now| match now.map(|t| t.hash()) == Some(tip.hash()) {
        true => false,
        false => {
            *now = Some(tip);
            true
        }
    });
}

//! What the group tasks share on each tip: one template without mempool transactions for
//! all of them, and the order of their full builds.
//!
//! A template without mempool selection holds the coinbase and nothing else, so the
//! groups' reserved weight and sigops do not change it: the first group task to reach a
//! new tip builds it and every other group publishes the same node template (under an id
//! of its own). Full builds (a tip's full template, fee checks) take one place, one at a
//! time (the node builds them one after another under `cs_main` anyway), and none starts
//! before every active group's pair for the tip is out: the engine says when it has
//! published a group's pair ([`TipRounds::settle`]). The group with the most clients
//! gets the place first.
//!
//! Nothing here can hold a group back for good: a group that fails and pauses, or is busy
//! with a first template of its own, is not waited for ([`Member::away`]); one that is
//! stopped leaves ([`Membership`]'s drop); a waiter that gives up (a new tip, a cancel)
//! leaves the queue as its future drops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bitcoin::BlockHash;
use tokio::sync::{watch, OnceCell};

use super::tip::NodeTip;
use crate::node::Template;

/// The state every group task of the daemon shares.
#[derive(Debug)]
pub(crate) struct TipRounds {
    state: Mutex<State>,
    /// Bumped on every change a waiter may care about.
    changed: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct State {
    /// The newest tip's shared template without mempool transactions.
    empty: Option<(NodeTip, Arc<OnceCell<Template>>)>,
    /// Every running group task, by serial.
    members: HashMap<u64, Member>,
    /// Whether a full build holds the place.
    busy: bool,
    /// Tasks waiting for the full-build place, by serial, with the tip they build on.
    waiting: HashMap<u64, BlockHash>,
}

/// One group task as the round sees it.
#[derive(Debug, Default)]
struct Member {
    /// The group's clients (the engine keeps this).
    clients: usize,
    /// Whether the group builds at all (the standing group rests while others serve).
    active: bool,
    /// Not waited for: paused after a failure, or building a template of its own that
    /// is no tip's pair (a first template, which may wait for a client-call place).
    away: bool,
    /// The newest tip whose pair it has out, or for which it sends none.
    settled: Option<BlockHash>,
}

impl TipRounds {
    /// No members yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            changed: watch::channel(0).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `change` on the state and wakes the waiters.
    fn update(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.lock());
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Makes task `serial` a member (active or resting) until its [`Membership`] drops or
    /// [`TipRounds::leave`].
    pub fn join(self: &Arc<Self>, serial: u64, active: bool) -> Membership {
        self.update(|s| {
            s.members.insert(
                serial,
                Member {
                    active,
                    ..Member::default()
                },
            );
        });
        Membership {
            rounds: self.clone(),
            serial,
        }
    }

    /// Task `serial` is stopped: nobody waits for it any more.
    pub fn leave(&self, serial: u64) {
        self.update(|s| {
            s.members.remove(&serial);
            s.waiting.remove(&serial);
        });
    }

    /// Whether task `serial` builds templates.
    pub fn set_active(&self, serial: u64, active: bool) {
        self.update(|s| {
            if let Some(m) = s.members.get_mut(&serial) {
                m.active = active;
            }
        });
    }

    /// The number of clients of task `serial`'s group.
    pub fn set_clients(&self, serial: u64, clients: usize) {
        let mut state = self.lock();
        if let Some(m) = state.members.get_mut(&serial) {
            m.clients = clients;
        }
    }

    /// The pair of task `serial` for `tip` is out (or none is coming): full builds wait
    /// for it no more. Once every pair is out the shared empty template is let go, so
    /// the node keeps it only while a held template needs it (a group that reaches the
    /// tip later builds its own).
    pub fn settle(&self, serial: u64, tip: BlockHash) {
        self.update(|s| {
            if let Some(m) = s.members.get_mut(&serial) {
                m.settled = Some(tip);
            }
            if s.empty
                .as_ref()
                .is_some_and(|(of, _)| s.pairs_out(of.hash()))
            {
                s.empty = None;
            }
        });
    }

    /// The cell of `tip`'s shared template without mempool transactions: the first
    /// caller on a new tip gets an empty cell and builds into it, the others wait for
    /// that. Only the newest tip's is kept, until every pair is out.
    pub fn empty_for(&self, tip: NodeTip) -> Arc<OnceCell<Template>> {
        let mut state = self.lock();
        match &state.empty {
            Some((of, cell)) if *of == tip => cell.clone(),
            _ => {
                let cell = Arc::new(OnceCell::new());
                state.empty = Some((tip, cell.clone()));
                cell
            }
        }
    }

    /// How far task `serial`'s fee checks are set off within `interval`, so the groups'
    /// checks spread over it instead of landing together: its rank among the members
    /// (oldest first) times `interval / members`.
    pub fn fee_offset(&self, serial: u64, interval: Duration) -> Duration {
        let state = self.lock();
        let count = state.members.len().max(1);
        let rank = state.members.keys().filter(|&&s| s < serial).count();
        interval.mul_f64(rank as f64 / count as f64)
    }
}

impl State {
    /// Whether every member that builds has its pair for `tip` out.
    fn pairs_out(&self, tip: BlockHash) -> bool {
        self.members
            .values()
            .all(|m| !m.active || m.away || m.settled == Some(tip))
    }

    /// Whether `serial`, waiting to build on `tip`, may take the place now.
    fn may_build(&self, serial: u64, tip: BlockHash) -> bool {
        if self.busy || !self.pairs_out(tip) {
            return false;
        }
        let clients = |s: &u64| self.members.get(s).map_or(0, |m| m.clients);
        // The most clients first; among equals, the oldest group.
        let first = self
            .waiting
            .iter()
            .filter(|(_, t)| **t == tip)
            .map(|(s, _)| s)
            .max_by(|a, b| clients(a).cmp(&clients(b)).then(b.cmp(a)));
        first == Some(&serial)
    }
}

/// A task's part in the rounds; dropping it leaves them.
#[derive(Debug)]
pub(crate) struct Membership {
    rounds: Arc<TipRounds>,
    serial: u64,
}

impl Membership {
    /// See [`TipRounds::empty_for`].
    pub fn empty_for(&self, tip: NodeTip) -> Arc<OnceCell<Template>> {
        self.rounds.empty_for(tip)
    }

    /// See [`TipRounds::settle`].
    pub fn settle(&self, tip: BlockHash) {
        self.rounds.settle(self.serial, tip);
    }

    /// Not waited for until the guard drops.
    pub fn away(&self) -> Away<'_> {
        self.set_away(true);
        Away(self)
    }

    fn set_away(&self, away: bool) {
        self.rounds.update(|s| {
            if let Some(m) = s.members.get_mut(&self.serial) {
                m.away = away;
            }
        });
    }

    /// See [`TipRounds::fee_offset`].
    pub fn fee_offset(&self, interval: Duration) -> Duration {
        self.rounds.fee_offset(self.serial, interval)
    }

    /// Joins the queue for the full-build place, to build on `tip`. Queue before the
    /// pair is reported, so the place goes to the right group the moment the last pair
    /// is out.
    pub fn queue_full(&self, tip: BlockHash) -> Queued<'_> {
        self.rounds.update(|s| {
            s.waiting.insert(self.serial, tip);
        });
        Queued { member: self, tip }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.rounds.leave(self.serial);
    }
}

/// A member away from the rounds ([`Membership::away`]).
pub(crate) struct Away<'a>(&'a Membership);

impl Drop for Away<'_> {
    fn drop(&mut self) {
        self.0.set_away(false);
    }
}

/// A place in the queue for full builds; dropping it leaves the queue.
pub(crate) struct Queued<'a> {
    member: &'a Membership,
    tip: BlockHash,
}

impl<'a> Queued<'a> {
    /// Waits until every active group's pair for the tip is out, no full build runs and
    /// no group with more clients waits; then holds the place until the [`FullPlace`]
    /// drops.
    pub async fn place(self) -> FullPlace<'a> {
        let rounds = &self.member.rounds;
        let mut changes = rounds.changed.subscribe();
        loop {
            {
                let mut state = rounds.lock();
                if state.may_build(self.member.serial, self.tip) {
                    state.busy = true;
                    state.waiting.remove(&self.member.serial);
                    drop(state);
                    return FullPlace(self.member);
                }
            }
            if changes.changed().await.is_err() {
                // Unreachable while `rounds` lives (it owns the sender); wait for the
                // caller's other branches.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let serial = self.member.serial;
        self.member.rounds.update(|s| {
            s.waiting.remove(&serial);
        });
    }
}

/// The one full build running now; dropping it lets the next one start.
pub(crate) struct FullPlace<'a>(&'a Membership);

impl Drop for FullPlace<'_> {
    fn drop(&mut self) {
        self.0.rounds.update(|s| s.busy = false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::hashes::Hash;
    use futures::FutureExt;

    fn now_or_never<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        f.now_or_never()
    }

    fn hash(n: u8) -> BlockHash {
        BlockHash::from_byte_array([n; 32])
    }

    #[tokio::test]
    async fn fulls_wait_for_every_pair_then_go_most_clients_first_one_at_a_time() {
        let rounds = TipRounds::new();
        let (a, b, resting) = (
            rounds.join(1, true),
            rounds.join(2, true),
            rounds.join(3, false),
        );
        rounds.set_clients(1, 1);
        rounds.set_clients(2, 10);
        let tip = hash(1);
        let qa = a.queue_full(tip);
        let qb = b.queue_full(tip);
        let (mut pa, mut pb) = (Box::pin(qa.place()), Box::pin(qb.place()));
        a.settle(tip);
        assert!(now_or_never(pa.as_mut()).is_none(), "b's pair is not out");
        b.settle(tip);
        assert!(now_or_never(pa.as_mut()).is_none(), "b has more clients");
        let place_b = now_or_never(pb.as_mut()).expect("b first");
        assert!(now_or_never(pa.as_mut()).is_none(), "one at a time");
        drop(place_b);
        assert!(now_or_never(pa.as_mut()).is_some(), "then a");
        drop(resting);
    }

    #[tokio::test]
    async fn a_member_away_or_gone_holds_nobody_back() {
        let rounds = TipRounds::new();
        let (a, b, c) = (
            rounds.join(1, true),
            rounds.join(2, true),
            rounds.join(3, true),
        );
        let tip = hash(2);
        let q = a.queue_full(tip);
        let mut place = Box::pin(q.place());
        a.settle(tip);
        let away = b.away();
        assert!(now_or_never(place.as_mut()).is_none(), "c is waited for");
        drop(c);
        assert!(now_or_never(place.as_mut()).is_some(), "b is away, c gone");
        drop(away);
    }

    #[test]
    fn fee_checks_spread_over_the_interval() {
        let rounds = TipRounds::new();
        let members: Vec<_> = (1..=4).map(|s| rounds.join(s, true)).collect();
        let offsets: Vec<_> = members
            .iter()
            .map(|m| m.fee_offset(Duration::from_secs(30)))
            .collect();
        let secs: Vec<u64> = offsets.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [0, 7, 15, 22]);
    }
}

//! Subscribed sessions and the constraint groups they fall into: which group a client
//! joins, and queueing each group's templates to its sessions.

use std::sync::Arc;

use stratum_core::template_distribution_sv2::{NewTemplateOwned, SetNewPrevHashOwned};
use tokio::sync::mpsc;
use tracing::warn;

use super::api::{Constraints, TemplateEvent};

/// Constraints of the group the engine keeps running even with no client, so a template
/// (and `/health`) is ready before the first pool connects.
pub(crate) const STANDING_GROUP: Constraints = Constraints {
    max_additional_size: 0,
    max_additional_sigops: 0,
};

/// Distinct constraint sets served with their own group (each is a build task and
/// templates held in the node); more clients share a larger group.
pub(crate) const MAX_GROUPS: usize = 32;

/// One subscribed session.
#[derive(Debug)]
pub(crate) struct Subscriber {
    /// The group it receives templates of.
    pub constraints: Constraints,
    /// Its session's event queue.
    pub events: mpsc::Sender<TemplateEvent>,
}

/// Every subscribed session.
#[derive(Debug, Default)]
pub(crate) struct Fanout {
    subscribers: Vec<Subscriber>,
}

impl Fanout {
    /// Forgets sessions that closed their queue.
    pub fn forget_gone(&mut self) {
        self.subscribers.retain(|s| !s.events.is_closed());
    }

    /// The group a client asking for `requested` joins, given the groups clients use now
    /// (see [`choose_group`]); `None`, and a warning, when it cannot be served.
    pub fn group_for(&self, requested: Constraints) -> Option<Constraints> {
        let group = choose_group(&self.groups(), requested, MAX_GROUPS);
        if group.is_none() {
            warn!(
                size = requested.max_additional_size,
                sigops = requested.max_additional_sigops,
                "too many distinct coinbase constraints ({MAX_GROUPS}) and none larger to \
                 share; refusing this client"
            );
        }
        group
    }

    /// Adds a subscriber; when its group already has a template (`current`), that goes
    /// out first, as a future template with its `SetNewPrevHash`.
    pub fn add(&mut self, sub: Subscriber, current: Option<CurrentPair<'_>>) {
        if let Some(pair) = current {
            send_pair(&sub, pair);
        }
        self.subscribers.push(sub);
    }

    /// The group of the session whose queue is `events`, if it is subscribed.
    pub fn group_of(&self, events: &mpsc::Sender<TemplateEvent>) -> Option<Constraints> {
        self.subscribers
            .iter()
            .find(|s| s.events.same_channel(events))
            .map(|s| s.constraints)
    }

    /// Queues `current` (its group's current template) again to the session whose queue is
    /// `events`, as on joining; a session too slow to take it is dropped, as in
    /// [`Fanout::publish`]. Returns whether it was queued.
    pub fn resend(
        &mut self,
        events: &mpsc::Sender<TemplateEvent>,
        current: CurrentPair<'_>,
    ) -> bool {
        let Some(i) = self
            .subscribers
            .iter()
            .position(|s| s.events.same_channel(events))
        else {
            return false;
        };
        let queued = send_pair(&self.subscribers[i], current);
        if !queued {
            self.subscribers.remove(i);
        }
        queued
    }

    /// Queues a group's new template (for a new tip, with its `SetNewPrevHash`) to every
    /// session of that group. A session that is gone, or too slow to take the update, is
    /// dropped: a client that silently missed templates would mine on a stale tip.
    pub fn publish(&mut self, group: Constraints, event: TemplateEvent) {
        self.subscribers
            .retain(|sub| sub.constraints != group || send(sub, event.clone()));
    }

    /// Whether any session uses the group for `constraints`.
    pub fn wanted(&self, constraints: Constraints) -> bool {
        self.subscribers
            .iter()
            .any(|s| s.constraints == constraints)
    }

    /// How many sessions each group has.
    pub fn client_counts(&self) -> std::collections::HashMap<Constraints, usize> {
        let mut counts = std::collections::HashMap::new();
        for sub in &self.subscribers {
            *counts.entry(sub.constraints).or_default() += 1;
        }
        counts
    }

    /// The distinct groups sessions use, sorted.
    pub fn groups(&self) -> Vec<Constraints> {
        let mut groups: Vec<Constraints> = self.subscribers.iter().map(|s| s.constraints).collect();
        groups.sort_unstable();
        groups.dedup();
        groups
    }

    /// Forgets every subscriber (shutdown).
    pub fn clear(&mut self) {
        self.subscribers.clear();
    }
}

/// The group a client asking for `requested` joins, when `in_use` are the groups clients
/// use now: its own; or, once `max_groups` distinct ones run, the smallest that reserves
/// at least as much (a little less block space for that client, instead of another
/// template loop in the node). `None` when no such group exists.
pub(crate) fn choose_group(
    in_use: &[Constraints],
    requested: Constraints,
    max_groups: usize,
) -> Option<Constraints> {
    if requested == STANDING_GROUP || in_use.contains(&requested) || in_use.len() < max_groups {
        return Some(requested);
    }
    in_use
        .iter()
        .copied()
        .chain([STANDING_GROUP])
        .filter(|c| {
            c.max_additional_size >= requested.max_additional_size
                && c.max_additional_sigops >= requested.max_additional_sigops
        })
        .min_by_key(|c| (c.max_additional_size, c.max_additional_sigops))
}

/// A group's current template and its `SetNewPrevHash`, as the engine holds them.
pub(crate) type CurrentPair<'a> = (&'a NewTemplateOwned, &'a Arc<SetNewPrevHashOwned>);

/// Queues `(template, prev_hash)` as `NewTemplate(future)` + `SetNewPrevHash`: what a
/// client needs to start mining on the group's current template.
fn send_pair(sub: &Subscriber, (new_template, prev_hash): CurrentPair<'_>) -> bool {
    let mut future = new_template.clone();
    future.future_template = true;
    send(sub, TemplateEvent::NewTemplate(Arc::new(future)))
        && send(sub, TemplateEvent::SetNewPrevHash(prev_hash.clone()))
}

fn send(sub: &Subscriber, event: TemplateEvent) -> bool {
    match sub.events.try_send(event) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            warn!("a client is too slow to take templates; dropping it");
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(size: u32, sigops: u16) -> Constraints {
        Constraints {
            max_additional_size: size,
            max_additional_sigops: sigops,
        }
    }

    #[test]
    fn choosing_a_group() {
        let full = [c(100, 5), c(200, 5), c(300, 50)];
        let cases = [
            // (groups in use, requested, cap, joins, case)
            (
                &[][..],
                c(10, 1),
                3,
                Some(c(10, 1)),
                "room left: its own group",
            ),
            (
                &full[..],
                c(200, 5),
                3,
                Some(c(200, 5)),
                "its group runs already",
            ),
            (
                &full[..],
                STANDING_GROUP,
                3,
                Some(STANDING_GROUP),
                "the standing group",
            ),
            (
                &full[..],
                c(150, 5),
                3,
                Some(c(200, 5)),
                "cap hit: smallest larger",
            ),
            (
                &full[..],
                c(150, 6),
                3,
                Some(c(300, 50)),
                "sigops count too",
            ),
            (&full[..], c(400, 1), 3, None, "cap hit and nothing larger"),
            (
                &full[..],
                c(150, 5),
                4,
                Some(c(150, 5)),
                "under a larger cap",
            ),
        ];
        for (in_use, requested, cap, joins, case) in cases {
            assert_eq!(choose_group(in_use, requested, cap), joins, "{case}");
        }
    }

    #[test]
    fn the_group_cap_counts_distinct_constraint_sets() {
        let mut fanout = Fanout::default();
        let mut receivers = Vec::new();
        for i in 0..MAX_GROUPS {
            for _ in 0..2 {
                let (events, rx) = mpsc::channel(4);
                receivers.push(rx);
                fanout.add(
                    Subscriber {
                        constraints: c(1000 + i as u32, 10),
                        events,
                    },
                    None,
                );
            }
        }
        assert_eq!(fanout.groups().len(), MAX_GROUPS);
        assert_eq!(fanout.group_for(c(1000, 10)), Some(c(1000, 10)));
        assert_eq!(fanout.group_for(c(5, 5)), Some(c(1000, 10)));
        receivers.clear();
        fanout.forget_gone();
        assert!(fanout.groups().is_empty(), "closed queues are forgotten");
    }

    fn template(id: u64) -> NewTemplateOwned {
        use stratum_core::binary_sv2::{B0255Owned, B064KOwned, Seq0255Owned};
        NewTemplateOwned {
            template_id: id,
            future_template: false,
            version: 0x2000_0000,
            coinbase_tx_version: 2,
            coinbase_prefix: B0255Owned::new(vec![1]).expect("prefix"),
            coinbase_tx_input_sequence: 0,
            coinbase_tx_value_remaining: 0,
            coinbase_tx_outputs_count: 0,
            coinbase_tx_outputs: B064KOwned::new(vec![]).expect("outputs"),
            coinbase_tx_locktime: 0,
            merkle_path: Seq0255Owned::new(vec![]).expect("path"),
        }
    }

    #[test]
    fn a_group_update_reaches_its_sessions_only_and_drops_a_full_queue() {
        let mut fanout = Fanout::default();
        let (fast_tx, mut fast) = mpsc::channel(8);
        let (other_tx, mut other) = mpsc::channel(8);
        let (slow_tx, _slow) = mpsc::channel(1);
        // A session that has not taken its last update yet.
        slow_tx
            .try_send(TemplateEvent::NewTemplate(Arc::new(template(6))))
            .expect("room for one");
        for (constraints, events) in [(c(1, 1), fast_tx), (c(2, 2), other_tx), (c(1, 1), slow_tx)] {
            fanout.add(
                Subscriber {
                    constraints,
                    events,
                },
                None,
            );
        }
        let nt = Arc::new(template(7));
        let prev = Arc::new(SetNewPrevHashOwned {
            template_id: 7,
            prev_hash: stratum_core::binary_sv2::U256Owned::new(vec![0; 32]).expect("hash"),
            header_timestamp: 0,
            n_bits: 0,
            target: stratum_core::binary_sv2::U256Owned::new(vec![0; 32]).expect("target"),
        });
        fanout.publish(c(1, 1), TemplateEvent::NewTemplate(nt));
        fanout.publish(c(1, 1), TemplateEvent::SetNewPrevHash(prev));
        assert!(matches!(fast.try_recv(), Ok(TemplateEvent::NewTemplate(t)) if t.template_id == 7));
        assert!(
            matches!(fast.try_recv(), Ok(TemplateEvent::SetNewPrevHash(p)) if p.template_id == 7)
        );
        assert!(
            other.try_recv().is_err(),
            "another group's session got nothing"
        );
        assert!(fanout.wanted(c(1, 1)));
        assert_eq!(
            fanout.subscribers.len(),
            2,
            "the session whose queue was full is dropped"
        );
    }
}

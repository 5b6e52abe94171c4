//! Which connections the server takes on, so that no client can cost a pool its place.
//!
//! A connection is *in setup* from TCP accept until its setup is done (Noise,
//! `SetupConnection` and its first `CoinbaseOutputConstraints`), then *established*.
//! - Established connections are limited by `max_clients`; connections in setup do not
//!   take those slots.
//! - A connection in setup first *waits*: from accept until its whole Noise act 1 (the
//!   initiator's 64-byte ElligatorSwift key) has arrived (it is *silent* until then; an
//!   honest client sends it at once) and then until one of `max_pending_handshakes` setup
//!   places is free, in arrival order ([`Ticket::take_place`]); one address group holds
//!   at most half of the places ([`places_per_group`]), so the other half stays open to
//!   other addresses while one stalls its handshakes. Only a connection with a
//!   place costs handshake work, and `handshake_timeout` counts from when it got one; a
//!   connection silent for `handshake_timeout` is closed.
//! - At most [`WAITING_PER_PLACE`] × `max_pending_handshakes` connections wait at once;
//!   a burst of honest clients that fits (every pool reconnecting after a restart) loses
//!   nothing. The listener never stops accepting. When the waiting list is full, a
//!   newcomer whose address has fewer waiting connections than the address with the most
//!   of them evicts one of that address's: its oldest silent one, or if none is silent its
//!   longest-waiting one ([`Admission::admit`]). A newcomer from that address itself (or
//!   one tied with it) evicts its own address's oldest silent connection, and is closed
//!   if none of them is silent. So one address holding many sockets, silent or stalled
//!   in the handshake, cannot keep another address out, and a pool that shares the
//!   flooding address still gets in while that address holds silent sockets.
//! - For this, IPv4 addresses count one by one (loopback ones too: 127.0.0.1 and
//!   127.0.0.2 are two) and IPv6 addresses by their /64 prefix, which one host usually
//!   holds whole.
//! - Optionally, connections per IP address (in setup and established) are limited by
//!   `max_clients_per_ip`; loopback addresses are exempt.
//!
//! Refused, evicted and failed connections are counted in
//! `sv2_tpd_connections_refused_total{reason}` and summed up for one periodic log line
//! ([`Admission::take_summary`]) rather than one line each.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::metrics::{metrics, REFUSAL_REASONS};

/// Connections that may wait for a setup place, per place: they cost a socket each and
/// no work, like the kernel's backlog.
pub const WAITING_PER_PLACE: usize = 16;

/// Setup places one address group ([`Admission::admit`]) may hold at once out of
/// `max_pending`: half of them (at least one).
pub fn places_per_group(max_pending: usize) -> usize {
    (max_pending / 2).max(1)
}

/// The limits [`Admission`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Established (set-up) connections served at once.
    pub max_clients: usize,
    /// Setups in progress at once (`max_pending_handshakes`).
    pub max_pending: usize,
    /// Connections from one non-loopback IP address at once; 0 for no limit.
    pub max_per_ip: usize,
}

/// Why a connection was refused or dropped before its setup was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    /// `max_clients` established connections already.
    MaxClients,
    /// `max_clients_per_ip` connections from this address already.
    PerIp,
    /// Closed because the waiting list was full and its address had the most waiting
    /// connections: evicted for a newcomer from another address, or closed on arrival.
    Evicted,
    /// Silent for `handshake_timeout`, or the setup not done within it.
    HandshakeTimeout,
    /// The Noise handshake or `SetupConnection` failed, or the peer left during setup.
    HandshakeFailed,
}

impl Refusal {
    /// Every reason, in the order they are reported.
    pub const ALL: [Refusal; 5] = [
        Refusal::MaxClients,
        Refusal::PerIp,
        Refusal::Evicted,
        Refusal::HandshakeTimeout,
        Refusal::HandshakeFailed,
    ];

    /// The metric label and log field name (one of [`REFUSAL_REASONS`], in order).
    pub fn label(self) -> &'static str {
        REFUSAL_REASONS[self as usize]
    }
}

/// The server's connection bookkeeping, shared by the listener and every connection.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    inner: Mutex<Inner>,
    /// Setup places, handed out in the order they are asked for.
    places: Arc<Semaphore>,
}

/// A connection waiting for a setup place.
#[derive(Debug)]
struct Waiting {
    /// Its address group ([`flood_group`]).
    group: IpAddr,
    /// Cancelled on eviction.
    token: CancellationToken,
    /// Whether the client's whole Noise act 1 has arrived.
    heard: bool,
}

/// The address group a connection from `ip` counts in when the waiting list is full: the
/// IPv4 address itself, or the /64 prefix of an IPv6 one.
fn flood_group(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (!0u128 << 64))),
        v4 => v4,
    }
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    // Waiting connections by age (ids grow).
    waiting: BTreeMap<u64, Waiting>,
    /// Waiting connections per address group (every group).
    waiting_per_group: HashMap<IpAddr, usize>,
    /// Connections holding a setup place.
    in_setup: usize,
    /// Each address group's share of the setup places ([`places_per_group`]), while one
    /// of its connections holds or waits for one.
    group_places: HashMap<IpAddr, Arc<Semaphore>>,
    established: usize,
    /// Connections per address, for `max_per_ip` (non-loopback addresses only).
    per_ip: HashMap<IpAddr, usize>,
    summary: BTreeMap<Refusal, u64>,
}

impl Inner {
    /// Forgets waiting connection `id` (if it still waits).
    fn stop_waiting(&mut self, id: u64) -> bool {
        let Some(gone) = self.waiting.remove(&id) else {
            return false;
        };
        decrement(&mut self.waiting_per_group, gone.group);
        true
    }

    /// Gives back a group share taken by [`Ticket::take_place`], forgetting the group's
    /// share once no connection holds or waits for it.
    fn release_group_place(&mut self, group: IpAddr, permit: Option<OwnedSemaphorePermit>) {
        drop(permit);
        if self
            .group_places
            .get(&group)
            .is_some_and(|share| Arc::strong_count(share) == 1)
        {
            self.group_places.remove(&group);
        }
    }

    fn waiting_in(&self, group: IpAddr) -> usize {
        self.waiting_per_group.get(&group).copied().unwrap_or(0)
    }

    /// The group with the most waiting connections (ties: the group of the oldest one)
    /// and how many it has.
    fn top_group(&self) -> Option<(IpAddr, usize)> {
        let mut top: Option<(IpAddr, usize)> = None;
        for w in self.waiting.values() {
            let n = self.waiting_in(w.group);
            if top.is_none_or(|(_, most)| n > most) {
                top = Some((w.group, n));
            }
        }
        top
    }

    /// Whom a newcomer from `group` evicts from a full waiting list: if its group has fewer
    /// waiting than the top group, the top group's oldest silent connection, else its
    /// longest-waiting one; otherwise its own group's oldest silent connection, or `None`
    /// (the newcomer is closed) if none of them is silent.
    fn flood_victim(&self, group: IpAddr) -> Option<u64> {
        let (top, most) = self.top_group()?;
        let oldest_silent = |of: IpAddr| {
            self.waiting
                .iter()
                .find(|(_, w)| w.group == of && !w.heard)
                .map(|(&id, _)| id)
        };
        if self.waiting_in(group) >= most {
            return oldest_silent(group);
        }
        oldest_silent(top).or_else(|| {
            self.waiting
                .iter()
                .find(|(_, w)| w.group == top)
                .map(|(&id, _)| id)
        })
    }
}

fn decrement(counts: &mut HashMap<IpAddr, usize>, ip: IpAddr) {
    if let Some(count) = counts.get_mut(&ip) {
        *count -= 1;
        if *count == 0 {
            counts.remove(&ip);
        }
    }
}

impl Admission {
    /// Bookkeeping under `limits`.
    pub fn new(limits: AdmissionLimits) -> Arc<Self> {
        Arc::new(Admission {
            limits,
            inner: Mutex::new(Inner::default()),
            places: Arc::new(Semaphore::new(limits.max_pending.max(1))),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state stays consistent even if a holder panicked: every update is one step.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn max_waiting(&self) -> usize {
        self.limits.max_pending.max(1) * WAITING_PER_PLACE
    }

    /// Whether the waiting list is full: a newcomer evicts someone or is closed.
    pub fn flooded(&self) -> bool {
        self.lock().waiting.len() >= self.max_waiting()
    }

    /// Takes on a new connection from `peer`; it waits for a setup place. If the waiting
    /// list is full, it evicts a connection of the address group with the most waiting
    /// connections, or a silent one of its own group if that is the one, or is refused
    /// ([`Refusal::Evicted`]) if none of those is silent (see the module doc). The ticket's token, a child of `parent`, is cancelled on eviction.
    pub fn admit(
        self: &Arc<Self>,
        peer: IpAddr,
        parent: &CancellationToken,
    ) -> Result<Ticket, Refusal> {
        let peer = peer.to_canonical();
        let counted_ip = (self.limits.max_per_ip > 0 && !peer.is_loopback()).then_some(peer);
        let mut inner = self.lock();
        if let Some(ip) = counted_ip {
            if inner.per_ip.get(&ip).copied().unwrap_or(0) >= self.limits.max_per_ip {
                drop(inner);
                self.record(Refusal::PerIp);
                return Err(Refusal::PerIp);
            }
        }
        if inner.established >= self.limits.max_clients {
            drop(inner);
            self.record(Refusal::MaxClients);
            return Err(Refusal::MaxClients);
        }
        let group = flood_group(peer);
        let full = inner.waiting.len() >= self.max_waiting();
        if full {
            let Some(victim) = inner.flood_victim(group) else {
                drop(inner);
                self.record(Refusal::Evicted);
                return Err(Refusal::Evicted);
            };
            if let Some(gone) = inner.waiting.get(&victim) {
                gone.token.cancel();
            }
            inner.stop_waiting(victim);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let token = parent.child_token();
        inner.waiting.insert(
            id,
            Waiting {
                group,
                token: token.clone(),
                heard: false,
            },
        );
        *inner.waiting_per_group.entry(group).or_insert(0) += 1;
        if let Some(ip) = counted_ip {
            *inner.per_ip.entry(ip).or_insert(0) += 1;
        }
        drop(inner);
        if full {
            self.record(Refusal::Evicted);
        }
        Ok(Ticket {
            admission: self.clone(),
            id,
            ip: counted_ip,
            group,
            group_place: None,
            place: None,
            established: false,
            token,
        })
    }

    /// Counts a refused or failed connection, for the metric and the next summary.
    pub fn record(&self, refusal: Refusal) {
        metrics()
            .connections_refused
            .with_label_values(&[refusal.label()])
            .inc();
        *self.lock().summary.entry(refusal).or_insert(0) += 1;
    }

    /// The counts recorded since the last call, by reason; empty if there were none.
    pub fn take_summary(&self) -> BTreeMap<Refusal, u64> {
        std::mem::take(&mut self.lock().summary)
    }

    /// Connections in their setup right now: waiting, or holding a setup place.
    pub fn pending(&self) -> usize {
        let inner = self.lock();
        inner.waiting.len() + inner.in_setup
    }

    /// Connections holding a setup place right now.
    pub fn in_setup(&self) -> usize {
        self.lock().in_setup
    }

    /// Established connections right now.
    pub fn established(&self) -> usize {
        self.lock().established
    }
}

/// One admitted connection; dropping it gives its place back.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    ip: Option<IpAddr>,
    /// Its address group ([`flood_group`]).
    group: IpAddr,
    /// Its share of its group's setup places, once it has one (until established).
    group_place: Option<OwnedSemaphorePermit>,
    /// Its setup place, once it has one (until established).
    place: Option<OwnedSemaphorePermit>,
    established: bool,
    token: CancellationToken,
}

impl Ticket {
    /// Cancelled when the connection is evicted or the server shuts down.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Counts a failure of this connection (see [`Admission::record`]).
    pub fn record(&self, refusal: Refusal) {
        self.admission.record(refusal);
    }

    /// Notes that the client's whole Noise act 1 has arrived: it is no longer silent, and
    /// in a flood is evicted only after its address's silent connections.
    pub fn heard_from(&self) {
        if let Some(waiting) = self.admission.lock().waiting.get_mut(&self.id) {
            waiting.heard = true;
        }
    }

    /// Waits for a setup place (in the order asked for, within its address group's share
    /// of them). Cancel-safe; a place taken while this connection was being evicted is
    /// given back by the ticket.
    pub async fn take_place(&mut self) {
        if self.place.is_some() || self.established {
            return;
        }
        if self.group_place.is_none() {
            let share = {
                let per_group = places_per_group(self.admission.limits.max_pending);
                let mut inner = self.admission.lock();
                inner
                    .group_places
                    .entry(self.group)
                    .or_insert_with(|| Arc::new(Semaphore::new(per_group)))
                    .clone()
            };
            let Ok(permit) = share.acquire_owned().await else {
                return;
            };
            self.group_place = Some(permit);
        }
        let Ok(place) = self.admission.places.clone().acquire_owned().await else {
            return;
        };
        let admission = self.admission.clone();
        let mut inner = admission.lock();
        inner.stop_waiting(self.id);
        inner.in_setup += 1;
        let in_setup = inner.in_setup;
        drop(inner);
        self.place = Some(place);
        metrics().handshakes_pending.set(in_setup as i64);
    }

    /// Whether the setup is done.
    pub fn is_established(&self) -> bool {
        self.established
    }

    /// Marks the setup done, giving its setup place back and taking one of the
    /// `max_clients` places. Fails (and records the refusal) if they are all taken or
    /// the connection was evicted.
    pub fn establish(&mut self) -> Result<(), Refusal> {
        if self.established {
            return Ok(());
        }
        if self.token.is_cancelled() {
            return Err(Refusal::Evicted);
        }
        let admission = self.admission.clone();
        let mut inner = admission.lock();
        if self.place.take().is_some() {
            inner.in_setup -= 1;
        } else {
            inner.stop_waiting(self.id);
        }
        inner.release_group_place(self.group, self.group_place.take());
        let in_setup = inner.in_setup;
        let refused = inner.established >= admission.limits.max_clients;
        if !refused {
            inner.established += 1;
            self.established = true;
        }
        drop(inner);
        metrics().handshakes_pending.set(in_setup as i64);
        if refused {
            admission.record(Refusal::MaxClients);
            return Err(Refusal::MaxClients);
        }
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let admission = self.admission.clone();
        let mut inner = admission.lock();
        if self.established {
            inner.established = inner.established.saturating_sub(1);
        } else if self.place.take().is_some() {
            inner.in_setup -= 1;
        } else {
            inner.stop_waiting(self.id);
        }
        inner.release_group_place(self.group, self.group_place.take());
        if let Some(ip) = self.ip {
            decrement(&mut inner.per_ip, ip);
        }
        let in_setup = inner.in_setup;
        drop(inner);
        metrics().handshakes_pending.set(in_setup as i64);
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn each_refusal_has_its_own_label_in_order() {
        for (i, reason) in Refusal::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, i);
            assert_eq!(reason.label(), REFUSAL_REASONS[i]);
        }
    }

    use super::*;

    fn limits(max_clients: usize, max_pending: usize, max_per_ip: usize) -> AdmissionLimits {
        AdmissionLimits {
            max_clients,
            max_pending,
            max_per_ip,
        }
    }

    const REMOTE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn pending_connections_do_not_take_client_places() {
        let admission = Admission::new(limits(1, 8, 0));
        let root = CancellationToken::new();
        let pending: Vec<_> = (0..5)
            .map(|_| admission.admit(REMOTE, &root).unwrap())
            .collect();
        let mut pool = admission.admit(REMOTE, &root).unwrap();
        pool.establish().unwrap();
        assert_eq!(admission.established(), 1);
        assert_eq!(admission.pending(), 5);
        // The one place is taken: a newcomer is refused, and so is a pending one's setup.
        assert_eq!(
            admission.admit(REMOTE, &root).unwrap_err(),
            Refusal::MaxClients
        );
        let mut late = pending.into_iter().next().unwrap();
        assert_eq!(late.establish().unwrap_err(), Refusal::MaxClients);
        drop(pool);
        assert_eq!(admission.established(), 0);
    }

    #[tokio::test]
    async fn setup_places_go_in_turn_and_nothing_is_evicted_for_them() {
        // Two places for one address: its share of four.
        let admission = Admission::new(limits(10, 4, 0));
        let root = CancellationToken::new();
        let mut tickets: Vec<_> = (0..5)
            .map(|_| admission.admit(REMOTE, &root).unwrap())
            .collect();
        for t in &mut tickets[..2] {
            t.take_place().await;
        }
        assert_eq!(admission.in_setup(), 2);
        // The third waits for a place; finishing a setup hands it on.
        let mut third = tickets.remove(2);
        let waiter = tokio::spawn(async move {
            third.take_place().await;
            third
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        tickets[0].establish().unwrap();
        let third = waiter.await.unwrap();
        assert_eq!(admission.in_setup(), 2);
        assert!(tickets.iter().all(|t| !t.token().is_cancelled()));
        assert!(!third.token().is_cancelled());
        assert!(admission.take_summary().is_empty(), "nothing was evicted");
    }

    #[tokio::test]
    async fn one_address_holds_at_most_half_of_the_setup_places() {
        let admission = Admission::new(limits(10, 4, 0));
        let root = CancellationToken::new();
        let mut flood: Vec<_> = (0..3)
            .map(|_| admission.admit(REMOTE, &root).unwrap())
            .collect();
        for t in &mut flood[..2] {
            t.take_place().await;
        }
        let mut third = flood.pop().unwrap();
        let blocked = tokio::spawn(async move {
            third.take_place().await;
            third
        });
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished(), "its address already holds half");
        let other: IpAddr = "192.0.2.9".parse().unwrap();
        let mut pool = admission.admit(other, &root).unwrap();
        pool.take_place().await;
        assert_eq!(admission.in_setup(), 3);
        flood[0].establish().unwrap();
        let third = blocked.await.unwrap();
        assert_eq!(admission.in_setup(), 3);
        drop((flood, third, pool));
        assert!(
            admission.lock().group_places.is_empty(),
            "shares are forgotten"
        );
    }

    #[test]
    fn a_full_waiting_list_closes_newcomers_from_the_address_with_the_most() {
        let admission = Admission::new(limits(10, 1, 0));
        let root = CancellationToken::new();
        let waiting: Vec<_> = (0..WAITING_PER_PLACE)
            .map(|_| admission.admit(REMOTE, &root).unwrap())
            .collect();
        assert!(admission.flooded());
        waiting.iter().for_each(Ticket::heard_from);
        assert_eq!(
            admission.admit(REMOTE, &root).unwrap_err(),
            Refusal::Evicted
        );
        assert!(waiting.iter().all(|t| !t.token().is_cancelled()));
        // Another address still gets in, even though everyone waiting has talked.
        let other: IpAddr = "192.0.2.9".parse().unwrap();
        let _newcomer = admission.admit(other, &root).unwrap();
        assert!(
            waiting[0].token().is_cancelled(),
            "the longest-waiting one goes"
        );
        assert!(waiting[1..].iter().all(|t| !t.token().is_cancelled()));
        assert_eq!(admission.pending(), WAITING_PER_PLACE);
        assert_eq!(admission.take_summary()[&Refusal::Evicted], 2);
    }

    #[test]
    fn a_flood_evicts_from_the_address_with_the_most_waiting_connections() {
        let admission = Admission::new(limits(10, 1, 0));
        let root = CancellationToken::new();
        let other: IpAddr = "192.0.2.9".parse().unwrap();
        let pool = admission.admit(other, &root).unwrap();
        let flood: Vec<_> = (1..WAITING_PER_PLACE)
            .map(|_| admission.admit(REMOTE, &root).unwrap())
            .collect();
        // A newcomer from a third address evicts the flooding address's oldest silent
        // connection, not the pool's older one.
        let third: IpAddr = "192.0.2.10".parse().unwrap();
        let newcomer = admission.admit(third, &root).unwrap();
        assert!(flood[0].token().is_cancelled());
        assert!(!flood[1].token().is_cancelled());
        assert!(!pool.token().is_cancelled());
        // A newcomer from the flooding address takes that address's oldest place.
        let _again = admission.admit(REMOTE, &root).unwrap();
        assert!(flood[1].token().is_cancelled());
        assert!(!pool.token().is_cancelled() && !newcomer.token().is_cancelled());
        assert_eq!(admission.pending(), WAITING_PER_PLACE);
        assert_eq!(admission.take_summary()[&Refusal::Evicted], 2);
        let mut evicted = flood.into_iter().next().unwrap();
        assert_eq!(evicted.establish().unwrap_err(), Refusal::Evicted);
    }

    #[test]
    fn silent_connections_are_evicted_before_those_that_sent_act_one() {
        let admission = Admission::new(limits(10, 1, 0));
        let root = CancellationToken::new();
        let talking = admission.admit(REMOTE, &root).unwrap();
        talking.heard_from();
        let silent: Vec<_> = (1..WAITING_PER_PLACE)
            .map(|_| admission.admit(REMOTE, &root).unwrap())
            .collect();
        let other: IpAddr = "192.0.2.9".parse().unwrap();
        let _newcomer = admission.admit(other, &root).unwrap();
        assert!(silent[0].token().is_cancelled());
        assert!(!talking.token().is_cancelled());
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_prefix_in_a_flood() {
        let admission = Admission::new(limits(10, 1, 0));
        let root = CancellationToken::new();
        let one_host: Vec<_> = (1..WAITING_PER_PLACE)
            .map(|i| {
                let ip: IpAddr = format!("2001:db8:0:1::{i:x}").parse().unwrap();
                admission.admit(ip, &root).unwrap()
            })
            .collect();
        let other: IpAddr = "2001:db8:0:2::1".parse().unwrap();
        let first_other = admission.admit(other, &root).unwrap();
        // The list is full and the first /64 has talked: a newcomer from it, on an
        // address of its own, is closed; one from the second /64 evicts from the first.
        one_host.iter().for_each(Ticket::heard_from);
        let same_prefix: IpAddr = "2001:db8:0:1:ffff::1".parse().unwrap();
        assert_eq!(
            admission.admit(same_prefix, &root).unwrap_err(),
            Refusal::Evicted
        );
        let _second_other = admission.admit(other, &root).unwrap();
        assert!(one_host[0].token().is_cancelled());
        assert!(!first_other.token().is_cancelled());
        assert_eq!(
            flood_group("10.0.0.1".parse().unwrap()).to_string(),
            "10.0.0.1"
        );
    }

    #[test]
    fn loopback_addresses_are_told_apart_in_a_flood() {
        let admission = Admission::new(limits(10, 1, 0));
        let root = CancellationToken::new();
        let other_loopback: IpAddr = "127.0.0.2".parse().unwrap();
        let first = admission.admit(other_loopback, &root).unwrap();
        let local: Vec<_> = (1..WAITING_PER_PLACE)
            .map(|_| admission.admit(LOOPBACK, &root).unwrap())
            .collect();
        let _c = admission.admit(other_loopback, &root).unwrap();
        assert!(local[0].token().is_cancelled());
        local.iter().for_each(Ticket::heard_from);
        assert_eq!(
            admission.admit(LOOPBACK, &root).unwrap_err(),
            Refusal::Evicted
        );
        assert!(!first.token().is_cancelled());
    }

    #[test]
    fn the_per_ip_cap_spares_loopback() {
        let admission = Admission::new(limits(10, 10, 2));
        let root = CancellationToken::new();
        let a = admission.admit(REMOTE, &root).unwrap();
        let _b = admission.admit(REMOTE, &root).unwrap();
        assert_eq!(admission.admit(REMOTE, &root).unwrap_err(), Refusal::PerIp);
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(admission.admit(mapped, &root).unwrap_err(), Refusal::PerIp);
        drop(a);
        let _c = admission.admit(REMOTE, &root).unwrap();
        let local: Vec<_> = (0..5)
            .map(|_| admission.admit(LOOPBACK, &root).unwrap())
            .collect();
        assert_eq!(local.len(), 5);
    }

    #[test]
    fn shutdown_reaches_every_ticket() {
        let admission = Admission::new(limits(10, 10, 0));
        let root = CancellationToken::new();
        let ticket = admission.admit(REMOTE, &root).unwrap();
        root.cancel();
        assert!(ticket.token().is_cancelled());
    }
}

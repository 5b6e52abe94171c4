//! Which connections the server takes on, so that no client can cost a pool its place.
//!
//! A connection is *in setup* from TCP accept until its setup is done (Noise,
//! `SetupConnection` and its first `CoinbaseOutputConstraints`), then *established*.
//! - Established connections are limited by `max_clients`; connections in setup do not
//!   take those slots.
//! - A connection in setup first *waits*: from accept until its first bytes arrive (it is
//!   *silent* until then; an honest client sends its Noise act 1 at once) and then until
//!   one of `max_pending_handshakes` setup places is free, in arrival order
//!   ([`Ticket::take_place`]). Only a connection with a place costs handshake work, and
//!   `handshake_timeout` counts from when it got one; a connection silent for
//!   `handshake_timeout` is closed.
//! - At most [`WAITING_PER_PLACE`] × `max_pending_handshakes` connections wait at once.
//!   While that many wait and none of them is silent, the listener stops accepting
//!   ([`Admission::can_accept`]) and newcomers stay in the kernel's accept backlog. Nothing
//!   in setup is ever evicted for a burst of honest clients (every pool reconnecting after
//!   a restart): each gets its turn.
//! - A *flood*: that many wait and some are silent. Then each newcomer evicts the oldest
//!   silent connection of the address with the most waiting connections
//!   ([`Admission::admit`]), so an address holding many idle sockets cannot keep another
//!   address out, and a pool that shares the attacker's address still gets its turn. A
//!   connection that has sent something is never evicted.
//! - Optionally, connections per IP address (in setup and established) are limited by
//!   `max_clients_per_ip`; loopback addresses are exempt. (Flood eviction tells every
//!   address apart, loopback ones included: 127.0.0.1 and 127.0.0.2 are two addresses.)
//!
//! Refused, evicted and failed connections are counted in
//! `sv2_tpd_connections_refused_total{reason}` and summed up for one periodic log line
//! ([`Admission::take_summary`]) rather than one line each.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::metrics::{metrics, REFUSAL_REASONS};

/// Connections that may wait for a setup place, per place: they cost a socket each and
/// no work, like the kernel's backlog.
pub const WAITING_PER_PLACE: usize = 16;

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
    /// A silent connection closed to make room for a newer one during a flood.
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
    /// Woken when a connection stops waiting: the listener may accept again.
    left_waiting: Notify,
}

/// A connection waiting for a setup place.
#[derive(Debug)]
struct Waiting {
    ip: IpAddr,
    /// Cancelled on eviction.
    token: CancellationToken,
    /// Whether the client has sent anything yet.
    heard: bool,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    // Waiting connections by age (ids grow).
    waiting: BTreeMap<u64, Waiting>,
    /// Waiting connections per address (every address).
    waiting_per_ip: HashMap<IpAddr, usize>,
    /// Connections holding a setup place.
    in_setup: usize,
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
        decrement(&mut self.waiting_per_ip, gone.ip);
        true
    }

    /// The oldest silent connection of the address with the most waiting connections,
    /// counting a newcomer from `newcomer` (ties: the address with the oldest one).
    fn flood_victim(&self, newcomer: Option<IpAddr>) -> Option<u64> {
        let count = |ip: IpAddr| {
            self.waiting_per_ip.get(&ip).copied().unwrap_or(0) + usize::from(Some(ip) == newcomer)
        };
        let mut best: Option<(usize, u64)> = None;
        // Oldest first, so the first silent one seen of each address is its oldest.
        for (&id, w) in self.waiting.iter().filter(|(_, w)| !w.heard) {
            let n = count(w.ip);
            if best.is_none_or(|(most, _)| n > most) {
                best = Some((n, id));
            }
        }
        best.map(|(_, id)| id)
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
            left_waiting: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state stays consistent even if a holder panicked: every update is one step.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn max_waiting(&self) -> usize {
        self.limits.max_pending.max(1) * WAITING_PER_PLACE
    }

    /// Whether the listener should accept: there is room to wait, or a silent
    /// connection a newcomer would evict (a flood).
    pub fn can_accept(&self) -> bool {
        let inner = self.lock();
        inner.waiting.len() < self.max_waiting() || inner.flood_victim(None).is_some()
    }

    /// Whether admitting a newcomer now would evict a silent connection.
    pub fn flooded(&self) -> bool {
        self.lock().waiting.len() >= self.max_waiting()
    }

    /// Resolves when a connection stops waiting (or at once if one did since the last
    /// call): the listener may accept again.
    pub async fn left_waiting(&self) {
        self.left_waiting.notified().await
    }

    /// Takes on a new connection from `peer`; it waits for a setup place. If the waiting
    /// set is full, the oldest silent connection of the address with the most waiting
    /// connections is evicted for it (the set holds one more for a moment if none is
    /// silent any more). The ticket's token, a child of `parent`, is cancelled on
    /// eviction.
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
        let mut evicted = 0;
        while inner.waiting.len() >= self.max_waiting() {
            let Some(victim) = inner.flood_victim(Some(peer)) else {
                break;
            };
            if let Some(gone) = inner.waiting.get(&victim) {
                gone.token.cancel();
            }
            inner.stop_waiting(victim);
            evicted += 1;
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let token = parent.child_token();
        inner.waiting.insert(
            id,
            Waiting {
                ip: peer,
                token: token.clone(),
                heard: false,
            },
        );
        *inner.waiting_per_ip.entry(peer).or_insert(0) += 1;
        if let Some(ip) = counted_ip {
            *inner.per_ip.entry(ip).or_insert(0) += 1;
        }
        drop(inner);
        for _ in 0..evicted {
            self.record(Refusal::Evicted);
        }
        Ok(Ticket {
            admission: self.clone(),
            id,
            ip: counted_ip,
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

    /// Notes that the client has sent something: it is no longer silent, and is never
    /// evicted in a flood.
    pub fn heard_from(&self) {
        if let Some(waiting) = self.admission.lock().waiting.get_mut(&self.id) {
            waiting.heard = true;
        }
    }

    /// Waits for a setup place (in the order asked for). Cancel-safe; a place taken
    /// while this connection was being evicted is given back by the ticket.
    pub async fn take_place(&mut self) {
        if self.place.is_some() || self.established {
            return;
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
        admission.left_waiting.notify_one();
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
        } else if inner.stop_waiting(self.id) {
            admission.left_waiting.notify_one();
        }
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
        } else if inner.stop_waiting(self.id) {
            admission.left_waiting.notify_one();
        }
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
        let admission = Admission::new(limits(10, 2, 0));
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

    #[test]
    fn a_full_waiting_set_stops_the_listener_unless_someone_is_silent() {
        let admission = Admission::new(limits(10, 1, 0));
        let root = CancellationToken::new();
        let waiting: Vec<_> = (0..WAITING_PER_PLACE)
            .map(|_| admission.admit(REMOTE, &root).unwrap())
            .collect();
        assert!(admission.flooded());
        assert!(admission.can_accept(), "silent ones can be evicted");
        waiting.iter().for_each(Ticket::heard_from);
        assert!(!admission.can_accept(), "everyone waiting has talked");
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
        // A newcomer from the flooding address takes that address's oldest place too.
        let _again = admission.admit(REMOTE, &root).unwrap();
        assert!(flood[1].token().is_cancelled());
        assert!(!pool.token().is_cancelled() && !newcomer.token().is_cancelled());
        assert_eq!(admission.pending(), WAITING_PER_PLACE);
        assert_eq!(admission.take_summary()[&Refusal::Evicted], 2);
        let mut evicted = flood.into_iter().next().unwrap();
        assert_eq!(evicted.establish().unwrap_err(), Refusal::Evicted);
    }

    #[test]
    fn a_connection_that_has_sent_something_is_not_evicted() {
        let admission = Admission::new(limits(10, 1, 0));
        let root = CancellationToken::new();
        let talking = admission.admit(REMOTE, &root).unwrap();
        talking.heard_from();
        let silent: Vec<_> = (1..WAITING_PER_PLACE)
            .map(|_| admission.admit(REMOTE, &root).unwrap())
            .collect();
        let _newcomer = admission.admit(REMOTE, &root).unwrap();
        assert!(silent[0].token().is_cancelled());
        assert!(!talking.token().is_cancelled());
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

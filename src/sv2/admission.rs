//! Which connections the server takes on, so that no client can cost a pool its place.
//!
//! A connection is *pending* from TCP accept until its setup is done (Noise,
//! `SetupConnection` and its first `CoinbaseOutputConstraints`), then *established*.
//! - Established connections are limited by `max_clients`; pending ones do not take those
//!   slots.
//! - Pending connections are limited by `max_pending_handshakes`. When that set is full a
//!   newcomer still gets in: the oldest pending connection is evicted instead, since an
//!   attacker and a pool may share an address and refusing newcomers would lock the pool out.
//! - Optionally, connections per IP address (pending and established) are limited by
//!   `max_clients_per_ip`; loopback addresses are exempt.
//!
//! Refused, evicted and failed connections are counted in
//! `sv2_tpd_connections_refused_total{reason}` and summed up for one periodic log line
//! ([`Admission::take_summary`]) rather than one line each.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio_util::sync::CancellationToken;

use crate::metrics::metrics;

/// The limits [`Admission`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Established (set-up) connections served at once.
    pub max_clients: usize,
    /// Connections still in their setup at once; the oldest is evicted for a newcomer.
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
    /// Evicted, still pending, to make room for a newer connection.
    Evicted,
    /// The setup did not finish within `handshake_timeout`.
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

    /// The metric label and log field name.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::MaxClients => "max_clients",
            Refusal::PerIp => "per_ip",
            Refusal::Evicted => "evicted",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::HandshakeFailed => "handshake_failed",
        }
    }
}

/// The server's connection bookkeeping, shared by the listener and every connection.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    // Pending connections by age (ids grow), with what evicts each.
    pending: BTreeMap<u64, CancellationToken>,
    established: usize,
    per_ip: HashMap<IpAddr, usize>,
    summary: BTreeMap<Refusal, u64>,
}

impl Admission {
    /// Bookkeeping under `limits`.
    pub fn new(limits: AdmissionLimits) -> Arc<Self> {
        Arc::new(Admission {
            limits,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state stays consistent even if a holder panicked: every update is one step.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes on a new connection from `peer`, evicting the oldest pending one if the pending
    /// set is full. The ticket's token, a child of `parent`, is cancelled on eviction.
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
        while inner.pending.len() >= self.limits.max_pending.max(1) {
            let Some((_, token)) = inner.pending.pop_first() else {
                break;
            };
            token.cancel();
            evicted += 1;
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let token = parent.child_token();
        inner.pending.insert(id, token.clone());
        if let Some(ip) = counted_ip {
            *inner.per_ip.entry(ip).or_insert(0) += 1;
        }
        let pending = inner.pending.len();
        drop(inner);
        for _ in 0..evicted {
            self.record(Refusal::Evicted);
        }
        metrics().handshakes_pending.set(pending as i64);
        Ok(Ticket {
            admission: self.clone(),
            id,
            ip: counted_ip,
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

    /// Connections in their setup right now.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
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

    /// Whether the setup is done.
    pub fn is_established(&self) -> bool {
        self.established
    }

    /// Marks the setup done, taking one of the `max_clients` places. Fails (and records
    /// the refusal) if they are all taken or the connection was already evicted.
    pub fn establish(&mut self) -> Result<(), Refusal> {
        if self.established {
            return Ok(());
        }
        let admission = self.admission.clone();
        let mut inner = admission.lock();
        if inner.pending.remove(&self.id).is_none() {
            return Err(Refusal::Evicted);
        }
        let pending = inner.pending.len();
        let refused = inner.established >= admission.limits.max_clients;
        if !refused {
            inner.established += 1;
            self.established = true;
        }
        drop(inner);
        metrics().handshakes_pending.set(pending as i64);
        if refused {
            admission.record(Refusal::MaxClients);
            return Err(Refusal::MaxClients);
        }
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut inner = self.admission.lock();
        if self.established {
            inner.established = inner.established.saturating_sub(1);
        } else {
            inner.pending.remove(&self.id);
        }
        if let Some(ip) = self.ip {
            if let Some(count) = inner.per_ip.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    inner.per_ip.remove(&ip);
                }
            }
        }
        let pending = inner.pending.len();
        drop(inner);
        metrics().handshakes_pending.set(pending as i64);
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn a_full_pending_set_evicts_its_oldest() {
        let admission = Admission::new(limits(10, 2, 0));
        let root = CancellationToken::new();
        let oldest = admission.admit(REMOTE, &root).unwrap();
        let second = admission.admit(REMOTE, &root).unwrap();
        let mut newest = admission.admit(REMOTE, &root).unwrap();
        assert!(oldest.token().is_cancelled());
        assert!(!second.token().is_cancelled());
        assert_eq!(admission.pending(), 2);
        let mut oldest = oldest;
        assert_eq!(oldest.establish().unwrap_err(), Refusal::Evicted);
        newest.establish().unwrap();
        assert_eq!(admission.pending(), 1);
        assert_eq!(admission.take_summary()[&Refusal::Evicted], 1);
        assert!(admission.take_summary().is_empty());
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

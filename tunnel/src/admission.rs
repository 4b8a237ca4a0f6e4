//! Pre-authentication admission for the internet-facing listeners (agents, enrollment): how
//! many connections may be in their handshake (or, for enrollment, their one request) at
//! once, in total and per source address.
//!
//! Over the per-source limit, the new connection is closed at once: one address cannot take
//! the server's slots. Over the total, the *oldest* connection still handshaking is closed for
//! the new one if it has been at it for `evict_after` (a stale one: a source that never
//! finishes); otherwise the new one is closed (it retries with backoff).
//!
//! Both halves matter. Refusing newcomers alone would let sources that never finish hold every
//! slot for the whole handshake timeout and lock every agent out. Evicting the oldest always
//! (the first design) threw away work: in a reconnect storm of 10,000 agents the server runs
//! at full CPU, 1,024 handshakes in flight each take a few hundred milliseconds, and the
//! newcomers pushed out 13,995 handshakes that were nearly done, which then came back.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

/// What outsiders may hold: slots before authentication on the two internet-facing
/// listeners, sessions per node identity, and redirected connections.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// TLS handshake deadline (agents and enrollment).
    pub handshake_timeout: Duration,
    /// Agent connections in their TLS handshake.
    pub agents: AdmissionLimits,
    /// Enrollment connections (each one request, all of it before authentication).
    pub enrollment: AdmissionLimits,
    /// Live sessions of one node identity (an agent upgrade with a surge holds two).
    pub max_sessions_per_node: usize,
    /// Redirected connections held at once by the ingresses.
    pub max_ingress_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            agents: AdmissionLimits::default(),
            // Nodes enroll once; a site installing many at once retries with backoff.
            enrollment: AdmissionLimits {
                total: 256,
                per_source: 8,
                ..AdmissionLimits::default()
            },
            max_sessions_per_node: 4,
            // Each holds two descriptors and a stream; the server raises its open-file limit.
            max_ingress_connections: 20_000,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct AdmissionLimits {
    pub total: usize,
    pub per_source: usize,
    /// With every slot taken, the oldest is closed for a newcomer only once it has been in
    /// flight this long.
    pub evict_after: Duration,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        // Per source: agents behind one NAT share an address, and after a server restart
        // they reconnect together (with jittered backoff); 64 handshakes of a few ms each in
        // flight at once is a high rate for one site.
        // Stale after 2 s: a TLS 1.3 handshake takes two round trips, under a second even over
        // a satellite link, plus its wait for CPU in a storm (a few hundred ms, measured).
        Self {
            total: 1024,
            per_source: 64,
            evict_after: Duration::from_secs(2),
        }
    }
}

#[derive(Default)]
struct State {
    /// Follows `in_flight.len()` (a metric), if given.
    gauge: Option<prometheus_client::metrics::gauge::Gauge>,
    next: u64,
    /// By admission order: the first is the oldest.
    in_flight: BTreeMap<u64, (IpAddr, Instant, CancellationToken)>,
    per_source: HashMap<IpAddr, usize>,
}

impl State {
    fn counted(&self) {
        if let Some(g) = &self.gauge {
            g.set(self.in_flight.len() as i64);
        }
    }

    fn forget(&mut self, id: u64) -> Option<CancellationToken> {
        let (ip, _, evict) = self.in_flight.remove(&id)?;
        self.counted();
        if let Some(n) = self.per_source.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&ip);
            }
        }
        Some(evict)
    }
}

/// Cheap to clone; clones share the slots.
#[derive(Clone)]
pub struct Admission {
    limits: AdmissionLimits,
    state: Arc<Mutex<State>>,
}

/// A slot, held while the connection is pre-authentication; freed on drop.
pub struct Ticket {
    id: u64,
    state: Arc<Mutex<State>>,
    /// Cancelled when a newer connection took this slot: close the connection.
    pub evicted: CancellationToken,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(self.id);
    }
}

/// Why a connection was not admitted, or what its admission did to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Admitted,
    /// Admitted, and the oldest connection in its handshake was closed for it.
    AdmittedEvictingOldest,
    /// Refused: its source already has `per_source` in flight.
    PerSourceFull,
    /// Refused: every slot is taken, and none for as long as `evict_after`.
    TotalFull,
}

impl Verdict {
    /// The refusal label a verdict is counted under (`None`: nothing to count).
    pub fn label(self) -> Option<&'static str> {
        match self {
            Verdict::Admitted => None,
            Verdict::AdmittedEvictingOldest => Some("evicted_oldest"),
            Verdict::PerSourceFull => Some("per_source_full"),
            Verdict::TotalFull => Some("total_full"),
        }
    }
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Self {
        Self {
            limits: AdmissionLimits {
                total: limits.total.max(1),
                per_source: limits.per_source.max(1),
                evict_after: limits.evict_after,
            },
            state: Default::default(),
        }
    }

    /// Keeps `gauge` at the number of connections in flight.
    pub fn counted_in(self, gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).gauge = Some(gauge);
        self
    }

    pub fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    /// A slot for a connection from `ip`, or `None` (with the verdict) if it must be closed.
    pub fn admit(&self, ip: IpAddr) -> (Option<Ticket>, Verdict) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.per_source.get(&ip).copied().unwrap_or(0) >= self.limits.per_source {
            return (None, Verdict::PerSourceFull);
        }
        let mut verdict = Verdict::Admitted;
        if s.in_flight.len() >= self.limits.total {
            let Some((&oldest, &(_, since, _))) = s.in_flight.iter().next() else {
                return (None, Verdict::TotalFull);
            };
            if since.elapsed() < self.limits.evict_after {
                return (None, Verdict::TotalFull);
            }
            if let Some(evict) = s.forget(oldest) {
                evict.cancel();
                verdict = Verdict::AdmittedEvictingOldest;
            }
        }
        let id = s.next;
        s.next += 1;
        let evicted = CancellationToken::new();
        s.in_flight
            .insert(id, (ip, Instant::now(), evicted.clone()));
        *s.per_source.entry(ip).or_default() += 1;
        s.counted();
        (
            Some(Ticket {
                id,
                state: self.state.clone(),
                evicted,
            }),
            verdict,
        )
    }

    /// Connections in flight now.
    pub fn in_flight(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .in_flight
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        [192, 0, 2, last].into()
    }

    #[test]
    fn per_source_is_refused_and_total_evicts_the_oldest() {
        let a = Admission::new(AdmissionLimits {
            total: 3,
            per_source: 2,
            evict_after: Duration::ZERO,
        });
        let (t1, v) = a.admit(ip(1));
        assert_eq!(v, Verdict::Admitted);
        let (t2, _) = a.admit(ip(1));
        let (none, v) = a.admit(ip(1));
        assert!(none.is_none());
        assert_eq!(v, Verdict::PerSourceFull);
        let (_t3, _) = a.admit(ip(2));
        // Full: the oldest (t1) is evicted for the newcomer.
        let (t4, v) = a.admit(ip(3));
        assert_eq!(v, Verdict::AdmittedEvictingOldest);
        let t1 = t1.unwrap();
        assert!(t1.evicted.is_cancelled());
        assert!(!t2.as_ref().unwrap().evicted.is_cancelled());
        assert_eq!(a.in_flight(), 3);
        // The evicted ticket's drop frees nothing twice; source 1 has one slot in use again.
        drop(t1);
        assert_eq!(a.in_flight(), 3);
        let (t5, v) = a.admit(ip(1));
        assert_eq!(v, Verdict::AdmittedEvictingOldest, "t2 is now the oldest");
        assert!(t2.unwrap().evicted.is_cancelled());
        drop((t4, t5));
        assert_eq!(a.in_flight(), 1);
    }

    #[test]
    fn a_full_table_of_young_handshakes_refuses_the_newcomer_and_evicts_once_stale() {
        let a = Admission::new(AdmissionLimits {
            total: 2,
            per_source: 2,
            evict_after: Duration::from_millis(200),
        });
        let (t1, _) = a.admit(ip(1));
        let (t2, _) = a.admit(ip(2));
        // Both still young: the handshakes in progress are kept, the newcomer goes.
        let (none, v) = a.admit(ip(3));
        assert!(none.is_none());
        assert_eq!(v, Verdict::TotalFull);
        assert_eq!(v.label(), Some("total_full"));
        assert!(!t1.as_ref().unwrap().evicted.is_cancelled());
        std::thread::sleep(Duration::from_millis(250));
        // Stale now: the oldest makes room.
        let (t3, v) = a.admit(ip(3));
        assert_eq!(v, Verdict::AdmittedEvictingOldest);
        assert!(t3.is_some());
        assert!(t1.unwrap().evicted.is_cancelled());
        assert!(!t2.unwrap().evicted.is_cancelled());
    }
}

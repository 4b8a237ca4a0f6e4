//! Resumable streams: what each end of a relayed connection keeps so that the connection
//! outlives the session it runs on.
//!
//! When a session is lost (keepalive timeout, TCP reset, TLS error), a resumable stream is
//! parked, not reset: the server keeps the client's TCP connection, the agent its connection to
//! the local service, and each keeps the bytes it read that the other end may not have written
//! yet. On the agent's next session to the same server the server opens a stream that names the
//! parked one and how much of it the server delivered; the agent answers with how much it
//! delivered, and each end sends again from the other's figure. Nothing is lost, doubled or
//! reordered, and END_STREAM sent before the loss is sent again if it did not arrive.
//!
//! No acknowledgement travels for this: HTTP/2 flow control is the acknowledgement. A receiver
//! releases window only after writing the bytes to TCP, so the bytes a sender has read but the
//! receiver has not delivered are at most the stream window, plus the first read (queued
//! without window) and one read waiting for window. Keeping that many of the latest bytes read
//! is always enough ([`keep_for`]). An idle stream keeps only what it ever read, up to that.
use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::keepalive::Reason;

/// On the server's stream open: the stream's resume ID (hex), asking the agent to keep the
/// stream resumable; echoed on the agent's 200 when it does.
pub const RESUME_HEADER: &str = "x-edge-resume";
/// On a resume: the ID of the parked stream to continue.
pub const RESUME_OF_HEADER: &str = "x-edge-resume-of";
/// On a resume and its answer: how many bytes of the other end's this end has delivered, and
/// ` end` once END_STREAM arrived.
pub const RECEIVED_HEADER: &str = "x-edge-received";

/// How long and how much a session's streams are kept for resumption; both ends take the same
/// flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeConfig {
    /// How long a stream whose session was lost waits for the next one; zero: streams are
    /// reset with their session, as before resumption.
    pub window: std::time::Duration,
    /// The bytes one session's streams may keep for it.
    pub budget_per_session: u64,
}

impl Default for ResumeConfig {
    fn default() -> Self {
        ResumeConfig {
            window: std::time::Duration::from_secs(60),
            budget_per_session: 64 << 20,
        }
    }
}

impl ResumeConfig {
    pub fn enabled(&self) -> bool {
        !self.window.is_zero()
    }
}

/// Both ends' resumption metrics, each registered under its end's prefix.
#[derive(Clone, Default, Debug)]
pub struct ResumeMetrics {
    /// Streams waiting now for a session to resume on.
    pub parked: Gauge,
    /// Streams continued on a new session.
    pub resumed: Counter,
    /// Parked streams reset instead: `window_expired`, `stream_gone` (the other end no longer
    /// has it), `offset` (the other end asked for bytes no longer kept), `unresumable` (the
    /// stream was never resumable: the peer predates resumption, or the budget was spent).
    pub failed: Family<Reason, Counter>,
    /// Bytes kept for resumption, all sessions.
    pub held_bytes: Gauge,
}

impl ResumeMetrics {
    pub fn fail(&self, reason: &'static str) {
        self.failed.get_or_create(&Reason { reason }).inc();
    }

    /// Every reason a parked stream may fail for (each at 0 in the first scrape).
    pub const REASONS: [&'static str; 4] =
        ["window_expired", "stream_gone", "offset", "unresumable"];

    pub fn register(&self, prefix: &str, r: &mut Registry) {
        for reason in Self::REASONS {
            let _ = self.failed.get_or_create(&Reason { reason });
        }
        r.register(
            format!("{prefix}_streams_parked"),
            "Streams whose session was lost, waiting for the next one to resume on",
            self.parked.clone(),
        );
        r.register(
            format!("{prefix}_streams_resumed"),
            "Streams continued on a new session after theirs was lost",
            self.resumed.clone(),
        );
        r.register(
            format!("{prefix}_streams_resume_failed"),
            "Streams whose session was lost and that were reset instead of resumed, by reason",
            self.failed.clone(),
        );
        r.register(
            format!("{prefix}_resume_held_bytes"),
            "Bytes kept so that streams can be resumed",
            self.held_bytes.clone(),
        );
    }
}

/// One of what `gauge` counts (a parked stream, a live session), until dropped.
pub struct GaugeHeld(Gauge);

impl GaugeHeld {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        GaugeHeld(gauge.clone())
    }
}

impl Drop for GaugeHeld {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A stream's resume ID: random, 128 bits, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowId(pub u128);

impl FlowId {
    pub fn random() -> FlowId {
        FlowId(rand::random())
    }

    pub fn header(self) -> String {
        format!("{:032x}", self.0)
    }

    pub fn parse(s: &str) -> Option<FlowId> {
        (s.len() == 32)
            .then(|| u128::from_str_radix(s, 16).ok())
            .flatten()
            .map(FlowId)
    }

    pub fn value(self) -> http::HeaderValue {
        self.header().parse().expect("hex is a header value")
    }

    /// The ID in header `name` of `h`, if there is a valid one.
    pub fn from_header(h: &http::HeaderMap, name: &str) -> Option<FlowId> {
        FlowId::parse(h.get(name)?.to_str().ok()?)
    }
}

impl std::fmt::Display for FlowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.header())
    }
}

/// What one end has delivered of the other's bytes: the other end resends from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub bytes: u64,
    pub end: bool,
}

impl Received {
    pub fn header(self) -> String {
        if self.end {
            format!("{} end", self.bytes)
        } else {
            self.bytes.to_string()
        }
    }

    pub fn value(self) -> http::HeaderValue {
        self.header().parse().expect("digits are a header value")
    }

    /// The figure in [`RECEIVED_HEADER`] of `h`, if there is a valid one.
    pub fn from_headers(h: &http::HeaderMap) -> Option<Received> {
        Received::parse(h.get(RECEIVED_HEADER)?.to_str().ok()?)
    }

    pub fn parse(s: &str) -> Option<Received> {
        let (n, end) = match s.strip_suffix(" end") {
            Some(n) => (n, true),
            None => (s, false),
        };
        Some(Received {
            bytes: n.parse().ok()?,
            end,
        })
    }
}

/// The bytes a stream may have to send again: at most the largest stream window (a resize can
/// raise it to [`crate::keepalive::MAX_STREAM_WINDOW`], or the configured base if larger), the
/// first read queued without window, and one read waiting for window.
pub fn keep_for(stream_window: u32) -> u64 {
    let window = crate::keepalive::MAX_STREAM_WINDOW.max(stream_window);
    u64::from(window) + crate::relay::FIRST_READ as u64 + crate::relay::CHUNK as u64
}

/// The bytes one session's streams keep for resumption, against a limit: a stream that would
/// take more stops being resumable (its session's loss resets it, as without resumption).
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
    /// Every session's bytes kept, for the metric.
    held: Option<Gauge>,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Budget {
            limit,
            used: AtomicU64::new(0),
            held: None,
        })
    }

    /// A budget whose bytes also count in `held` (shared by every session's).
    pub fn counted(limit: u64, held: Gauge) -> Arc<Self> {
        Arc::new(Budget {
            limit,
            used: AtomicU64::new(0),
            held: Some(held),
        })
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: u64) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used + n > self.limit {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    if let Some(g) = &self.held {
                        g.inc_by(n as i64);
                    }
                    return true;
                }
                Err(now) => used = now,
            }
        }
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::Relaxed);
        if let Some(g) = &self.held {
            g.dec_by(n as i64);
        }
    }
}

/// Why a stream stopped being resumable before any loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unresumable {
    /// Its session's [`Budget`] was spent.
    Budget,
}

/// The latest bytes read from TCP, by offset: chunks as they were sent (shared, not copied),
/// the oldest dropped once the newer ones alone cover [`keep_for`].
#[derive(Debug)]
pub struct Retained {
    chunks: VecDeque<Bytes>,
    /// Offset of the first byte of `chunks`.
    start: u64,
    /// Offset after the last byte read.
    end: u64,
    keep: u64,
    budget: Arc<Budget>,
}

impl Retained {
    pub fn new(keep: u64, budget: Arc<Budget>) -> Self {
        Retained {
            chunks: VecDeque::new(),
            start: 0,
            end: 0,
            keep,
            budget,
        }
    }

    /// What another process kept: the bytes from offset `start` on (a stream handed over by
    /// the agent it ran in, see the agent's `handoff`).
    pub fn restore(
        keep: u64,
        budget: Arc<Budget>,
        start: u64,
        bytes: Bytes,
    ) -> Result<Self, Unresumable> {
        let mut r = Retained::new(keep, budget);
        r.start = start;
        r.end = start;
        r.push(bytes)?;
        Ok(r)
    }

    /// Offset of the first byte held.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Bytes read so far.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.end - self.start
    }

    /// Records `b` as read. `Err` once the budget is spent: nothing is held any more.
    pub fn push(&mut self, b: Bytes) -> Result<(), Unresumable> {
        let n = b.len() as u64;
        if !self.budget.take(n) {
            self.clear();
            return Err(Unresumable::Budget);
        }
        self.end += n;
        self.chunks.push_back(b);
        while let Some(front) = self.chunks.front() {
            let rest = self.held() - front.len() as u64;
            if rest < self.keep {
                break;
            }
            self.start += front.len() as u64;
            self.budget.give(front.len() as u64);
            self.chunks.pop_front();
        }
        Ok(())
    }

    /// The bytes from `offset` on, or `None` if they are no longer (or never were) held.
    pub fn since(&self, offset: u64) -> Option<VecDeque<Bytes>> {
        if offset < self.start || offset > self.end {
            return None;
        }
        let mut skip = offset - self.start;
        let mut out = VecDeque::new();
        for c in &self.chunks {
            let len = c.len() as u64;
            if skip >= len {
                skip -= len;
                continue;
            }
            out.push_back(c.slice(skip as usize..));
            skip = 0;
        }
        Some(out)
    }

    /// Charges what it holds to `budget` instead (the stream moved to another session).
    /// `Err` if that budget cannot take it.
    pub fn rebind(&mut self, budget: Arc<Budget>) -> Result<(), Unresumable> {
        let held = self.held();
        if !budget.take(held) {
            self.clear();
            return Err(Unresumable::Budget);
        }
        self.budget.give(held);
        self.budget = budget;
        Ok(())
    }

    fn clear(&mut self) {
        self.budget.give(self.held());
        self.chunks.clear();
        self.start = self.end;
    }
}

impl Drop for Retained {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The TCP-to-stream direction of one relayed connection, kept across the sessions it runs
/// on.
#[derive(Debug, Default)]
pub struct Sending {
    /// The bytes read that may have to be sent again; `None` once the stream is no longer
    /// resumable.
    pub retained: Option<Retained>,
    /// Bytes read from TCP.
    pub read: u64,
    /// TCP EOF read: END_STREAM is (to be) sent after them.
    pub read_end: bool,
    /// Why the stream stopped being resumable, if it did.
    pub unresumable: Option<Unresumable>,
}

impl Sending {
    /// Records bytes read from TCP.
    pub fn read(&mut self, b: &Bytes) {
        self.read += b.len() as u64;
        if let Some(r) = &mut self.retained
            && let Err(why) = r.push(b.clone())
        {
            self.retained = None;
            self.unresumable = Some(why);
        }
    }
}

impl Sending {
    /// Charges what is kept to `budget` (the stream moved to another session's); a budget that
    /// cannot take it makes the stream unresumable from now on.
    pub fn rebind(&mut self, budget: Arc<Budget>) {
        if let Some(r) = &mut self.retained
            && let Err(why) = r.rebind(budget)
        {
            self.retained = None;
            self.unresumable = Some(why);
        }
    }
}

/// The stream-to-TCP direction, kept across sessions.
#[derive(Debug, Default, Clone, Copy)]
pub struct Receiving {
    /// Bytes written to TCP.
    pub delivered: u64,
    /// END_STREAM received (the TCP write side is shut).
    pub got_end: bool,
}

/// What a resumed stream sends first: the bytes the other end did not deliver, then
/// END_STREAM if it was sent before; nothing at all once the other end had it all.
#[derive(Debug, Default)]
pub struct Resend {
    pub bytes: VecDeque<Bytes>,
    pub then_end: bool,
    /// The other end delivered everything and END_STREAM: this direction is done.
    pub done: bool,
}

/// Both directions of one relayed connection.
#[derive(Debug, Default)]
pub struct Progress {
    pub sending: Sending,
    pub receiving: Receiving,
}

impl Progress {
    /// A stream that keeps what it reads (`retained`), or one that does not (`None`).
    pub fn new(retained: Option<Retained>) -> Self {
        Progress {
            sending: Sending {
                retained,
                ..Sending::default()
            },
            receiving: Receiving::default(),
        }
    }

    pub fn resumable(&self) -> bool {
        self.sending.retained.is_some()
    }

    /// Stops keeping bytes (the other end cannot resume).
    pub fn forget(&mut self) {
        self.sending.retained = None;
    }

    /// What this end tells the other on a resume.
    pub fn received(&self) -> Received {
        Received {
            bytes: self.receiving.delivered,
            end: self.receiving.got_end,
        }
    }

    /// What to send again, given what the other end delivered; `None` if those bytes are no
    /// longer held (or the figure is beyond what was read: a confused or lying peer).
    pub fn resend(&self, theirs: Received) -> Option<Resend> {
        let s = &self.sending;
        if theirs.end {
            // Only a stream that sent END_STREAM can have had it delivered.
            return (s.read_end && theirs.bytes == s.read).then(|| Resend {
                done: true,
                ..Resend::default()
            });
        }
        Some(Resend {
            bytes: s.retained.as_ref()?.since(theirs.bytes)?,
            then_end: s.read_end,
            done: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(from: u8, n: usize) -> Bytes {
        (0..n).map(|i| from.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn retained_keeps_the_latest_bytes_and_serves_any_offset_within_them() {
        let budget = Budget::new(1 << 20);
        let mut r = Retained::new(10, budget.clone());
        for i in 0..5u8 {
            r.push(bytes(i * 4, 4)).unwrap();
        }
        // 20 read, the last 10 needed: chunks from offset 8 on cover them (12 held).
        assert_eq!((r.end(), r.held()), (20, 12));
        assert_eq!(budget.used(), 12);
        assert!(r.since(7).is_none(), "dropped bytes are not offered");
        assert!(r.since(21).is_none(), "bytes never read are not offered");
        let tail: Vec<u8> = r.since(10).unwrap().into_iter().flatten().collect();
        assert_eq!(tail, (10u8..20).collect::<Vec<_>>());
        assert_eq!(r.since(20).unwrap().len(), 0);
        drop(r);
        assert_eq!(budget.used(), 0, "a dropped stream gives its bytes back");
    }

    #[test]
    fn a_spent_budget_makes_the_stream_unresumable_and_frees_what_it_held() {
        let budget = Budget::new(10);
        let mut p = Progress::new(Some(Retained::new(100, budget.clone())));
        p.sending.read(&bytes(0, 8));
        assert!(p.resumable());
        p.sending.read(&bytes(0, 8));
        assert!(!p.resumable());
        assert_eq!(p.sending.unresumable, Some(Unresumable::Budget));
        assert_eq!((p.sending.read, budget.used()), (16, 0));
    }

    #[test]
    fn resend_starts_at_the_other_ends_figure_and_ends_with_end_stream_if_sent() {
        let mut p = Progress::new(Some(Retained::new(100, Budget::new(100))));
        p.sending.read(&bytes(0, 6));
        p.sending.read_end = true;
        let r = p
            .resend(Received {
                bytes: 2,
                end: false,
            })
            .unwrap();
        let b: Vec<u8> = r.bytes.into_iter().flatten().collect();
        assert_eq!((b, r.then_end, r.done), (vec![2, 3, 4, 5], true, false));
        assert!(
            p.resend(Received {
                bytes: 6,
                end: true
            })
            .unwrap()
            .done
        );
        assert!(
            p.resend(Received {
                bytes: 5,
                end: true
            })
            .is_none(),
            "END_STREAM before the last byte"
        );
        assert!(
            p.resend(Received {
                bytes: 7,
                end: false
            })
            .is_none()
        );
        p.forget();
        assert!(
            p.resend(Received {
                bytes: 6,
                end: false
            })
            .is_none()
        );
    }

    #[test]
    fn rebinding_moves_the_charge_between_budgets() {
        let (a, b) = (Budget::new(100), Budget::new(100));
        let mut r = Retained::new(100, a.clone());
        r.push(bytes(0, 30)).unwrap();
        r.rebind(b.clone()).unwrap();
        assert_eq!((a.used(), b.used()), (0, 30));
        let small = Budget::new(10);
        assert_eq!(r.rebind(small.clone()), Err(Unresumable::Budget));
        assert_eq!((b.used(), small.used(), r.held()), (0, 0, 0));
    }

    #[test]
    fn headers_round_trip_and_reject_nonsense() {
        let id = FlowId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(FlowId::parse(&id.header()), Some(id));
        assert_eq!(FlowId::parse("12"), None);
        assert_eq!(FlowId::parse(&"g".repeat(32)), None);
        for r in [
            Received {
                bytes: 0,
                end: false,
            },
            Received {
                bytes: 1 << 40,
                end: true,
            },
        ] {
            assert_eq!(Received::parse(&r.header()), Some(r));
        }
        assert_eq!(Received::parse("x end"), None);
        assert_eq!(Received::parse("-1"), None);
    }
}

//! HTTP/2 PING keepalive, run on both ends of a session: a peer that stops answering (a frozen
//! process, a dropped NAT mapping, a pulled cable) is declared dead within
//! `interval + timeout`, even when no stream is open, and its session is torn down so the
//! agent reconnects and the server stops routing to it.
use std::time::{Duration, Instant};

use prometheus_client::{encoding::EncodeLabelSet, metrics::gauge::Gauge};

#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        // 30 s + 10 s: finds a dead peer in at most 40 s. One PING exchange per 30 s is about
        // 0.7 MB a day per idle session with TLS and TCP/IP headers (every 10 s it was 2.4 MB,
        // and 10,000 idle sessions cost a server 4.7% of a core): a fleet's idle cost, traded
        // against 20 s more to notice a silent peer.
        Keepalive {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
        }
    }
}

/// How often a session with open streams pings: an outage under a running `logs -f` is found
/// within this plus the timeout, and its streams park and resume, instead of waiting out an
/// idle session's interval. Idle sessions (nearly all of a fleet's) keep the long interval.
pub const BUSY_INTERVAL: Duration = Duration::from_secs(1);

/// How long a PING may go unanswered before the session counts as stalled (at least; four
/// round trips on a long link): the agent then dials a standby session beside it, which takes
/// the streams over if it comes up while the PING is still unanswered (the path works again
/// but the old connection waits out TCP's retransmission backoff).
pub const STALL_AFTER: Duration = Duration::from_secs(1);

/// Whether a session carries streams now, and a wake-up when it starts to; `stalled` is set
/// while a PING is late (see [`STALL_AFTER`]).
pub struct Busy<'a> {
    pub now: &'a (dyn Fn() -> bool + Sync),
    pub started: &'a tokio::sync::Notify,
    pub stalled: &'a tokio::sync::watch::Sender<bool>,
}

/// Pings until the peer fails to answer; returns why. The first PING goes out at once, so the
/// session learns its round-trip time (and sizes its stream windows, see [`stream_window`])
/// within one RTT; `rtt` receives every measurement, `rtt_us` holds the last. While `busy`,
/// it pings every [`BUSY_INTERVAL`].
pub async fn run(
    mut pp: h2::PingPong,
    ka: Keepalive,
    rtt_us: &Gauge,
    rtt: &tokio::sync::watch::Sender<Option<Duration>>,
    busy: Busy<'_>,
) -> String {
    let mut first = true;
    loop {
        if !first {
            if (busy.now)() {
                tokio::time::sleep(BUSY_INTERVAL.min(ka.interval)).await;
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(ka.interval) => {}
                    _ = busy.started.notified() => continue,
                }
            }
        }
        first = false;
        if let Err(why) = ping(&mut pp, ka.timeout, rtt_us, rtt, Some(busy.stalled)).await {
            return why.unwrap_or_else(|| {
                format!(
                    "peer did not answer a keepalive PING within {:?}",
                    ka.timeout
                )
            });
        }
    }
}

/// One PING answered within `within`, its round trip recorded. `Err(None)`: no answer in
/// time; `Err(Some(why))`: the PING itself failed.
async fn ping(
    pp: &mut h2::PingPong,
    within: Duration,
    rtt_us: &Gauge,
    rtt: &tokio::sync::watch::Sender<Option<Duration>>,
    stalled: Option<&tokio::sync::watch::Sender<bool>>,
) -> Result<(), Option<String>> {
    let start = Instant::now();
    let answer = tokio::time::timeout(within, pp.ping(h2::Ping::opaque()));
    tokio::pin!(answer);
    let answered = match stalled {
        None => answer.await,
        Some(flag) => {
            let after = STALL_AFTER.max(rtt.borrow().unwrap_or_default() * 4);
            tokio::select! {
                r = &mut answer => r,
                _ = tokio::time::sleep(after) => {
                    flag.send_replace(true);
                    let r = answer.await;
                    flag.send_replace(false);
                    r
                }
            }
        }
    };
    match answered {
        Ok(Ok(_)) => {
            let took = start.elapsed();
            rtt_us.set(took.as_micros() as i64);
            rtt.send_replace(Some(took));
            Ok(())
        }
        Ok(Err(e)) => Err(Some(format!("keepalive PING failed: {e}"))),
        Err(_) => Err(None),
    }
}

/// The server's side: it pings only when the peer has been silent for [`listening_quiet`]
/// (`interval + timeout / 2`, less the watch's tick), and then wants the answer within
/// `timeout / 2`, so a dead peer is still found within `interval + timeout`. An agent pinging
/// every `interval` (the same default) keeps it quiet: an idle session carries one PING
/// exchange per interval, not one from each end. The first PING goes out at once, as in
/// [`run`], to learn the round-trip time.
///
/// `heard` comes from the server's [`silence_watch`]: the session keeps no timer of its own
/// while it waits.
///
/// `probe` asks for a PING at once, to be answered within [`PROBE_WITHIN`]: a newer session
/// of the same node came up, which is what an agent does when it found this one dead, so the
/// server need not wait out the silence to learn it too (a peer whose socket is gone answers
/// with a reset at once).
pub async fn run_listening(
    mut pp: h2::PingPong,
    ka: Keepalive,
    heard: &crate::heard::LastHeard,
    rtt_us: &Gauge,
    rtt: &tokio::sync::watch::Sender<Option<Duration>>,
    probe: &tokio::sync::Notify,
) -> String {
    let answer_within = ka.timeout / 2;
    let quiet_for = listening_quiet(ka);
    let mut first = true;
    loop {
        let mut within = if first { ka.timeout } else { answer_within };
        if !first {
            tokio::select! {
                _ = heard.until_silent(quiet_for) => {}
                _ = probe.notified() => within = within.min(PROBE_WITHIN),
            }
        }
        first = false;
        if let Err(why) = ping(&mut pp, within, rtt_us, rtt, None).await {
            return why.unwrap_or_else(|| {
                format!(
                    "peer sent nothing for {:?} and did not answer a keepalive PING within {within:?}",
                    heard.silent_for().saturating_sub(within)
                )
            });
        }
    }
}

/// How long a probed session has to answer (see [`run_listening`]). A live one answers in a
/// round trip; one behind a queue of its own bytes may take longer and is then taken for dead,
/// which is safe: its resumable streams continue on the newer session.
pub const PROBE_WITHIN: Duration = Duration::from_secs(1);

/// How long the server lets a peer be silent before it pings: `interval + timeout / 2`, less
/// the [`SilenceWatch`] tick by which the wake may come late.
///
/// [`SilenceWatch`]: crate::silence::SilenceWatch
pub fn listening_quiet(ka: Keepalive) -> Duration {
    let tick = crate::silence::SilenceWatch::tick_for(ka.timeout);
    (ka.interval + (ka.timeout - ka.timeout / 2)).saturating_sub(tick)
}

/// The one watch over a server's sessions, for keepalive `ka`.
pub fn silence_watch(ka: Keepalive) -> std::sync::Arc<crate::silence::SilenceWatch> {
    crate::silence::SilenceWatch::new(
        listening_quiet(ka),
        crate::silence::SilenceWatch::tick_for(ka.timeout),
    )
}

/// What one stream should be able to carry on a long link before its window, not the link,
/// limits it (bytes per second; 2.5 Gbit/s).
const STREAM_RATE: f64 = 312.5e6;
/// The largest per-stream window: the most one stalled reader can make a session buffer.
pub const MAX_STREAM_WINDOW: u32 = 16 << 20;

/// The per-stream receive window for a session with round-trip time `rtt`: at least `base`,
/// enough for one stream to reach [`STREAM_RATE`] over that RTT (its bandwidth-delay
/// product), at most [`MAX_STREAM_WINDOW`]. On a LAN or loopback this stays `base`; at 50 ms it
/// is 15.6 MB, so a long edge link does not cap a stream at `base` / RTT.
pub fn stream_window(rtt: Duration, base: u32) -> u32 {
    let bdp = (rtt.as_secs_f64() * STREAM_RATE) as u64;
    bdp.clamp(u64::from(base), u64::from(MAX_STREAM_WINDOW.max(base))) as u32
}

/// A session's per-stream window, following the RTTs its keepalive measures.
///
/// The window follows the smallest of the last [`RTT_SAMPLES`] round trips (the link's own
/// delay; a busy peer's or a queue's delay on top is not the link's) and changes only when it
/// moves by more than a quarter. Every change is a SETTINGS exchange (four packets): a window
/// that followed each sample would send one on nearly every PING of a WAN link, whose RTT
/// jitters by more than the few per cent that move the window, and double its idle traffic.
pub struct Windows {
    rtt: tokio::sync::watch::Receiver<Option<Duration>>,
    base: u32,
    current: u32,
    recent: std::collections::VecDeque<Duration>,
}

/// How many round trips the window's RTT is the minimum of (at the default keepalive, the
/// last four minutes): a longer path is followed after that long, a shorter one at once.
pub const RTT_SAMPLES: usize = 8;

impl Windows {
    pub fn new(rtt: tokio::sync::watch::Receiver<Option<Duration>>, base: u32) -> Self {
        Self {
            rtt,
            base,
            current: base,
            recent: std::collections::VecDeque::with_capacity(RTT_SAMPLES),
        }
    }

    /// Waits for the next RTT measurement; the link's RTT and the new window when the window
    /// should change (None otherwise, or once the keepalive has ended).
    pub async fn resized(&mut self) -> Option<(Duration, u32)> {
        self.rtt.changed().await.ok()?;
        let rtt = (*self.rtt.borrow_and_update()).unwrap_or_default();
        self.next(rtt)
    }

    fn next(&mut self, sample: Duration) -> Option<(Duration, u32)> {
        if self.recent.len() == RTT_SAMPLES {
            self.recent.pop_front();
        }
        self.recent.push_back(sample);
        let rtt = self.recent.iter().min().copied().unwrap_or(sample);
        let w = stream_window(rtt, self.base);
        let (cur, new) = (u64::from(self.current), u64::from(w));
        (new * 4 > cur * 5 || new * 4 < cur * 3).then(|| {
            self.current = w;
            (rtt, w)
        })
    }
}

/// Logs the result of applying a new stream window on the session with `peer`.
pub fn log_resize(peer: &str, rtt: Duration, window: u32, applied: Result<(), h2::Error>) {
    match applied {
        // Debug: it comes once per session, 10,000 lines when a fleet reconnects.
        Ok(()) => tracing::debug!(peer, ?rtt, window, "stream windows sized for the link"),
        Err(e) => tracing::warn!(peer, "resizing stream windows: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_follows_the_links_rtt_and_not_its_jitter() {
        let (_tx, rx) = tokio::sync::watch::channel(None);
        let base = 1 << 20;
        let mut w = Windows::new(rx, base);
        let ms = |m: f64| Duration::from_secs_f64(m / 1e3);
        let got = |w: &mut Windows, m: f64| w.next(ms(m)).map(|x| x.1);
        // A loaded LAN peer: samples from 0.1 to 8 ms, the link 0.1 ms: base throughout.
        for m in [0.1, 5.0, 0.3, 8.0, 0.2, 4.0, 6.0, 0.1, 7.5, 3.9] {
            assert_eq!(got(&mut w, m), None, "{m} ms");
        }
        // A WAN link (50 ms): the first sample sizes the window (after the LAN samples
        // have left the filter); jitter above it changes nothing.
        let mut w = Windows::new(tokio::sync::watch::channel(None).1, base);
        assert_eq!(got(&mut w, 50.0), Some(15_625_000));
        for m in [57.0, 53.0, 80.0, 55.0, 51.0, 120.0, 52.0, 50.5, 61.0] {
            assert_eq!(got(&mut w, m), None, "{m} ms");
        }
        // A shorter path is followed at once; a longer one after RTT_SAMPLES samples.
        assert_eq!(got(&mut w, 20.0), Some(6_250_000));
        let mut longer = Vec::new();
        for _ in 0..RTT_SAMPLES {
            longer.push(got(&mut w, 45.0));
        }
        assert_eq!(longer.iter().filter(|x| x.is_some()).count(), 1);
        assert_eq!(longer.last().copied().flatten(), Some(14_062_500));
        assert_eq!(got(&mut w, 0.2), Some(base), "back on a LAN");
    }

    #[test]
    fn windows_follow_the_bandwidth_delay_product_within_bounds() {
        let base = 1 << 20;
        assert_eq!(stream_window(Duration::from_micros(100), base), base);
        assert_eq!(stream_window(Duration::from_millis(10), base), 3_125_000);
        assert_eq!(stream_window(Duration::from_millis(50), base), 15_625_000);
        assert_eq!(
            stream_window(Duration::from_millis(100), base),
            MAX_STREAM_WINDOW
        );
        assert_eq!(
            stream_window(Duration::from_secs(2), base),
            MAX_STREAM_WINDOW
        );
    }
}

/// Metric labels both ends use.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    /// `to_node` (client -> edge service) or `from_node`.
    pub direction: &'static str,
}

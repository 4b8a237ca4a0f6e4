//! What one client of the enrollment endpoint may hold or try. The endpoint faces the
//! internet before any authentication, so every phase of a request has a deadline, every part
//! a size, and failed token guesses a rate per source address.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

#[derive(Clone, Debug)]
pub struct EnrollLimits {
    /// The TLS handshake.
    pub handshake: Duration,
    /// From the end of the handshake to the end of the request head: an idle connection and
    /// headers sent a byte at a time both end here.
    pub head: Duration,
    /// The request body, once the head is in.
    pub body: Duration,
    /// Request head (hyper answers 431 above it; its floor is 8 KiB).
    pub max_head_bytes: usize,
    /// Request body (413 above it; a CSR is well under 2 KiB).
    pub max_body_bytes: usize,
    /// Failed enrollments (unknown, used, expired or wrong-node tokens) allowed per source
    /// address and window; past it, 429 until the window ends.
    pub failures_per_source: u32,
    pub failure_window: Duration,
}

impl Default for EnrollLimits {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            head: Duration::from_secs(10),
            body: Duration::from_secs(10),
            max_head_bytes: 8 * 1024,
            max_body_bytes: 16 * 1024,
            failures_per_source: 10,
            failure_window: Duration::from_secs(60),
        }
    }
}

/// Failed token guesses per source address, in fixed windows. Bounded: past `MAX_SOURCES`
/// addresses, expired windows are dropped first and then the oldest, so a flood of sources
/// costs memory once and no more.
pub struct FailedGuesses {
    limit: u32,
    window: Duration,
    by_source: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

const MAX_SOURCES: usize = 16 * 1024;

impl FailedGuesses {
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            by_source: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(wait)` while `ip` is over its limit: how long until it may try again.
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let m = self.by_source.lock().unwrap_or_else(|p| p.into_inner());
        let (start, n) = *m.get(&ip)?;
        let left = self.window.checked_sub(start.elapsed())?;
        (n >= self.limit).then_some(left)
    }

    /// Counts one failed guess from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let mut m = self.by_source.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if m.len() >= MAX_SOURCES && !m.contains_key(&ip) {
            let window = self.window;
            m.retain(|_, (start, _)| now.duration_since(*start) < window);
            if m.len() >= MAX_SOURCES
                && let Some(oldest) = m
                    .iter()
                    .min_by_key(|(_, (start, _))| *start)
                    .map(|(k, _)| *k)
            {
                m.remove(&oldest);
            }
        }
        let e = m.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= self.window {
            *e = (now, 0);
        }
        e.1 += 1;
    }

    #[cfg(test)]
    fn sources(&self) -> usize {
        self.by_source.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_blocked_after_its_limit_until_the_window_ends_and_others_are_not() {
        let g = FailedGuesses::new(3, Duration::from_millis(200));
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        for _ in 0..2 {
            g.failed(a);
        }
        assert_eq!(g.blocked(a), None, "2 of 3");
        g.failed(a);
        let wait = g.blocked(a).expect("3 of 3: blocked");
        assert!(wait <= Duration::from_millis(200));
        assert_eq!(g.blocked(b), None, "another source is not");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(g.blocked(a), None, "the window ended");
        g.failed(a);
        assert_eq!(g.blocked(a), None, "a new window starts at 1");
    }

    #[test]
    fn a_flood_of_sources_is_bounded() {
        let g = FailedGuesses::new(3, Duration::from_secs(60));
        for i in 0..(MAX_SOURCES as u32 + 500) {
            g.failed(IpAddr::from(std::net::Ipv4Addr::from(0xc633_0000 + i)));
        }
        assert_eq!(g.sources(), MAX_SOURCES);
    }
}

//! Warnings an outsider can trigger at will (failed handshakes, accept errors) are aggregated:
//! the first of a window in full, then one line with how many more there were, so a flood gives
//! a line or two per window whatever its rate. The metrics keep the exact counts.
use std::time::{Duration, Instant};

pub struct WarnEvery {
    window: Duration,
    /// Lines logged in full per window.
    burst: u64,
    started: Option<Instant>,
    logged: u64,
    suppressed: u64,
}

impl WarnEvery {
    pub fn new(window: Duration) -> Self {
        Self::with_burst(window, 1)
    }

    /// The first `burst` of a window in full (events an operator follows one by one while
    /// they are few, such as agent sessions coming and going), then counted.
    pub fn with_burst(window: Duration, burst: u64) -> Self {
        WarnEvery {
            window,
            burst: burst.max(1),
            started: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// Calls `emit` with a suffix (`""`, or `" (N more in the last 10 s)"`) when this
    /// occurrence should be logged; counts it otherwise.
    pub fn warn(&mut self, emit: impl FnOnce(&str)) {
        let now = Instant::now();
        match self.started {
            Some(t) if now.duration_since(t) < self.window => {
                if self.logged < self.burst {
                    self.logged += 1;
                    emit("");
                } else {
                    self.suppressed += 1;
                }
            }
            _ => {
                let more = match self.suppressed {
                    0 => String::new(),
                    n => format!(" ({n} more in the last {:?})", self.window),
                };
                self.started = Some(now);
                self.logged = 1;
                self.suppressed = 0;
                emit(&more);
            }
        }
    }
}

/// [`WarnEvery`] per kind of message: a flood of one kind is aggregated while a different
/// reason still gets its own first line. Kinds are bounded (a flood of distinct texts cannot
/// grow it): past `MAX_KINDS` they share one window.
pub struct WarnKinds {
    window: Duration,
    burst: u64,
    kinds: std::collections::HashMap<String, WarnEvery>,
    overflow: WarnEvery,
}

const MAX_KINDS: usize = 64;

impl WarnKinds {
    pub fn new(window: Duration) -> Self {
        Self::with_burst(window, 1)
    }

    /// Each kind's first `burst` lines of a window in full ([`WarnEvery::with_burst`]).
    pub fn with_burst(window: Duration, burst: u64) -> Self {
        WarnKinds {
            window,
            burst,
            kinds: std::collections::HashMap::new(),
            overflow: WarnEvery::with_burst(window, burst),
        }
    }

    pub fn warn(&mut self, kind: &str, emit: impl FnOnce(&str)) {
        if let Some(w) = self.kinds.get_mut(kind) {
            return w.warn(emit);
        }
        if self.kinds.len() >= MAX_KINDS {
            return self.overflow.warn(emit);
        }
        let mut w = WarnEvery::with_burst(self.window, self.burst);
        w.warn(emit);
        self.kinds.insert(kind.to_owned(), w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_gets_its_first_line_and_a_flood_of_one_kind_is_held_back() {
        let mut w = WarnKinds::new(Duration::from_secs(10));
        let mut lines = Vec::new();
        for i in 0..1000 {
            w.warn("TLS handshake timed out", |m| {
                lines.push(format!("timeout{m}"))
            });
            if i == 500 {
                w.warn("unknown issuer", |m| lines.push(format!("issuer{m}")));
            }
        }
        assert_eq!(lines, ["timeout", "issuer"]);
        for i in 0..1000 {
            w.warn(&format!("distinct {i}"), |_| lines.push("distinct".into()));
        }
        // 62 more kinds fit (64 in all), the rest share one window.
        assert_eq!(lines.len(), 2 + 62 + 1, "{}", lines.len());
    }

    #[test]
    fn a_flood_gives_one_line_per_window_and_the_next_says_how_many_were_held_back() {
        let mut w = WarnEvery::new(Duration::from_millis(50));
        let mut lines = Vec::new();
        for _ in 0..10_000 {
            w.warn(|more| lines.push(more.to_owned()));
        }
        assert_eq!(lines, [""], "one line for the whole burst");
        std::thread::sleep(Duration::from_millis(60));
        w.warn(|more| lines.push(more.to_owned()));
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1], " (9999 more in the last 50ms)");
    }

    #[test]
    fn a_burst_is_logged_in_full_and_the_rest_counted_into_the_next_window() {
        let mut w = WarnEvery::with_burst(Duration::from_millis(100), 3);
        let mut lines = Vec::new();
        for _ in 0..10 {
            w.warn(|more| lines.push(more.to_owned()));
        }
        assert_eq!(lines, ["", "", ""], "three in full, seven counted");
        std::thread::sleep(Duration::from_millis(120));
        w.warn(|more| lines.push(more.to_owned()));
        assert_eq!(lines[3], " (7 more in the last 100ms)");
    }
}

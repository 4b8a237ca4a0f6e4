//! Warnings an outsider can trigger at will (failed handshakes, accept errors) are aggregated:
//! the first of a window in full, then one line with how many more there were, so a flood gives
//! a line or two per window whatever its rate. The metrics keep the exact counts.
use std::time::{Duration, Instant};

pub struct WarnEvery {
    window: Duration,
    started: Option<Instant>,
    suppressed: u64,
}

impl WarnEvery {
    pub fn new(window: Duration) -> Self {
        WarnEvery {
            window,
            started: None,
            suppressed: 0,
        }
    }

    /// Calls `emit` with a suffix (`""`, or `" (N more in the last 10 s)"`) when this
    /// occurrence should be logged; counts it otherwise.
    pub fn warn(&mut self, emit: impl FnOnce(&str)) {
        let now = Instant::now();
        match self.started {
            Some(t) if now.duration_since(t) < self.window => self.suppressed += 1,
            _ => {
                let more = match self.suppressed {
                    0 => String::new(),
                    n => format!(" ({n} more in the last {:?})", self.window),
                };
                self.started = Some(now);
                self.suppressed = 0;
                emit(&more);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

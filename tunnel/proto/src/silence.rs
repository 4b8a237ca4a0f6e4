//! One clock for the silence of every session a server holds.
//!
//! The server's keepalive ([`crate::keepalive::run_listening`]) pings a peer only once it has
//! been silent for a while. With a timer per session, 10,000 idle sessions meant 333 timer
//! wakeups a second, each a thread woken from `epoll_wait` apart from the PING arrivals: about
//! as many wakeups again as the PINGs themselves cause. Here one task scans every session's
//! [`LastHeard`] stamp once per tick (a load each, microseconds for 10,000) and wakes only the
//! sessions that have gone silent, which on a healthy fleet is none.
use std::{
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use crate::heard::LastHeard;

/// The sessions a server's keepalives listen on.
pub struct SilenceWatch {
    /// How long a session may be silent before its keepalive is woken.
    quiet_for: Duration,
    tick: Duration,
    /// Every stamp's base: one clock reading per scan.
    base: Instant,
    /// Held here too: a stamp only the watch holds belongs to a session that has ended.
    sessions: Mutex<Vec<Arc<LastHeard>>>,
    scanner: OnceLock<()>,
}

impl SilenceWatch {
    /// Wakes a session once it has been silent for `quiet_for`, at most `tick` late.
    pub fn new(quiet_for: Duration, tick: Duration) -> Arc<Self> {
        Arc::new(Self {
            quiet_for,
            tick: tick.max(Duration::from_millis(1)),
            base: Instant::now(),
            sessions: Mutex::default(),
            scanner: OnceLock::new(),
        })
    }

    /// The tick for keepalive `timeout`: a quarter of it (2.5 s by default). A session is
    /// woken at most that late, and its keepalive's threshold is that much shorter (see
    /// [`crate::keepalive::listening_quiet`]), so a dead peer is found as soon as before.
    pub fn tick_for(timeout: Duration) -> Duration {
        timeout / 4
    }

    /// A stamp for a new session, watched from now until the session drops it. Starts the
    /// scanning task on first use (on the caller's runtime); it ends once the watch is gone.
    pub fn watch(self: &Arc<Self>) -> Arc<LastHeard> {
        self.scanner.get_or_init(|| {
            let me = Arc::downgrade(self);
            tokio::spawn(async move {
                let Some(tick) = me.upgrade().map(|w| w.tick) else {
                    return;
                };
                let mut every = tokio::time::interval(tick);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let Some(w) = me.upgrade() else { return };
                    w.scan();
                }
            });
        });
        let heard = LastHeard::new(self.base);
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(heard.clone());
        heard
    }

    /// How many sessions are watched (ended ones leave at the next scan).
    pub fn len(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One pass: forgets ended sessions, wakes silent ones.
    fn scan(&self) {
        let mut silent = Vec::new();
        let now = self.base.elapsed();
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            // Two loads per session, both in the stamp's one allocation.
            sessions.retain(|h| {
                if Arc::strong_count(h) == 1 {
                    return false;
                }
                if h.silent_at(now) >= self.quiet_for {
                    silent.push(h.clone());
                }
                true
            });
        }
        // Woken outside the lock: a woken session may register or end at once.
        for h in silent {
            h.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_silent_session_is_woken_and_ended_ones_are_forgotten() {
        let quiet = Duration::from_millis(200);
        let w = SilenceWatch::new(quiet, Duration::from_millis(20));
        let talking = w.watch();
        let silent = w.watch();
        let ended = w.watch();
        drop(ended);
        // `talking` hears something every 50 ms, so it is never woken.
        let t = talking.clone();
        let chatter = tokio::spawn(async move {
            for _ in 0..20 {
                t.stamp();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let t0 = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(2), silent.until_silent(quiet))
            .await
            .expect("the silent session is woken");
        let took = t0.elapsed();
        assert!(took >= quiet, "woken after {took:?}, before its silence");
        assert!(
            tokio::time::timeout(Duration::from_millis(400), talking.until_silent(quiet))
                .await
                .is_err(),
            "a session that keeps hearing is not woken"
        );
        chatter.abort();
        assert_eq!(w.len(), 2, "the ended session is forgotten");
    }
}

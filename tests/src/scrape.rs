//! Reading a daemon's `/metrics` in tests: one sample's value, or waiting for one.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use crate::{Netns, tunnel_procs::http_get_in};

/// The value of the sample `series` (name and labels as printed) in a scrape.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes `at` (from `netns`) until `series` is `want`; returns how long that took. Panics
/// after `within`, showing the samples whose names start like `series`'s.
pub fn wait_sample(
    netns: &Netns,
    at: SocketAddr,
    series: &str,
    want: f64,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    let family = series
        .split(['{', '_'])
        .take(2)
        .collect::<Vec<_>>()
        .join("_");
    loop {
        let text = http_get_in(netns, at, "/metrics");
        if sample(&text, series) == Some(want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{series} is not {want} after {within:?}:\n{}",
            text.lines()
                .filter(|l| l.starts_with(&family))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

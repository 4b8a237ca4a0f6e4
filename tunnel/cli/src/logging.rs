//! One logging set-up for every binary: text for people, JSON for log pipelines.
//!
//! `RUST_LOG` takes `level` and `target=level` directives, comma separated (e.g.
//! `info,tunnel::server=debug`), default `info`. A directive list rather than tracing's
//! `EnvFilter`: that one's span and field matching needs a regex engine, a quarter of a
//! megabyte in the edge agent's binary for a feature nobody sets on a node.
use std::str::FromStr;

use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The filter `RUST_LOG` asks for; an unreadable value falls back to `info`, said on stderr.
pub fn filter() -> Targets {
    let info = Targets::new().with_default(tracing::Level::INFO);
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => Targets::from_str(&v).unwrap_or_else(|e| {
            eprintln!(
                "RUST_LOG={v:?} is not a list of `level` or `target=level` ({e}); logging at info"
            );
            info
        }),
        _ => info,
    }
}

/// Logs to stderr, filtered by `RUST_LOG`; colours only on a terminal.
pub fn init(format: LogFormat) {
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter());
    match format {
        LogFormat::Text => registry
            .with(fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
            .init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_directives_set_levels_per_target() {
        let t = Targets::from_str("warn,tunnel::server=debug").unwrap();
        assert!(t.would_enable("tunnel::server", &tracing::Level::DEBUG));
        assert!(!t.would_enable("tunnel_agent::session", &tracing::Level::INFO));
        assert!(t.would_enable("tunnel_agent::session", &tracing::Level::WARN));
    }
}

//! The kit every binary (redirector, tunnel, tunnel-agent) starts from, so that flags, logs and
//! signals behave the same in each.
//!
//! - [`logging`]: `--log-format text|json`, `RUST_LOG` filter defaulting to `info`.
//! - [`seconds`]: positive-seconds flags parsed once, into [`std::time::Duration`].
//! - [`process`]: SIGTERM/SIGINT as a cancellation token, the runtime, the open-file limit.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`; [`runtime_tasks`]: the tasks alive, on every
//!   `/metrics`.
//! - [`memory`]: freed memory handed back after a burst; [`heap`]: what the allocator holds, on
//!   every `/metrics`.
//! - [`linger`]: a close that does not destroy the last answer.
//! - [`accept`]: accept loops that back off on resource errors; [`warn_every`]: aggregated
//!   warnings for what outsiders can trigger.
pub mod accept;
pub mod heap;
pub mod http;
pub mod linger;
pub mod logging;
pub mod memory;
pub mod process;
pub mod runtime_tasks;
pub mod seconds;
pub mod warn_every;

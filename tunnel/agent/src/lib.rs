//! The edge agent: dials every tunnel server replica, proves its node identity with its client
//! certificate, serves HTTP/2 on the connection it dialled, and answers each CONNECT stream by
//! dialling its own node on an allow-listed port. It is not an open proxy.
//!
//! Its dependency closure has no aya, no eBPF build, and no kube unless built with the
//! `csr-api` feature, so it builds with a stable toolchain for every edge architecture.
//!
//! - [`run`]: the whole agent from its [`run::Settings`] (what `tunnel-agent` runs).
//! - [`session`]: sessions to every replica, rotation, the allow-listed local dial.
//! - [`pki`], [`enroll`], `csr_api`: certificates from files, a bootstrap token or the CSR API.
//! - [`metrics`]: the agent's Prometheus metrics; [`metrics_port`]: their port when two agents
//!   share a node, and `tunnel-agent probe`.
//! - [`resume`]: streams kept across a lost session, resumed on the next; [`handoff`]: open
//!   streams handed to a newer agent on the node (a rolling upgrade).
//! - [`connect`]: which streams it serves (CONNECT, its own node, allow-listed ports).
pub mod connect;
#[cfg(feature = "csr-api")]
pub mod csr_api;
pub mod enroll;
mod fd_pass;
pub mod handoff;
pub mod metrics;
pub mod metrics_port;
pub mod pki;
pub mod refused_cert;
pub mod resume;
pub mod run;
pub mod session;

pub use metrics::AgentMetrics;
pub use session::AgentConfig;

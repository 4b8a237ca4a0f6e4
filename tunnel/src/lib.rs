//! The tunnel server, on every master. The edge agent is its own crate (`tunnel-agent`), and
//! what both ends speak is `tunnel-proto`; this crate re-exports the protocol modules so that
//! the server's code reads as one.
//!
//! Data path: a redirected connection arrives at the server's ingress; its original
//! destination (asked of the kernel, [`orig_dst`]) carries the kernel's verdict, and maps to a node ID
//! through the routes of the node table snapshot the one follower hands out; the server opens
//! one HTTP/2 CONNECT stream on that node's session; the agent dials its own node on the
//! allow-listed port and relays.
//!
//! Identity: the node ID is the `urn:edge-redirector:node:<name>` URI SAN of the agent's client
//! certificate, verified against the cluster CA ([`identity`]); sessions are keyed by it, never
//! by IP.
//!
//! Modules: [`server`] (agent sessions, ingress, routing), [`run`] (the whole server from its
//! settings: listeners, PKI, node table, drain), [`pki`] (CA, tokens, enrollment endpoint, CSR
//! signer), [`metrics`].
pub mod admission;
pub mod audit;
pub mod metrics;
pub mod node_events;
pub mod orig_dst;
pub mod pki;
pub mod reach;
pub mod run;
pub mod server;

pub use tunnel_proto::{Error, Result, error, identity, keepalive, listen, relay, tls, wire};

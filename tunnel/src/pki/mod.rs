//! The cluster's tunnel PKI: a CA that creates itself on first start, single-use bootstrap
//! tokens, and the enrollment endpoint where an agent trades a token (or, to renew, its
//! current certificate) and a CSR for a certificate naming its node. The agent's private key
//! never leaves the node: only the CSR travels.
//!
//! Identity is one URI SAN, `urn:edge-redirector:node:<node-name>` ([`crate::identity`]); the
//! CA signs only CSRs asking for exactly that name, and only for the node the token (or the
//! current certificate) belongs to.
pub mod ca;
pub mod csr_api;
pub mod enroll;
pub mod enroll_limits;
pub mod material;
pub mod secret;
pub mod token;

//! How a node's identity is carried in its certificate, and read back from a verified chain.
//!
//! The node ID is a URI subject alternative name of the form
//! `urn:edge-redirector:node:<node-name>`, exactly one per certificate. The server reads it
//! only from a chain rustls has already verified against the cluster CA; nothing the agent
//! says on the wire can change it.
use std::time::Duration;

use rcgen::{CertificateParams, DnType, KeyPair, SanType};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

use crate::error::{Error, Result};

/// Prefix of the URI SAN that names the node.
pub const NODE_URI_PREFIX: &str = "urn:edge-redirector:node:";

/// The URI SAN for a node name.
pub fn node_uri(node: &str) -> String {
    format!("{NODE_URI_PREFIX}{node}")
}

/// Reads the node ID from an end-entity certificate (DER).
/// When a certificate expires (None: unparsable, which the handshake would have refused).
pub fn not_after(der: &[u8]) -> Option<std::time::SystemTime> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

pub fn node_id_from_cert(der: &[u8]) -> Result<String> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| Error::Identity(format!("unparsable client certificate: {e}")))?;
    let mut ids = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && let Some(id) = uri.strip_prefix(NODE_URI_PREFIX)
            {
                ids.push(id.to_owned());
            }
        }
    }
    match ids.as_slice() {
        [id] if valid_node_name(id) => Ok(id.clone()),
        [id] => Err(Error::Identity(format!(
            "certificate names node {id:?}, which is not a valid node name"
        ))),
        [] => Err(Error::Identity(format!(
            "certificate (subject {}) has no URI SAN {NODE_URI_PREFIX}<node>; issue agent certificates with the node's name there",
            cert.subject()
        ))),
        many => Err(Error::Identity(format!(
            "certificate names several nodes {many:?}; exactly one is allowed"
        ))),
    }
}

pub use edge_model::names::valid_node_name;

/// The signer agents name in Kubernetes CSRs; no built-in signer acts on it, the tunnel
/// server's `--csr-signer` does.
pub const CSR_SIGNER: &str = "edge-redirector.io/tunnel-agent";

/// An agent certificate's subject: a common name for people, and the one URI SAN that is the
/// node's identity.
pub fn agent_params(node: &str) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    p.distinguished_name
        .push(DnType::CommonName, format!("edge-redirector agent {node}"));
    let uri = node_uri(node)
        .try_into()
        .map_err(|_| Error::Identity(format!("{node:?} is not a valid node name")))?;
    p.subject_alt_names = vec![SanType::URI(uri)];
    Ok(p)
}

/// A new key and a CSR for `node` (what an agent sends; the key stays with it).
pub fn node_csr(node: &str) -> Result<(String, String)> {
    let p = agent_params(node)?;
    let key = KeyPair::generate().map_err(tls_err)?;
    let csr = p.serialize_request(&key).map_err(tls_err)?;
    Ok((csr.pem().map_err(tls_err)?, key.serialize_pem()))
}

/// Issued certificates start this long before issuance: clocks of edge nodes drift.
pub const BACKDATE: Duration = Duration::from_secs(300);

fn tls_err(e: rcgen::Error) -> Error {
    Error::TlsConfig(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert_with(uris: &[&str]) -> Vec<u8> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        for u in uris {
            p.subject_alt_names
                .push(SanType::URI((*u).try_into().unwrap()));
        }
        p.self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn reads_exactly_one_node_uri() {
        assert_eq!(
            node_id_from_cert(&cert_with(&["urn:edge-redirector:node:edge-a"])).unwrap(),
            "edge-a"
        );
        // Other URIs are ignored.
        let other = cert_with(&["spiffe://cluster/ns/x", "urn:edge-redirector:node:edge-b"]);
        assert_eq!(node_id_from_cert(&other).unwrap(), "edge-b");
    }

    #[test]
    fn missing_several_or_invalid_identities_are_refused_with_the_reason() {
        let cases: [(&[&str], &str); 3] = [
            (&[], "has no URI SAN urn:edge-redirector:node:<node>"),
            (
                &["urn:edge-redirector:node:a", "urn:edge-redirector:node:b"],
                "names several nodes",
            ),
            (
                &["urn:edge-redirector:node:Edge_A"],
                "not a valid node name",
            ),
        ];
        for (uris, reason) in cases {
            let e = node_id_from_cert(&cert_with(uris)).unwrap_err().to_string();
            assert!(e.contains(reason), "{uris:?}: {e}");
        }
    }

    #[test]
    fn every_prefix_of_a_valid_certificate_is_an_error_not_a_panic() {
        let der = cert_with(&["urn:edge-redirector:node:edge-a"]);
        for n in 0..der.len() {
            assert!(
                node_id_from_cert(&der[..n]).is_err(),
                "prefix of {n} bytes accepted"
            );
        }
        // And garbage of every length.
        for n in 0..64 {
            assert!(node_id_from_cert(&vec![0x30; n]).is_err());
        }
    }
}

//! The tunnel CA: created on first start if absent, kept as files (mode 0600) or in a
//! Kubernetes Secret. Rotation keeps the previous CA beside the current one: both are trusted
//! (the overlap), new agent certificates come from the current one, and the servers' own
//! certificate from the oldest one present, which every agent already trusts. Finishing the
//! rotation removes the previous CA.
use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use tunnel_proto::identity::{BACKDATE, agent_params};
pub use tunnel_proto::{files::write_private, identity::node_csr};

use crate::{
    error::{Error, Result},
    identity,
};

/// A CA certificate with its signing key.
pub struct Authority {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    /// A new self-signed CA, valid for `lifetime`.
    pub fn generate(common_name: &str, lifetime: Duration) -> Result<(Self, String)> {
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
        p.distinguished_name.push(DnType::CommonName, common_name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(5);
        p.not_after = now + lifetime;
        let key = KeyPair::generate().map_err(tls_err)?;
        let cert = p.self_signed(&key).map_err(tls_err)?;
        let key_pem = key.serialize_pem();
        Ok((
            Self {
                cert_pem: cert.pem(),
                issuer: Issuer::new(p, key),
            },
            key_pem,
        ))
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| Error::TlsConfig(format!("CA private key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| Error::TlsConfig(format!("CA certificate: {e}")))?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// The servers' certificate and key: every name and address agents dial (IPs become IP
    /// SANs).
    pub fn issue_server(&self, names: &[String], lifetime: Duration) -> Result<(String, String)> {
        if names.is_empty() {
            return Err(Error::TlsConfig(
                "no server names: pass --server-names with every name and address agents dial"
                    .into(),
            ));
        }
        let mut p = CertificateParams::new(names.to_vec()).map_err(tls_err)?;
        p.distinguished_name
            .push(DnType::CommonName, "edge-redirector tunnel server");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut p, lifetime);
        let key = KeyPair::generate().map_err(tls_err)?;
        let cert = p.signed_by(&key, &self.issuer).map_err(tls_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs an agent's CSR, which must ask for exactly the identity of `node` and nothing
    /// else; the certificate carries only that identity, whatever else the CSR asked for.
    pub fn sign_node_csr(&self, csr_pem: &str, node: &str, lifetime: Duration) -> Result<String> {
        let node_in_csr = csr_node(csr_pem)?;
        if node_in_csr != node {
            return Err(Error::Identity(format!(
                "the CSR asks for node {node_in_csr:?}, but the credential presented belongs to node {node:?}; an agent can only enroll as its own node"
            )));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Error::Identity(format!("malformed CSR: {e}")))?;
        let mut p = agent_params(node)?;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut p, lifetime);
        let signed = CertificateSigningRequestParams {
            params: p,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(tls_err)?;
        Ok(signed.pem())
    }
}

/// The node a CSR asks for: its one `urn:edge-redirector:node:` URI SAN.
pub fn csr_node(csr_pem: &str) -> Result<String> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        Error::Identity(format!(
            "malformed CSR ({e}); expected a PEM CERTIFICATE REQUEST signed by the agent's key"
        ))
    })?;
    let mut nodes = Vec::new();
    for san in &csr.params.subject_alt_names {
        match san {
            SanType::URI(u) => match u.as_str().strip_prefix(identity::NODE_URI_PREFIX) {
                Some(n) => nodes.push(n.to_owned()),
                None => {
                    return Err(Error::Identity(format!(
                        "the CSR asks for URI {:?}; only {}<node> is signed",
                        u.as_str(),
                        identity::NODE_URI_PREFIX
                    )));
                }
            },
            other => {
                return Err(Error::Identity(format!(
                    "the CSR asks for {other:?}; agent certificates carry only the node identity"
                )));
            }
        }
    }
    match nodes.as_slice() {
        [n] if identity::valid_node_name(n) => Ok(n.clone()),
        [n] => Err(Error::Identity(format!(
            "the CSR names {n:?}, not a valid node name"
        ))),
        [] => Err(Error::Identity(format!(
            "the CSR has no URI SAN {}<node>",
            identity::NODE_URI_PREFIX
        ))),
        many => Err(Error::Identity(format!(
            "the CSR names several nodes {many:?}"
        ))),
    }
}

fn validity(p: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    p.not_before = now - BACKDATE;
    p.not_after = now + lifetime;
}

fn tls_err(e: rcgen::Error) -> Error {
    Error::TlsConfig(e.to_string())
}

/// The CA files of embedded mode: `ca.crt`/`ca.key` (current) and, during a rotation,
/// `ca-previous.crt`/`ca-previous.key`.
pub struct CaDir {
    pub dir: PathBuf,
}

/// A CA's validity: long; rotation is explicit (`tunnel ca rotate`).
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl CaDir {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates the current CA if there is none; returns whether it did.
    pub fn ensure(&self) -> Result<bool> {
        if self.path("ca.crt").exists() {
            return Ok(false);
        }
        fs::create_dir_all(&self.dir)
            .map_err(|e| Error::io(format!("creating CA directory {}", self.dir.display()), e))?;
        let (ca, key) = Authority::generate("edge-redirector tunnel CA", CA_LIFETIME)?;
        // The key first: a crash in between leaves no certificate without its key.
        write_private(&self.path("ca.key"), &key)?;
        write_private(&self.path("ca.crt"), &ca.cert_pem)?;
        Ok(true)
    }

    fn load(&self, stem: &str) -> Result<Option<Authority>> {
        let crt = self.path(&format!("{stem}.crt"));
        if !crt.exists() {
            return Ok(None);
        }
        let read = |p: &Path| {
            fs::read_to_string(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))
        };
        Ok(Some(Authority::from_pem(
            &read(&crt)?,
            &read(&self.path(&format!("{stem}.key")))?,
        )?))
    }

    /// The CA that signs agent certificates.
    pub fn current(&self) -> Result<Authority> {
        self.load("ca")?.ok_or_else(|| {
            Error::TlsConfig(format!(
                "no CA in {}: start the server with --ca-dir to create one",
                self.dir.display()
            ))
        })
    }

    /// The CA that signs the servers' certificate: the previous one during a rotation (every
    /// agent trusts it), else the current one.
    pub fn for_server(&self) -> Result<Authority> {
        match self.load("ca-previous")? {
            Some(a) => Ok(a),
            None => self.current(),
        }
    }

    /// Every trusted CA certificate (current, and previous during a rotation), PEM.
    pub fn bundle(&self) -> Result<String> {
        let mut out = self.current()?.cert_pem;
        if let Some(prev) = self.load("ca-previous")? {
            out.push_str(&prev.cert_pem);
        }
        Ok(out)
    }

    /// Starts a rotation: the current CA becomes the previous one (still trusted), a new one
    /// becomes current.
    pub fn rotate(&self) -> Result<()> {
        if self.path("ca-previous.crt").exists() {
            return Err(Error::TlsConfig(
                "a rotation is already in progress: finish it first (`tunnel ca finish-rotation`) once every agent has renewed".into(),
            ));
        }
        let mv = |a: &str, b: &str| {
            fs::rename(self.path(a), self.path(b))
                .map_err(|e| Error::io(format!("renaming {a} to {b}"), e))
        };
        mv("ca.key", "ca-previous.key")?;
        mv("ca.crt", "ca-previous.crt")?;
        self.ensure().map(drop)
    }

    /// Ends a rotation: the previous CA is no longer trusted.
    pub fn finish_rotation(&self) -> Result<()> {
        for f in ["ca-previous.crt", "ca-previous.key"] {
            match fs::remove_file(self.path(f)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("removing {f}"), e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn signs_only_the_nodes_own_identity() {
        let (ca, _) = Authority::generate("test CA", DAY).unwrap();
        let (csr, _key) = node_csr("edge-a").unwrap();
        assert_eq!(csr_node(&csr).unwrap(), "edge-a");
        let cert = ca.sign_node_csr(&csr, "edge-a", DAY).unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes());
        use rustls_pki_types::pem::PemObject;
        assert_eq!(
            identity::node_id_from_cert(&der.unwrap()).unwrap(),
            "edge-a"
        );
        let e = ca
            .sign_node_csr(&csr, "edge-b", DAY)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("asks for node \"edge-a\"") && e.contains("belongs to node \"edge-b\""),
            "{e}"
        );
        assert!(
            csr_node("garbage")
                .unwrap_err()
                .to_string()
                .contains("malformed CSR")
        );
        // A CSR asking for a DNS name too is refused.
        let mut p = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        p.subject_alt_names.push(SanType::URI(
            identity::node_uri("edge-a").try_into().unwrap(),
        ));
        let k = KeyPair::generate().unwrap();
        let bad = p.serialize_request(&k).unwrap().pem().unwrap();
        assert!(
            csr_node(&bad)
                .unwrap_err()
                .to_string()
                .contains("only the node identity")
        );
    }

    #[test]
    fn ca_dir_creates_once_with_private_files_and_rotates_with_overlap() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ca-dir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let d = CaDir::new(&dir);
        assert!(d.ensure().unwrap());
        assert!(!d.ensure().unwrap(), "created once");
        for f in ["ca.crt", "ca.key"] {
            let mode = fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let first = d.current().unwrap().cert_pem;
        d.rotate().unwrap();
        assert_ne!(d.current().unwrap().cert_pem, first);
        assert_eq!(
            d.for_server().unwrap().cert_pem,
            first,
            "servers keep the old CA during the overlap"
        );
        assert_eq!(d.bundle().unwrap().matches("BEGIN CERTIFICATE").count(), 2);
        assert!(
            d.rotate()
                .unwrap_err()
                .to_string()
                .contains("already in progress")
        );
        d.finish_rotation().unwrap();
        assert_eq!(d.bundle().unwrap().matches("BEGIN CERTIFICATE").count(), 1);
        assert_ne!(d.for_server().unwrap().cert_pem, first);
        fs::remove_dir_all(&dir).unwrap();
    }
}

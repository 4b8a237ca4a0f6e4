//! A cluster CA and certificates written as PEM files, for tests that start the real tunnel
//! binaries. The node identity goes in the URI SAN the tunnel documents.
use std::{
    fs,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

pub struct TestPki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    pub ca_pem: PathBuf,
}

/// (certificate, key) PEM paths.
pub type Pair = (PathBuf, PathBuf);

impl TestPki {
    pub fn new(dir: &Path) -> Self {
        Self::named(dir, "ca", "test cluster CA")
    }

    /// A CA of its own, written to `<dir>/<file>.pem` (e.g. a kubelet serving CA beside the
    /// tunnel's).
    pub fn named(dir: &Path, file: &str, common_name: &str) -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, common_name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let ca_pem = dir.join(format!("{file}.pem"));
        fs::write(&ca_pem, cert.pem()).unwrap();
        TestPki {
            dir: dir.to_owned(),
            issuer: Issuer::new(p, key),
            ca_pem,
        }
    }

    fn write(&self, name: &str, p: CertificateParams) -> Pair {
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}-key.pem")),
        );
        fs::write(&c, cert.pem()).unwrap();
        fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    /// The servers' certificate, for the name agents verify.
    pub fn server(&self, dns_name: &str) -> Pair {
        self.write(
            "server",
            CertificateParams::new(vec![dns_name.to_owned()]).unwrap(),
        )
    }

    /// A serving certificate for DNS names and IP addresses (each SAN parsed as an IP if it is
    /// one), written as `<file>.pem`.
    pub fn serving(&self, file: &str, sans: &[String]) -> Pair {
        self.write(file, CertificateParams::new(sans.to_vec()).unwrap())
    }

    /// A client certificate with common name `cn`, written as `<file>.pem`.
    pub fn client(&self, file: &str, cn: &str) -> Pair {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        self.write(file, p)
    }

    /// An agent certificate naming `node`.
    pub fn agent(&self, node: &str) -> Pair {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, format!("agent {node}"));
        p.subject_alt_names.push(SanType::URI(
            format!("urn:edge-redirector:node:{node}")
                .try_into()
                .unwrap(),
        ));
        self.write(&format!("agent-{node}"), p)
    }
}

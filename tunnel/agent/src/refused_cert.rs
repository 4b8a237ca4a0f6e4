//! What to tell the operator when a server refuses this agent's certificate. TLS 1.3 sends the
//! refusal after the client thinks the handshake is done, as a bare alert: a certificate from
//! another CA with the same subject as the cluster CA (what two runs of a make-certs script
//! give) shows up as `DecryptError`, the server having failed to check the signature, which
//! says nothing about certificates to someone reading the agent's log.
use rustls::AlertDescription as A;

/// The alert a server sent, if `e` is one.
fn alert(e: &std::io::Error) -> Option<A> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// A hint for an alert that means the server refused our certificate, or "".
pub fn hint(e: &std::io::Error) -> &'static str {
    match alert(e) {
        Some(
            A::DecryptError
            | A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::AccessDenied,
        ) => {
            "; the server refused this agent's certificate: it must be signed by the CA the servers trust (the server's --ca, or ca.crt in its --ca-dir; a different CA with the same name shows as DecryptError). Check with `openssl verify -CAfile <the servers' CA> <this agent's certificate>`"
        }
        Some(A::CertificateExpired) => {
            "; the server says this agent's certificate has expired: renew it (an enrolled agent renews at two thirds of its lifetime; check the node's clock too)"
        }
        Some(A::CertificateRequired) => {
            "; the server requires a client certificate: give --cert and --key, or enroll"
        }
        _ => "",
    }
}

/// [`hint`] for an h2 error that carries an I/O error.
pub fn hint_h2(e: &h2::Error) -> &'static str {
    e.get_io().map_or("", hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_certificate_says_what_to_check() {
        let e = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(A::DecryptError),
        );
        assert!(hint(&e).contains("refused this agent's certificate"));
        let other = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(A::HandshakeFailure),
        );
        assert_eq!(hint(&other), "");
        assert_eq!(hint(&std::io::Error::other("plain")), "");
    }
}

//! Enrollment request handling, as the endpoint calls it after reading a request: any path,
//! bearer token and body never panic, and without a valid token or a client certificate
//! nothing is ever issued.
#![no_main]
use std::{sync::OnceLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use tunnel::pki::{ca::CaDir, enroll::Enroller, token::TokenStore};

fn enroller() -> &'static Enroller {
    static E: OnceLock<Enroller> = OnceLock::new();
    E.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("enroll-fuzz-{}", std::process::id()));
        let ca = CaDir::new(&d.join("ca"));
        ca.ensure().unwrap();
        Enroller {
            ca,
            tokens: TokenStore::new(&d.join("tokens")),
            lifetime: Duration::from_secs(3600),
        }
    })
}

fuzz_target!(|input: &str| {
    // `path` NUL `bearer` NUL `body`.
    let mut parts = input.splitn(3, '\0');
    let (path, bearer, body) = (
        parts.next().unwrap_or(""),
        parts.next(),
        parts.next().unwrap_or(""),
    );
    let r = enroller().handle(path, bearer, None, body);
    assert!(
        r.is_err(),
        "issued without a token or a certificate: {path:?} {bearer:?}"
    );
});

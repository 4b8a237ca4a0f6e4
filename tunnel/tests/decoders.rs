//! Property tests of the tunnel's decoders of untrusted input: certificates (before and apart
//! from chain verification), bootstrap tokens and the token store file. Arbitrary input never
//! panics, is refused with a reason, and leaves the decoder serving valid input.
use std::time::Duration;

use proptest::prelude::*;
use tunnel::{
    identity::node_id_from_cert,
    pki::token::{TokenError, TokenStore},
};

/// A real agent certificate (DER) naming `node` in its URI SAN.
fn agent_cert(node: &str) -> Vec<u8> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        tunnel::identity::node_uri(node).try_into().unwrap(),
    )];
    let key = rcgen::KeyPair::generate().unwrap();
    p.self_signed(&key).unwrap().der().to_vec()
}

fn temp_store(tag: &str) -> (std::path::PathBuf, TokenStore) {
    let dir = std::env::temp_dir().join(format!("decoders-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = TokenStore::new(&dir.join("tokens"));
    (dir, store)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn arbitrary_bytes_are_not_a_certificate(der in prop::collection::vec(any::<u8>(), 0..600)) {
        prop_assert!(node_id_from_cert(&der).is_err());
    }

    #[test]
    fn a_damaged_certificate_never_panics_nor_names_an_invalid_node(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut der = CERT.with(|c| c.clone());
        for (at, x) in flips {
            let i = at.index(der.len());
            der[i] ^= x;
        }
        if truncate {
            der.truncate(cut.index(der.len()));
        }
        if let Ok(node) = node_id_from_cert(&der) {
            prop_assert!(tunnel::identity::valid_node_name(&node), "{:?}", node);
        }
    }
}

thread_local! {
    static CERT: Vec<u8> = agent_cert("edge-a");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn a_bad_token_is_refused_and_the_good_one_still_works(token in "\\PC{0,48}|[0-9a-f]{8}\\.[0-9a-f]{32}") {
        let (dir, store) = temp_store("token");
        let good = store.create("edge-a", Duration::from_secs(600)).unwrap();
        prop_assume!(token != good);
        let r = store.redeem(&token, "edge-a");
        prop_assert!(
            matches!(r, Err(TokenError::Malformed) | Err(TokenError::Unknown(_))),
            "{:?} -> {:?}", token, r
        );
        prop_assert_eq!(store.redeem(&good, "edge-a"), Ok("edge-a".to_owned()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_garbled_store_line_is_an_error_naming_it(line in "[ -~]{1,60}") {
        let (dir, store) = temp_store("store");
        let good = store.create("edge-a", Duration::from_secs(600)).unwrap();
        let path = dir.join("tokens");
        let text = std::fs::read_to_string(&path).unwrap();
        let n = text.lines().count() + 1;
        std::fs::write(&path, format!("{text}{line}\n")).unwrap();
        match store.redeem(&good, "edge-a") {
            // The line happened to be a well-formed entry (or a comment or blank).
            Ok(node) => prop_assert_eq!(node, "edge-a"),
            Err(TokenError::Store(msg)) => {
                prop_assert!(msg.contains(&format!("tokens:{n}:")), "{}", msg)
            }
            Err(e) => prop_assert!(false, "unexpected {:?}", e),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn a_used_flag_garbled_by_hand_does_not_revive_a_token() {
    let (dir, store) = temp_store("revive");
    let t = store.create("edge-a", Duration::from_secs(600)).unwrap();
    assert_eq!(store.redeem(&t, "edge-a").unwrap(), "edge-a");
    let path = dir.join("tokens");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.trim_end().ends_with(" 1"), "{text}");
    std::fs::write(
        &path,
        format!("{}true\n", text.trim_end().strip_suffix('1').unwrap()),
    )
    .unwrap();
    assert!(matches!(
        store.redeem(&t, "edge-a"),
        Err(TokenError::Store(_))
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

mod enrollment {
    use std::{sync::OnceLock, time::Duration};

    use proptest::prelude::*;
    use rustls_pki_types::pem::PemObject;
    use tunnel::{
        identity::node_id_from_cert,
        pki::{
            ca::{CaDir, node_csr},
            enroll::Enroller,
            token::TokenStore,
        },
    };

    /// One CA and token store for all cases (creating a CA per case would dominate the run).
    fn enroller() -> &'static Enroller {
        static E: OnceLock<Enroller> = OnceLock::new();
        E.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("decoders-enroll-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let ca = CaDir::new(&dir.join("ca"));
            ca.ensure().unwrap();
            Enroller {
                ca,
                tokens: TokenStore::new(&dir.join("tokens")),
                lifetime: Duration::from_secs(3600),
            }
        })
    }

    fn csr() -> &'static str {
        static C: OnceLock<String> = OnceLock::new();
        C.get_or_init(|| node_csr("edge-a").unwrap().0)
    }

    /// The PEM with base64 characters of its body replaced: a CSR whose bytes are damaged.
    fn damaged(pem: &str, edits: &[(prop::sample::Index, u8)]) -> String {
        const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut lines: Vec<Vec<u8>> = pem.lines().map(|l| l.as_bytes().to_vec()).collect();
        let body = lines.len() - 2;
        for (at, c) in edits {
            let i = at.index(body * 64);
            let line = &mut lines[1 + (i / 64).min(body - 1)];
            let j = (i % 64).min(line.len() - 1);
            line[j] = B64[usize::from(*c) % 64];
        }
        lines
            .into_iter()
            .map(|l| String::from_utf8(l).unwrap() + "\n")
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Garbage in any field is refused with a 4xx and a reason, never a panic.
        #[test]
        fn garbage_requests_are_refused_with_a_reason(
            path in prop_oneof![Just("/v1/enroll".to_owned()), Just("/v1/renew".to_owned()), "\\PC{0,12}"],
            bearer in proptest::option::of("\\PC{0,48}"),
            body in "\\PC{0,200}",
        ) {
            let e = enroller();
            let r = e.handle(&path, bearer.as_deref(), None, &body);
            let (status, why) = r.expect_err("garbage was accepted");
            prop_assert!(status.is_client_error(), "{} {}", status, why);
            prop_assert!(!why.is_empty());
        }

        /// A damaged CSR with a valid token: refused, or a certificate for the token's node
        /// and no other.
        #[test]
        fn a_damaged_csr_never_gets_another_nodes_certificate(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let e = enroller();
            let token = e.tokens.create("edge-a", Duration::from_secs(600)).unwrap();
            match e.handle("/v1/enroll", Some(&token), None, &damaged(csr(), &edits)) {
                Ok(json) => {
                    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
                    let pem = v["certificate"].as_str().unwrap();
                    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
                    prop_assert_eq!(node_id_from_cert(&der).unwrap(), "edge-a");
                }
                Err((status, why)) => prop_assert!(status.is_client_error(), "{} {}", status, why),
            }
        }
    }
}

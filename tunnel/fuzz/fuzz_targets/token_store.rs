//! The bootstrap token store (a file the server and `tunnel token create` rewrite): whatever
//! the file holds, checking a token and creating one never panic; a store that reads creates
//! a token that then checks out, and a store that does not read refuses to be rewritten.
#![no_main]
use std::{sync::OnceLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use tunnel::pki::token::TokenStore;

fn dir() -> &'static std::path::Path {
    static D: OnceLock<std::path::PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        };
        let d = std::path::PathBuf::from(format!("{base}/token-store-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let path = dir().join("tokens");
    std::fs::write(&path, data).unwrap();
    let store = TokenStore::new(&path);
    let probe = format!("0123abcd.{}", "0".repeat(32));
    let read = store.check(&probe, "edge-a");
    match store.create("edge-a", Duration::from_secs(600)) {
        Ok(token) => {
            assert_eq!(store.check(&token, "edge-a").as_deref(), Ok("edge-a"));
            assert_eq!(store.redeem(&token, "edge-a").as_deref(), Ok("edge-a"));
            assert!(
                store.check(&token, "edge-a").is_err(),
                "a redeemed token is used up"
            );
        }
        Err(e) => {
            // Only an unreadable store refuses a new token, and it is left as it was.
            assert!(read.is_err(), "create failed ({e}) on a store that reads");
            assert_eq!(
                std::fs::read(&path).unwrap(),
                data,
                "a refused store was rewritten"
            );
        }
    }
});

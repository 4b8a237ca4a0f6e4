//! Bootstrap tokens: single-use, time-limited, scoped to one node, stored hashed.
//!
//! A token is `<id>.<secret>` (8 and 32 hex digits). The store (a file, one token per line:
//! `<id> <sha256(secret)> <node> <expires> <used>`) never holds a secret, so reading it
//! grants nothing. Redeeming checks node, expiry and single use under an exclusive lock and
//! marks the token used in the same step.
use std::{
    fs::File,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sha2::{Digest, Sha256};

use crate::{error::Error, pki::ca::write_private};

/// Why a token was refused; each says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed bootstrap token: expected <id>.<secret> as `tunnel token create` prints it")]
    Malformed,
    #[error(
        "bootstrap token {0} is unknown (or its secret is wrong): create one with `tunnel token create --node <node>`"
    )]
    Unknown(String),
    #[error("bootstrap token {0} was already used; tokens are single-use: create a new one")]
    Used(String),
    #[error("bootstrap token {id} expired {ago} s ago: create a new one")]
    Expired { id: String, ago: u64 },
    #[error(
        "bootstrap token {id} is for node {token_node:?}, but the CSR asks for node {csr_node:?}; a token enrolls only its own node"
    )]
    WrongNode {
        id: String,
        token_node: String,
        csr_node: String,
    },
    #[error("token store: {0}")]
    Store(String),
}

pub struct TokenStore {
    path: PathBuf,
}

#[derive(Debug, Clone)]
struct Entry {
    id: String,
    hash: String,
    node: String,
    expires: u64,
    used: bool,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hash(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

impl TokenStore {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    fn lock(&self) -> Result<File, TokenError> {
        edge_model::lock::lock_beside(&self.path).map_err(|e| TokenError::Store(e.to_string()))
    }

    fn read(&self) -> Result<Vec<Entry>, TokenError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(TokenError::Store(format!("{}: {e}", self.path.display()))),
        };
        let mut v = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            // Strict: a garbled expiry or used flag must not quietly revive a token.
            let entry = match f.as_slice() {
                [id, hash, node, expires, used @ ("0" | "1")] => {
                    expires.parse().ok().map(|expires| Entry {
                        id: id.to_string(),
                        hash: hash.to_string(),
                        node: node.to_string(),
                        expires,
                        used: *used == "1",
                    })
                }
                _ => None,
            };
            let Some(entry) = entry else {
                return Err(TokenError::Store(format!(
                    "{}:{}: expected `<id> <sha256> <node> <expires-unix> <0|1>`; fix or delete the line (tokens are recreated with `tunnel token create`)",
                    self.path.display(),
                    i + 1
                )));
            };
            v.push(entry);
        }
        Ok(v)
    }

    fn write(&self, entries: &[Entry]) -> Result<(), TokenError> {
        let mut text = String::from(
            "# bootstrap tokens: <id> <sha256(secret)> <node> <expires-unix> <used>\n",
        );
        for e in entries {
            text.push_str(&format!(
                "{} {} {} {} {}\n",
                e.id,
                e.hash,
                e.node,
                e.expires,
                u8::from(e.used)
            ));
        }
        write_private(&self.path, &text).map_err(|e: Error| TokenError::Store(e.to_string()))
    }

    /// A new token for `node`, valid for `ttl`. Expired and used tokens are dropped.
    pub fn create(&self, node: &str, ttl: Duration) -> Result<String, TokenError> {
        let _lock = self.lock()?;
        let t = now();
        let mut entries: Vec<Entry> = self
            .read()?
            .into_iter()
            .filter(|e| !e.used && e.expires > t)
            .collect();
        let (id, secret) = (random_hex(4), random_hex(16));
        entries.push(Entry {
            id: id.clone(),
            hash: hash(&secret),
            node: node.to_owned(),
            expires: t + ttl.as_secs(),
            used: false,
        });
        self.write(&entries)?;
        Ok(format!("{id}.{secret}"))
    }

    /// Checks `token` for `csr_node` without using it up: a request can still fail after this
    /// (its CSR refused), and a failed request must leave the token as it was.
    pub fn check(&self, token: &str, csr_node: &str) -> Result<String, TokenError> {
        let _lock = self.lock()?;
        let entries = self.read()?;
        valid(&entries, token, csr_node).map(|i| entries[i].node.clone())
    }

    /// Checks `token` for `csr_node` and marks it used; the node it enrolls. Only a valid
    /// token rewrites the store.
    pub fn redeem(&self, token: &str, csr_node: &str) -> Result<String, TokenError> {
        let _lock = self.lock()?;
        let mut entries = self.read()?;
        let i = valid(&entries, token, csr_node)?;
        entries[i].used = true;
        let node = entries[i].node.clone();
        self.write(&entries)?;
        Ok(node)
    }
}

/// The index of `token`'s entry if it may enroll `csr_node`, or why not.
fn valid(entries: &[Entry], token: &str, csr_node: &str) -> Result<usize, TokenError> {
    let (id, secret) = token.trim().split_once('.').ok_or(TokenError::Malformed)?;
    if id.len() != 8 || secret.len() != 32 {
        return Err(TokenError::Malformed);
    }
    let i = entries
        .iter()
        .position(|e| e.id == id && e.hash == hash(secret))
        .ok_or_else(|| TokenError::Unknown(id.to_owned()))?;
    let e = &entries[i];
    if e.used {
        return Err(TokenError::Used(id.to_owned()));
    }
    let t = now();
    if e.expires <= t {
        return Err(TokenError::Expired {
            id: id.to_owned(),
            ago: t - e.expires,
        });
    }
    if e.node != csr_node {
        return Err(TokenError::WrongNode {
            id: id.to_owned(),
            token_node: e.node.clone(),
            csr_node: csr_node.to_owned(),
        });
    }
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_use_scoped_time_limited_and_stored_hashed() {
        let dir = std::env::temp_dir().join(format!("tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let s = TokenStore::new(&dir.join("tokens"));
        let t = s.create("edge-a", Duration::from_secs(600)).unwrap();
        let stored = std::fs::read_to_string(dir.join("tokens")).unwrap();
        assert!(
            !stored.contains(t.split_once('.').unwrap().1),
            "the secret is not stored"
        );
        let id = t.split_once('.').unwrap().0.to_owned();
        assert!(matches!(
            s.redeem(&t, "edge-b"),
            Err(TokenError::WrongNode { .. })
        ));
        assert_eq!(s.redeem(&t, "edge-a").unwrap(), "edge-a");
        assert_eq!(s.redeem(&t, "edge-a"), Err(TokenError::Used(id.clone())));
        assert_eq!(
            s.redeem(&format!("{id}.{}", "0".repeat(32)), "edge-a"),
            Err(TokenError::Unknown(id))
        );
        assert_eq!(s.redeem("nonsense", "edge-a"), Err(TokenError::Malformed));
        let old = s.create("edge-c", Duration::ZERO).unwrap();
        assert!(matches!(
            s.redeem(&old, "edge-c"),
            Err(TokenError::Expired { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

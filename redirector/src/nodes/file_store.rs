//! Embedded mode's allocation store: a local file, written whole (temporary file + rename)
//! with a generation number in its first line, or grown by one appended line for one new
//! node. Its version is the generation and the length (`<generation>+<bytes>`), compared and
//! swapped under an exclusive `flock` on a lock file beside it, so allocators in several
//! processes stay consistent.
use std::{
    fs::File,
    io::{ErrorKind, Read, Write},
    net::IpAddr,
    path::{Path, PathBuf},
};

use super::{
    error::{Result, SyncError},
    pool::Allocations,
    store::{AllocationStore, Saved, parse, render},
};

pub struct FileStore {
    path: PathBuf,
}

const GENERATION: &str = "# generation ";

impl FileStore {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    /// An exclusive lock held until the returned file is dropped.
    fn lock(&self) -> Result<File> {
        edge_model::lock::lock_beside(&self.path)
            .map_err(|e| SyncError::io(format!("locking beside {}", self.path.display()), e))
    }

    fn read(&self) -> Result<(Allocations, String)> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Ok((Allocations::new(), String::new()));
            }
            Err(e) => return Err(SyncError::io(format!("reading {}", self.path.display()), e)),
        };
        let version = version_of(&text, text.len() as u64);
        Ok((parse(&text, &self.path.display().to_string())?, version))
    }

    /// The stored version from the first line and the length only (no parse of the rest).
    fn version(&self) -> Result<String> {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(String::new()),
            Err(e) => return Err(SyncError::io(format!("reading {}", self.path.display()), e)),
        };
        let mut head = [0u8; 64];
        let n = f
            .read(&mut head)
            .and_then(|n| f.metadata().map(|m| (n, m.len())));
        let (n, len) =
            n.map_err(|e| SyncError::io(format!("reading {}", self.path.display()), e))?;
        Ok(version_of(&String::from_utf8_lossy(&head[..n]), len))
    }
}

fn version_of(text: &str, len: u64) -> String {
    let generation = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix(GENERATION))
        .unwrap_or("0");
    format!("{}+{len}", generation.trim())
}

impl AllocationStore for FileStore {
    async fn load(&self) -> Result<(Allocations, String)> {
        let _lock = self.lock()?;
        self.read()
    }

    async fn save(&self, allocations: &Allocations, version: &str) -> Result<Saved> {
        let _lock = self.lock()?;
        let current = self.version()?;
        if current != version {
            return Ok(Saved::Conflict);
        }
        let generation = current.split('+').next().unwrap_or("0");
        let next = generation.parse::<u64>().unwrap_or(0) + 1;
        let text = format!(
            "{GENERATION}{next}\n# tunnel addresses: <node-name> <address>; managed by `redirector sync-nodes`\n{}",
            render(allocations)
        );
        let tmp = self.path.with_extension("tmp");
        let len = text.len() as u64;
        std::fs::write(&tmp, &text)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .map_err(|e| SyncError::io(format!("writing {}", self.path.display()), e))?;
        Ok(Saved::Yes(version_of(&text, len)))
    }

    /// One line appended: a new node costs a write of its own line, not of the fleet's.
    async fn append(
        &self,
        _allocations: &Allocations,
        node: &str,
        ip: IpAddr,
        version: &str,
    ) -> Result<Option<String>> {
        let _lock = self.lock()?;
        if version.is_empty() || self.version()? != version {
            return Ok(None);
        }
        let line = format!("{node} {ip}\n");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| SyncError::io(format!("appending to {}", self.path.display()), e))?;
        f.write_all(line.as_bytes())
            .map_err(|e| SyncError::io(format!("appending to {}", self.path.display()), e))?;
        self.version().map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, net::IpAddr};

    use super::*;
    use crate::nodes::{pool::Pool, store::allocate};

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("file-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn stale_version_is_a_conflict_and_allocations_persist() {
        let d = dir("cas");
        let s = FileStore::new(&d.join("alloc"));
        let (a, v) = s.load().await.unwrap();
        assert!(a.is_empty());
        let mut one = Allocations::new();
        one.insert("a".into(), IpAddr::from([100, 64, 0, 1]));
        let Saved::Yes(v1) = s.save(&one, &v).await.unwrap() else {
            panic!("first save refused")
        };
        assert_eq!(s.save(&one, &v).await.unwrap(), Saved::Conflict);
        // A new store on the same file (a restart) sees the same allocations.
        let (back, v2) = FileStore::new(&d.join("alloc")).load().await.unwrap();
        assert_eq!(back, one);
        assert_eq!(v2, v1);
        assert!(v2.starts_with("1+"), "{v2}");
        // An append is a new version: a writer holding the old one conflicts.
        let b = IpAddr::from([100, 64, 0, 2]);
        let v3 = s
            .append(&one, "b", b, &v2)
            .await
            .unwrap()
            .expect("appended");
        assert_ne!(v3, v2);
        assert_eq!(s.append(&one, "c", b, &v2).await.unwrap(), None);
        assert_eq!(s.save(&one, &v2).await.unwrap(), Saved::Conflict);
        let (back, v4) = s.load().await.unwrap();
        assert_eq!(back.get("b"), Some(&b));
        assert_eq!(back.len(), 2);
        assert_eq!(v4, v3);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Two allocators (separate threads, separate stores on one file, as two replicas) add
    /// 1,000 nodes each in batches, interleaved: no address is handed out twice, and each
    /// node keeps the address it got first.
    #[test]
    fn two_allocators_racing_for_1000_nodes_never_share_an_address() {
        let d = dir("race");
        let path = d.join("alloc");
        let pool = Pool::parse("100.64.0.0/20").unwrap();
        let run = |prefix: &'static str| {
            let (path, pool) = (path.clone(), pool.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let store = FileStore::new(&path);
                let mut seen = std::collections::BTreeMap::new();
                for batch in 0..20 {
                    // This replica's view: its nodes so far; the other's nodes are not in its
                    // view yet, so it holds them (as within the release grace period).
                    let wanted: BTreeSet<String> = (0..(batch + 1) * 50)
                        .map(|i| format!("{prefix}-{i}"))
                        .collect();
                    let hold = |n: &str| !n.starts_with(prefix);
                    let (p, _) = rt
                        .block_on(allocate(&store, &pool, &wanted, &hold))
                        .unwrap();
                    for (n, ip) in &p.allocations {
                        if n.starts_with(prefix) {
                            assert_eq!(*seen.entry(n.clone()).or_insert(*ip), *ip, "{n} moved");
                        }
                    }
                }
            })
        };
        let (x, y) = (run("left"), run("right"));
        x.join().unwrap();
        y.join().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (a, _) = rt.block_on(FileStore::new(&path).load()).unwrap();
        assert_eq!(a.len(), 2000);
        let distinct: BTreeSet<_> = a.values().collect();
        assert_eq!(distinct.len(), 2000, "an address was handed out twice");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

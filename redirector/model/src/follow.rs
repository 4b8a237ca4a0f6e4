//! The one follower of the node table file. The redirector (kernel maps) and the tunnel server
//! (routes) each hold one and see the same snapshots: reloaded when the file's identity changes
//! (polled), at once on SIGHUP, and on demand ([`Follower::refreshed`]) when the server meets
//! an address the kernel redirected but its own snapshot does not know yet, so a node is never
//! refused because the server's copy is older than the kernel's.
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{error::Result, node_table::NodeTable, routes::Routes};

/// One loaded node table with everything derived from it, computed once.
#[derive(Debug)]
pub struct Snapshot {
    pub table: NodeTable,
    pub routes: Routes,
}

impl Snapshot {
    pub fn new(table: NodeTable) -> Self {
        let routes = Routes::from_table(&table);
        Snapshot { table, routes }
    }
}

/// What identifies one version of a file: a rename (atomic replace) changes the inode, an
/// in-place edit the size or modification time (nanoseconds), either the change time. Every
/// file follower here (node tables, certificates) compares these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    /// The file's stamp now (None: it cannot be read now).
    pub fn of(path: &Path) -> Option<FileStamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

pub struct Follower {
    path: PathBuf,
    tx: watch::Sender<Arc<Snapshot>>,
    /// The version last read, good or bad: a bad edit is reported once, not at every poll.
    seen: Mutex<Option<FileStamp>>,
}

impl Follower {
    /// Loads the table once; an unreadable or invalid file is an error here (nothing started).
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        let seen = FileStamp::of(path);
        let table = NodeTable::load(path)?;
        let (tx, _) = watch::channel(Arc::new(Snapshot::new(table)));
        Ok(Arc::new(Follower {
            path: path.to_owned(),
            tx,
            seen: Mutex::new(seen),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Every new snapshot, from now on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Reloads if the file changed since it was last read (or always, with `force`). Returns
    /// whether a new snapshot was published; a bad edit keeps the previous one, reported once.
    pub fn refresh(&self, force: bool) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let now = FileStamp::of(&self.path);
        if !force && now == *seen {
            return false;
        }
        *seen = now;
        match NodeTable::load(&self.path) {
            Ok(table) => {
                let nodes = table.nodes.len();
                self.tx.send_replace(Arc::new(Snapshot::new(table)));
                tracing::debug!(nodes, file = %self.path.display(), "node table reloaded");
                true
            }
            Err(e) => {
                tracing::error!("node table not applied, keeping the previous one: {e}");
                false
            }
        }
    }

    /// The newest snapshot after checking the file once more, off the async threads (a table
    /// of a fleet takes milliseconds to parse). Concurrent callers share one read.
    pub async fn refreshed(self: &Arc<Self>) -> Arc<Snapshot> {
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.refresh(false)).await;
        self.current()
    }

    /// Polls every `interval` and reloads at once on SIGHUP, until `stop`.
    pub async fn run(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!("no SIGHUP handler ({e}); the node table is polled only");
                None
            }
        };
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let force = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => false,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            };
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.refresh(force)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_edit_is_seen_on_demand_before_any_poll_and_a_bad_edit_keeps_the_last_table() {
        let dir = std::env::temp_dir().join(format!("follow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nodes");
        std::fs::write(&path, "edge-a 192.0.2.10\n").unwrap();
        let f = Follower::open(&path).unwrap();
        let mut rx = f.subscribe();
        assert!(!f.refresh(false), "unchanged file: no reload");
        // Same size, same second: the inode of an atomic replace tells it apart.
        let tmp = dir.join("nodes.tmp");
        std::fs::write(&tmp, "edge-b 192.0.2.11\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let snap = f.refreshed().await;
        assert!(snap.table.nodes.contains_key("edge-b"));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        std::fs::write(&path, "Bad_Name 192.0.2.12\n").unwrap();
        assert!(!f.refresh(false));
        assert!(f.current().table.nodes.contains_key("edge-b"));
        assert!(!rx.has_changed().unwrap());
        // Reported once: the same bad version is not read again.
        assert!(!f.refresh(false));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

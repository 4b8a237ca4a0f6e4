//! The one follower of the node table file and its journal ([`crate::journal`]). The
//! redirector (kernel maps) and the tunnel server (routes) each hold one and see the same
//! snapshots. The table is reloaded when the file's identity changes; journal entries are
//! applied as they are appended. Both are noticed through inotify at once (with a poll behind
//! it, for file systems without inotify), at once on SIGHUP, and on demand
//! ([`Follower::refreshed`]) when the server meets an address the kernel redirected but its
//! own snapshot does not know yet, so a node is never refused because the server's copy is
//! older than the kernel's.
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    dir_watch::DirWatch,
    error::Result,
    journal::{self, Entry},
    node_table::NodeTable,
};

pub use crate::snapshot::Snapshot;

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
    state: Mutex<Seen>,
}

/// What the follower has read: the table version (good or bad: a bad edit is reported once,
/// not at every poll) and how far into which journal file.
#[derive(Default)]
struct Seen {
    table: Option<FileStamp>,
    journal: Option<JournalPos>,
}

struct JournalPos {
    /// The journal file being read (an atomic replace is a new file).
    file: (u64, u64),
    /// Bytes read and applied, up to the end of the last complete line.
    offset: u64,
    /// Lines read (the header included), for error messages.
    lines: usize,
    /// An entry was refused: nothing more of this journal applies (reported once).
    stopped: bool,
}

/// Reads a table file: its table and the generation its header names.
fn load_table(path: &Path) -> Result<(NodeTable, Option<u64>)> {
    let text = std::fs::read_to_string(path).map_err(|e| crate::Error::NodeTableRead {
        file: path.to_owned(),
        source: e,
    })?;
    let table = NodeTable::parse(&text, path)?;
    Ok((table, journal::table_generation(&text)))
}

impl Follower {
    /// Loads the table (and its journal) once; an unreadable or invalid table is an error
    /// here (nothing started).
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        let stamp = FileStamp::of(path);
        let (table, generation) = load_table(path)?;
        let (tx, _) = watch::channel(Arc::new(Snapshot::new(table, generation)));
        let f = Arc::new(Follower {
            path: path.to_owned(),
            tx,
            state: Mutex::new(Seen {
                table: stamp,
                journal: None,
            }),
        });
        f.refresh(false);
        Ok(f)
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

    /// Reloads the table if its file changed since it was last read (or always, with
    /// `force`), then applies journal entries appended since. Returns whether a new snapshot
    /// was published; a bad edit keeps the previous one, reported once.
    pub fn refresh(&self, force: bool) -> bool {
        let mut seen = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = FileStamp::of(&self.path);
        let mut published = false;
        if force || now != seen.table {
            seen.table = now;
            match load_table(&self.path) {
                Ok((table, generation)) => {
                    let nodes = table.nodes.len();
                    self.tx
                        .send_replace(Arc::new(Snapshot::new(table, generation)));
                    seen.journal = None;
                    published = true;
                    tracing::debug!(nodes, file = %self.path.display(), "node table reloaded");
                }
                Err(e) => {
                    tracing::error!("node table not applied, keeping the previous one: {e}");
                    return false;
                }
            }
        }
        self.follow_journal(&mut seen) || published
    }

    /// Applies the journal entries appended since the last read, if the journal belongs to
    /// the table loaded. True if a new snapshot was published.
    fn follow_journal(&self, seen: &mut Seen) -> bool {
        use std::io::{Read, Seek, SeekFrom};
        let current = self.current();
        let Some(generation) = current.generation() else {
            return false;
        };
        let path = journal::journal_path(&self.path);
        let Ok(mut file) = std::fs::File::open(&path) else {
            return false;
        };
        let Ok(meta) = file.metadata() else {
            return false;
        };
        let id = (meta.dev(), meta.ino());
        if seen.journal.as_ref().is_none_or(|j| j.file != id) {
            // A new journal: it applies only if it names the loaded table's generation (the
            // writer replaces the table first, then the journal).
            let mut head = [0u8; 64];
            let n = file.read(&mut head).unwrap_or(0);
            let head = String::from_utf8_lossy(&head[..n]);
            let Some(first) = head.split_once('\n').map(|(l, _)| l) else {
                return false;
            };
            if journal::journal_generation(first) != Some(generation) {
                return false;
            }
            seen.journal = Some(JournalPos {
                file: id,
                offset: first.len() as u64 + 1,
                lines: 1,
                stopped: false,
            });
        }
        let Some(pos) = seen.journal.as_mut() else {
            return false;
        };
        if pos.stopped || meta.len() <= pos.offset {
            return false;
        }
        let mut text = Vec::new();
        if file.seek(SeekFrom::Start(pos.offset)).is_err() || file.read_to_end(&mut text).is_err() {
            return false;
        }
        // Complete lines only: the writer may be in the middle of one.
        let Some(end) = text.iter().rposition(|b| *b == b'\n') else {
            return false;
        };
        let mut snap = (*current).clone();
        let mut applied = 0;
        for line in String::from_utf8_lossy(&text[..end]).lines() {
            pos.lines += 1;
            let pushed = Entry::parse(line, &path, pos.lines).and_then(|e| {
                snap.push(&e).map_err(|reason| crate::Error::NodeTable {
                    file: path.clone(),
                    line: pos.lines,
                    reason,
                })
            });
            match pushed {
                Ok(()) => applied += 1,
                Err(e) => {
                    tracing::error!(
                        "node table journal entry not applied; following no more of this journal until the table is rewritten: {e}"
                    );
                    pos.stopped = true;
                    break;
                }
            }
        }
        pos.offset += end as u64 + 1;
        if applied == 0 {
            return false;
        }
        tracing::debug!(applied, nodes = snap.len(), file = %path.display(), "node table journal applied");
        self.tx.send_replace(Arc::new(snap));
        true
    }

    /// The newest snapshot after checking the file once more, off the async threads (a table
    /// of a fleet takes milliseconds to parse). Concurrent callers share one read.
    pub async fn refreshed(self: &Arc<Self>) -> Arc<Snapshot> {
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.refresh(false)).await;
        self.current()
    }

    /// Follows the table and its journal until `stop`: at once when inotify reports a write
    /// or a replace, at once on SIGHUP (a full reload), and every `interval` in any case.
    pub async fn run(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!("no SIGHUP handler ({e}); the node table is polled only");
                None
            }
        };
        let journal = journal::journal_path(&self.path);
        let mut watch = match DirWatch::new(&[&self.path, &journal]) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(file = %self.path.display(), "no inotify watch on the node table's directory ({e}); changes are seen at the next poll, every {interval:?}");
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
                r = async { match watch.as_mut() { Some(w) => w.changed().await, None => std::future::pending().await } } => {
                    if let Err(e) = r {
                        tracing::warn!("inotify watch on the node table failed ({e}); polling only");
                        watch = None;
                    }
                    false
                }
            };
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.refresh(force)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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
        assert!(snap.node("edge-b").is_some());
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        std::fs::write(&path, "Bad_Name 192.0.2.12\n").unwrap();
        assert!(!f.refresh(false));
        assert!(f.current().node("edge-b").is_some());
        assert!(!rx.has_changed().unwrap());
        // Reported once: the same bad version is not read again.
        assert!(!f.refresh(false));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The journal's promise: a table plus its entries, as followed, is the table the writer
    /// meant, and a follower that applied some entries learns which addresses the rest touch.
    #[tokio::test]
    async fn journal_entries_reach_the_follower_as_appended_and_a_rewrite_resets_them() {
        use crate::{journal::TableWriter, routes::Route};
        let dir = std::env::temp_dir().join(format!("follow-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nodes");
        let p = |t: &str| NodeTable::parse(t, Path::new("t")).unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let mut w = TableWriter::new(&path);
        let first = p("edge-a 192.0.2.10 tunnel=100.64.0.1\nedge-b 192.0.2.11 tunnel=100.64.0.2\n");
        assert_eq!(
            w.publish(&first).unwrap(),
            None,
            "the first table is a file"
        );
        let f = Follower::open(&path).unwrap();
        let before = f.current();
        assert!(before.generation().is_some());
        // edge-b moves onto edge-a's InternalIP (now ambiguous), edge-c arrives, edge-a's
        // tunnel address stays its own.
        let second = p(
            "edge-a 192.0.2.10 tunnel=100.64.0.1\nedge-b 192.0.2.10 tunnel=100.64.0.2\nedge-c 192.0.2.12 tunnel=100.64.0.3\n",
        );
        assert_eq!(w.publish(&second).unwrap(), Some(2));
        assert!(f.refresh(false));
        let now = f.current();
        assert!(now.same_base(&before));
        assert_eq!(now.table().into_owned(), second);
        assert_eq!(now.len(), 3);
        let names = |r: Option<Route>| match r {
            Some(Route::Ambiguous(v)) => v.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            Some(Route::Node(n)) => vec![n.to_string()],
            None => vec![],
        };
        assert_eq!(names(now.route(&ip("192.0.2.10"))), ["edge-a", "edge-b"]);
        assert_eq!(names(now.route(&ip("192.0.2.11"))), Vec::<String>::new());
        assert_eq!(names(now.route(&ip("100.64.0.3"))), ["edge-c"]);
        let touched: std::collections::BTreeSet<_> = now.touched_since(0).collect();
        assert_eq!(
            touched,
            [
                ip("192.0.2.10"),
                ip("192.0.2.11"),
                ip("192.0.2.12"),
                ip("100.64.0.3")
            ]
            .into()
        );
        // A removal; then an entry the table's rules refuse is not written at all.
        w.change(crate::journal::Entry::Remove {
            id: "edge-c".into(),
        })
        .unwrap();
        let bad = crate::journal::Entry::Upsert {
            id: "edge-d".into(),
            addrs: vec![ip("100.64.0.1")],
            tunnel: None,
        };
        assert!(
            w.change(bad)
                .unwrap_err()
                .to_string()
                .contains("tunnel address of node \"edge-a\"")
        );
        assert!(f.refresh(false));
        assert_eq!(f.current().len(), 2);
        assert_eq!(
            f.current().touched_since(2).collect::<Vec<_>>(),
            [ip("192.0.2.12"), ip("100.64.0.3")]
        );
        // A line the follower refuses stops the journal, keeps the last good snapshot.
        std::fs::OpenOptions::new()
            .append(true)
            .open(crate::journal::journal_path(&path))
            .unwrap()
            .write_all(b"+ Bad_Name 192.0.2.40\n")
            .unwrap();
        assert!(!f.refresh(false));
        assert_eq!(f.current().len(), 2);
        // A half-written line waits for its end.
        let mut w2 = TableWriter::new(&path);
        assert_eq!(
            w2.publish(&first).unwrap(),
            None,
            "a new writer starts a new generation"
        );
        assert!(f.refresh(false));
        assert!(!f.current().same_base(&now));
        assert_eq!(f.current().journal_entries(), 0);
        let mut j = std::fs::OpenOptions::new()
            .append(true)
            .open(crate::journal::journal_path(&path))
            .unwrap();
        j.write_all(b"- edge-").unwrap();
        assert!(!f.refresh(false));
        j.write_all(b"b\n").unwrap();
        assert!(f.refresh(false));
        assert!(f.current().node("edge-b").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Appended entries wake a running follower through inotify, not its poll.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_running_follower_applies_an_entry_without_waiting_for_its_poll() {
        use crate::journal::{Entry, TableWriter};
        let dir = std::env::temp_dir().join(format!("follow-inotify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nodes");
        let mut w = TableWriter::new(&path);
        w.publish(&NodeTable::parse("edge-a 192.0.2.10\n", Path::new("t")).unwrap())
            .unwrap();
        let f = Follower::open(&path).unwrap();
        let mut rx = f.subscribe();
        let stop = CancellationToken::new();
        tokio::spawn(f.clone().run(Duration::from_secs(3600), stop.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = std::time::Instant::now();
        w.change(Entry::Upsert {
            id: "edge-b".into(),
            addrs: vec!["192.0.2.11".parse().unwrap()],
            tunnel: None,
        })
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("no wake within 5 s (the poll is an hour)")
            .unwrap();
        assert!(f.current().node("edge-b").is_some());
        eprintln!("entry applied {:?} after the append", t.elapsed());
        stop.cancel();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

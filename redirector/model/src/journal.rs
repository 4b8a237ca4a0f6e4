//! The node table's journal: single-node changes appended beside the table file, so one
//! Node's change reaches the followers in microseconds instead of through a rewrite and a
//! re-read of the whole table (about a second at 100,000 nodes).
//!
//! The table file written by `redirector sync-nodes` starts with its generation, and the
//! journal (`<table>.journal`, same directory) names the generation it applies to:
//!
//! ```text
//! # journal of generation 1764680000123456789
//! + edge-a 192.0.2.10 tunnel=100.64.0.1       (the node's whole table line)
//! - edge-b
//! ```
//!
//! Entries are appended whole lines at a time, so a reader takes complete lines only. A new
//! table file starts a new generation and an empty journal: entries of another generation are
//! never applied. A table without a generation header (written by hand) has no journal.
use std::{
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{
    error::{Error, Result},
    node_table::NodeTable,
    snapshot::Snapshot,
};

const TABLE_HEADER: &str = "# generation ";
const JOURNAL_HEADER: &str = "# journal of generation ";

/// After this many entries the writer rewrites the table (a new generation): followers copy
/// the delta on each entry, so it stays short.
pub const COMPACT_AFTER: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// The node now has these addresses (its tunnel address among them).
    Upsert {
        id: String,
        addrs: Vec<IpAddr>,
        tunnel: Option<IpAddr>,
    },
    Remove {
        id: String,
    },
}

impl Entry {
    pub fn render(&self) -> String {
        match self {
            Entry::Upsert { id, addrs, tunnel } => {
                let mut t = NodeTable::default();
                t.nodes.insert(id.clone(), addrs.clone());
                if let Some(ip) = tunnel {
                    t.tunnel.insert(id.clone(), *ip);
                }
                format!("+ {}", t.render())
            }
            Entry::Remove { id } => format!("- {id}\n"),
        }
    }

    /// One journal line (without its newline); `file` and `line` name it in errors.
    pub fn parse(text: &str, file: &Path, line: usize) -> Result<Entry> {
        let err = |reason: String| Error::NodeTable {
            file: file.to_owned(),
            line,
            reason,
        };
        if let Some(rest) = text.strip_prefix("+ ") {
            // The node's table line, parsed by the table's own rules.
            let t = NodeTable::parse(rest, file).map_err(|e| match e {
                Error::NodeTable { reason, .. } => err(reason),
                other => other,
            })?;
            let (id, addrs) = t
                .nodes
                .into_iter()
                .next()
                .ok_or_else(|| err("an upsert entry without a node".into()))?;
            let tunnel = t.tunnel.get(&id).copied();
            Ok(Entry::Upsert { id, addrs, tunnel })
        } else if let Some(id) = text.strip_prefix("- ") {
            let id = id.trim();
            crate::names::validate_node_id(id).map_err(err)?;
            Ok(Entry::Remove { id: id.to_owned() })
        } else {
            Err(err(format!(
                "{text:?} is not a journal entry; expected `+ <node> <ip>...` or `- <node>`"
            )))
        }
    }
}

/// The journal of the table at `table`.
pub fn journal_path(table: &Path) -> PathBuf {
    let mut name = table.file_name().unwrap_or_default().to_owned();
    name.push(".journal");
    table.with_file_name(name)
}

/// The generation a table file's text names in its first line.
pub fn table_generation(text: &str) -> Option<u64> {
    text.lines()
        .next()?
        .strip_prefix(TABLE_HEADER)?
        .trim()
        .parse()
        .ok()
}

/// The generation a journal's first line names.
pub fn journal_generation(first_line: &str) -> Option<u64> {
    first_line.strip_prefix(JOURNAL_HEADER)?.trim().parse().ok()
}

/// The one writer of a node table and its journal (`redirector sync-nodes`).
pub struct TableWriter {
    path: PathBuf,
    /// What the file and its journal say now (None: nothing written by this writer yet).
    current: Option<Snapshot>,
}

impl TableWriter {
    pub fn new(path: &Path) -> Self {
        TableWriter {
            path: path.to_owned(),
            current: None,
        }
    }

    /// The table as written (file plus journal), if this writer has written one.
    pub fn current(&self) -> Option<&Snapshot> {
        self.current.as_ref()
    }

    /// Publishes `table`: as journal entries when it differs from the current one by few
    /// nodes, else as a new table file (a new generation, an empty journal). Returns the
    /// number of entries appended, or None when the table file was rewritten; Some(0): no
    /// change at all.
    pub fn publish(&mut self, table: &NodeTable) -> Result<Option<usize>> {
        if let Some(cur) = &self.current {
            let entries = diff(cur, table);
            if cur.journal_entries() + entries.len() <= COMPACT_AFTER && self.append(&entries)? {
                return Ok(Some(entries.len()));
            }
        }
        // A table the parser refuses is refused here, before anything is written.
        self.rewrite(table)?;
        Ok(None)
    }

    /// Appends one node's change, or rewrites the table when the journal is long. An entry
    /// the table's rules refuse is an error and nothing is written.
    pub fn change(&mut self, entry: Entry) -> Result<()> {
        let Some(cur) = &self.current else {
            return Err(Error::io(
                format!("appending to the journal of {}", self.path.display()),
                std::io::Error::other("no table written yet"),
            ));
        };
        let next = cur.with(&entry).map_err(|reason| Error::NodeTable {
            file: journal_path(&self.path),
            line: cur.journal_entries() + 2,
            reason,
        })?;
        if next.journal_entries() > COMPACT_AFTER {
            return self.rewrite(&next.table());
        }
        write_journal_lines(&journal_path(&self.path), &entry.render())?;
        self.current = Some(next);
        Ok(())
    }

    /// Appends `entries`; Ok(false) if the table's rules refuse one (nothing is written).
    fn append(&mut self, entries: &[Entry]) -> Result<bool> {
        let Some(mut cur) = self.current.take() else {
            return Ok(false);
        };
        let mut text = String::new();
        for e in entries {
            if let Err(reason) = cur.push(e) {
                tracing::debug!("journal entry refused ({reason}); rewriting the table");
                return Ok(false);
            }
            text.push_str(&e.render());
        }
        // On an error what the file holds is unknown: `current` stays empty and the next
        // publish rewrites the table.
        if !text.is_empty() {
            write_journal_lines(&journal_path(&self.path), &text)?;
        }
        self.current = Some(cur);
        Ok(true)
    }

    /// A new table file and an empty journal. The generation is the time in nanoseconds, so
    /// a restarted writer never reuses one.
    fn rewrite(&mut self, table: &NodeTable) -> Result<()> {
        self.current = None;
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let body = table.render();
        let what = || format!("writing node table {}", self.path.display());
        // Parsed back before anyone follows it: a table its followers would refuse is never
        // published.
        let checked = NodeTable::parse(&body, &self.path)?;
        atomic_write(
            &self.path,
            &format!(
                "{TABLE_HEADER}{generation}\n# managed by `redirector sync-nodes`; changes since are in {}\n{body}",
                journal_path(&self.path).display()
            ),
        )
        .map_err(|e| Error::io(what(), e))?;
        atomic_write(
            &journal_path(&self.path),
            &format!("{JOURNAL_HEADER}{generation}\n"),
        )
        .map_err(|e| Error::io(what(), e))?;
        self.current = Some(Snapshot::new(checked, Some(generation)));
        Ok(())
    }
}

/// The entries that turn `from` into `to`.
pub fn diff(from: &Snapshot, to: &NodeTable) -> Vec<Entry> {
    let mut out = Vec::new();
    for (id, addrs) in &to.nodes {
        let tunnel = to.tunnel.get(id).copied();
        if from.node(id) != Some((addrs.as_slice(), tunnel)) {
            out.push(Entry::Upsert {
                id: id.clone(),
                addrs: addrs.clone(),
                tunnel,
            });
        }
    }
    for id in from.node_names() {
        if !to.nodes.contains_key(&id) {
            out.push(Entry::Remove { id });
        }
    }
    out
}

fn write_journal_lines(path: &Path, text: &str) -> Result<()> {
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| Error::io(format!("appending to {}", path.display()), e))
}

fn atomic_write(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

//! The managed block of a hosts file: each edge node's name -> its tunnel address.
//!
//! The API server (host network, so it reads the master's `/etc/hosts`) dials a kubelet by the
//! node's name when `--kubelet-preferred-address-types` starts with `Hostname`; the name then
//! resolves to the node's tunnel address, which only that node has, so the connection is
//! redirected and routed even when the node's InternalIP is shared with another node. Lines
//! outside the block are the operator's and are never touched.
use std::{io::ErrorKind, path::Path};

use crate::{
    error::{Error, Result},
    node_table::NodeTable,
};

pub const BEGIN: &str =
    "# BEGIN edge-redirector: edge node name -> tunnel address (managed, edits are overwritten)";
pub const END: &str = "# END edge-redirector";

/// The block for `table` (empty when no node has a tunnel address).
pub fn render(table: &NodeTable) -> String {
    if table.tunnel.is_empty() {
        return String::new();
    }
    let mut out = format!("{BEGIN}\n");
    for (id, ip) in &table.tunnel {
        out.push_str(&format!("{ip}\t{id}\n"));
    }
    out.push_str(END);
    out.push('\n');
    out
}

/// `existing` with its managed block replaced by `block` (appended if there was none; removed
/// if `block` is empty). A block whose END line was deleted by hand loses only its BEGIN
/// line: the lines after it may be the operator's, and are kept.
pub fn splice(existing: &str, block: &str) -> String {
    let mut out = String::with_capacity(existing.len() + block.len());
    // Split on '\n' only: `str::lines` also eats a '\r' before it, so every rewrite of a line
    // ending in "\r\r\n" lost one '\r' and the file never stopped changing (found by fuzzing).
    // The markers are recognised with or without a '\r' (a file saved with CRLF endings).
    let lines: Vec<&str> = existing
        .split_inclusive('\n')
        .map(|l| l.strip_suffix('\n').unwrap_or(l))
        .collect();
    let is = |line: &str, marker: &str| line.strip_suffix('\r').unwrap_or(line) == marker;
    let mut inside = false;
    let mut placed = false;
    for (i, line) in lines.iter().enumerate() {
        if is(line, BEGIN) {
            inside = lines[i + 1..].iter().any(|l| is(l, END));
            if !placed {
                out.push_str(block);
                placed = true;
            }
            continue;
        }
        if inside {
            inside = !is(line, END);
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if !placed {
        out.push_str(block);
    }
    out
}

/// Rewrites the managed block of `path` for `table`; returns whether the file changed.
pub fn update(path: &Path, table: &NodeTable) -> Result<bool> {
    let existing = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(Error::io(
                format!("reading hosts file {}", path.display()),
                e,
            ));
        }
    };
    let wanted = splice(&existing, &render(table));
    if wanted == existing {
        return Ok(false);
    }
    write(path, &wanted)?;
    Ok(true)
}

/// A hosts file for CoreDNS's `hosts` plugin: node name -> tunnel address, for pods.
pub fn coredns_hosts(t: &NodeTable) -> String {
    let mut out = String::from("# managed by edge-redirector: edge node name -> tunnel address\n");
    for (n, ip) in &t.tunnel {
        out.push_str(&format!("{ip} {n}\n"));
    }
    out
}

/// Atomic replace where possible; in place where the file is a bind mount (a container's
/// `/etc/hosts`), which cannot be renamed over.
fn write(path: &Path, text: &str) -> Result<()> {
    let ctx = |what: &str| format!("{what} hosts file {} (--hosts-file)", path.display());
    let tmp = path.with_extension("edge-redirector.tmp");
    let renamed = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
    match renamed {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EXDEV)) => {
            let _ = std::fs::remove_file(&tmp);
            std::fs::write(path, text).map_err(|e| Error::io(ctx("writing"), e))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(Error::io(ctx("replacing"), e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> NodeTable {
        NodeTable::parse(text, Path::new("nodes.txt")).unwrap()
    }

    #[test]
    fn carriage_returns_survive_every_rewrite_and_crlf_markers_are_recognised() {
        // Found by fuzzing: each splice ate one '\r' of a line ending in "\r\r\n".
        let existing = "127.0.0.1 localhost\r\r\r\n10.0.0.1 host\r\n";
        let once = splice(existing, "");
        assert_eq!(once, existing);
        assert_eq!(splice(&once, ""), once);
        let block = render(&table("edge-a 192.0.2.10 tunnel=198.51.100.10\n"));
        let with = splice(existing, &block);
        assert_eq!(splice(&with, &block), with);
        // A block saved with CRLF endings is still the managed block.
        let crlf = with.replace('\n', "\r\n");
        assert_eq!(splice(&crlf, ""), existing.replace('\n', "\r\n"));
    }

    #[test]
    fn block_is_appended_replaced_and_removed_leaving_other_lines() {
        let t = table(
            "edge-a 192.0.2.10 tunnel=198.51.100.10\nedge-b 192.0.2.10 tunnel=198.51.100.11\nedge-c 192.0.2.30\n",
        );
        let base = "127.0.0.1 localhost\n::1 localhost\n";
        let with = splice(base, &render(&t));
        assert_eq!(
            with,
            format!("{base}{BEGIN}\n198.51.100.10\tedge-a\n198.51.100.11\tedge-b\n{END}\n")
        );
        // Idempotent, and the operator's lines after the block survive a change.
        assert_eq!(splice(&with, &render(&t)), with);
        let edited = format!("{with}10.0.0.1 mine\n");
        let t2 = table("edge-a 192.0.2.10 tunnel=198.51.100.20\n");
        assert_eq!(
            splice(&edited, &render(&t2)),
            format!("{base}{BEGIN}\n198.51.100.20\tedge-a\n{END}\n10.0.0.1 mine\n")
        );
        // No tunnel address: no block.
        assert_eq!(
            splice(&edited, &render(&table("edge-c 192.0.2.30\n"))),
            format!("{base}10.0.0.1 mine\n")
        );
    }

    #[test]
    fn update_writes_only_on_change() {
        let dir = std::env::temp_dir().join(format!("hosts-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hosts");
        std::fs::write(&path, "127.0.0.1 localhost\n").unwrap();
        let t = table("edge-a 192.0.2.10 tunnel=198.51.100.10\n");
        assert!(update(&path, &t).unwrap());
        assert!(!update(&path, &t).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("127.0.0.1 localhost\n"));
        assert!(text.contains("198.51.100.10\tedge-a\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

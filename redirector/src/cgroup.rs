//! Finding the cgroup v2 hierarchy and the attach point.
//!
//! The mount point is detected from `/proc/self/mountinfo`, never assumed: it is
//! `/sys/fs/cgroup` on most hosts and `/sys/fs/cgroup/unified` on hybrid ones.
use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// The first cgroup2 mount point in the given mountinfo text.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> ..."
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push(char::from_u32(v).unwrap_or(char::REPLACEMENT_CHARACTER));
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The cgroup v2 mount point of this host.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    cgroup2_mount_in(&info).ok_or(Error::NoCgroup2)
}

/// The kernel's id of the root cgroup (the root of the v2 hierarchy is kernfs node 1).
const ROOT_CGROUP_ID: u64 = 1;

/// Resolves the attach point: `requested` if given (must be a directory inside the cgroup v2
/// mount), else the mount's root, which must be the host's real root cgroup.
pub fn attach_point(requested: Option<&Path>) -> Result<PathBuf> {
    let mount = cgroup2_mount()?;
    let Some(path) = requested else {
        // In a container with its own cgroup namespace, the cgroup2 mount shows the
        // container's cgroup as "/": programs attached there would see only the container.
        let id = cgroup_id(&mount)?;
        if id != ROOT_CGROUP_ID {
            return Err(Error::NotHostCgroupRoot { mount, id });
        }
        return Ok(mount);
    };
    let canonical = fs::canonicalize(path).map_err(|_| Error::NotACgroup {
        path: path.to_owned(),
        mount: mount.clone(),
    })?;
    if !canonical.starts_with(&mount) || !canonical.join("cgroup.procs").exists() {
        return Err(Error::NotACgroup {
            path: path.to_owned(),
            mount,
        });
    }
    Ok(canonical)
}

/// The cgroup id the kernel reports for a cgroup directory (its kernfs inode number).
pub fn cgroup_id(path: &Path) -> Result<u64> {
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|e| Error::OpenCgroup {
            path: path.to_owned(),
            source: e,
        })
}

/// Finds the directory of a cgroup id under the cgroup v2 mount (breadth first, bounded so a
/// huge hierarchy cannot stall `status`).
pub fn path_of_cgroup_id(id: u64) -> Option<PathBuf> {
    const MAX_DIRS: usize = 100_000;
    let mount = cgroup2_mount().ok()?;
    let mut queue = std::collections::VecDeque::from([mount]);
    let mut seen = 0;
    while let Some(dir) = queue.pop_front() {
        seen += 1;
        if seen > MAX_DIRS {
            return None;
        }
        let Ok(meta) = fs::metadata(&dir) else {
            continue;
        };
        if meta.ino() == id {
            return Some(dir);
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back(e.path());
            }
        }
    }
    None
}

/// The cgroup v2 directory of `pid` (its `0::` line in /proc/PID/cgroup).
pub fn of_pid(mount: &Path, pid: u32) -> Result<PathBuf> {
    let file = format!("/proc/{pid}/cgroup");
    let text = fs::read_to_string(&file).map_err(|e| {
        Error::Config(format!(
            "reading {file}: {e} (is pid {pid} running, and visible here? In a container, \
             run with the host's pid namespace)"
        ))
    })?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| Error::Config(format!("{file} has no cgroup v2 line (0::)")))?;
    Ok(mount.join(rel.trim().trim_start_matches('/')))
}

/// Whether `dir` is the cgroup `attached` (an id) or below it: ids are the directories'
/// inode numbers on cgroup v2, so each ancestor up to the mount is compared.
pub fn is_under(dir: &Path, attached: u64, mount: &Path) -> bool {
    let mut d = Some(dir);
    while let Some(p) = d {
        if fs::metadata(p).is_ok_and(|m| m.ino() == attached) {
            return true;
        }
        if p == mount {
            break;
        }
        d = p.parent();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_among_other_mounts() {
        let info = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,name=systemd
";
        assert_eq!(
            cgroup2_mount_in(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_is_none_and_escapes_are_decoded() {
        assert_eq!(
            cgroup2_mount_in("22 1 0:21 / /proc rw - proc proc rw\n"),
            None
        );
        let info = "31 30 0:27 / /mnt/my\\040cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(info),
            Some(PathBuf::from("/mnt/my cgroup"))
        );
    }
}

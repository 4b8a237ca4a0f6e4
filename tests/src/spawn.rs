//! Starting processes inside a test cgroup and/or network namespace.
//!
//! Order matters: the child joins the cgroup first, then the namespace (`ip netns exec`
//! would remount /sys and hide the cgroup filesystem; we call setns directly instead).
use std::{
    fs::{File, OpenOptions},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::PathBuf,
    process::Command,
};

use crate::{cgroup::TestCgroup, netns::Netns};

/// Path of a binary built in this workspace's target directory (next to the test binary's
/// `deps/` directory). `cargo xtask test` builds every binary before running tests.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` (or `cargo xtask test`)",
        path.display()
    );
    path
}

/// Makes `cmd` start inside `cgroup` and `netns` (either optional).
pub fn place(cmd: &mut Command, cgroup: Option<&TestCgroup>, netns: Option<&Netns>) {
    let procs: Option<File> = cgroup.map(|cg| {
        OpenOptions::new()
            .write(true)
            .open(cg.procs_file())
            .unwrap_or_else(|e| panic!("open {}: {e}", cg.procs_file().display()))
    });
    let ns: Option<File> = netns.map(Netns::open);
    // SAFETY: the closure only makes async-signal-safe syscalls (write, setns) on fds opened
    // before fork; the Files are moved in and stay open until exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(f) = &procs {
                // "0" = the writing process itself.
                if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(f) = &ns
                && libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The unprivileged user a dropped process runs as (`nobody`).
pub const NOBODY: u32 = 65534;

/// Makes `cmd` run as [`NOBODY`] with no capability at all: the bounding set emptied, no new
/// privileges, no supplementary groups. Register after [`place`] (joining a cgroup and a
/// namespace needs root; pre-exec steps run in order).
pub fn drop_privileges(cmd: &mut Command) {
    // SAFETY: only async-signal-safe syscalls (prctl, setgroups, setresgid, setresuid).
    unsafe {
        cmd.pre_exec(|| {
            for cap in 0..64 {
                // EINVAL past the kernel's last capability: the rest do not exist.
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    break;
                }
            }
            let ok = libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
                && libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresgid(NOBODY, NOBODY, NOBODY) == 0
                // Leaving uid 0 clears the permitted, effective and ambient sets.
                && libc::setresuid(NOBODY, NOBODY, NOBODY) == 0;
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

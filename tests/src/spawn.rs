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

//! Network namespaces built for a test, removed on drop (even when the test panics).
use std::{
    fs::File,
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
    process::Command,
};

/// Runs a command and panics with its output if it fails: test setup must not half-succeed.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawning {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        // A leftover from a killed earlier run of the same name would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        sh(&["ip", "netns", "add", name]);
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full);
    }

    pub fn open(&self) -> File {
        File::open(self.path()).unwrap_or_else(|e| panic!("open {}: {e}", self.path().display()))
    }

    /// Moves the calling thread into this namespace until the guard drops. Sockets created
    /// meanwhile stay in it.
    pub fn enter(&self) -> NetnsGuard {
        let previous: OwnedFd = File::open("/proc/thread-self/ns/net")
            .expect("own netns")
            .into();
        let target = self.open();
        // SAFETY: setns on valid fds; affects only this thread.
        let r = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            r,
            0,
            "setns into {}: {}",
            self.name,
            std::io::Error::last_os_error()
        );
        NetnsGuard { previous }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            eprintln!("cleanup: ip netns del {}: {e}", self.name);
        }
    }
}

pub struct NetnsGuard {
    previous: OwnedFd,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // SAFETY: returning this thread to the namespace it came from.
        let r = unsafe { libc::setns(self.previous.as_raw_fd(), libc::CLONE_NEWNET) };
        if r != 0 {
            eprintln!(
                "cleanup: setns back failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Joins two namespaces with a veth pair and gives each end an address (CIDR notation).
pub fn veth(a: &Netns, a_if: &str, a_addrs: &[&str], b: &Netns, b_if: &str, b_addrs: &[&str]) {
    sh(&[
        "ip", "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]);
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            ns.ip(&["addr", "add", addr, "dev", ifname]);
        }
        ns.ip(&["link", "set", ifname, "up"]);
    }
}

//! Who the caller of an explained connection is: its cgroup (is it under the attached one?)
//! and its network namespace (host or pod ingress?), from a pid, a cgroup path, or this
//! process.
use std::{fs, os::fd::AsRawFd, path::PathBuf};

use crate::{
    cgroup,
    error::{Error, Result},
    sys,
};

/// Whose connection is explained.
#[derive(Debug, Clone)]
pub enum Caller {
    /// This process (`redirector explain` itself, as a client started here would be).
    This,
    Pid(u32),
    /// A cgroup directory (absolute, or relative to the cgroup v2 mount).
    Cgroup(PathBuf),
}

/// What is known of the caller.
pub struct Facts {
    pub what: String,
    pub cgroup: PathBuf,
    /// The network namespace cookie; None when only a cgroup was given.
    pub netns_cookie: Option<u64>,
}

impl Caller {
    pub fn facts(&self) -> Result<Facts> {
        let mount = cgroup::cgroup2_mount()?;
        match self {
            Caller::This => {
                let pid = std::process::id();
                Ok(Facts {
                    what: format!("this process (pid {pid})"),
                    cgroup: cgroup::of_pid(&mount, pid)?,
                    netns_cookie: Some(
                        sys::current_netns_cookie()
                            .map_err(|e| Error::io("reading this network namespace's cookie", e))?,
                    ),
                })
            }
            Caller::Pid(pid) => Ok(Facts {
                what: format!("pid {pid} ({})", comm(*pid)),
                cgroup: cgroup::of_pid(&mount, *pid)?,
                netns_cookie: Some(netns_cookie_of_pid(*pid)?),
            }),
            Caller::Cgroup(p) => {
                let path = if p.starts_with(&mount) {
                    p.clone()
                } else {
                    mount.join(p.strip_prefix("/").unwrap_or(p))
                };
                // The same check as for `run --cgroup`: a cgroup v2 directory in the mount.
                let path = cgroup::attach_point(Some(&path))?;
                Ok(Facts {
                    what: format!("a process in {}", path.display()),
                    cgroup: path,
                    netns_cookie: None,
                })
            }
        }
    }
}

fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// The network namespace cookie of `pid`: a socket made by a thread that joined its namespace.
fn netns_cookie_of_pid(pid: u32) -> Result<u64> {
    let ns = format!("/proc/{pid}/ns/net");
    let f = fs::File::open(&ns).map_err(|e| Error::io(format!("opening {ns}"), e))?;
    // A thread of its own: setns changes only the calling thread's namespace.
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a namespace fd we hold, for this thread only.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(Error::io(
                    format!("joining {ns} (needs CAP_SYS_ADMIN)"),
                    std::io::Error::last_os_error(),
                ));
            }
            sys::current_netns_cookie()
                .map_err(|e| Error::io(format!("reading the cookie of {ns}"), e))
        })
        .join()
        .unwrap_or_else(|_| Err(Error::Config("the namespace probe thread panicked".into())))
    })
}

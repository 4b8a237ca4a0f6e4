//! Errors an operator can act on: each says what failed, with what input, and what to do.
use std::{io, path::PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no cgroup v2 filesystem is mounted (none in /proc/self/mountinfo); the redirector \
         attaches to a cgroup v2 subtree. Boot with systemd.unified_cgroup_hierarchy=1 or mount \
         one: `mount -t cgroup2 none /sys/fs/cgroup`. Under `ip netns exec`, which remounts \
         /sys without it, enter the namespace with `nsenter --net=/run/netns/NAME` instead"
    )]
    NoCgroup2,

    #[error(
        "cgroup path {path} is not a directory inside the cgroup v2 mount {mount}; pass an \
         existing cgroup v2 directory with --cgroup (default: the mount's root)"
    )]
    NotACgroup { path: PathBuf, mount: PathBuf },

    #[error(
        "the cgroup v2 root seen here ({mount}, cgroup id {id}) is not the host's root cgroup \
         (id 1): this process runs in a cgroup namespace, e.g. a container, and programs \
         attached there would only see that container. Run with the host's cgroup namespace \
         (hostPID and a hostPath mount of /sys/fs/cgroup, or `cgroupns: host`), or pass \
         --cgroup to attach to a chosen subtree on purpose"
    )]
    NotHostCgroupRoot { mount: PathBuf, id: u64 },

    #[error("cannot open cgroup {path}: {source}")]
    OpenCgroup { path: PathBuf, source: io::Error },

    #[error(
        "cannot mount bpffs at {path}: {source}; the redirector pins its programs and maps \
         there. Mount it (`mount -t bpf bpf /sys/fs/bpf`) or, in a container, mount the host's \
         /sys/fs/bpf"
    )]
    BpffsMount { path: PathBuf, source: io::Error },

    #[error(
        "{path} is not on a bpf filesystem; pass a --pin-dir under a bpffs mount (usually \
         /sys/fs/bpf)"
    )]
    NotBpffs { path: PathBuf },

    #[error(
        "permission denied while {action}: the redirector needs root, or CAP_BPF, \
         CAP_NET_ADMIN and CAP_SYS_ADMIN (a privileged DaemonSet)"
    )]
    Permission { action: String },

    #[error(
        "this kernel cannot load or attach the {program} program ({hook}): {detail}. It needs \
         Linux {min_kernel} or newer with CONFIG_CGROUP_BPF=y and BPF syscall support"
    )]
    KernelMissingHook {
        program: &'static str,
        hook: &'static str,
        min_kernel: &'static str,
        detail: String,
    },

    /// The node table, the hosts block (`edge-model`).
    #[error(transparent)]
    Model(#[from] edge_model::Error),

    #[error(
        "map {map} is full ({capacity} entries) while adding {what}; raise {flag} and restart \
         (after `redirector uninstall`, since a pinned map keeps its size)"
    )]
    MapFull {
        map: &'static str,
        capacity: u32,
        what: String,
        flag: &'static str,
    },

    #[error(
        "the redirector is already installed in {pin_dir} and attached to cgroup id {attached} \
         ({attached_path}), not {wanted}; run `redirector uninstall --pin-dir {pin_dir}` first"
    )]
    AttachedElsewhere {
        pin_dir: PathBuf,
        attached: u64,
        attached_path: String,
        wanted: PathBuf,
    },

    #[error("not installed: no pins in {pin_dir}; start `redirector run` first")]
    NotInstalled { pin_dir: PathBuf },

    #[error("{what}: {detail}")]
    Ebpf { what: String, detail: String },

    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },

    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("node sync: {0}")]
    Sync(#[from] crate::nodes::error::SyncError),
}

impl Error {
    /// Wraps an I/O error with what was being done; EPERM/EACCES become [`Error::Permission`].
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        let what = what.into();
        match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => Error::Permission { action: what },
            _ => Error::Io { what, source },
        }
    }

    /// Wraps an aya error with what was being done, keeping its full cause chain.
    pub fn ebpf(what: impl Into<String>, err: impl std::error::Error) -> Self {
        let mut detail = err.to_string();
        let mut src = err.source();
        while let Some(s) = src {
            detail.push_str(": ");
            detail.push_str(&s.to_string());
            src = s.source();
        }
        let what = what.into();
        // The verifier refuses a program with EACCES too: with its log, that is no
        // permission problem, and the log's last lines say what it refused.
        let verifier = detail
            .split_once("Verifier output:")
            .map(|(_, log)| log.trim())
            .filter(|log| !log.is_empty());
        if let Some(log) = verifier {
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(12)..];
            return Error::Ebpf {
                what,
                detail: format!("the kernel's verifier refused it: ...\n{}", tail.join("\n")),
            };
        }
        if detail.contains("Operation not permitted") || detail.contains("Permission denied") {
            return Error::Permission { action: what };
        }
        Error::Ebpf { what, detail }
    }
}

//! Loading, attaching, pinning and adopting the eBPF programs.
//!
//! Pin layout under the pin directory (default `/sys/fs/bpf/edge-redirector`):
//!
//! ```text
//! <pin-dir>/<MAP>             every map (NODES4, PORTS, ORIG_BY_TUPLE, ...)
//! <pin-dir>/programs/<prog>   every program
//! <pin-dir>/links/<prog>      the cgroup link attaching it (keeps it attached without us)
//! ```
//!
//! A first start attaches and pins. A restart finds the pinned links and *adopts* them: it
//! loads its own programs against the same pinned maps and swaps each link's program with
//! `BPF_LINK_UPDATE`, so the hooks are never empty and connections made while the process
//! was down or restarting are redirected by the old programs, later ones by the new.
use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, ProgramError, SockOps, links::FdLink,
    },
};
use redirector_common::{map_names, program_names};

use crate::{
    bpffs, cgroup,
    error::{Error, Result},
    sys,
};

/// The compiled eBPF object, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector-ebpf"));

#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// cgroup v2 directory to attach to.
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    /// Capacity of each node map (IPv4, IPv6). Fixed once the maps are pinned.
    pub max_node_addresses: u32,
    /// Load the connect programs that also record who connected (`--record-callers`); a
    /// kernel without their helpers (before 6.1) gets the plain ones, with a warning.
    pub record_callers: bool,
}

/// A live installation: the loaded object (its programs stay referenced by the pinned links
/// after this is dropped) and the log drain for the programs' warnings.
pub struct Installed {
    pub ebpf: Ebpf,
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Programs whose pinned link was adopted (program swapped in place) rather than created.
    pub adopted: Vec<&'static str>,
    pub attached: Vec<&'static str>,
}

struct ProgSpec {
    name: &'static str,
    hook: &'static str,
    min_kernel: &'static str,
}

const PROGRAMS: [ProgSpec; 6] = [
    ProgSpec {
        name: program_names::CONNECT4,
        hook: "cgroup/connect4",
        min_kernel: "5.7",
    },
    ProgSpec {
        name: program_names::CONNECT6,
        hook: "cgroup/connect6",
        min_kernel: "5.7",
    },
    ProgSpec {
        name: program_names::GETPEERNAME4,
        hook: "cgroup/getpeername4",
        min_kernel: "5.8",
    },
    ProgSpec {
        name: program_names::GETPEERNAME6,
        hook: "cgroup/getpeername6",
        min_kernel: "5.8",
    },
    ProgSpec {
        name: program_names::SOCK_OPS,
        hook: "sockops",
        min_kernel: "5.7",
    },
    ProgSpec {
        name: program_names::GETSOCKOPT,
        hook: "cgroup/getsockopt",
        min_kernel: "5.7",
    },
];

pub fn link_pin(pin_dir: &Path, prog: &str) -> PathBuf {
    pin_dir.join("links").join(prog)
}

/// What the kernel says of `prog`'s pinned link (None: no pin, or not a link). A detached
/// link still answers, with cgroup id 0.
pub fn pinned_link_info(pin_dir: &Path, prog: &str) -> Option<sys::LinkInfo> {
    sys::obj_get(&link_pin(pin_dir, prog))
        .and_then(|fd| sys::link_info(fd.as_fd()))
        .ok()
}

pub fn program_pin(pin_dir: &Path, prog: &str) -> PathBuf {
    pin_dir.join("programs").join(prog)
}

/// Before 5.11 BPF memory is charged to RLIMIT_MEMLOCK; lift it so large maps load.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain setrlimit with a valid struct; failure only matters on old kernels, where
    // the load error that follows says what went wrong.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Checks existing link pins: all must point at `cgroup_id`. Stale pins (link detached, e.g.
/// its cgroup was removed) are deleted so they get re-created.
fn check_existing_links(opts: &InstallOptions, cgroup_id: u64) -> Result<()> {
    for p in &PROGRAMS {
        let path = link_pin(&opts.pin_dir, p.name);
        if !path.exists() {
            continue;
        }
        let info = sys::obj_get(&path)
            .and_then(|fd| sys::link_info(fd.as_fd()))
            .map_err(|e| Error::io(format!("opening pinned link {}", path.display()), e))?;
        if info.cgroup_id == 0 {
            tracing::warn!(link = %path.display(), "pinned link is detached (its cgroup is gone); re-attaching");
            fs::remove_file(&path)
                .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
        } else if info.cgroup_id != cgroup_id {
            return Err(Error::AttachedElsewhere {
                pin_dir: opts.pin_dir.clone(),
                attached: info.cgroup_id,
                attached_path: cgroup::path_of_cgroup_id(info.cgroup_id)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "path not found".into()),
                wanted: opts.cgroup.clone(),
            });
        }
    }
    Ok(())
}

fn load_error(p: &ProgSpec, e: ProgramError) -> Error {
    match Error::ebpf(format!("loading {}", p.name), e) {
        Error::Ebpf { detail, .. } => Error::KernelMissingHook {
            program: p.name,
            hook: p.hook,
            min_kernel: p.min_kernel,
            detail,
        },
        other => other,
    }
}

/// Loads the programs against the pinned maps and attaches (or adopts) them on the cgroup.
/// A first install that fails part way removes what it pinned: nothing is left half set up.
pub fn install(opts: &InstallOptions) -> Result<Installed> {
    let fresh = !PROGRAMS
        .iter()
        .any(|p| link_pin(&opts.pin_dir, p.name).exists());
    install_inner(opts).inspect_err(|_| {
        if fresh && let Err(e) = crate::uninstall::uninstall(&opts.pin_dir) {
            tracing::warn!("cleaning up after a failed install: {e}");
        }
    })
}

fn install_inner(opts: &InstallOptions) -> Result<Installed> {
    bpffs::ensure_pin_dir(&opts.pin_dir)?;
    fs::create_dir_all(opts.pin_dir.join("programs"))
        .map_err(|e| Error::io(format!("creating {}/programs", opts.pin_dir.display()), e))?;
    raise_memlock();
    let cgroup_id = cgroup::cgroup_id(&opts.cgroup)?;
    let cgroup_fd = fs::File::open(&opts.cgroup).map_err(|e| Error::OpenCgroup {
        path: opts.cgroup.clone(),
        source: e,
    })?;
    check_existing_links(opts, cgroup_id)?;

    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&opts.pin_dir)
        .map_max_entries(map_names::NODES4, opts.max_node_addresses)
        .map_max_entries(map_names::NODES6, opts.max_node_addresses)
        .load(OBJECT)
        .map_err(|e| {
            Error::ebpf(
                format!(
                    "loading the eBPF object (maps pinned in {})",
                    opts.pin_dir.display()
                ),
                e,
            )
        })?;
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!("eBPF log drain unavailable: {e}");
            None
        }
    };

    let mut installed = Installed {
        ebpf,
        logger,
        adopted: Vec::new(),
        attached: Vec::new(),
    };
    for p in &PROGRAMS {
        let link_path = link_pin(&opts.pin_dir, p.name);
        if let Some(audit) = opts.record_callers.then(|| audit_variant(p.name)).flatten() {
            let prog = program(&mut installed.ebpf, audit)?;
            let prog: &mut CgroupSockAddr = prog.try_into().map_err(|e| load_error(p, e))?;
            match place(p, prog, &link_path, &cgroup_fd) {
                Ok(adopted) => {
                    pin_program(&mut installed.ebpf, audit, p.name, &opts.pin_dir)?;
                    installed.record(p.name, adopted);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(
                        program = audit,
                        "callers are not recorded (--record-callers): this kernel does not load {audit} ({e}); it needs Linux 6.1+ for bpf_get_current_pid_tgid and bpf_get_current_comm in cgroup programs. Audit lines carry no caller; redirection is unaffected"
                    );
                }
            }
        }
        let prog = program(&mut installed.ebpf, p.name)?;
        let adopted = if p.name == program_names::SOCK_OPS {
            let prog: &mut SockOps = prog.try_into().map_err(|e| load_error(p, e))?;
            place(p, prog, &link_path, &cgroup_fd)?
        } else if p.name == program_names::GETSOCKOPT {
            let prog: &mut CgroupSockopt = prog.try_into().map_err(|e| load_error(p, e))?;
            place(p, prog, &link_path, &cgroup_fd)?
        } else {
            let prog: &mut CgroupSockAddr = prog.try_into().map_err(|e| load_error(p, e))?;
            place(p, prog, &link_path, &cgroup_fd)?
        };
        pin_program(&mut installed.ebpf, p.name, p.name, &opts.pin_dir)?;
        installed.record(p.name, adopted);
    }
    Ok(installed)
}

impl Installed {
    fn record(&mut self, name: &'static str, adopted: bool) {
        if adopted {
            self.adopted.push(name)
        } else {
            self.attached.push(name)
        }
    }
}

/// The caller-recording variant of a connect program.
fn audit_variant(name: &str) -> Option<&'static str> {
    match name {
        program_names::CONNECT4 => Some(program_names::CONNECT4_AUDIT),
        program_names::CONNECT6 => Some(program_names::CONNECT6_AUDIT),
        _ => None,
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, elf: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(elf).ok_or_else(|| Error::Ebpf {
        what: format!("program {elf}"),
        detail: "missing from the object".into(),
    })
}

/// The program kinds we attach to a cgroup, seen the same way.
trait CgroupProgram {
    fn load_prog(&mut self) -> Result<(), ProgramError>;
    fn prog_fd(&self) -> Result<std::os::fd::BorrowedFd<'_>, ProgramError>;
    /// Attaches with a bpf_link and pins it at `path`.
    fn attach_pinned(&mut self, p: &ProgSpec, cgroup: &fs::File, path: &Path) -> Result<()>;
}

macro_rules! cgroup_program {
    ($t:ty) => {
        impl CgroupProgram for $t {
            fn load_prog(&mut self) -> Result<(), ProgramError> {
                self.load()
            }
            fn prog_fd(&self) -> Result<std::os::fd::BorrowedFd<'_>, ProgramError> {
                Ok(self.fd()?.as_fd())
            }
            fn attach_pinned(
                &mut self,
                p: &ProgSpec,
                cgroup: &fs::File,
                path: &Path,
            ) -> Result<()> {
                // bpf_link attachments always coexist with other programs on the cgroup (a
                // CNI's, for example); the kernel rejects any flag on link_create for cgroups,
                // and `Single` is the mode aya maps to flags = 0.
                let link = (|| -> Result<FdLink, ProgramError> {
                    let id = self.attach(cgroup, CgroupAttachMode::Single)?;
                    Ok(FdLink::try_from(self.take_link(id)?)?)
                })()
                .map_err(|e| load_error(p, e))?;
                link.pin(path)
                    .map(drop)
                    .map_err(|e| Error::ebpf(format!("pinning link {}", path.display()), e))
            }
        }
    };
}
cgroup_program!(SockOps);
cgroup_program!(CgroupSockAddr);

// aya cannot turn a getsockopt link into a pinnable one: link_create and pin it ourselves.
impl CgroupProgram for CgroupSockopt {
    fn load_prog(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
    fn prog_fd(&self) -> Result<std::os::fd::BorrowedFd<'_>, ProgramError> {
        Ok(self.fd()?.as_fd())
    }
    fn attach_pinned(&mut self, p: &ProgSpec, cgroup: &fs::File, path: &Path) -> Result<()> {
        let prog = self.prog_fd().map_err(|e| load_error(p, e))?;
        let link = sys::cgroup_link_create(prog, cgroup.as_fd(), sys::BPF_CGROUP_GETSOCKOPT)
            .map_err(|e| Error::KernelMissingHook {
                program: p.name,
                hook: p.hook,
                min_kernel: p.min_kernel,
                detail: format!("BPF_LINK_CREATE: {e}"),
            })?;
        sys::obj_pin(link.as_fd(), path)
            .map_err(|e| Error::io(format!("pinning link {}", path.display()), e))
    }
}

/// Loads `prog`, then swaps it into the pinned link at `link_path` if there is one (adopted:
/// true), or attaches it to the cgroup and pins the new link (false).
fn place(
    p: &ProgSpec,
    prog: &mut impl CgroupProgram,
    link_path: &Path,
    cgroup: &fs::File,
) -> Result<bool> {
    prog.load_prog().map_err(|e| load_error(p, e))?;
    if link_path.exists() {
        let link = sys::obj_get(link_path)
            .map_err(|e| Error::io(format!("opening {}", link_path.display()), e))?;
        let fd = prog.prog_fd().map_err(|e| load_error(p, e))?;
        sys::link_update(link.as_fd(), fd).map_err(|e| {
            Error::io(
                format!(
                    "replacing the program of {} (BPF_LINK_UPDATE)",
                    link_path.display()
                ),
                e,
            )
        })?;
        return Ok(true);
    }
    prog.attach_pinned(p, cgroup, link_path)?;
    Ok(false)
}

/// Pins the loaded program `elf` under `name` (a variant takes its plain program's name).
fn pin_program(ebpf: &mut Ebpf, elf: &str, name: &str, pin_dir: &Path) -> Result<()> {
    let path = program_pin(pin_dir, name);
    // A previous version's program stays loaded only while something references it; drop its
    // pin so the new one can take the name (the link already runs the new program).
    if path.exists() {
        fs::remove_file(&path)
            .map_err(|e| Error::io(format!("removing old pin {}", path.display()), e))?;
    }
    let prog = ebpf.program_mut(elf).expect("program checked above");
    prog.pin(&path)
        .map_err(|e| Error::ebpf(format!("pinning program {}", path.display()), e))
}

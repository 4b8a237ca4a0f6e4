//! The bpf filesystem that holds the pins: mounted on demand, verified before use.
use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs lives by convention; the only place we mount it ourselves.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: statfs fills the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(at: &Path) -> Result<()> {
    fs::create_dir_all(at).map_err(|e| Error::BpffsMount {
        path: at.to_owned(),
        source: e,
    })?;
    let target = CString::new(at.as_os_str().as_bytes()).expect("no NUL in a fixed path");
    // SAFETY: static NUL-terminated strings and a valid target path.
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(Error::BpffsMount {
            path: at.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    tracing::info!(path = %at.display(), "mounted bpffs");
    Ok(())
}

/// Makes sure `pin_dir` exists on a bpf filesystem, mounting bpffs at /sys/fs/bpf if the
/// pin directory is under it and nothing is mounted there yet.
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<()> {
    let existing: PathBuf = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_owned();
    let on_bpffs =
        is_bpffs(&existing).map_err(|e| Error::io(format!("statfs {}", existing.display()), e))?;
    if !on_bpffs {
        let default = Path::new(DEFAULT_BPFFS);
        if pin_dir.starts_with(default) && !existing.starts_with(default) || existing == default {
            mount_bpffs(default)?;
        } else {
            return Err(Error::NotBpffs {
                path: pin_dir.to_owned(),
            });
        }
    }
    for dir in [pin_dir.to_owned(), pin_dir.join("links")] {
        fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    Ok(())
}

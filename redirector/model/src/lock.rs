//! An exclusive lock beside a file that several processes rewrite (the allocation store, the
//! token store): held until the returned file is dropped.
use std::{fs::File, io, os::fd::AsRawFd, path::Path};

/// Takes an exclusive `flock` on `<path>.lock`, blocking until it is ours.
pub fn lock_beside(path: &Path) -> io::Result<File> {
    let lock_path = path.with_extension("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("opening lock file {}: {e}", lock_path.display()),
            )
        })?;
    // SAFETY: flock on an fd we own; blocks until the lock is ours.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("locking {}: {e}", lock_path.display()),
        ));
    }
    Ok(f)
}

//! Wakes a follower when named files in one directory are written or replaced (inotify), so
//! a journal entry is applied when it is appended rather than at the next poll.
use std::{
    ffi::{CString, OsString},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::{OsStrExt, OsStringExt},
    },
    path::Path,
};

use tokio::io::unix::AsyncFd;

pub struct DirWatch {
    fd: AsyncFd<OwnedFd>,
    names: Vec<OsString>,
}

impl DirWatch {
    /// Watches the directory of `files` (all in one directory) for writes, replaces and
    /// creations of them.
    pub fn new(files: &[&Path]) -> io::Result<Self> {
        let dir = files
            .first()
            .and_then(|f| f.parent())
            .map(|d| {
                if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                }
            })
            .ok_or_else(|| io::Error::other("no file to watch"))?;
        // SAFETY: plain syscalls; the descriptor is owned from here on.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let c = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
        let mask = libc::IN_MODIFY | libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO | libc::IN_CREATE;
        // SAFETY: `c` is a valid C string for the duration of the call.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an OwnedFd keeps its one descriptor open until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(DirWatch {
            fd,
            names: files
                .iter()
                .filter_map(|f| f.file_name().map(|n| n.to_owned()))
                .collect(),
        })
    }

    /// Waits until one of the files changes (events for other files are read and skipped).
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            let mut guard = self.fd.readable().await?;
            // SAFETY: reads into a buffer of the given length.
            let n = unsafe {
                libc::read(
                    guard.get_inner().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    continue;
                }
                return Err(e);
            }
            if self.mentions_ours(&buf[..n as usize]) {
                return Ok(());
            }
        }
    }

    /// Whether the events in `buf` name one of the watched files (or overflowed: then
    /// anything may have changed).
    fn mentions_ours(&self, buf: &[u8]) -> bool {
        const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
        let mut at = 0;
        while at + HEADER <= buf.len() {
            // SAFETY: the kernel writes whole events; read_unaligned copes with the offset.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                return true;
            }
            let name_end = (at + HEADER + ev.len as usize).min(buf.len());
            let raw = &buf[at + HEADER..name_end];
            let name = raw.split(|b| *b == 0).next().unwrap_or_default();
            if self.names.contains(&OsString::from_vec(name.to_vec())) {
                return true;
            }
            at = name_end;
        }
        false
    }
}

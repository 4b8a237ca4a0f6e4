//! The few raw `bpf(2)` and socket calls aya does not expose: opening a pinned link as a plain
//! fd, replacing a link's program atomically (`BPF_LINK_UPDATE`, used to adopt pins on restart
//! without a detach gap), force-detaching a link (`BPF_LINK_DETACH`, for uninstall while some
//! process may still hold the link), reading a link's info, and the netns cookie.
use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `SO_NETNS_COOKIE` (Linux 5.14+); not in every libc crate version.
const SO_NETNS_COOKIE: libc::c_int = 71;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a properly sized, initialised bpf_attr prefix for `cmd`; the kernel
    // reads (and for OBJ_GET_INFO writes through a pointer we own) only `size_of::<T>()` bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    // Explicit: the kernel rejects non-zero bytes past the last field, and implicit padding
    // would be uninitialised.
    _pad: u32,
}

/// Opens a pinned bpffs object (link, program or map) as an owned fd.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins `fd` (a link, program or map) at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// `enum bpf_attach_type` values we attach with our own `link_create`.
pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// Attaches `prog` to the cgroup `target` with a bpf_link (`BPF_LINK_CREATE`): for program
/// kinds whose aya link cannot be turned into a pinnable one.
pub fn cgroup_link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Reads and deletes one entry in a single syscall (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, hash
/// maps since Linux 5.14). Ok(None): no such key.
pub fn map_lookup_and_delete<K: Copy, V: Copy + Default>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = V::default();
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes many entries in one syscall (`BPF_MAP_UPDATE_BATCH`, Linux 5.6+ for hash maps).
/// Returns how many were written before an error, with the error.
pub fn map_update_batch<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> (usize, io::Result<()>) {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    // The kernel writes back how many elements it processed into `count`.
    let r = bpf(BPF_MAP_UPDATE_BATCH, &mut attr).map(drop);
    (attr.count as usize, r)
}

/// Deletes many keys in one syscall (`BPF_MAP_DELETE_BATCH`, Linux 5.6+ for hash maps).
/// Returns how many were deleted before an error, with the error.
pub fn map_delete_batch<K: Copy>(map: BorrowedFd<'_>, keys: &[K]) -> (usize, io::Result<()>) {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    let r = bpf(BPF_MAP_DELETE_BATCH, &mut attr).map(drop);
    (attr.count as usize, r)
}

/// Reads every entry of a hash map in chunks (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6+): a few
/// syscalls instead of two per entry.
pub fn map_lookup_all<K: Copy + Default, V: Copy + Default>(
    map: BorrowedFd<'_>,
) -> io::Result<Vec<(K, V)>> {
    // Large enough for any bucket (ENOSPC otherwise) and few round trips.
    const CHUNK: usize = 8192;
    let mut out = Vec::new();
    let (mut keys, mut values) = (vec![K::default(); CHUNK], vec![V::default(); CHUNK]);
    // The batch token is the hash table's bucket index (u32); 8 bytes leave room.
    let (mut token, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token as *const u64 as u64
            },
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match r {
            Ok(_) => {}
            // ENOENT: no more entries (the last chunk came with it).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        token = next;
        first = false;
    }
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Atomically swaps the program behind a link: the attach point is never empty.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// Detaches a link from its hook now, even if other fds or pins still reference it.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// The prefix of `struct bpf_link_info` for cgroup links.
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    _pad: u32,
    /// For cgroup links: the cgroup's id (its inode number in cgroupfs); 0 once detached.
    pub cgroup_id: u64,
    pub attach_type: u32,
    _pad2: u32,
    _rest: [u64; 6],
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// The cookie of the network namespace `sock` lives in (the calling thread's, for a new socket).
pub fn netns_cookie_of(sock: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length for a u64 option value.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(cookie)
    }
}

/// The cookie of the calling thread's network namespace.
pub fn current_netns_cookie() -> io::Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    netns_cookie_of(sock.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layouts_match_the_kernel_abi() {
        // include/uapi/linux/bpf.h: the obj_get member is { __aligned_u64 pathname; __u32
        // bpf_fd; __u32 file_flags; __s32 path_fd; } (padded to 24), link_update is four u32s.
        assert_eq!(size_of::<ObjGetAttr>(), 24);
        assert_eq!(size_of::<LinkUpdateAttr>(), 16);
        assert_eq!(size_of::<InfoAttr>(), 16);
        assert_eq!(size_of::<BatchAttr>(), 56);
        assert_eq!(size_of::<ElemAttr>(), 32);
        // bpf_link_info: type, id, prog_id, then an 8-aligned union; cgroup_id is at 16.
        assert_eq!(std::mem::offset_of!(LinkInfo, cgroup_id), 16);
        assert_eq!(std::mem::offset_of!(LinkInfo, attach_type), 24);
    }
}

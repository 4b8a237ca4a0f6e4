//! The original destination of an accepted ingress connection, asked of the kernel with
//! `getsockopt(SO_ORIGINAL_DST)`: the redirector's cgroup/getsockopt program answers it (see
//! `redirector_common::sockopt`). No capability, no map descriptor and no bpf() call: the
//! internet-facing server can run with every capability dropped.
use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use edge_model::OriginalDst;
use redirector_common::{orig_flags, sockopt};

/// One `getsockopt(SO_ORIGINAL_DST)` into `buf`; returns the length the kernel wrote.
fn getsockopt(fd: BorrowedFd<'_>, level: i32, buf: &mut [u8]) -> io::Result<usize> {
    getsockopt_named(fd, level, sockopt::SO_ORIGINAL_DST, buf)
}

fn getsockopt_named(
    fd: BorrowedFd<'_>,
    level: i32,
    optname: i32,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buf is valid for `len` bytes, and len is a valid socklen_t the kernel updates.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            optname,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(len as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether the redirector's getsockopt program covers this process's sockets (its cgroup is
/// at or under the one the redirector attached to). `sock` is any socket of this process.
pub fn program_answers(sock: BorrowedFd<'_>) -> bool {
    let mut buf = [0u8; sockopt::PROBE_LEN];
    matches!(getsockopt(sock, sockopt::SOL_IP, &mut buf), Ok(n) if n == buf.len())
        && u32::from_ne_bytes(buf) == sockopt::PROBE_ANSWER
}

/// Takes the original destination of an accepted connection (the kernel deletes the entry as
/// it answers). `Ok(None)`: the connection was not redirected by us, or its entry was evicted;
/// the ingress refuses it. `ipv6_socket`: the accepted socket is AF_INET6.
pub fn take(sock: BorrowedFd<'_>, ipv6_socket: bool) -> io::Result<Option<OriginalDst>> {
    let mut buf = [0u8; 28];
    let (level, want) = if ipv6_socket {
        (sockopt::SOL_IPV6, 28)
    } else {
        (sockopt::SOL_IP, 16)
    };
    let n = match getsockopt(sock, level, &mut buf[..want]) {
        Ok(n) => n,
        // ENOENT: conntrack has no entry either; ENOPROTOOPT: no conntrack module; EINVAL:
        // conntrack did not like the socket. All mean: not redirected by us.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ENOPROTOOPT | libc::EINVAL)
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    Ok(sockopt::decode(&buf[..n]).map(|d| OriginalDst {
        addr: d.addr,
        from_pod: d.flags & orig_flags::FROM_POD != 0,
        ambiguous: d.flags & orig_flags::AMBIGUOUS != 0,
        probe: d.flags & orig_flags::PROBE != 0,
    }))
}

/// Who opened an accepted redirected connection, if the redirector recorded it
/// (`redirector run --record-callers`); taken, like the original destination.
pub fn take_caller(sock: BorrowedFd<'_>, ipv6_socket: bool) -> Option<sockopt::CallerAnswer> {
    let mut buf = [0u8; sockopt::CALLER_ANSWER_LEN];
    let level = if ipv6_socket {
        sockopt::SOL_IPV6
    } else {
        sockopt::SOL_IP
    };
    let n = getsockopt_named(sock, level, sockopt::SO_ORIGINAL_CALLER, &mut buf).ok()?;
    sockopt::decode_caller(&buf[..n])
}

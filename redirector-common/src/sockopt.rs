//! The ingress asks the kernel for a redirected connection's original destination with
//! `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (`SOL_IPV6, IP6T_SO_ORIGINAL_DST` on IPv6 sockets),
//! the call iptables-based proxies already make. The redirector's cgroup/getsockopt program
//! answers it from `ORIG_BY_TUPLE`, so the ingress needs no capability and no map descriptor.
//!
//! The answer is a plain `sockaddr_in` / `sockaddr_in6` with the original address and port.
//! Four bytes that the kernel leaves unused (`sin_zero`, `sin6_scope_id`) carry [`MARK`] and
//! the [`crate::orig_flags`]: the mark tells our answer from conntrack's (an iptables DNAT into
//! the ingress is not a redirect of ours, and is refused like any connection we did not
//! redirect).
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h); `IP6T_SO_ORIGINAL_DST` has the same value.
pub const SO_ORIGINAL_DST: i32 = 80;
/// "RD": this answer came from the redirector's program.
pub const MARK: u16 = 0x5244;

/// The probe: `SO_ORIGINAL_DST` at `SOL_IP` with a 4-byte buffer, which conntrack rejects
/// (EINVAL) and the program answers with [`PROBE_ANSWER`], on any socket. A process learns
/// this way whether the program covers its cgroup before it relies on it.
pub const PROBE_LEN: usize = 4;
/// "RD" and the answer format's version.
pub const PROBE_ANSWER: u32 = (MARK as u32) << 16 | 1;

/// `struct sockaddr_in` as the program writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Answer4 {
    pub family: u16,
    /// Network byte order.
    pub port: u16,
    /// Network byte order.
    pub addr: u32,
    pub mark: u16,
    pub flags: u16,
    pub zero: u32,
}

/// `struct sockaddr_in6` as the program writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Answer6 {
    pub family: u16,
    /// Network byte order.
    pub port: u16,
    pub flowinfo: u32,
    /// Network byte order words (an IPv4 destination IPv4-mapped).
    pub addr: [u32; 4],
    pub mark: u16,
    pub flags: u16,
}

/// `getsockopt(SOL_IP or SOL_IPV6, SO_ORIGINAL_CALLER)` on an accepted ingress socket: the
/// program answers with a [`CallerAnswer`] (taken: read once) when the caller was recorded.
/// No kernel option has this number, so without an answer the call fails (ENOPROTOOPT).
pub const SO_ORIGINAL_CALLER: i32 = 0x5244;
/// The first word of a [`CallerAnswer`].
pub const CALLER_MAGIC: u32 = (MARK as u32) << 16 | 2;

/// What the program writes for `SO_ORIGINAL_CALLER`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallerAnswer {
    pub magic: u32,
    pub pid: u32,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub comm: [u8; 16],
}

pub const CALLER_ANSWER_LEN: usize = core::mem::size_of::<CallerAnswer>();

/// Reads a [`CallerAnswer`]; `None` if it is not one.
pub fn decode_caller(b: &[u8]) -> Option<CallerAnswer> {
    if b.len() < CALLER_ANSWER_LEN {
        return None;
    }
    let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64_at = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        u64::from_ne_bytes(w)
    };
    if u32_at(0) != CALLER_MAGIC {
        return None;
    }
    let mut comm = [0u8; 16];
    comm.copy_from_slice(&b[24..40]);
    Some(CallerAnswer {
        magic: CALLER_MAGIC,
        pid: u32_at(4),
        cgroup_id: u64_at(8),
        netns_cookie: u64_at(16),
        comm,
    })
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// A decoded answer: the original destination and its [`crate::orig_flags`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub addr: SocketAddr,
    pub flags: u16,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

/// Reads what `getsockopt` returned. `None`: not an answer of ours (conntrack's, or too short).
pub fn decode(b: &[u8]) -> Option<Decoded> {
    if b.len() < 16 {
        return None;
    }
    let family = u16_at(b, 0);
    let port = u16::from_be_bytes([b[2], b[3]]);
    let (ip, mark_at) = match family {
        AF_INET => (IpAddr::V4(Ipv4Addr::new(b[4], b[5], b[6], b[7])), 8),
        AF_INET6 if b.len() >= 28 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[8..24]);
            (IpAddr::V6(Ipv6Addr::from(o)).to_canonical(), 24)
        }
        _ => return None,
    };
    if u16_at(b, mark_at) != MARK {
        return None;
    }
    Some(Decoded {
        addr: SocketAddr::new(ip, port),
        flags: u16_at(b, mark_at + 2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    fn bytes<T: Copy>(v: &T) -> &[u8] {
        // SAFETY: plain repr(C) integers without padding (sizes checked below).
        unsafe { core::slice::from_raw_parts((v as *const T).cast(), size_of::<T>()) }
    }

    #[test]
    fn layouts_are_the_kernels() {
        assert_eq!(size_of::<Answer4>(), 16, "sizeof(struct sockaddr_in)");
        assert_eq!(size_of::<Answer6>(), 28, "sizeof(struct sockaddr_in6)");
    }

    #[test]
    fn an_ipv4_answer_reads_back() {
        let a = Answer4 {
            family: AF_INET,
            port: 10250u16.to_be(),
            addr: u32::from_ne_bytes([198, 51, 100, 7]),
            mark: MARK,
            flags: crate::orig_flags::FROM_POD,
            zero: 0,
        };
        assert_eq!(
            decode(bytes(&a)),
            Some(Decoded {
                addr: "198.51.100.7:10250".parse().unwrap(),
                flags: crate::orig_flags::FROM_POD
            })
        );
    }

    #[test]
    fn an_ipv6_answer_reads_back_and_mapped_ones_are_ipv4() {
        let ip: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let o = ip.octets();
        let words = [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]));
        let mut a = Answer6 {
            family: AF_INET6,
            port: 10255u16.to_be(),
            flowinfo: 0,
            addr: words,
            mark: MARK,
            flags: crate::orig_flags::AMBIGUOUS,
        };
        let d = decode(bytes(&a)).unwrap();
        assert_eq!(d.addr, "[2001:db8::7]:10255".parse().unwrap());
        assert_eq!(d.flags, crate::orig_flags::AMBIGUOUS);
        a.addr = crate::v4_mapped(u32::from_ne_bytes([203, 0, 113, 9]));
        assert_eq!(
            decode(bytes(&a)).unwrap().addr,
            "203.0.113.9:10255".parse().unwrap()
        );
    }

    #[test]
    fn a_caller_answer_reads_back_and_others_do_not() {
        assert_eq!(CALLER_ANSWER_LEN, 40);
        let mut comm = [0u8; 16];
        comm[..5].copy_from_slice(b"probe");
        let a = CallerAnswer {
            magic: CALLER_MAGIC,
            pid: 4242,
            cgroup_id: 77,
            netns_cookie: 4096,
            comm,
        };
        assert_eq!(decode_caller(bytes(&a)), Some(a));
        assert_eq!(decode_caller(&bytes(&a)[..39]), None);
        assert_eq!(decode_caller(&[0u8; 40]), None);
    }

    #[test]
    fn conntracks_answer_and_short_buffers_are_not_ours() {
        // What nf_conntrack returns for a DNAT: sin_zero is zero.
        let a = Answer4 {
            family: AF_INET,
            port: 80u16.to_be(),
            addr: 1,
            ..Default::default()
        };
        assert_eq!(decode(bytes(&a)), None);
        assert_eq!(decode(&bytes(&a)[..8]), None);
        assert_eq!(decode(&[0u8; 28]), None);
    }
}

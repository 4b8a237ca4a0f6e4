//! Types shared by the redirector's eBPF programs (`redirector-ebpf`) and user space
//! (`redirector`): map keys and values, map and program names, capacities, counter indexes.
//!
//! Every type is `#[repr(C)]` with no implicit padding (explicit `_pad` fields, `u32` flags
//! instead of `bool`), so the kernel and user space agree byte for byte; sizes are tested on
//! the host. Byte order is stated on every field: kernel contexts hand out IP addresses in
//! network byte order, ports in different orders depending on the hook.
//!
//! Addresses are always 16 bytes: an IPv4 address is stored IPv4-mapped
//! (`::ffff:a.b.c.d`), so one key type serves connect4, connect6 (including IPv4-mapped
//! destinations on dual-stack sockets) and sock_ops.
#![no_std]

/// An IP address as four 32-bit words in network byte order, exactly as the kernel's
/// `user_ip6` / `local_ip6` fields hold it. IPv4 is stored IPv4-mapped: `[0, 0, 0xffff (BE), ip4]`.
pub type Ip6Words = [u32; 4];

/// The third word of an IPv4-mapped address (`::ffff:0:0/96`) in network byte order, read
/// as a native-endian `u32`.
pub const V4_MAPPED_WORD2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Builds the IPv4-mapped form of an IPv4 address given in network byte order.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> Ip6Words {
    [0, 0, V4_MAPPED_WORD2, ip4_be]
}

/// True if the address is IPv4-mapped (`::ffff:a.b.c.d`).
#[inline(always)]
pub const fn is_v4_mapped(ip: &Ip6Words) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD2
}

/// Value of the node maps (`NODES4`, `NODES6`): present = the address belongs to an edge node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeValue {
    /// Bit set of [`node_flags`].
    pub flags: u32,
}

pub mod sockopt;

pub mod node_flags {
    /// Two or more edge nodes share this address. The kernel still redirects (so the tunnel
    /// ingress can refuse it with a clear error naming the nodes); the ingress never routes it.
    pub const AMBIGUOUS: u32 = 1;
    /// The redirector's ingress probe address (`--probe-address`), no node's: the tunnel
    /// ingress answers a connection to it itself, which shows the whole redirect path works.
    pub const PROBE: u32 = 2;
}

/// Value of the `PORTS` map (key: destination port, host byte order, `u16`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortValue {
    /// Reserved; zero.
    pub flags: u32,
}

/// One tunnel ingress address that redirected connections are rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ingress {
    /// Network byte order words; IPv4 stored IPv4-mapped.
    pub ip: Ip6Words,
    /// Host byte order. 0 = no ingress configured: matching connections pass through and are
    /// counted as `NO_INGRESS`.
    pub port: u16,
    pub _pad: u16,
}

/// The single entry of the `CONFIG` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Network namespace cookie (`SO_NETNS_COOKIE`) of the redirector's own namespace: callers
    /// there are "host" callers and go to the loopback ingress; callers in any other namespace
    /// (pods) go to the pod ingress, which their namespace can reach.
    pub host_netns_cookie: u64,
    /// For IPv4 destinations (and IPv4-mapped ones on dual-stack sockets) from the host.
    pub host4: Ingress,
    /// For IPv4 destinations from other network namespaces.
    pub pod4: Ingress,
    /// For IPv6 destinations from the host.
    pub host6: Ingress,
    /// For IPv6 destinations from other network namespaces.
    pub pod6: Ingress,
}

/// The original destination of a redirected connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Network byte order words; IPv4 stored IPv4-mapped.
    pub ip: Ip6Words,
    /// Host byte order.
    pub port: u16,
    /// Bit set of [`orig_flags`].
    pub flags: u16,
}

pub mod orig_flags {
    /// The client was outside the host network namespace (sent to the pod ingress).
    pub const FROM_POD: u16 = 1;
    /// The destination node address carries [`crate::node_flags::AMBIGUOUS`].
    pub const AMBIGUOUS: u16 = 2;
    /// The destination carries [`crate::node_flags::PROBE`].
    pub const PROBE: u16 = 4;
}

/// Who opened a redirected connection, recorded by the `*_audit` variants of connect4/6
/// (`redirector run --record-callers`) for the tunnel server's audit trail.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    /// Thread group id (the process id) in the initial pid namespace.
    pub pid: u32,
    pub _pad: u32,
    /// The cgroup v2 id (the directory's inode number) of the calling task.
    pub cgroup_id: u64,
    /// The caller's network namespace cookie (`SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
    /// The task's command name, NUL padded.
    pub comm: [u8; 16],
}

/// Key of `ORIG_BY_TUPLE`: a redirected connection as the ingress sees it on `accept()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockTuple {
    /// The client's local address (the ingress's peer). Network byte order words.
    pub client_ip: Ip6Words,
    /// The ingress address the client was rewritten to. Network byte order words.
    pub ingress_ip: Ip6Words,
    /// Host byte order.
    pub client_port: u16,
    /// Host byte order.
    pub ingress_port: u16,
}

/// Map names (as in the eBPF object and under the pin directory).
pub mod map_names {
    pub const NODES4: &str = "NODES4";
    pub const NODES6: &str = "NODES6";
    pub const PORTS: &str = "PORTS";
    pub const CONFIG: &str = "CONFIG";
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    pub const COUNTERS: &str = "COUNTERS";
    pub const CALLER_BY_COOKIE: &str = "CALLER_BY_COOKIE";
    pub const CALLER_BY_TUPLE: &str = "CALLER_BY_TUPLE";
    pub const ALL: [&str; 9] = [
        NODES4,
        NODES6,
        PORTS,
        CONFIG,
        ORIG_BY_COOKIE,
        ORIG_BY_TUPLE,
        COUNTERS,
        CALLER_BY_COOKIE,
        CALLER_BY_TUPLE,
    ];
}

/// Program names (the eBPF functions), also the names of their pinned links.
pub mod program_names {
    pub const CONNECT4: &str = "redirect_connect4";
    pub const CONNECT6: &str = "redirect_connect6";
    pub const GETPEERNAME4: &str = "orig_getpeername4";
    pub const GETPEERNAME6: &str = "orig_getpeername6";
    pub const SOCK_OPS: &str = "publish_sock_ops";
    pub const GETSOCKOPT: &str = "orig_getsockopt";
    /// The variants of CONNECT4/6 that also record the caller ([`crate::Caller`]); loaded in
    /// their place with `--record-callers` (Linux 6.1+), pinned under the same names.
    pub const CONNECT4_AUDIT: &str = "redirect_connect4_audit";
    pub const CONNECT6_AUDIT: &str = "redirect_connect6_audit";
    pub const ALL: [&str; 6] = [
        CONNECT4,
        CONNECT6,
        GETPEERNAME4,
        GETPEERNAME6,
        SOCK_OPS,
        GETSOCKOPT,
    ];
}

/// Default capacities. The node maps are sized at load time from configuration; these are
/// what the object declares.
pub mod capacity {
    /// Edge node addresses per family (hash map, allocated on use: `BPF_F_NO_PREALLOC`).
    pub const NODES: u32 = 131_072;
    /// Redirected ports.
    pub const PORTS: u32 = 1_024;
    /// In-flight redirected sockets (LRU): from `connect()` until the socket closes.
    pub const ORIG_BY_COOKIE: u32 = 65_536;
    /// Established redirected connections waiting for the ingress's `accept()` (LRU).
    pub const ORIG_BY_TUPLE: u32 = 65_536;
    /// Callers of redirected sockets, by cookie (LRU); empty unless callers are recorded.
    pub const CALLER_BY_COOKIE: u32 = 16_384;
    /// Callers of established redirected connections, until the ingress reads them (LRU).
    pub const CALLER_BY_TUPLE: u32 = 16_384;
}

/// Indexes into the per-CPU `COUNTERS` array.
pub mod counter {
    /// connect() to an edge node address and redirected port, rewritten to an ingress.
    pub const REDIRECTED: u32 = 0;
    /// connect() not for an edge node address or port (TCP only): left alone.
    pub const PASSED: u32 = 1;
    /// Edge destination, but no ingress is configured for its family / namespace kind.
    pub const NO_INGRESS: u32 = 2;
    /// A redirect was refused (connect() gets EPERM) because its original destination could
    /// not be recorded.
    pub const MAP_FULL: u32 = 3;
    /// A redirected connection was established but its original destination was gone
    /// (evicted from the LRU) or could not be published for the ingress.
    pub const ORIG_DST_MISS: u32 = 4;
    /// Original destination published for the ingress (sock_ops, established).
    pub const PUBLISHED: u32 = 5;
    /// getpeername() answered with the original destination.
    pub const GETPEERNAME_REWRITTEN: u32 = 6;
    pub const LEN: u32 = 7;
    /// Names for status output and metrics, indexed like the constants above.
    pub const NAMES: [&str; LEN as usize] = [
        "redirected",
        "passed",
        "no_ingress",
        "map_full",
        "orig_dst_miss",
        "published",
        "getpeername_rewritten",
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is repr(C), Copy, made only of integers, with no implicit padding
    // (checked by the size tests below).
    unsafe impl aya::Pod for super::NodeValue {}
    unsafe impl aya::Pod for super::PortValue {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockTuple {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn sizes_have_no_implicit_padding() {
        // Sum of field sizes == struct size means no hidden padding bytes.
        assert_eq!(size_of::<NodeValue>(), 4);
        assert_eq!(size_of::<PortValue>(), 4);
        assert_eq!(size_of::<Ingress>(), 16 + 2 + 2);
        assert_eq!(size_of::<Config>(), 8 + 4 * size_of::<Ingress>());
        assert_eq!(align_of::<Config>(), 8);
        assert_eq!(size_of::<OrigDst>(), 16 + 2 + 2);
        assert_eq!(size_of::<SockTuple>(), 16 + 16 + 2 + 2);
    }

    #[test]
    fn v4_mapped_layout_matches_the_wire() {
        // 198.51.100.10 in network byte order, as the kernel's user_ip4 holds it.
        let ip4 = u32::from_ne_bytes([198, 51, 100, 10]);
        let m = v4_mapped(ip4);
        let mut bytes = [0u8; 16];
        for (i, w) in m.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 51, 100, 10]
        );
        assert!(is_v4_mapped(&m));
        assert!(!is_v4_mapped(&[0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]));
    }

    #[test]
    fn names_are_consistent() {
        assert_eq!(counter::NAMES.len(), counter::LEN as usize);
        assert_eq!(map_names::ALL.len(), 9);
        // Every map once: uninstall removes the pins by this list.
        for (i, a) in map_names::ALL.iter().enumerate() {
            assert!(!map_names::ALL[i + 1..].contains(a), "{a} twice");
        }
    }
}

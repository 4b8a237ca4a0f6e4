//! Kernel half of the redirector: cgroup sock_addr and sock_ops programs.
//!
//! Data path, per redirected connection:
//! 1. `redirect_connect4` / `redirect_connect6` (cgroup/connect4, connect6): the destination is an
//!    edge node address (`NODES4` / `NODES6`) and the port is in `PORTS` -> remember the original
//!    destination under the socket cookie (`ORIG_BY_COOKIE`) and rewrite the destination to the
//!    tunnel ingress: loopback for callers in the host network namespace, the pod ingress for
//!    callers in any other namespace (their own 127.0.0.1 is not the tunnel).
//! 2. `publish_sock_ops` (sock_ops): at `ACTIVE_ESTABLISHED` the client's local address and port
//!    are known; publish the original destination under the 4-tuple the ingress will see on
//!    `accept()` (`ORIG_BY_TUPLE`). This runs before the client sends the final ACK of the
//!    handshake, so the entry exists before the ingress can accept the connection: no race.
//!    On close, the cookie entry is dropped.
//! 3. `orig_getpeername4` / `orig_getpeername6`: the client sees the address it dialled.
//! 4. `orig_getsockopt` (cgroup/getsockopt): the ingress asks `SO_ORIGINAL_DST` on the accepted
//!    socket and gets the entry of step 2 (taken: read and deleted), so the internet-facing
//!    tunnel server needs no capability to read the map. It runs for every getsockopt() in
//!    the cgroup, so anything else returns at once.
//!
//! With `--record-callers` the `*_audit` variants of step 1 also store who connected (pid,
//! command, cgroup, network namespace) under the cookie; step 2 moves it to `CALLER_BY_TUPLE`,
//! and step 4 answers it for the private `SO_ORIGINAL_CALLER` (the audit trail).
//!
//! Kernel quirks that shape the code: `user_ip6` and `local_ip6`/`remote_ip6` may only be
//! accessed one 32-bit word at a time (the verifier rejects the 64-bit loads LLVM likes to merge
//! adjacent words into), hence the volatile word accesses; sock_ops' `remote_port` holds the
//! network-order port in its upper 16 bits on little-endian hosts, `local_port` is host order.
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_F_NO_PREALLOC, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sock_addr,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    },
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext, SockoptContext},
};
use redirector_common::{
    Caller, Config, Ingress, Ip6Words, NodeValue, OrigDst, PortValue, SockTuple, capacity, counter,
    is_v4_mapped, node_flags, orig_flags,
    sockopt::{self, Answer4, Answer6},
    v4_mapped,
};

/// Edge node IPv4 addresses (network byte order).
#[map]
static NODES4: HashMap<u32, NodeValue> = HashMap::pinned(capacity::NODES, BPF_F_NO_PREALLOC);
/// Edge node IPv6 addresses.
#[map]
static NODES6: HashMap<Ip6Words, NodeValue> = HashMap::pinned(capacity::NODES, BPF_F_NO_PREALLOC);
/// Redirected destination ports (host byte order).
#[map]
static PORTS: HashMap<u16, PortValue> = HashMap::pinned(capacity::PORTS, 0);
#[map]
static CONFIG: Array<Config> = Array::pinned(1, 0);
/// socket cookie -> original destination; from connect() until the socket closes.
#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(capacity::ORIG_BY_COOKIE, 0);
/// 4-tuple seen by the ingress -> original destination; the ingress deletes what it consumes.
#[map]
static ORIG_BY_TUPLE: LruHashMap<SockTuple, OrigDst> =
    LruHashMap::pinned(capacity::ORIG_BY_TUPLE, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::LEN, 0);
/// socket cookie -> who connected; written only by the `*_audit` connect programs.
#[map]
static CALLER_BY_COOKIE: LruHashMap<u64, Caller> =
    LruHashMap::pinned(capacity::CALLER_BY_COOKIE, 0);
/// 4-tuple seen by the ingress -> who connected; the ingress takes what it reads.
#[map]
static CALLER_BY_TUPLE: LruHashMap<SockTuple, Caller> =
    LruHashMap::pinned(capacity::CALLER_BY_TUPLE, 0);

const ALLOW: i32 = 1;
/// connect() fails with EPERM: used only when a redirect cannot be recorded, because a
/// connection whose original destination is unknown would be refused by the ingress anyway,
/// and an immediate error beats a connection that is reset after it was accepted.
const DENY: i32 = 0;
const SOCK_STREAM: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[inline(always)]
fn bump(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // Per-CPU slot: no other CPU writes it, and sock_addr hooks run with preemption
        // disabled, so a plain add is safe.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn read_ip6(p: *const [u32; 4]) -> Ip6Words {
    let w = p as *const u32;
    unsafe {
        [
            read_volatile(w),
            read_volatile(w.add(1)),
            read_volatile(w.add(2)),
            read_volatile(w.add(3)),
        ]
    }
}

#[inline(always)]
fn write_ip6(p: *mut [u32; 4], ip: &Ip6Words) {
    let w = p as *mut u32;
    unsafe {
        write_volatile(w, ip[0]);
        write_volatile(w.add(1), ip[1]);
        write_volatile(w.add(2), ip[2]);
        write_volatile(w.add(3), ip[3]);
    }
}

/// The ingress to use for this caller: host namespace or pod namespace.
#[inline(always)]
fn pick_ingress(ctx: &SockAddrContext, v6: bool) -> Option<(Ingress, u16)> {
    let cfg = CONFIG.get(0)?;
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let from_pod = netns != cfg.host_netns_cookie;
    let ingress = match (v6, from_pod) {
        (false, false) => cfg.host4,
        (false, true) => cfg.pod4,
        (true, false) => cfg.host6,
        (true, true) => cfg.pod6,
    };
    if ingress.port == 0 {
        return None;
    }
    Some((ingress, if from_pod { orig_flags::FROM_POD } else { 0 }))
}

/// Records the original destination under the socket cookie. Err = could not record.
#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: &OrigDst) -> Result<(), i32> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ORIG_BY_COOKIE
        .insert(&cookie, orig, BPF_ANY as u64)
        .map_err(|_| {
            bump(counter::MAP_FULL);
            aya_log_ebpf::warn!(
                ctx,
                "redirect refused: ORIG_BY_COOKIE update failed (map full?)"
            );
            DENY
        })
}

#[inline(always)]
fn sock_addr(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

/// The decision shared by connect4 and connect6: is (node, port) redirected, to which ingress?
/// On Ok(Some) the original destination is recorded and the caller rewrites the address.
/// Counters are bumped here, once per connect(). `AUDIT` also records who connected: the
/// helpers for that (pid, comm) exist in cgroup programs from Linux 6.1, hence a variant.
#[inline(always)]
fn plan<const AUDIT: bool>(
    ctx: &SockAddrContext,
    node: Option<&NodeValue>,
    ip: Ip6Words,
    port: u16,
    v6: bool,
) -> Result<Option<Ingress>, i32> {
    let Some(node) = node else {
        bump(counter::PASSED);
        return Ok(None);
    };
    if unsafe { PORTS.get(&port) }.is_none() {
        bump(counter::PASSED);
        return Ok(None);
    }
    let Some((ingress, flags)) = pick_ingress(ctx, v6) else {
        bump(counter::NO_INGRESS);
        return Ok(None);
    };
    let ambiguous = if node.flags & node_flags::AMBIGUOUS != 0 {
        orig_flags::AMBIGUOUS
    } else {
        0
    };
    let probe = if node.flags & node_flags::PROBE != 0 {
        orig_flags::PROBE
    } else {
        0
    };
    remember(
        ctx,
        &OrigDst {
            ip,
            port,
            flags: flags | ambiguous | probe,
        },
    )?;
    if AUDIT {
        record_caller(ctx);
    }
    bump(counter::REDIRECTED);
    Ok(Some(ingress))
}

/// Best effort: a caller that cannot be recorded leaves its audit line without one, and
/// never fails the connection.
#[inline(always)]
fn record_caller(ctx: &SockAddrContext) {
    let caller = Caller {
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = CALLER_BY_COOKIE.insert(&cookie, &caller, BPF_ANY as u64);
}

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4::<false>(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4_audit(ctx: SockAddrContext) -> i32 {
    match try_connect4::<true>(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_connect4<const AUDIT: bool>(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = sock_addr(ctx);
    if unsafe { (*sa).type_ } != SOCK_STREAM {
        return Ok(ALLOW);
    }
    let ip4 = unsafe { (*sa).user_ip4 };
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    let node = unsafe { NODES4.get(&ip4) };
    if let Some(ingress) = plan::<AUDIT>(ctx, node, v4_mapped(ip4), port, false)? {
        unsafe {
            (*sa).user_ip4 = ingress.ip[3];
            (*sa).user_port = u32::from(ingress.port.to_be());
        }
    }
    Ok(ALLOW)
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6::<false>(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6_audit(ctx: SockAddrContext) -> i32 {
    match try_connect6::<true>(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_connect6<const AUDIT: bool>(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = sock_addr(ctx);
    if unsafe { (*sa).type_ } != SOCK_STREAM {
        return Ok(ALLOW);
    }
    let ip = read_ip6(unsafe { addr_of!((*sa).user_ip6) });
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    // A dual-stack socket dialling ::ffff:a.b.c.d is an IPv4 connection: same node map, same
    // IPv4 ingress (written back IPv4-mapped).
    let mapped = is_v4_mapped(&ip);
    let node = if mapped {
        unsafe { NODES4.get(&ip[3]) }
    } else {
        unsafe { NODES6.get(&ip) }
    };
    if let Some(ingress) = plan::<AUDIT>(ctx, node, ip, port, !mapped)? {
        write_ip6(unsafe { addr_of_mut!((*sa).user_ip6) }, &ingress.ip);
        unsafe { (*sa).user_port = u32::from(ingress.port.to_be()) };
    }
    Ok(ALLOW)
}

/// Shows the original destination to the client. getpeername hooks must return 1.
#[inline(always)]
fn getpeername(ctx: &SockAddrContext, v6: bool) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }) else {
        return ALLOW;
    };
    let sa = sock_addr(ctx);
    if v6 {
        write_ip6(unsafe { addr_of_mut!((*sa).user_ip6) }, &orig.ip);
    } else {
        unsafe { (*sa).user_ip4 = orig.ip[3] };
    }
    unsafe { (*sa).user_port = u32::from(orig.port.to_be()) };
    bump(counter::GETPEERNAME_REWRITTEN);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn orig_getpeername4(ctx: SockAddrContext) -> i32 {
    getpeername(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn orig_getpeername6(ctx: SockAddrContext) -> i32 {
    getpeername(&ctx, true)
}

// Named unlike its section: bpf-linker refuses a function called `sockops`.
#[sock_ops]
pub fn publish_sock_ops(ctx: SockOpsContext) -> u32 {
    match try_sock_ops(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<u32, u32> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return Ok(1);
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }) else {
        // Not a redirected socket (or its entry was evicted: counted at establishment).
        if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
            && ctx.cb_flags() & BPF_SOCK_OPS_STATE_CB_FLAG != 0
        {
            bump(counter::ORIG_DST_MISS);
        }
        return Ok(1);
    };
    match op {
        // Ask for state callbacks before the SYN goes out, so a failed connect also reaches
        // TCP_CLOSE below and frees its cookie entry.
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let orig = *orig;
            let tuple = client_tuple(ctx).ok_or(1u32)?;
            if ORIG_BY_TUPLE.insert(&tuple, &orig, BPF_ANY as u64).is_ok() {
                bump(counter::PUBLISHED);
            } else {
                bump(counter::ORIG_DST_MISS);
            }
            if let Some(caller) = unsafe { CALLER_BY_COOKIE.get(&cookie) } {
                let caller = *caller;
                let _ = CALLER_BY_TUPLE.insert(&tuple, &caller, BPF_ANY as u64);
            }
        }
        _ => {
            // STATE_CB: args[1] is the new state. The tuple entry is NOT removed here: a
            // client may close before the ingress accepts, and the ingress still needs it.
            if ctx.arg(1) == BPF_TCP_CLOSE {
                let _ = ORIG_BY_COOKIE.remove(&cookie);
                let _ = CALLER_BY_COOKIE.remove(&cookie);
            }
        }
    }
    Ok(1)
}

/// The 4-tuple of the client's socket as the ingress will see it (peer = client).
#[inline(always)]
fn client_tuple(ctx: &SockOpsContext) -> Option<SockTuple> {
    let family = ctx.family();
    let (client_ip, ingress_ip) = if family == AF_INET {
        (v4_mapped(ctx.local_ip4()), v4_mapped(ctx.remote_ip4()))
    } else if family == AF_INET6 {
        // IPv4-mapped connections on dual-stack sockets already read as ::ffff:a.b.c.d here.
        let ops = ctx.ops;
        (
            read_ip6(unsafe { addr_of!((*ops).local_ip6) }),
            read_ip6(unsafe { addr_of!((*ops).remote_ip6) }),
        )
    } else {
        return None;
    };
    Some(SockTuple {
        client_ip,
        ingress_ip,
        client_port: ctx.local_port() as u16,
        // Network-order port in the upper 16 bits (little-endian kernels).
        ingress_port: u16::from_be((ctx.remote_port() >> 16) as u16),
    })
}

/// Answers `SO_ORIGINAL_DST` on an accepted ingress socket (see `redirector_common::sockopt`).
/// getsockopt hooks must return 1; the answer replaces the kernel's error through `retval`.
#[cgroup_sockopt(getsockopt)]
pub fn orig_getsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    let (level, optname) = unsafe { ((*so).level, (*so).optname) };
    if level != sockopt::SOL_IP && level != sockopt::SOL_IPV6 {
        return ALLOW;
    }
    if optname == sockopt::SO_ORIGINAL_CALLER {
        return answer_caller(&ctx);
    }
    if optname != sockopt::SO_ORIGINAL_DST {
        return ALLOW;
    }
    let optval = unsafe { (*so).__bindgen_anon_2.optval } as *mut u8;
    let end = unsafe { (*so).__bindgen_anon_3.optval_end } as *mut u8;
    let optlen = unsafe { (*so).optlen };
    if level == sockopt::SOL_IP && optlen == sockopt::PROBE_LEN as i32 {
        if unsafe { optval.add(sockopt::PROBE_LEN) } > end {
            return ALLOW;
        }
        unsafe {
            write_volatile(optval as *mut u32, sockopt::PROBE_ANSWER);
            (*so).retval = 0;
        }
        return ALLOW;
    }
    let Some(key) = ingress_tuple(&ctx) else {
        return ALLOW;
    };
    let Some(orig) = (unsafe { ORIG_BY_TUPLE.get(&key) }).copied() else {
        return ALLOW;
    };
    if level == sockopt::SOL_IP {
        if !is_v4_mapped(&orig.ip) || optlen < 16 || unsafe { optval.add(16) } > end {
            return ALLOW;
        }
        let answer = Answer4 {
            family: sockopt::AF_INET,
            port: orig.port.to_be(),
            addr: orig.ip[3],
            mark: sockopt::MARK,
            flags: orig.flags,
            zero: 0,
        };
        unsafe {
            write_volatile(optval as *mut Answer4, answer);
            (*so).optlen = 16;
        }
    } else {
        if optlen < 28 || unsafe { optval.add(28) } > end {
            return ALLOW;
        }
        let answer = Answer6 {
            family: sockopt::AF_INET6,
            port: orig.port.to_be(),
            flowinfo: 0,
            addr: orig.ip,
            mark: sockopt::MARK,
            flags: orig.flags,
        };
        unsafe {
            write_volatile(optval as *mut Answer6, answer);
            (*so).optlen = 28;
        }
    }
    unsafe { (*so).retval = 0 };
    let _ = ORIG_BY_TUPLE.remove(&key);
    ALLOW
}

/// Answers `SO_ORIGINAL_CALLER` from `CALLER_BY_TUPLE` (taken), if the caller was recorded.
#[inline(always)]
fn answer_caller(ctx: &SockoptContext) -> i32 {
    let so = ctx.sockopt;
    let optval = unsafe { (*so).__bindgen_anon_2.optval } as *mut u8;
    let end = unsafe { (*so).__bindgen_anon_3.optval_end } as *mut u8;
    let optlen = unsafe { (*so).optlen };
    if optlen < sockopt::CALLER_ANSWER_LEN as i32
        || unsafe { optval.add(sockopt::CALLER_ANSWER_LEN) } > end
    {
        return ALLOW;
    }
    let Some(key) = ingress_tuple(ctx) else {
        return ALLOW;
    };
    let Some(c) = (unsafe { CALLER_BY_TUPLE.get(&key) }).copied() else {
        return ALLOW;
    };
    let answer = sockopt::CallerAnswer {
        magic: sockopt::CALLER_MAGIC,
        pid: c.pid,
        cgroup_id: c.cgroup_id,
        netns_cookie: c.netns_cookie,
        comm: c.comm,
    };
    // One 32-bit store each: adjacent plain stores get merged into a 64-bit one, which the
    // verifier refuses on the sockopt context.
    unsafe {
        write_volatile(optval as *mut sockopt::CallerAnswer, answer);
        write_volatile(
            addr_of_mut!((*so).optlen),
            sockopt::CALLER_ANSWER_LEN as i32,
        );
        write_volatile(addr_of_mut!((*so).retval), 0);
    }
    let _ = CALLER_BY_TUPLE.remove(&key);
    ALLOW
}

/// The `ORIG_BY_TUPLE` key of an accepted ingress socket: its peer is the client.
#[inline(always)]
fn ingress_tuple(ctx: &SockoptContext) -> Option<SockTuple> {
    let sk = unsafe { (*ctx.sockopt).__bindgen_anon_1.sk };
    if sk.is_null() {
        return None;
    }
    let family = unsafe { (*sk).family };
    let (client_ip, ingress_ip) = if family == AF_INET {
        unsafe { (v4_mapped((*sk).dst_ip4), v4_mapped((*sk).src_ip4)) }
    } else if family == AF_INET6 {
        (
            read_ip6(unsafe { addr_of!((*sk).dst_ip6) }),
            read_ip6(unsafe { addr_of!((*sk).src_ip6) }),
        )
    } else {
        return None;
    };
    Some(SockTuple {
        client_ip,
        ingress_ip,
        client_port: u16::from_be(unsafe { read_volatile(addr_of!((*sk).dst_port)) }),
        ingress_port: unsafe { (*sk).src_port } as u16,
    })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

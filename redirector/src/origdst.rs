//! The ingress's side of original-destination recovery: given an accepted connection, which
//! node address and port did its client dial?
//!
//! The sock_ops program published the answer under the connection's 4-tuple before the
//! client's handshake completed, so it is there by the time `accept()` returns. Each entry is
//! taken (read and deleted) exactly once.
use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
};

use aya::maps::{HashMap, Map, MapData, MapError};
use redirector_common::{OrigDst, SockTuple, map_names, orig_flags};

use crate::{
    error::{Error, Result},
    maps::open_map,
    node_table::{ip6_words, words_to_bytes},
};

pub use edge_model::OriginalDst;

/// Handle on the pinned `ORIG_BY_TUPLE` map. Cheap to keep; one per ingress.
///
/// Shared by every ingress without a lock: a take is one system call on the map's descriptor
/// (the kernel serializes per entry), so lookups never queue behind one another in user space.
pub struct OrigDstTable {
    /// For kernels without lookup-and-delete only (before 5.14): lookup, then delete.
    map: std::sync::Mutex<HashMap<MapData, SockTuple, OrigDst>>,
    /// Second handle for the one-syscall lookup-and-delete (aya does not offer it).
    raw: MapData,
    /// Cleared when the kernel lacks lookup-and-delete for this map type.
    atomic_take: AtomicBool,
}

fn words(ip: IpAddr) -> [u32; 4] {
    match ip.to_canonical() {
        IpAddr::V4(v4) => redirector_common::v4_mapped(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => ip6_words(&v6.octets()),
    }
}

impl OrigDstTable {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let data = open_map(pin_dir, map_names::ORIG_BY_TUPLE)?;
        let map = HashMap::try_from(Map::LruHashMap(data))
            .map_err(|e| Error::ebpf("ORIG_BY_TUPLE has an unexpected layout", e))?;
        let raw = open_map(pin_dir, map_names::ORIG_BY_TUPLE)?;
        Ok(Self {
            map: std::sync::Mutex::new(map),
            raw,
            atomic_take: AtomicBool::new(true),
        })
    }

    /// Takes the original destination of an accepted stream (`None`: not redirected, or its
    /// entry was evicted; the ingress must refuse it).
    pub fn take_for_stream(&self, stream: &impl AsFd) -> Result<Option<OriginalDst>> {
        let sock = socket2::SockRef::from(stream);
        let peer = sock
            .peer_addr()
            .map_err(|e| Error::io("getpeername on accepted stream", e))?;
        let local = sock
            .local_addr()
            .map_err(|e| Error::io("getsockname on accepted stream", e))?;
        match (peer.as_socket(), local.as_socket()) {
            (Some(peer), Some(local)) => self.take(peer, local),
            _ => Ok(None),
        }
    }

    /// Takes the original destination of the connection `peer` -> `local` as the ingress sees it.
    pub fn take(&self, peer: SocketAddr, local: SocketAddr) -> Result<Option<OriginalDst>> {
        let key = SockTuple {
            client_ip: words(peer.ip()),
            ingress_ip: words(local.ip()),
            client_port: peer.port(),
            ingress_port: local.port(),
        };
        let Some(orig) = self.take_entry(&key)? else {
            return Ok(None);
        };
        let ip = IpAddr::from(words_to_bytes(&orig.ip)).to_canonical();
        Ok(Some(OriginalDst {
            addr: SocketAddr::new(ip, orig.port),
            from_pod: orig.flags & orig_flags::FROM_POD != 0,
            ambiguous: orig.flags & orig_flags::AMBIGUOUS != 0,
            probe: orig.flags & orig_flags::PROBE != 0,
        }))
    }

    fn take_entry(&self, key: &SockTuple) -> Result<Option<OrigDst>> {
        if self.atomic_take.load(Ordering::Relaxed) {
            match crate::sys::map_lookup_and_delete::<SockTuple, OrigDst>(
                self.raw.fd().as_fd(),
                key,
            ) {
                Ok(v) => return Ok(v),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL) | Some(crate::maps::ENOTSUPP)
                    ) =>
                {
                    tracing::info!(
                        "kernel lacks BPF_MAP_LOOKUP_AND_DELETE_ELEM for LRU maps; using lookup + delete"
                    );
                    self.atomic_take.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(Error::io("taking an ORIG_BY_TUPLE entry", e)),
            }
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let orig = match map.get(key, 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(Error::ebpf("reading ORIG_BY_TUPLE", e)),
        };
        // Delete what we consumed; a concurrent eviction is fine.
        match map.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => tracing::warn!("could not delete a consumed ORIG_BY_TUPLE entry: {e}"),
        }
        Ok(Some(orig))
    }
}

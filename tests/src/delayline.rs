//! A point-to-point link with a fixed delay between two namespaces, for long-RTT measurements
//! on a kernel without `sch_netem` (or `sch_fq` for EDT pacing), as this one: one TUN device
//! in each namespace and a userspace forwarder that holds every packet for `one_way` before
//! writing it out of the other device. TCP on both ends sees a real RTT of 2 x `one_way`, with
//! its own windows and congestion control: nothing is terminated or proxied.
//!
//! [`Faults`] break the link on demand: every packet dropped (an outage), or a share of them at
//! random (a lossy radio link).
use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::Netns;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// Large packets keep the forwarder's packet rate low (about 16,000 a second at 1 GB/s).
const MTU: &str = "65000";

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A TUN device named `name`, made inside `ns` (the fd keeps working from any namespace).
fn tun_in(ns: &Netns, name: &str) -> File {
    let _in = ns.enter();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF with a properly sized ifreq on an fd we own.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req) };
    assert_eq!(
        r,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    f
}

pub struct DelayLink {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
    faults: Arc<Faults>,
}

/// What the link does to packets, both ways, changed while it runs.
#[derive(Default)]
pub struct Faults {
    /// Every packet is dropped.
    down: AtomicBool,
    /// Packets dropped at random, per million.
    loss_ppm: std::sync::atomic::AtomicU32,
}

impl Faults {
    /// An outage: drop everything (true) or nothing but the random loss (false).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Random loss, as a fraction of packets (0.01: 1%).
    pub fn set_loss(&self, fraction: f64) {
        self.loss_ppm
            .store((fraction * 1e6) as u32, Ordering::SeqCst);
    }

    fn drops(&self, rng: &mut u64) -> bool {
        if self.down.load(Ordering::Relaxed) {
            return true;
        }
        let ppm = self.loss_ppm.load(Ordering::Relaxed);
        if ppm == 0 {
            return false;
        }
        // xorshift64: a packet's fate needs no quality beyond uniformity.
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng % 1_000_000 < u64::from(ppm)
    }
}

impl DelayLink {
    /// Links `a` (address `a_cidr`, e.g. "192.0.2.1/30") and `b` with `one_way` delay each way.
    pub fn new(a: &Netns, a_cidr: &str, b: &Netns, b_cidr: &str, one_way: Duration) -> Self {
        Self::with_mtu(a, a_cidr, b, b_cidr, one_way, MTU)
    }

    /// [`Self::new`] with packets of at most `mtu` bytes (1500: a WAN's, where a lost packet
    /// costs what it costs there).
    pub fn with_mtu(
        a: &Netns,
        a_cidr: &str,
        b: &Netns,
        b_cidr: &str,
        one_way: Duration,
        mtu: &str,
    ) -> Self {
        let (ta, tb) = (tun_in(a, "dly0"), tun_in(b, "dly1"));
        for (ns, dev, cidr) in [(a, "dly0", a_cidr), (b, "dly1", b_cidr)] {
            ns.ip(&["addr", "add", cidr, "dev", dev]);
            ns.ip(&["link", "set", dev, "mtu", mtu, "up"]);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(Faults::default());
        let mut threads = Vec::new();
        for (from, to) in [(ta.try_clone().unwrap(), tb.try_clone().unwrap()), (tb, ta)] {
            threads.extend(forward(from, to, one_way, stop.clone(), faults.clone()));
        }
        Self {
            stop,
            threads,
            faults,
        }
    }

    /// The link's fault injector.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }
}

impl Drop for DelayLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The readers wake up at their poll timeout; the devices go with their namespaces.
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Reads packets from `from` and writes each to `to` `delay` later, in order.
fn forward(
    mut from: File,
    mut to: File,
    delay: Duration,
    stop: Arc<AtomicBool>,
    faults: Arc<Faults>,
) -> [thread::JoinHandle<()>; 2] {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let s = stop.clone();
    let reader = thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
        while !s.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd: from.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one valid fd.
            if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                continue;
            }
            match from.read(&mut buf) {
                Ok(_) if faults.drops(&mut rng) => {}
                Ok(n)
                    if n > 0
                        && tx
                            .send((Instant::now() + delay, buf[..n].to_vec()))
                            .is_err() =>
                {
                    return;
                }
                _ => {}
            }
        }
    });
    let writer = thread::spawn(move || {
        let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
        while !stop.load(Ordering::Relaxed) {
            let wait = queue
                .front()
                .map(|(due, _)| due.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_millis(100));
            match rx.recv_timeout(wait) {
                Ok(p) => queue.push_back(p),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            while queue.front().is_some_and(|(due, _)| *due <= now) {
                let (_, p) = queue.pop_front().expect("checked");
                let _ = to.write(&p);
            }
        }
    });
    [reader, writer]
}

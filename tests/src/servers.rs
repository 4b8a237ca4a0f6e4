//! Test servers: the tunnel ingress stand-in (records each connection's recovered original
//! destination) and the edge hosts' services (to see any connection that escaped redirection).
//!
//! Protocol: the client sends one line (its token); the server answers one line, a label
//! saying where the connection landed, and closes.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use redirector::OrigDstTable;

/// One connection a server accepted.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub token: String,
    pub label: String,
    /// Who connected: tells a tunnel agent's dial from a connection that escaped redirection.
    pub peer: Option<SocketAddr>,
}

#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<Accepted>>>);

impl Log {
    pub fn all(&self) -> Vec<Accepted> {
        self.0.lock().unwrap().clone()
    }
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    /// Forgets what was logged (a long run keeps only what it still checks).
    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A listener with 4096 backlog (1,000 concurrent connects must not overflow it).
pub fn listen(addr: SocketAddr) -> TcpListener {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None).expect("socket");
    s.set_reuse_address(true).expect("SO_REUSEADDR");
    if addr.is_ipv6() {
        // Separate IPv4 and IPv6 listeners on one port.
        s.set_only_v6(true).expect("IPV6_V6ONLY");
    }
    s.bind(&addr.into())
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    s.listen(4096).expect("listen");
    s.into()
}

fn serve(
    listener: TcpListener,
    log: Log,
    label: impl Fn(&TcpStream) -> String + Send + Sync + 'static,
) {
    let label = Arc::new(label);
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            // Label on the accept thread: original-destination lookups happen in accept order.
            let l = label(&conn);
            let peer = conn.peer_addr().ok();
            let log = log.clone();
            thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let mut r = BufReader::new(&conn);
                let mut token = String::new();
                let _ = r.read_line(&mut token);
                let token = token.trim().to_owned();
                log.0.lock().unwrap().push(Accepted {
                    token,
                    label: l.clone(),
                    peer,
                });
                let _ = (&conn).write_all(format!("{l}\n").as_bytes());
            });
        }
    });
}

/// The ingress stand-in: labels each connection `ingress <orig> pod=<bool>` from the
/// recovered original destination (`ingress none` when there is none).
/// The pinned map is opened at the first connection, so the listener can exist before the
/// redirector has created it (as a real ingress would start before or after the redirector).
pub fn ingress(listener: TcpListener, pin_dir: &Path, log: Log) {
    let pin_dir = pin_dir.to_owned();
    let table: Mutex<Option<OrigDstTable>> = Mutex::new(None);
    serve(listener, log, move |conn| {
        let mut t = table.lock().unwrap();
        if t.is_none() {
            match OrigDstTable::open(&pin_dir) {
                Ok(opened) => *t = Some(opened),
                Err(e) => return format!("ingress error {e}"),
            }
        }
        match t.as_mut().expect("opened above").take_for_stream(conn) {
            Ok(Some(o)) => format!("ingress {} pod={}", o.addr, o.from_pod),
            Ok(None) => "ingress none".into(),
            Err(e) => format!("ingress error {e}"),
        }
    });
}

/// An edge host's service: labels each connection `edge <local address>`.
pub fn edge(listener: TcpListener, log: Log) {
    serve(listener, log, |conn| match conn.local_addr() {
        Ok(a) => format!("edge {a}"),
        Err(e) => format!("edge error {e}"),
    });
}

/// The byte at offset `i` of [`commands`]' downloads (not periodic at any small length).
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// sha256 of the first `n` bytes of the [`pattern`].
pub fn pattern_sha(n: u64) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < n {
        let k = (n - off).min(buf.len() as u64) as usize;
        for (j, b) in buf[..k].iter_mut().enumerate() {
            *b = pattern(off + j as u64);
        }
        h.update(&buf[..k]);
        off += k as u64;
    }
    h.finalize().to_vec()
}

/// A node's service for long streams: a connection's first line is `bulk <n>` (n [`pattern`]
/// bytes follow) or `log <n>` (n lines `line <i>`, one per `every`); then it closes.
pub fn commands(l: TcpListener, every: Duration) {
    thread::spawn(move || {
        for conn in l.incoming().flatten() {
            thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut cmd = String::new();
                r.read_line(&mut cmd).unwrap();
                let mut w = conn;
                match cmd.split_whitespace().collect::<Vec<_>>()[..] {
                    ["bulk", n] => {
                        let n: u64 = n.parse().unwrap();
                        let mut buf = vec![0u8; 256 << 10];
                        let mut off = 0;
                        while off < n {
                            let k = (n - off).min(buf.len() as u64) as usize;
                            for (j, b) in buf[..k].iter_mut().enumerate() {
                                *b = pattern(off + j as u64);
                            }
                            w.write_all(&buf[..k]).unwrap();
                            off += k as u64;
                        }
                    }
                    ["log", n] => {
                        for i in 0..n.parse::<u64>().unwrap() {
                            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
                            thread::sleep(every);
                        }
                    }
                    _ => panic!("unknown command {cmd:?}"),
                }
            });
        }
    });
}

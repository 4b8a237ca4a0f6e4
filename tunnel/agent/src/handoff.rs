//! Handing open streams to the newer agent on the same node: a rolling upgrade drops none.
//!
//! Every agent given `--handoff-socket` listens there (the newest one binds the path, taking
//! it from the one before). An agent told to stop first looks for a newer agent at the path;
//! if one answers (another process of the same user, serving the same node), it closes its
//! sessions with a reset instead of draining them, and each resumable stream, lost with its
//! session, is handed over instead of parked: its connection to the local service (the file
//! descriptor, passed with SCM_RIGHTS), what it read and delivered, and the bytes it kept.
//! The newer agent parks it as its own; the server, which saw the session lost, resumes it on
//! the newer agent's session. Neither the local service nor the client sees anything but a
//! pause of about a round trip.
use std::{
    io::{Read, Write},
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::{TcpStream, UnixListener, UnixStream},
};
use tokio_util::sync::CancellationToken;
use tunnel_proto::{
    relay::{self, End, Outcome},
    resume::{Budget, FlowId, Progress, Retained, keep_for},
};

use crate::{AgentConfig, AgentMetrics};

/// Opens each hand-over message.
const MAGIC: &[u8; 4] = b"EDGH";
/// magic, ID, read, read_end, delivered, got_end, kept from, kept length.
const HEADER: usize = 4 + 16 + 8 + 1 + 8 + 1 + 8 + 8;

/// One stream on its way to the newer agent.
pub struct Handed {
    id: FlowId,
    tcp: std::net::TcpStream,
    p: Progress,
}

/// This agent's side of hand-overs: where it listens, and its successor once it stops.
#[derive(Default)]
pub struct Handoff {
    path: Option<PathBuf>,
    successor: Mutex<Option<mpsc::Sender<Handed>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Older agents handing streams over to this one now.
    receiving: std::sync::atomic::AtomicUsize,
    /// This agent's own abstract name, with an `@prefix` path.
    own: Mutex<Option<String>>,
}

/// Counts one hand-over connection in [`Handoff::receiving`] until dropped.
struct Receiving<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Receiving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Handoff {
    pub fn new(path: Option<PathBuf>) -> Arc<Self> {
        Arc::new(Handoff {
            path,
            ..Handoff::default()
        })
    }

    /// Whether an older agent is handing streams over now: a resume naming a stream not here
    /// yet may be for one still on its way.
    pub fn receiving(&self) -> bool {
        self.receiving.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    /// Where lost streams go while this agent stops for a newer one.
    pub fn successor(&self) -> Option<mpsc::Sender<Handed>> {
        self.successor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// At shutdown: whether a newer agent of `node` listens at the path, which then takes
    /// every stream lost from here on.
    pub async fn find_successor(&self, node: &str) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        let own = self.own.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match connect_successor(path, own.as_deref(), node).await {
            Ok(Some(sock)) => {
                let (tx, rx) = mpsc::channel();
                let writer = std::thread::spawn(move || write_all_handed(sock, rx));
                *self.successor.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
                *self.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(writer);
                tracing::info!(socket = %path.display(), "a newer agent of this node listens: its open streams go to it");
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(socket = %path.display(), "no hand-over to a newer agent ({e}): draining open streams instead");
                false
            }
        }
    }

    /// After the sessions closed: waits (up to `within`) until every stream was handed over
    /// and written to the successor.
    pub async fn finish(&self, flows: &crate::resume::Flows, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while !flows.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !flows.is_empty() {
            tracing::warn!(
                streams = flows.len(),
                "streams not handed over within {within:?}"
            );
        }
        // No sender left: the writer ends once it wrote what it has.
        self.successor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = writer {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
    }

    /// Listens at the path until `shutdown`, adopting every stream an older agent hands over.
    pub async fn listen(
        self: Arc<Self>,
        cfg: Arc<AgentConfig>,
        stats: Arc<AgentMetrics>,
        shutdown: CancellationToken,
    ) {
        let Some(path) = &self.path else { return };
        let l = match bind(path, &self.own) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(socket = %path.display(), "cannot listen for hand-overs (--handoff-socket): {e}; an older agent stopping now resets its open streams");
                return;
            }
        };
        loop {
            let sock = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = l.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!("hand-over socket: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let (cfg, stats) = (cfg.clone(), stats.clone());
            self.receiving
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let this = self.clone();
            tokio::spawn(async move {
                let _receiving = Receiving(&this.receiving);
                if let Err(e) = receive(sock, cfg, stats).await {
                    tracing::warn!("hand-over from an older agent failed: {e}");
                }
            });
        }
    }
}

/// Sends a lost stream to the successor; the outcome here is a clean end (it goes on there).
pub fn hand(
    to: mpsc::Sender<Handed>,
    id: FlowId,
    tcp: TcpStream,
    p: Progress,
    stats: &AgentMetrics,
) -> Outcome {
    let out = relay::outcome(&p, End::Closed);
    match tcp.into_std() {
        Ok(tcp) => match to.send(Handed { id, tcp, p }) {
            Ok(()) => {
                stats.streams_handed_over.inc();
            }
            Err(_) => {
                tracing::warn!(stream = %id, "the hand-over ended before this stream: closed")
            }
        },
        Err(e) => tracing::warn!(stream = %id, "cannot hand the stream over: {e}"),
    }
    out
}

/// The prefix of an abstract-namespace place (`@prefix`), if `path` is one.
fn abstract_prefix(path: &Path) -> Option<&str> {
    path.to_str()?.strip_prefix('@')
}

/// The socket directory is the agent's alone (0700); an older agent's socket file is replaced.
/// An `@prefix` place is in the abstract namespace of the network namespace (the host's, for
/// agents on the host network: no volume, no file permissions), under a name of its own, as
/// the older agent still holds its name.
fn bind(path: &Path, own: &Mutex<Option<String>>) -> std::io::Result<UnixListener> {
    use std::os::{linux::net::SocketAddrExt, unix::fs::PermissionsExt};
    if let Some(prefix) = abstract_prefix(path) {
        let name = format!("{prefix}/{:016x}", rand::random::<u64>());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let l = std::os::unix::net::UnixListener::bind_addr(&addr)?;
        l.set_nonblocking(true)?;
        *own.lock().unwrap_or_else(|p| p.into_inner()) = Some(name);
        return UnixListener::from_std(l);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// Every other agent's abstract name under `prefix` (from `/proc/net/unix`).
fn abstract_peers(prefix: &str, own: Option<&str>) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let mut names: Vec<String> = table
        .lines()
        .filter_map(|l| l.split_whitespace().nth(7)?.strip_prefix('@'))
        .filter(|n| n.strip_prefix(prefix).is_some_and(|r| r.starts_with('/')))
        .filter(|n| Some(*n) != own)
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Reaches the newer agent's listener at `path`.
async fn dial(path: &Path, own: Option<&str>) -> std::io::Result<UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    let Some(prefix) = abstract_prefix(path) else {
        return UnixStream::connect(path).await;
    };
    for name in abstract_peers(prefix, own) {
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        if let Ok(s) = std::os::unix::net::UnixStream::connect_addr(&addr) {
            s.set_nonblocking(true)?;
            return UnixStream::from_std(s);
        }
    }
    Err(std::io::ErrorKind::NotFound.into())
}

/// Connects to the listener at `path`: `None` if it is this process's own (no newer agent).
async fn connect_successor(
    path: &Path,
    own: Option<&str>,
    node: &str,
) -> std::io::Result<Option<std::os::unix::net::UnixStream>> {
    let mut sock = match dial(path, own).await {
        Ok(s) => s,
        // Nobody listens: no newer agent.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let cred = sock.peer_cred()?;
    if cred.pid() == Some(std::process::id() as i32) {
        return Ok(None);
    }
    // SAFETY: geteuid has no preconditions.
    if cred.uid() != unsafe { libc::geteuid() } {
        return Err(std::io::Error::other(format!(
            "the listener runs as uid {}, not this agent's",
            cred.uid()
        )));
    }
    sock.write_all(format!("{node}\n").as_bytes()).await?;
    let mut ack = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::BufReader::new(&mut sock).read_line(&mut ack),
    )
    .await
    .map_err(|_| std::io::Error::other("no answer from the newer agent"))??;
    if ack.trim() != "ok" {
        return Err(std::io::Error::other(format!(
            "the newer agent refused: {}",
            ack.trim()
        )));
    }
    let sock = sock.into_std()?;
    sock.set_nonblocking(false)?;
    Ok(Some(sock))
}

fn write_all_handed(mut sock: std::os::unix::net::UnixStream, rx: mpsc::Receiver<Handed>) {
    for h in rx {
        let id = h.id;
        if let Err(e) = write_one(&mut sock, &h) {
            tracing::warn!(stream = %id, "handing the stream over failed: {e}");
        }
        // Our copy of the descriptor closes here; the newer agent holds the connection.
    }
}

fn write_one(sock: &mut std::os::unix::net::UnixStream, h: &Handed) -> std::io::Result<()> {
    let s = &h.p.sending;
    let (start, chunks) = match &s.retained {
        Some(r) => (r.start(), r.since(r.start()).unwrap_or_default()),
        None => (s.read, Default::default()),
    };
    let len: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let mut head = Vec::with_capacity(HEADER);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&h.id.0.to_le_bytes());
    head.extend_from_slice(&s.read.to_le_bytes());
    head.push(s.read_end as u8);
    head.extend_from_slice(&h.p.receiving.delivered.to_le_bytes());
    head.push(h.p.receiving.got_end as u8);
    head.extend_from_slice(&start.to_le_bytes());
    head.extend_from_slice(&len.to_le_bytes());
    crate::fd_pass::send_with_fd(sock.as_raw_fd(), &head, h.tcp.as_raw_fd())?;
    for c in &chunks {
        sock.write_all(c)?;
    }
    Ok(())
}

async fn receive(
    sock: UnixStream,
    cfg: Arc<AgentConfig>,
    stats: Arc<AgentMetrics>,
) -> std::io::Result<()> {
    let cred = sock.peer_cred()?;
    // SAFETY: geteuid has no preconditions.
    if cred.uid() != unsafe { libc::geteuid() } {
        return Err(std::io::Error::other(format!(
            "refused a hand-over from uid {}",
            cred.uid()
        )));
    }
    let mut sock = tokio::io::BufReader::new(sock);
    let mut node = String::new();
    sock.read_line(&mut node).await?;
    if node.trim() != cfg.node_id {
        let _ = sock
            .get_mut()
            .write_all(format!("serving {}, not {}\n", cfg.node_id, node.trim()).as_bytes())
            .await;
        return Err(std::io::Error::other(format!(
            "an agent of {} tried to hand over streams to this agent of {}",
            node.trim(),
            cfg.node_id
        )));
    }
    sock.get_mut().write_all(b"ok\n").await?;
    let sock = sock.into_inner().into_std()?;
    sock.set_nonblocking(false)?;
    let rt = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let mut sock = sock;
        while let Some((id, fd, p)) = read_one(&mut sock, &cfg)? {
            let (cfg, stats) = (cfg.clone(), stats.clone());
            rt.spawn(async move {
                let tcp = std::net::TcpStream::from(fd);
                let tcp = match tcp
                    .set_nonblocking(true)
                    .and_then(|()| TcpStream::from_std(tcp))
                {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!(stream = %id, "a handed-over connection: {e}");
                        return;
                    }
                };
                stats.streams_adopted.inc();
                stats.streams_open.inc();
                tracing::debug!(stream = %id, "stream taken over from an older agent");
                let out = crate::resume::adopt(&cfg, &stats, tcp, id, p).await;
                stats.streams_open.dec();
                tracing::debug!(stream = %id, ?out, "handed-over stream done");
            });
        }
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
}

fn read_one(
    sock: &mut std::os::unix::net::UnixStream,
    cfg: &AgentConfig,
) -> std::io::Result<Option<(FlowId, OwnedFd, Progress)>> {
    let mut head = [0u8; HEADER];
    let Some(fd) = crate::fd_pass::recv_with_fd(sock.as_raw_fd(), &mut head)? else {
        return Ok(None);
    };
    if &head[..4] != MAGIC {
        return Err(std::io::Error::other("not a hand-over message"));
    }
    let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
    let id = FlowId(u128::from_le_bytes(
        head[4..20].try_into().expect("16 bytes"),
    ));
    let (read, read_end) = (u64_at(20), head[28] != 0);
    let (delivered, got_end) = (u64_at(29), head[37] != 0);
    let (start, len) = (u64_at(38), u64_at(46));
    if start + len != read || len > keep_for(u32::MAX) {
        return Err(std::io::Error::other(format!(
            "a hand-over keeps bytes {start}..{} of a stream that read {read}",
            start + len
        )));
    }
    let mut kept = vec![0u8; len as usize];
    sock.read_exact(&mut kept)?;
    // Charged to a budget of its own until it resumes on a session (and moves to its budget).
    let budget = Budget::new(cfg.resume.budget_per_session.max(len));
    let retained = Retained::restore(
        keep_for(cfg.stream_window),
        budget,
        start,
        Bytes::from(kept),
    )
    .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    let mut p = Progress::new(Some(retained));
    p.sending.read_end = read_end;
    p.receiving.delivered = delivered;
    p.receiving.got_end = got_end;
    Ok(Some((id, fd, p)))
}

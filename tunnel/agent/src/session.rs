//! Sessions: one to every server replica, each serving HTTP/2 on the connection the agent
//! dialled, each CONNECT stream answered by dialling this node on an allow-listed port. It is
//! not an open proxy: the host part of the request is ignored, only the configured local
//! addresses are ever dialled.
use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use tunnel_proto::{
    error::{Error, Result},
    keepalive::{Direction, Reason},
    relay,
    wire::{NODE_HEADER, Refusal, refusal_response},
};

pub use crate::metrics::AgentMetrics;

#[derive(Clone)]
pub struct AgentConfig {
    /// This node's name; requests naming another node are refused.
    pub node_id: String,
    /// Server replicas to keep a session with, each `host:port`; a name may resolve to
    /// several replicas, each gets its own session.
    pub servers: Vec<String>,
    pub resolver: Resolver,
    /// How often the server entries are resolved again (replicas added or removed).
    pub resolve_interval: Duration,
    /// The name the servers' certificate carries.
    pub server_name: ServerName<'static>,
    /// Replaceable: when it changes (a renewed certificate, a new CA bundle) the agent opens
    /// new sessions with it and drains the old ones.
    pub tls: tunnel_proto::tls::Live<rustls::ClientConfig>,
    /// Ports a stream may ask for.
    pub allowed_ports: BTreeSet<u16>,
    /// Local addresses to dial, in order (e.g. the node IP, then 127.0.0.1 for endpoints bound
    /// to localhost). The first that accepts wins.
    pub dial: Vec<IpAddr>,
    pub stream_window: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub keepalive: tunnel_proto::keepalive::Keepalive,
    /// How long a draining session (GOAWAY sent) may keep its open streams.
    pub drain_timeout: Duration,
    /// Told when the last open stream closes (memory goes back to the kernel then).
    pub trimmer: Option<edge_cli::memory::Trimmer>,
    /// The local address sessions leave from (`None`: the kernel's choice). A multi-homed
    /// node picks its uplink; the fleet simulator gives agents the sources real ones have.
    pub source: Option<IpAddr>,
    /// How long a stream whose session was lost waits to be resumed, and how much it keeps.
    pub resume: tunnel_proto::resume::ResumeConfig,
    /// The resumable streams being served (shared by every session of this agent).
    pub flows: Arc<crate::resume::Flows>,
    /// Where open streams go when this agent stops for a newer one (`--handoff-socket`).
    pub handoff: Arc<crate::handoff::Handoff>,
}

/// After new sessions are up, how long the old ones keep taking new streams: the servers
/// switch their routing to the new session when its handshake completes; this covers the
/// moments in between.
const ROTATION_GRACE: Duration = Duration::from_secs(1);
/// How long new sessions may take to come up before a rotation is abandoned.
const ROTATION_DEADLINE: Duration = Duration::from_secs(30);

/// h2 keeps a session's stream table and frame buffers at the most streams it ever had at once
/// and never shrinks them: in the soak, an agent whose one session carried bursts of 333
/// streams held 40% more heap after a hundred cycles than after the first. A session that
/// carried at least this many streams at once is therefore replaced (the new one up first,
/// then the old drained, as a certificate renewal does) once it has been idle for
/// [`RECYCLE_IDLE`]. Ordinary nodes (a few streams at a time) never reach it.
const RECYCLE_PEAK: usize = 256;
const RECYCLE_IDLE: Duration = Duration::from_secs(1);

/// A session's streams now, the most it had at once, and how many it has had.
#[derive(Default)]
pub(crate) struct Load {
    open: AtomicUsize,
    peak: AtomicUsize,
    started: AtomicUsize,
    /// Told when the session goes from no stream to one (its keepalive pings faster then).
    busy: tokio::sync::Notify,
}

/// One stream counted in its session's [`Load`] until dropped.
pub(crate) struct Counted(Arc<Load>);

impl Counted {
    fn new(load: &Arc<Load>) -> Self {
        let now = load.open.fetch_add(1, Ordering::Relaxed) + 1;
        if now == 1 {
            load.busy.notify_one();
        }
        load.peak.fetch_max(now, Ordering::Relaxed);
        load.started.fetch_add(1, Ordering::Relaxed);
        Counted(load.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The longest wait between session attempts while streams are parked, and the time each
/// attempt then has to connect.
const PARKED_RETRY: Duration = Duration::from_secs(1);
/// How often a new attempt starts while streams wait for a session (see `dial_racing`).
const RACE_EVERY: Duration = Duration::from_millis(250);
/// How long a dial to a server may take (a lost SYN is retried by the kernel for minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the TLS and HTTP/2 handshakes may take once connected.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the answer (200) to an opened stream waits for the service's first bytes to travel
/// with it. Services answer a client's first message within this in the common case (a TLS
/// ServerHello, an HTTP response head); a quiet one costs the server this much longer wait for
/// the answer, never the client anything (its bytes already flow).
pub(crate) const ANSWER_WITHIN: Duration = Duration::from_millis(2);

/// Capped exponential backoff with full jitter: a fleet of agents restarting together does
/// not reconnect in lockstep.
fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let exp = min.saturating_mul(1u32 << attempt.min(16)).min(max);
    let jitter = rand::random::<f64>();
    Duration::from_secs_f64(exp.as_secs_f64() * (0.5 + jitter / 2.0))
}

/// Finds the replicas behind one configured server entry (a `host:port` whose name may resolve
/// to several addresses, e.g. a headless Service).
pub type Resolver =
    Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = Vec<SocketAddr>> + Send>> + Send + Sync>;

/// DNS through the system resolver.
pub fn dns_resolver() -> Resolver {
    Arc::new(|entry: String| {
        Box::pin(async move {
            match tokio::net::lookup_host(entry.as_str()).await {
                Ok(addrs) => addrs.collect(),
                Err(e) => {
                    tracing::warn!(server = %entry, "cannot resolve: {e}");
                    Vec::new()
                }
            }
        })
    })
}

/// Keeps one session to every server replica until `shutdown`: resolves each configured entry
/// every `resolve_interval`, starts a session for each new address, stops sessions of
/// addresses that went away. A failed resolution keeps the last known replicas.
pub async fn run(cfg: AgentConfig, stats: Arc<AgentMetrics>, shutdown: CancellationToken) {
    let mut tasks = tokio::task::JoinSet::new();
    let mut running: HashMap<SocketAddr, CancellationToken> = HashMap::new();
    let mut last_known: HashMap<String, Vec<SocketAddr>> = HashMap::new();
    let mut tls_changes = cfg.tls.subscribe();
    tls_changes.mark_unchanged();
    // Sessions ask for their replacement after a burst (see RECYCLE_PEAK).
    let recycle = Arc::new(tokio::sync::Notify::new());
    loop {
        let mut want = BTreeSet::new();
        for entry in &cfg.servers {
            let found = (cfg.resolver)(entry.clone()).await;
            let addrs = if found.is_empty() {
                last_known.get(entry).cloned().unwrap_or_default()
            } else {
                last_known.insert(entry.clone(), found.clone());
                found
            };
            want.extend(addrs);
        }
        let new: Vec<SocketAddr> = want
            .iter()
            .filter(|a| !running.contains_key(a))
            .copied()
            .collect();
        for addr in &new {
            tracing::info!(server = %addr, "server replica found; starting a session");
            let token = shutdown.child_token();
            running.insert(*addr, token.clone());
            tasks.spawn(keep_session(
                cfg.clone(),
                addr.to_string(),
                stats.clone(),
                token,
                Arc::new(AtomicBool::new(false)),
                recycle.clone(),
            ));
        }
        running.retain(|addr, token| {
            let keep = want.contains(addr);
            if !keep {
                tracing::info!(server = %addr, "server replica gone; closing its session");
                token.cancel();
            }
            keep
        });
        stats.replicas.set(running.len() as i64);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(cfg.resolve_interval) => {}
            r = tls_changes.changed() => if r.is_ok() {
                let why = "TLS configuration changed";
                rotate(&cfg, &stats, &shutdown, &mut running, &mut tasks, &recycle, why).await;
            },
            _ = recycle.notified() => {
                let why = "a session is idle after a burst (h2 keeps its tables at the burst's size)";
                rotate(&cfg, &stats, &shutdown, &mut running, &mut tasks, &recycle, why).await;
            },
        }
        // A finished task stays in the set, future and all, until it is joined: without this
        // every certificate renewal and every replica that went away kept its session task's
        // memory (16 KiB a renewal in the soak).
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Moves every session onto the current TLS configuration without dropping a stream: opens a
/// new session to each replica, and once all are up (and the grace has passed), sends GOAWAY
/// on the old ones, whose open streams finish there.
async fn rotate(
    cfg: &AgentConfig,
    stats: &Arc<AgentMetrics>,
    shutdown: &CancellationToken,
    running: &mut HashMap<SocketAddr, CancellationToken>,
    tasks: &mut tokio::task::JoinSet<()>,
    recycle: &Arc<tokio::sync::Notify>,
    why: &str,
) {
    tracing::info!(
        sessions = running.len(),
        "{why}: opening new sessions, then draining the old ones"
    );
    let mut next = HashMap::new();
    let mut ups = Vec::new();
    for addr in running.keys() {
        let (token, up) = (shutdown.child_token(), Arc::new(AtomicBool::new(false)));
        tasks.spawn(keep_session(
            cfg.clone(),
            addr.to_string(),
            stats.clone(),
            token.clone(),
            up.clone(),
            recycle.clone(),
        ));
        next.insert(*addr, token);
        ups.push(up);
    }
    let deadline = tokio::time::Instant::now() + ROTATION_DEADLINE;
    let all_up = || ups.iter().all(|u| u.load(Ordering::Relaxed));
    while !all_up() && tokio::time::Instant::now() < deadline && !shutdown.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !all_up() {
        tracing::error!(
            "new sessions did not all come up in {ROTATION_DEADLINE:?}; keeping the current sessions (the servers may not trust the new certificate yet)"
        );
        next.values().for_each(CancellationToken::cancel);
        return;
    }
    tokio::time::sleep(ROTATION_GRACE).await;
    for (_, old) in running.drain() {
        old.cancel();
    }
    *running = next;
}

/// One server replica: reconnect with backoff until cancelled.
async fn keep_session(
    cfg: AgentConfig,
    server: String,
    stats: Arc<AgentMetrics>,
    stop: CancellationToken,
    up: Arc<AtomicBool>,
    recycle: Arc<tokio::sync::Notify>,
) {
    // Shared by the session's streams: each takes a reference, not a copy of the lists.
    let cfg = Arc::new(cfg);
    let mut attempt = 0u32;
    let mut next = None;
    while !stop.is_cancelled() {
        let began = tokio::time::Instant::now();
        let ended = session(&cfg, &server, &stats, &stop, &up, &recycle, next.take()).await;
        // Its buffers are free now; a session that ends after its last stream (a rotation's
        // old one) would otherwise leave them to the next idle moment.
        if let Some(t) = &cfg.trimmer {
            t.idle();
        }
        match ended {
            // A standby that came up while the session stalled: it runs next, at once.
            Ok(Some(standby)) => {
                next = Some(standby);
                attempt = 0;
                continue;
            }
            // A session that came up resets the backoff.
            Ok(None) => attempt = 0,
            Err(e) => {
                tracing::warn!(server = %server, "session failed: {e}");
                attempt += 1;
            }
        }
        let mut wait = backoff(attempt, cfg.backoff_min, cfg.backoff_max);
        if stats.resume.parked.get() > 0 {
            // Streams wait for a session to resume on: a link that comes back is found
            // within a second, not after a backoff grown through the whole outage.
            wait = wait.min(backoff(0, PARKED_RETRY, PARKED_RETRY));
            // A dial that timed out has waited a retry's time already.
            if began.elapsed() >= PARKED_RETRY {
                wait = Duration::ZERO;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn connect(server: &str, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(server).await;
    };
    let to: SocketAddr = server
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")))?;
    let sock = if to.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(source, 0))?;
    sock.connect(to).await
}

/// A session's connection once both handshakes are done, and its socket.
pub(crate) struct Dialled {
    conn: h2::server::Connection<tokio_rustls::client::TlsStream<TcpStream>, Bytes>,
    fd: std::os::fd::RawFd,
}

/// Connects to `server` (giving up after `within`) and does the TLS and HTTP/2 handshakes.
async fn dial(cfg: &AgentConfig, server: &str, within: Duration) -> Result<Dialled> {
    let tcp = tokio::time::timeout(within, connect(server, cfg.source))
        .await
        .map_err(|_| {
            Error::Refused(format!(
                "connecting to server {server}: no answer within {within:?}"
            ))
        })?
        .map_err(|e| Error::io(format!("connecting to server {server}"), e))?;
    let _ = tcp.set_nodelay(true);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
    let handshakes = async {
        let tls = tokio_rustls::TlsConnector::from(cfg.tls.get())
            .connect(cfg.server_name.clone(), tcp)
            .await
            .map_err(|e| {
                let hint = crate::refused_cert::hint(&e);
                Error::io(format!("TLS with server {server}{hint}"), e)
            })?;
        h2::server::Builder::new()
            .initial_window_size(cfg.stream_window)
            .initial_connection_window_size(i32::MAX as u32)
            .max_frame_size(256 * 1024)
            // Long-lived streams (logs -f, exec) must never hit a low default limit.
            .max_concurrent_streams(100_000)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| {
                let hint = crate::refused_cert::hint_h2(&e);
                Error::h2(format!("handshake with server {server}{hint}"), e)
            })
    };
    // A link that dies mid-handshake must not hold this replica's session forever.
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshakes)
        .await
        .map_err(|_| {
            Error::Refused(format!(
                "TLS and HTTP/2 handshakes with server {server} not done within {HANDSHAKE_TIMEOUT:?}"
            ))
        })??;
    Ok(Dialled { conn, fd })
}

/// Dials `server` until a session comes up, a new attempt every [`RACE_EVERY`] (each given
/// [`PARKED_RETRY`]), the first up wins: while the link is down every SYN is lost, and the
/// kernel would retry a lost one only after a second; with attempts overlapping, one leaves
/// within a quarter second of the link's return. For streams waiting on a session: a stalled
/// session's standby, a lost session's successor.
async fn dial_racing(cfg: &Arc<AgentConfig>, server: &str) -> Dialled {
    let mut attempts = tokio::task::JoinSet::new();
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                let (cfg, server) = (cfg.clone(), server.to_owned());
                attempts.spawn(async move { dial(&cfg, &server, PARKED_RETRY).await });
                next += RACE_EVERY;
            }
            Some(done) = attempts.join_next() => {
                if let Ok(Ok(d)) = done {
                    // The others are aborted with the set.
                    return d;
                }
            }
        }
    }
}

/// One session to `server`, on `dialled` if given (a standby that came up), else dialled now.
/// `Ok(Some(next))`: this session stalled and `next`, already up, takes its place.
async fn session(
    cfg: &Arc<AgentConfig>,
    server: &str,
    stats: &Arc<AgentMetrics>,
    shutdown: &CancellationToken,
    up: &AtomicBool,
    recycle: &tokio::sync::Notify,
    dialled: Option<Dialled>,
) -> Result<Option<Dialled>> {
    let Dialled { mut conn, fd } = match dialled {
        Some(d) => d,
        None => {
            // Parked streams wait on this dial: attempts overlap, so a link that comes back is
            // used at once, not after a lost SYN's retransmission.
            if stats.resume.parked.get() > 0 {
                tokio::select! {
                    d = dial_racing(cfg, server) => d,
                    _ = shutdown.cancelled() => return Ok(None),
                }
            } else {
                dial(cfg, server, CONNECT_TIMEOUT).await?
            }
        }
    };
    stats.sessions_established.inc();
    // Counted down however the session ends.
    let _up = tunnel_proto::resume::GaugeHeld::new(&stats.sessions);
    // Closes the session with a reset: the server's next packet on it meets no socket and
    // learns at once that the session is gone.
    // SAFETY: `fd` is the connection's socket, open until this function returns (and drops
    // `conn`); this is called only before returning.
    let reset_on_close =
        || relay::set_abortive_close(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) });
    tracing::info!(server = %server, node = %cfg.node_id, "session up");
    up.store(true, Ordering::Relaxed);
    let pings = conn.ping_pong().expect("ping_pong is taken once, here");
    let (rtt_tx, rtt_rx) = tokio::sync::watch::channel(None);
    let load = Arc::new(Load::default());
    let busy_now = || load.open.load(Ordering::Relaxed) > 0;
    let (stall_tx, mut stalled) = tokio::sync::watch::channel(false);
    let busy = tunnel_proto::keepalive::Busy {
        now: &busy_now,
        started: &load.busy,
        stalled: &stall_tx,
    };
    // Dialled while a PING is late: if it comes up first, the path works again and this
    // connection is only waiting out TCP's retransmission backoff.
    let mut replacement: Option<Pin<Box<dyn Future<Output = Dialled> + Send + '_>>> = None;
    let ka =
        tunnel_proto::keepalive::run(pings, cfg.keepalive, &stats.keepalive_rtt_us, &rtt_tx, busy);
    tokio::pin!(ka);
    let mut windows = tunnel_proto::keepalive::Windows::new(rtt_rx, cfg.stream_window);
    let drain_deadline = tokio::time::sleep(Duration::MAX);
    tokio::pin!(drain_deadline);
    let mut draining = false;
    // What this session's streams keep for resumption, against --resume-buffer-per-session.
    let budget = tunnel_proto::resume::Budget::counted(
        cfg.resume.budget_per_session,
        stats.resume.held_bytes.clone(),
    );
    let mut idle_check = tokio::time::interval(RECYCLE_IDLE / 2);
    let (mut idle_ticks, mut recycle_asked, mut seen) = (0u32, false, 0usize);
    loop {
        let next = tokio::select! {
            // Only a session that reached the peak runs this timer: an ordinary session (and
            // each of the fleet simulator's thousands) takes no wake-up for it.
            _ = idle_check.tick(), if !recycle_asked && !draining && load.peak.load(Ordering::Relaxed) >= RECYCLE_PEAK => {
                // Idle: nothing open now and nothing started since the last look.
                let started = load.started.load(Ordering::Relaxed);
                let busy = load.open.load(Ordering::Relaxed) > 0 || started != seen;
                seen = started;
                if busy {
                    idle_ticks = 0;
                    continue;
                }
                idle_ticks += 1;
                if idle_ticks > 2 {
                    recycle_asked = true;
                    recycle.notify_one();
                }
                continue;
            }
            _ = shutdown.cancelled(), if !draining => {
                if cfg.handoff.successor().is_some() {
                    // A newer agent takes the streams: the session closes at once (a reset, so
                    // the server sees it lost and resumes each stream there); nothing drains.
                    reset_on_close();
                    tracing::info!(server = %server, "session closed; its streams go to the newer agent");
                    return Ok(None);
                }
                // GOAWAY: the server opens no new stream here; open ones finish, which
                // needs the connection polled (below) until it closes.
                conn.graceful_shutdown();
                stats.sessions_drained.inc();
                draining = true;
                drain_deadline.as_mut().reset(tokio::time::Instant::now() + cfg.drain_timeout);
                tracing::info!(server = %server, "session draining (GOAWAY sent)");
                continue;
            }
            r = stalled.changed() => {
                if r.is_err() {
                    continue;
                }
                if *stalled.borrow_and_update() && !draining {
                    if replacement.is_none() {
                        replacement = Some(Box::pin(dial_racing(cfg, server)));
                    }
                } else {
                    replacement = None;
                }
                continue;
            }
            d = async { replacement.as_mut().expect("guarded").await }, if replacement.is_some() => {
                reset_on_close();
                tracing::info!(server = %server, "session stalled and a new one came up beside it: its streams resume there");
                return Ok(Some(d));
            }
            _ = &mut drain_deadline => {
                tracing::warn!(server = %server, "drain deadline passed; closing the session with streams still open");
                return Ok(None);
            }
            why = &mut ka => {
                // When the link returns, the server learns of it at once.
                reset_on_close();
                return Err(Error::Refused(format!("session with {server} is dead: {why}")));
            }
            Some((rtt, w)) = windows.resized() => {
                // Streams' receive windows follow the link's bandwidth-delay product.
                tunnel_proto::keepalive::log_resize(server, rtt, w, conn.set_initial_window_size(w));
                continue;
            }
            n = conn.accept() => n,
        };
        match next {
            None => return Ok(None),
            Some(Err(e)) => return Err(Error::h2(format!("session with {server}"), e)),
            Some(Ok((req, respond))) => {
                let (cfg, stats, budget) = (cfg.clone(), stats.clone(), budget.clone());
                let counted = Counted::new(&load);
                tokio::spawn(async move {
                    serve_stream(&cfg, &stats, req, respond, budget, counted).await
                });
            }
        }
    }
}

/// Refuses a stream: counted by reason, answered with the status and reason the server logs.
pub(crate) fn reject(
    stats: &AgentMetrics,
    mut respond: h2::server::SendResponse<Bytes>,
    why: Refusal,
) {
    stats
        .refused
        .get_or_create(&Reason {
            reason: why.label(),
        })
        .inc();
    let _ = respond.send_response(refusal_response(why), true);
}

async fn serve_stream(
    cfg: &AgentConfig,
    stats: &AgentMetrics,
    req: http::Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
    budget: Arc<tunnel_proto::resume::Budget>,
    counted: Counted,
) {
    if crate::connect::is_health(&req, &cfg.node_id) {
        // Answered here, never dialled, and not counted as a refusal: it is the server asking.
        let mut respond = respond;
        let answer = match req.uri().port_u16().unwrap_or(0) {
            0 => http::Response::builder().status(http::StatusCode::OK),
            p if cfg.allowed_ports.contains(&p) => http::Response::builder()
                .status(http::StatusCode::OK)
                .header(tunnel_proto::wire::PORT_ALLOWED_HEADER, "1"),
            _ => {
                let _ = respond.send_response(
                    tunnel_proto::wire::refusal_response(Refusal::PortNotAllowed),
                    true,
                );
                return;
            }
        };
        let _ = respond.send_response(answer.body(()).expect("static response"), true);
        return;
    }
    let port = match crate::connect::admit(&req, &cfg.node_id, &cfg.allowed_ports) {
        Ok(port) => port,
        Err(why) => {
            match why {
                Refusal::OtherNode => {
                    tracing::warn!(asked = ?req.headers().get(NODE_HEADER), node = %cfg.node_id, "stream for another node refused")
                }
                Refusal::PortNotAllowed => {
                    tracing::warn!(uri = %req.uri(), "stream for a port that is not allow-listed refused")
                }
                _ => {}
            }
            return reject(stats, respond, why);
        }
    };
    if req
        .headers()
        .contains_key(tunnel_proto::resume::RESUME_OF_HEADER)
    {
        // The same node and an allowed port, as checked above: the parked stream takes it.
        // The stream is on this session now: counted in its load (busy keepalive) while here.
        return crate::resume::hand_over(cfg, stats, req, respond, budget, counted).await;
    }
    let _counted = counted;
    let mut last_err = None;
    let mut tcp = None;
    for ip in &cfg.dial {
        match TcpStream::connect(SocketAddr::new(*ip, port)).await {
            Ok(t) => {
                tcp = Some(t);
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let Some(tcp) = tcp else {
        tracing::warn!(port, "local dial failed: {last_err:?}");
        return reject(stats, respond, Refusal::DialFailed);
    };
    let _ = tcp.set_nodelay(true);
    stats.streams_total.inc();
    stats.streams_open.inc();
    let resumable = crate::resume::asked(&req).filter(|_| cfg.resume.enabled());
    let out = match resumable {
        Some(id) => {
            crate::resume::serve(cfg, stats, tcp, respond, req.into_body(), id, budget).await
        }
        None => {
            let up = relay::Up::Answer {
                respond,
                by: ANSWER_WITHIN,
                ok: relay::ok_response(),
            };
            relay::relay(tcp, up, req.into_body()).await
        }
    };
    stats.streams_open.dec();
    if stats.streams_open.get() == 0
        && let Some(t) = &cfg.trimmer
    {
        t.idle();
    }
    stats
        .bytes
        .get_or_create(&Direction {
            direction: "to_node",
        })
        .inc_by(out.stream_to_tcp);
    stats
        .bytes
        .get_or_create(&Direction {
            direction: "from_node",
        })
        .inc_by(out.tcp_to_stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters_within_half() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for attempt in 0..30 {
            let d = backoff(attempt, min, max);
            let ceiling = min.saturating_mul(1 << attempt.min(16)).min(max);
            assert!(
                d <= ceiling && d >= ceiling / 2,
                "attempt {attempt}: {d:?} vs {ceiling:?}"
            );
        }
    }
}

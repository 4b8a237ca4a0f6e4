//! The tunnel server: accepts agent sessions (mutual TLS, node ID from the verified
//! certificate, then HTTP/2 with the server as client) and redirected connections (original
//! destination -> node ID -> one CONNECT stream on that node's session).
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use edge_cli::accept::Acceptor;
use edge_model::{OriginalDst, follow::Follower};
use h2::client::SendRequest;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    admission::{Admission, Limits, Ticket, Verdict},
    error::{Error, Result},
    identity,
    metrics::{AdmissionLabel, CheckLabel, Direction, Reason, ServerMetrics},
    reach::{Reach, Seen},
    relay,
    relay::{End, Leg, Up},
    wire,
};
use tunnel_proto::resume::{Budget, FlowId, Progress, RESUME_HEADER, Resend, Retained, keep_for};

mod explain;
mod resume;

pub use edge_model::routes::{Route, Routes};
pub use explain::{debug_handler as explain_handler, replica_name};
pub use tunnel_proto::wire::{NODE_HEADER, Refusal};

/// Session up/down lines logged one by one per 10 s (each kind) before they are counted.
const SESSION_LINES_PER_WINDOW: u64 = 20;
/// Health streams in flight at once: a fleet of idle nodes is checked in a trickle.
const CHECKS_IN_FLIGHT: usize = 64;

#[derive(Clone)]
pub struct ServerConfig {
    /// Replaceable: a renewed server certificate or CA bundle applies to new sessions.
    pub tls: tunnel_proto::tls::Live<rustls::ServerConfig>,
    /// Receive window per stream: bounds the memory one slow client can pin.
    pub stream_window: u32,
    /// How long opening a stream (agent dial included) may take.
    pub open_timeout: Duration,
    /// What outsiders may hold: handshake deadline and slots, sessions per node, redirected
    /// connections (the enrollment's limits are the endpoint's).
    pub limits: Limits,
    pub keepalive: tunnel_proto::keepalive::Keepalive,
    /// Told when the last redirected connection closes (memory goes back to the kernel).
    pub trimmer: Option<edge_cli::memory::Trimmer>,
    /// The per-stream audit trail (`--audit-log`), off when None.
    pub audit: Option<crate::audit::Audit>,
    /// How long a stream whose session was lost waits for the node's next one, and how much
    /// each session's streams may keep for it.
    pub resume: tunnel_proto::resume::ResumeConfig,
}

impl ServerConfig {
    pub fn new(tls: impl Into<tunnel_proto::tls::Live<rustls::ServerConfig>>) -> Self {
        Self {
            tls: tls.into(),
            stream_window: 1 << 20,
            open_timeout: Duration::from_secs(10),
            limits: Limits::default(),
            keepalive: Default::default(),
            trimmer: None,
            audit: None,
            resume: Default::default(),
        }
    }
}

struct Session {
    id: u64,
    send: SendRequest<Bytes>,
    peer: SocketAddr,
    /// When it came up (what `redirector explain` reports).
    since: std::time::SystemTime,
    /// Cancelled when newer sessions of the node pushed this one over the bound.
    evicted: CancellationToken,
    /// What its streams keep for resumption (--resume-buffer-per-session).
    budget: Arc<Budget>,
    /// Asks its keepalive for a PING now (see `keepalive::run_listening`).
    probe: Arc<tokio::sync::Notify>,
}

/// A session that may take a new stream, and the budget its streams keep their bytes in.
type Candidate = (SendRequest<Bytes>, Arc<Budget>);

/// Where routes come from: a fixed set (tests, benchmarks), or the node-table follower, whose
/// current snapshot is read per connection and refreshed on a miss.
enum Routing {
    Fixed(RwLock<Arc<Routes>>),
    Followed(Arc<Follower>),
}

struct Inner {
    cfg: ServerConfig,
    routing: Routing,
    /// Every live session of each node, oldest first: new streams go to the newest that takes
    /// them, and a session that ends takes only its own streams (and its own entry) with it.
    sessions: Mutex<HashMap<String, Vec<Session>>>,
    next_session: AtomicU64,
    stats: ServerMetrics,
    /// Every accepted redirected connection's task: what a stop drains.
    connections: TaskTracker,
    refused_warn: Mutex<edge_cli::warn_every::WarnKinds>,
    /// Session up/down lines: each one while they are few, counted in a storm.
    session_log: Mutex<edge_cli::warn_every::WarnKinds>,
    agents_admission: Admission,
    /// Redirected connections held now (against `limits.max_ingress_connections`).
    ingress_held: Arc<std::sync::atomic::AtomicUsize>,
    /// Which nodes answer streams, and when they last did.
    reach: Reach,
    /// The one clock over every session's silence: keepalives keep no timer of their own.
    silence: Arc<tunnel_proto::silence::SilenceWatch>,
    /// This replica's name, as probes and explanations report it.
    replica: Arc<str>,
    /// Per node with parked streams: woken when a session of the node comes up.
    resume_wake: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
}

/// An agent's connection once both handshakes are done.
struct Established {
    node: String,
    /// When its certificate expires (the certificate itself is not kept for the session).
    expires: Option<std::time::SystemTime>,
    heard: Arc<tunnel_proto::heard::LastHeard>,
    send: h2::client::SendRequest<Bytes>,
    conn: h2::client::Connection<
        tunnel_proto::heard::Heard<tokio_rustls::server::TlsStream<TcpStream>>,
        Bytes,
    >,
}

/// Cheap to clone; all clones share sessions, routes and counters.
#[derive(Clone)]
pub struct Server(Arc<Inner>);

fn refuse_tcp(tcp: TcpStream) {
    // A reset, not a FIN: the client must not mistake a refusal for an empty answer.
    relay::abort(&tcp);
    drop(tcp);
}

/// One redirected connection counted against the ingress limit, until dropped.
struct HeldConnection(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for HeldConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Server {
    pub fn new(cfg: ServerConfig, routes: Routes) -> Self {
        Self::with_routing(cfg, Routing::Fixed(RwLock::new(Arc::new(routes))))
    }

    /// Routes from the node-table follower the redirector's maps come from too.
    pub fn following(cfg: ServerConfig, nodes: Arc<Follower>) -> Self {
        Self::with_routing(cfg, Routing::Followed(nodes))
    }

    fn with_routing(cfg: ServerConfig, routing: Routing) -> Self {
        let stats = ServerMetrics::default();
        Server(Arc::new(Inner {
            routing,
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            agents_admission: Admission::new(cfg.limits.agents)
                .counted_in(stats.handshakes_in_flight.clone()),
            stats,
            connections: TaskTracker::new(),
            refused_warn: Mutex::new(edge_cli::warn_every::WarnKinds::new(Duration::from_secs(
                10,
            ))),
            session_log: Mutex::new(edge_cli::warn_every::WarnKinds::with_burst(
                Duration::from_secs(10),
                SESSION_LINES_PER_WINDOW,
            )),
            ingress_held: Default::default(),
            reach: Reach::default(),
            silence: crate::keepalive::silence_watch(cfg.keepalive),
            replica: replica_name().into(),
            resume_wake: Mutex::default(),
            cfg,
        }))
    }

    /// Replaces fixed routes (a server that follows the node table takes them from there).
    pub fn set_routes(&self, routes: Routes) {
        match &self.0.routing {
            Routing::Fixed(r) => *r.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(routes),
            Routing::Followed(_) => {
                tracing::warn!("set_routes on a server that follows the node table: ignored")
            }
        }
    }

    /// The route for a redirected destination. A miss is checked once more against the node
    /// table file: the kernel redirected the address, so the table it came from has it, and
    /// this server's snapshot may only be older.
    async fn route(&self, ip: &IpAddr) -> Option<Route> {
        match &self.0.routing {
            Routing::Fixed(r) => r.read().unwrap_or_else(|p| p.into_inner()).get(ip).cloned(),
            Routing::Followed(f) => match f.current().route(ip) {
                Some(r) => Some(r),
                None => f.refreshed().await.route(ip),
            },
        }
    }

    pub fn stats(&self) -> &ServerMetrics {
        &self.0.stats
    }

    /// Every node of the node table and every node seen on a session, with whether it answers
    /// streams and when it last did (the `tunnel_server_node_*` gauges).
    pub fn reachability(&self) -> std::collections::BTreeMap<String, Seen> {
        let known: Vec<String> = match &self.0.routing {
            Routing::Followed(f) => f.current().node_names(),
            Routing::Fixed(r) => r
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .nodes()
                .map(|n| n.to_string())
                .collect(),
        };
        self.0.reach.snapshot(known)
    }

    /// The self-check of every node with a session: each `interval`, a node that answered no
    /// stream for half of it gets a health stream, which its agent answers without dialling;
    /// no answer within half the interval (at most `open_timeout`) marks it unreachable. A
    /// node whose agent stops answering is therefore seen within two intervals, however long
    /// its session stays up.
    pub async fn check_nodes(&self, interval: Duration, shutdown: CancellationToken) {
        let timeout = (interval / 2).min(self.0.cfg.open_timeout);
        let limit = Arc::new(tokio::sync::Semaphore::new(CHECKS_IN_FLIGHT));
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for node in self.connected_nodes() {
                // A node that answered in the last half interval (a stream, or the previous
                // check answered quickly) has shown it is alive.
                if !self.0.reach.due(&node, interval - timeout) {
                    continue;
                }
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    return;
                };
                let server = self.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    server.check_node(&node, timeout).await;
                });
            }
        }
    }

    async fn check_node(&self, node: &str, timeout: Duration) {
        let check = async {
            let req = wire::health_request(node, 0).map_err(|e| e.to_string())?;
            let (resp, _body, _) = open_stream(self.candidates(node), req, true).await?;
            // Any answer is the agent's: an agent older than health streams refuses this one
            // (port 0 is never allowed), which proves the same.
            resp.await.map_err(|e| format!("awaiting the agent: {e}"))
        };
        let result = match tokio::time::timeout(timeout, check).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        };
        let was = self.0.reach.get(node).reachable;
        let label = |result: &'static str| CheckLabel { result };
        match result {
            Ok(()) => {
                self.0.stats.node_checks.get_or_create(&label("ok")).inc();
                self.0.reach.reached(node);
                if !was {
                    tracing::info!(node = %node, "node answers its health stream again");
                }
            }
            Err(e) => {
                self.0
                    .stats
                    .node_checks
                    .get_or_create(&label("failed"))
                    .inc();
                self.0.reach.lost(node);
                if was {
                    self.warn_aggregated("node_check", |more| {
                        tracing::warn!(node = %node, "node unreachable: its session is up but its agent did not answer a health stream ({e}); the agent hangs or cannot serve streams: see its log and tunnel_agent_* metrics{more}")
                    });
                }
            }
        }
    }

    /// A node's sessions that may take a new stream, newest first.
    fn candidates(&self, node: &str) -> Vec<Candidate> {
        self.0
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .map(|live| {
                live.iter()
                    .rev()
                    .map(|s| (s.send.clone(), s.budget.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What a node's parked streams wait on for its next session.
    pub(crate) fn resume_wake(&self, node: &str) -> Arc<tokio::sync::Notify> {
        self.0
            .resume_wake
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node.to_owned())
            .or_default()
            .clone()
    }

    /// Forgets `node`'s wake-up once no parked stream holds it but `wake` itself.
    pub(crate) fn resume_unwake(&self, node: &str, wake: Arc<tokio::sync::Notify>) {
        let mut waits = self.0.resume_wake.lock().unwrap_or_else(|p| p.into_inner());
        // The map's and this one: nobody else waits.
        if Arc::strong_count(&wake) <= 2 {
            waits.remove(node);
        }
    }

    /// How many redirected connections were refused for `why`.
    pub fn refused(&self, why: Refusal) -> u64 {
        self.0
            .stats
            .refused
            .get_or_create(&Reason {
                reason: why.label(),
            })
            .get()
    }

    /// Waits until every accepted connection is done, or `deadline`; call once no ingress
    /// accepts any more. Returns how many were still open at the deadline.
    pub async fn drain(&self, deadline: Duration) -> usize {
        let open = &self.0.connections;
        open.close();
        tracing::info!(
            streams = open.len(),
            "stopping: no new connections; draining open streams"
        );
        if tokio::time::timeout(deadline, open.wait()).await.is_err() {
            tracing::warn!(
                streams = open.len(),
                "drain deadline passed; closing the remaining streams"
            );
        }
        open.len()
    }

    /// The counter of failed accepts on `listener` (`agents`, `ingress`, `enrollment`).
    pub fn accept_errors(
        &self,
        listener: &'static str,
    ) -> prometheus_client::metrics::counter::Counter {
        self.0
            .stats
            .accept_errors
            .get_or_create(&crate::metrics::ListenerLabel { listener })
            .clone()
    }

    /// Node IDs with a live session.
    pub fn connected_nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .0
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Accepts agent sessions until `shutdown`.
    pub async fn serve_agents(&self, listener: TcpListener, shutdown: CancellationToken) {
        let mut listener = Acceptor::new(listener, "agent listener", self.accept_errors("agents"));
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                x = listener.accept() => x,
            };
            let (ticket, verdict) = self.0.agents_admission.admit(peer.ip());
            if let Some(reason) = verdict.label() {
                let limits = self.0.agents_admission.limits();
                self.admission_refused(reason, peer, || match verdict {
                    Verdict::PerSourceFull => format!("{} agent connections from {} already in their TLS handshake (--max-handshakes-per-source): closed at once", limits.per_source, peer.ip()),
                    Verdict::TotalFull => format!("{} agent connections in their TLS handshake, none for {:?} yet (--max-handshakes, --evict-handshakes-after): closed this one, it retries", limits.total, limits.evict_after),
                    _ => format!("{} agent connections in their TLS handshake (--max-handshakes): closed the oldest, stale for {:?}, for this one", limits.total, limits.evict_after),
                });
            }
            let Some(ticket) = ticket else {
                drop(tcp);
                continue;
            };
            let server = self.clone();
            // The configuration current at accept time (certificates and CAs reload live).
            let acceptor = tokio_rustls::TlsAcceptor::from(self.0.cfg.tls.get());
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                if let Err(e) = server
                    .agent_session(acceptor, tcp, peer, ticket, shutdown)
                    .await
                {
                    server.0.stats.sessions_rejected.inc();
                    // Anyone can make a handshake fail: a flood of one reason is one line
                    // per 10 s (the counter keeps the exact number), other reasons still show.
                    let msg = e.to_string();
                    server.warn_aggregated(&msg, |more| {
                        tracing::warn!(%peer, "agent session refused or failed: {msg}{more}")
                    });
                }
            });
        }
    }

    /// A session event of `kind` (up, down): logged one by one up to
    /// [`SESSION_LINES_PER_WINDOW`] per 10 s, then counted into the next line, so a reconnect
    /// storm of 10,000 agents logs a few dozen lines, not 20,000.
    fn log_session(&self, kind: &str, emit: impl FnOnce(&str)) {
        self.0
            .session_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .warn(kind, emit);
    }

    /// A warning of `kind` that outsiders can trigger at will: the first in full, then one line
    /// per 10 s saying how many more (the counters keep the exact numbers).
    fn warn_aggregated(&self, kind: &str, emit: impl FnOnce(&str)) {
        self.0
            .refused_warn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .warn(kind, emit);
    }

    /// Counts a connection closed before authentication and warns (aggregated per reason:
    /// outsiders decide how often this happens).
    fn admission_refused(
        &self,
        reason: &'static str,
        peer: SocketAddr,
        msg: impl FnOnce() -> String,
    ) {
        self.0
            .stats
            .admission
            .get_or_create(&AdmissionLabel {
                listener: "agents",
                reason,
            })
            .inc();
        self.warn_aggregated(reason, |more| {
            let msg = msg();
            tracing::warn!(%peer, reason, "agent connection closed before authentication: {msg}{more}")
        });
    }

    /// The TLS and HTTP/2 handshakes of an agent's connection, and who it is.
    async fn establish(
        &self,
        acceptor: tokio_rustls::TlsAcceptor,
        tcp: TcpStream,
        peer: SocketAddr,
        ticket: Ticket,
    ) -> Result<Established> {
        let _ = tcp.set_nodelay(true);
        let timeout = self.0.cfg.limits.handshake_timeout;
        let tls = tokio::select! {
            r = tokio::time::timeout(timeout, acceptor.accept(tcp)) => r,
            _ = ticket.evicted.cancelled() => {
                return Err(Error::Refused("closed in its TLS handshake for a newer connection (--max-handshakes)".into()));
            }
        };
        let tls = tls
            .map_err(|_| {
                self.admission_refused("handshake_timeout", peer, || {
                    format!("no TLS handshake within {timeout:?} (--handshake-timeout)")
                });
                Error::Refused(format!("TLS handshake not done within {timeout:?}"))
            })?
            // rustls says which: no certificate, unknown issuer (wrong CA), expired, ...
            .map_err(|e| Error::io("TLS handshake with agent", e))?;
        // Authenticated (the client certificate verified): no longer pre-authentication.
        drop(ticket);
        let der = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| Error::Identity("agent presented no certificate".into()))?
            .clone();
        let node = identity::node_id_from_cert(&der)?;
        let heard = self.0.silence.watch();
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(self.0.cfg.stream_window)
            // Connection-level window: effectively off; memory is bounded per stream, and a
            // shared window is what let one stalled stream freeze a whole session.
            .initial_connection_window_size(i32::MAX as u32)
            .max_frame_size(256 * 1024)
            .max_concurrent_reset_streams(10_000)
            .handshake::<_, Bytes>(tunnel_proto::heard::Heard::new(tls, heard.clone()))
            .await
            .map_err(|e| Error::h2(format!("handshake with agent {node}"), e))?;
        Ok(Established {
            node,
            expires: identity::not_after(&der),
            heard,
            send,
            conn,
        })
    }

    async fn agent_session(
        &self,
        acceptor: tokio_rustls::TlsAcceptor,
        tcp: TcpStream,
        peer: SocketAddr,
        ticket: Ticket,
        shutdown: CancellationToken,
    ) -> Result<()> {
        // Boxed, and freed once done: inline, the handshakes' futures (the TLS acceptor's
        // state, the HTTP/2 preface) made every idle session's task 7 KiB where the
        // running session needs about half of that.
        let Established {
            node,
            expires,
            heard,
            send,
            mut conn,
        } = Box::pin(self.establish(acceptor, tcp, peer, ticket)).await?;
        let id = self.0.next_session.fetch_add(1, Ordering::Relaxed);
        // Held for the connection's life: h2 closes a client connection once every handle is
        // gone, so without this a newer session of the node (a certificate rotation, a second
        // replica of the agent) replacing this one in the map would close it, and two sessions
        // of one node would keep closing each other. A replaced session stays up, takes no new
        // streams, and ends when the agent drains it (GOAWAY) or its keepalive fails.
        let mut held = Some(send.clone());
        let evicted = CancellationToken::new();
        let probe = Arc::new(tokio::sync::Notify::new());
        {
            let mut sessions = self.0.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let live = sessions.entry(node.clone()).or_default();
            // Bounded per identity: the oldest leaves the routing (no new streams) and closes
            // once its open streams are done, as a drained session does.
            while live.len() >= self.0.cfg.limits.max_sessions_per_node.max(1) {
                let old = live.remove(0);
                old.evicted.cancel();
                self.0
                    .stats
                    .admission
                    .get_or_create(&AdmissionLabel {
                        listener: "agents",
                        reason: "sessions_per_node",
                    })
                    .inc();
                // Agents over the bound reconnect and close another in turn: aggregated.
                let max = self.0.cfg.limits.max_sessions_per_node;
                self.warn_aggregated("sessions_per_node", |more| {
                    tracing::warn!(node = %node, %peer, closed_session = old.id, closed_peer = %old.peer, max, "the node has more live sessions than --max-sessions-per-node: its oldest takes no new streams and closes once its open streams are done (more agents hold this node's certificate than the bound){more}");
                });
            }
            // An agent that found its session dead (an outage) comes back on a new one while
            // this server may still think the old one up: ask the older ones to answer now.
            for older in live.iter() {
                older.probe.notify_one();
            }
            if let Some(prev) = live.last() {
                // A rolling upgrade or a rotation looks like this; so does a second process
                // holding the node's certificate. Either way an operator must be able to see it.
                self.0.stats.session_takeovers.inc();
                // One line each while they are few; a fleet-wide agent rollout (or every
                // agent rotating its certificate at once) is counted into the next line.
                let prev = (prev.peer, prev.id);
                self.log_session("takeover", |more| {
                    tracing::warn!(node = %node, %peer, session = id, previous_peer = %prev.0, previous_session = prev.1, "a second session of this node takes its new streams; the previous one stays up until it ends (expected during an agent upgrade or certificate rotation; otherwise another process holds this node's certificate){more}");
                });
            }
            live.push(Session {
                id,
                send,
                peer,
                since: std::time::SystemTime::now(),
                evicted: evicted.clone(),
                budget: Budget::counted(
                    self.0.cfg.resume.budget_per_session,
                    self.0.stats.resume.held_bytes.clone(),
                ),
                probe: probe.clone(),
            });
            self.0.stats.sessions.set(sessions.len() as i64);
        }
        // Streams of the node parked by a lost session resume on this one.
        if let Some(wake) = self
            .0
            .resume_wake
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
        {
            wake.notify_waiters();
        }
        self.0.stats.sessions_accepted.inc();
        // It answered the HTTP/2 handshake just now.
        self.0.reach.session_up(&node, expires);
        self.log_session(
            "up",
            |more| tracing::info!(node = %node, %peer, session = id, "agent session up{more}"),
        );
        let pings = conn.ping_pong().expect("ping_pong is taken once, here");
        let (rtt_tx, rtt_rx) = tokio::sync::watch::channel(None);
        // The agent pings on its own: the server only listens, and pings a silent agent.
        let ka = crate::keepalive::run_listening(
            pings,
            self.0.cfg.keepalive,
            &heard,
            &self.0.stats.keepalive_rtt_us,
            &rtt_tx,
            &probe,
        );
        tokio::pin!(ka);
        let mut windows = crate::keepalive::Windows::new(rtt_rx, self.0.cfg.stream_window);
        let r = loop {
            tokio::select! {
                r = &mut conn => break r.map_err(|e| Error::h2(format!("session of {node}"), e)),
                why = &mut ka => {
                    self.0.stats.sessions_dead.inc();
                    break Err(Error::Refused(format!("session of {node} is dead: {why}")));
                }
                _ = shutdown.cancelled() => break Ok(()),
                // Out of the routing already; without a handle left, h2 ends the connection
                // once its last stream is done.
                _ = evicted.cancelled(), if held.is_some() => held = None,
                Some((rtt, w)) = windows.resized() => {
                    // Streams' receive windows follow the link's bandwidth-delay product.
                    crate::keepalive::log_resize(&node, rtt, w, conn.set_initial_window_size(w));
                }
            }
        };
        let mut sessions = self.0.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let remaining = match sessions.get_mut(&node) {
            Some(live) => {
                live.retain(|s| s.id != id);
                live.last().map(|s| (s.id, s.peer))
            }
            None => None,
        };
        if remaining.is_none() {
            sessions.remove(&node);
            self.0.reach.lost(&node);
        }
        self.0.stats.sessions.set(sessions.len() as i64);
        drop(sessions);
        // The session's buffers are free now (see the agent's session end).
        if let Some(t) = &self.0.cfg.trimmer {
            t.idle();
        }
        self.log_session("down", |more| match remaining {
            Some((next, at)) => {
                tracing::info!(node = %node, session = id, next_session = next, next_peer = %at, "agent session down{more}; the node's other session takes its new streams")
            }
            None => tracing::info!(node = %node, session = id, "agent session down{more}"),
        });
        r
    }

    /// Accepts redirected connections until `shutdown`; `lookup(socket, client, ingress)` gives
    /// each one's original destination (getsockopt, the redirector's `OrigDstTable`, or a
    /// test's stand-in).
    pub async fn serve_ingress<F>(
        &self,
        listener: TcpListener,
        lookup: F,
        shutdown: CancellationToken,
    ) where
        F: Fn(std::os::fd::BorrowedFd<'_>, SocketAddr, SocketAddr) -> Option<OriginalDst>
            + Send
            + Sync
            + 'static,
    {
        // Accepted connections inherit TCP_NODELAY: one system call per listener, not per
        // connection (the relay writes whole messages and must not wait for ACKs).
        if let Err(e) = socket2::SockRef::from(&listener).set_tcp_nodelay(true) {
            tracing::warn!("ingress: cannot set TCP_NODELAY on the listener: {e}");
        }
        // A listener bound to one address is the local end of every connection it accepts;
        // only a wildcard listener needs getsockname per connection.
        let bound = listener
            .local_addr()
            .ok()
            .filter(|a| !a.ip().is_unspecified());
        let mut listener = Acceptor::new(listener, "ingress", self.accept_errors("ingress"));
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                x = listener.accept() => x,
            };
            // Looked up on the accept path, before the next accept (entries are per 4-tuple).
            let local = bound.or_else(|| tcp.local_addr().ok());
            let orig = match local {
                Some(local) => lookup(std::os::fd::AsFd::as_fd(&tcp), peer, local),
                None => None,
            };
            // Who connected, for the audit trail: asked only when there is one to write.
            let caller = match (&self.0.cfg.audit, local, orig) {
                (Some(_), Some(local), Some(_)) => {
                    crate::orig_dst::take_caller(std::os::fd::AsFd::as_fd(&tcp), local.is_ipv6())
                }
                _ => None,
            };
            let held = self.0.ingress_held.fetch_add(1, Ordering::Relaxed);
            let release = HeldConnection(self.0.ingress_held.clone());
            if held >= self.0.cfg.limits.max_ingress_connections {
                drop(release);
                self.refuse(tcp, Refusal::IngressFull, format!(
                    "{held} redirected connections held (--max-ingress-connections); {peer} reset"
                ));
                continue;
            }
            let server = self.clone();
            self.0.connections.spawn(async move {
                let _release = release;
                server.handle_accepted(tcp, orig, peer, caller).await
            });
        }
    }

    /// Forwards one redirected connection to its node, or refuses it with a reset.
    pub async fn handle_redirected(
        &self,
        tcp: TcpStream,
        orig: Option<OriginalDst>,
    ) -> Result<relay::Outcome, Refusal> {
        let peer = tcp
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        self.handle_accepted(tcp, orig, peer, None).await
    }

    /// [`Self::handle_redirected`] for a connection from `peer`, opened by `caller` (as the
    /// redirector recorded it), written to the audit trail once it ends.
    async fn handle_accepted(
        &self,
        tcp: TcpStream,
        orig: Option<OriginalDst>,
        peer: SocketAddr,
        caller: Option<redirector_common::sockopt::CallerAnswer>,
    ) -> Result<relay::Outcome, Refusal> {
        // Counted from acceptance, not from the stream open: a stopping server drains what it
        // accepted, including connections still waiting for their stream.
        let st = &self.0.stats;
        st.streams_open.inc();
        let (started, clock) = (std::time::SystemTime::now(), std::time::Instant::now());
        let mut node = None;
        let r = self.route_and_forward(tcp, orig, &mut node).await;
        if let Some(audit) = &self.0.cfg.audit
            && !orig.is_some_and(|o| o.probe)
        {
            let (outcome, reason, up, down) = match &r {
                Ok(o) if o.end == End::Reset => ("reset", None, o.tcp_to_stream, o.stream_to_tcp),
                Ok(o) => ("closed", None, o.tcp_to_stream, o.stream_to_tcp),
                Err(why) => ("refused", Some(why.label()), 0, 0),
            };
            audit.record(&crate::audit::Record {
                started,
                duration: clock.elapsed(),
                caller,
                client: peer,
                from_pod: orig.is_some_and(|o| o.from_pod),
                destination: orig.map(|o| o.addr),
                node: node.as_deref(),
                outcome,
                reason,
                bytes_to_node: up,
                bytes_from_node: down,
            });
        }
        st.streams_open.dec();
        if st.streams_open.get() == 0
            && let Some(t) = &self.0.cfg.trimmer
        {
            t.idle();
        }
        r
    }

    /// `node` learns the node the connection is for, once known (for the audit trail).
    async fn route_and_forward(
        &self,
        tcp: TcpStream,
        orig: Option<OriginalDst>,
        node_of: &mut Option<Arc<str>>,
    ) -> Result<relay::Outcome, Refusal> {
        let Some(orig) = orig else {
            let peer = tcp.peer_addr().ok();
            return Err(self.refuse(
                tcp,
                Refusal::NotRedirected,
                format!(
                    "connection from {peer:?} has no original destination (not redirected); refused"
                ),
            ));
        };
        if orig.probe {
            // The redirector's ingress probe: the path from connect() to here works. Answered
            // here, never routed; the replica's name says which server took it.
            self.0.stats.ingress_probes.inc();
            let mut tcp = tcp;
            let line = format!("{} {}\n", edge_model::orig_dst::PROBE_REPLY, self.0.replica);
            let _ = tokio::io::AsyncWriteExt::write_all(&mut tcp, line.as_bytes()).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tcp).await;
            return Ok(relay::Outcome {
                tcp_to_stream: 0,
                stream_to_tcp: line.len() as u64,
                end: End::Closed,
            });
        }
        let route = self.route(&orig.addr.ip()).await;
        // Ambiguity is the kernel's verdict (it shipped it with the destination); the routes
        // only name the nodes. Routes that cannot name one node are never guessed either.
        let node = match route {
            Some(Route::Node(n)) if !orig.ambiguous => n,
            None if !orig.ambiguous => {
                return Err(self.refuse(
                    tcp,
                    Refusal::UnknownNode,
                    format!("{} is not a known node address; refused", orig.addr),
                ));
            }
            other => {
                let nodes = match other {
                    Some(Route::Ambiguous(nodes)) => nodes,
                    Some(Route::Node(n)) => vec![n],
                    None => Vec::new(),
                };
                return Err(self.refuse(tcp, Refusal::Ambiguous, format!(
                    "{} belongs to several nodes {nodes:?}; refused rather than risk the wrong node: reach them by their unique tunnel addresses or names",
                    orig.addr.ip()
                )));
            }
        };
        // Debug level: formatting the fields of an enabled span cost 2% of the server's CPU
        // per connection; the warnings below name node and destination themselves.
        *node_of = Some(node.clone());
        let span = tracing::debug_span!("stream", node = %node, dst = %orig.addr);
        self.forward(tcp, node, orig.addr).instrument(span).await
    }

    async fn forward(
        &self,
        tcp: TcpStream,
        node: Arc<str>,
        dst: SocketAddr,
    ) -> Result<relay::Outcome, Refusal> {
        let port = dst.port();
        // Newest first; one that no longer takes streams (its agent sent GOAWAY, or it is
        // closing) hands the stream to the next.
        let candidates = self.candidates(&node);
        if candidates.is_empty() {
            return Err(self.refuse(
                tcp,
                Refusal::NoSession,
                format!("node {node} has no agent session; refused"),
            ));
        }
        // Asked resumable; the agent's echo says whether it will be (an older agent ignores it).
        let flow = self.0.cfg.resume.enabled().then(FlowId::random);
        let open = async {
            let mut req = wire::connect_request(&node, port).map_err(|e| e.to_string())?;
            if let Some(id) = flow {
                req.headers_mut().insert(RESUME_HEADER, id.value());
            }
            open_stream(candidates, req, false).await
        };
        let (resp, tx, budget) = match tokio::time::timeout(self.0.cfg.open_timeout, open).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                return Err(self.refuse(
                    tcp,
                    Refusal::StreamOpenFailed,
                    format!("{dst} (node {node}): {e}"),
                ));
            }
            Err(_) => {
                let msg = format!(
                    "{dst} (node {node}): session busy for {:?}",
                    self.0.cfg.open_timeout
                );
                return Err(self.refuse(tcp, Refusal::StreamOpenFailed, msg));
            }
        };
        // The agent's answer is awaited inside the relay: the client's first bytes travel with
        // the stream open instead of one round trip later.
        let refused: Mutex<Option<Refusal>> = Mutex::new(None);
        let echoed = AtomicBool::new(false);
        let answer = async {
            let why = match tokio::time::timeout(self.0.cfg.open_timeout, resp).await {
                Ok(Ok(r)) if r.status() == http::StatusCode::OK => {
                    if flow.is_some() && FlowId::from_header(r.headers(), RESUME_HEADER) == flow {
                        echoed.store(true, Ordering::Relaxed);
                    }
                    // Counted when the agent accepted it, before any reply reaches the client.
                    self.0.stats.streams_total.inc();
                    self.0.reach.reached(&node);
                    return Some(r.into_body());
                }
                Ok(Ok(r)) => {
                    let (reason, detail) = wire::refusal_of(&r);
                    let reason = reason.map_or("unknown", Refusal::label);
                    (
                        Refusal::AgentRefused,
                        format!(
                            "{dst} (node {node}): agent answered {}: {detail} (agent reason {reason})",
                            r.status()
                        ),
                    )
                }
                // This end reset the stream: the client aborted before the agent's answer
                // (which waits for the service's first bytes). Not a refusal; the relay
                // reports the reset.
                Ok(Err(e)) if e.is_reset() && !e.is_remote() => return None,
                Ok(Err(e)) => (
                    Refusal::StreamOpenFailed,
                    format!("{dst} (node {node}): awaiting agent: {e}"),
                ),
                Err(_) => (
                    Refusal::StreamOpenFailed,
                    format!(
                        "{dst} (node {node}): no answer from the agent in {:?}",
                        self.0.cfg.open_timeout
                    ),
                ),
            };
            self.note_refusal(why.0, &why.1);
            *refused.lock().unwrap() = Some(why.0);
            None
        };
        let st = &self.0.stats;
        let mut tcp = tcp;
        let keep = flow.map(|_| Retained::new(keep_for(self.0.cfg.stream_window), budget));
        let mut p = Progress::new(keep);
        let mut leg = relay::leg(&mut tcp, Up::Open(tx), answer, &mut p, Resend::default()).await;
        let end = loop {
            let id = match (leg, flow) {
                (Leg::Done(end), _) => break end,
                (Leg::Lost, Some(id)) if echoed.load(Ordering::Relaxed) && p.resumable() => id,
                (Leg::Lost, flow) => {
                    if flow.is_some() {
                        st.resume.fail("unresumable");
                    }
                    relay::abort(&tcp);
                    break End::Reset;
                }
            };
            // Boxed: its state exists only while parked, not in every connection's task.
            match Box::pin(self.resume(&node, port, id, &mut p)).await {
                Some((tx, rx, resend)) => {
                    leg =
                        relay::leg(&mut tcp, Up::Open(tx), async { Some(rx) }, &mut p, resend).await
                }
                None => {
                    relay::abort(&tcp);
                    break End::Reset;
                }
            }
        };
        let out = relay::outcome(&p, end);
        if let Some(why) = *refused.lock().unwrap() {
            return Err(why);
        }
        st.bytes
            .get_or_create(&Direction {
                direction: "to_node",
            })
            .inc_by(out.tcp_to_stream);
        st.bytes
            .get_or_create(&Direction {
                direction: "from_node",
            })
            .inc_by(out.stream_to_tcp);
        if out.end == End::Reset {
            st.streams_reset.inc();
        }
        tracing::debug!(up = out.tcp_to_stream, down = out.stream_to_tcp, end = ?out.end, "stream done");
        Ok(out)
    }

    fn note_refusal(&self, why: Refusal, msg: &str) {
        self.0
            .stats
            .refused
            .get_or_create(&Reason {
                reason: why.label(),
            })
            .inc();
        if why == Refusal::IngressFull {
            // A flood is what fills the ingress: one line per 10 s, the counter is exact.
            self.warn_aggregated(why.label(), |more| {
                tracing::warn!(reason = why.label(), "{msg}{more}")
            });
            return;
        }
        tracing::warn!(reason = why.label(), "{msg}");
    }

    fn refuse(&self, tcp: TcpStream, why: Refusal, msg: String) -> Refusal {
        self.note_refusal(why, &msg);
        refuse_tcp(tcp);
        why
    }
}

/// Opens a stream with `req` on the first of `candidates` (newest first) that takes one: a
/// session that no longer does (its agent sent GOAWAY, or it is closing) hands it to the next.
async fn open_stream(
    candidates: Vec<Candidate>,
    req: http::Request<()>,
    end_of_stream: bool,
) -> std::result::Result<
    (
        h2::client::ResponseFuture,
        h2::SendStream<Bytes>,
        Arc<Budget>,
    ),
    String,
> {
    let mut last = None;
    for (send, budget) in candidates {
        match send.ready().await {
            Ok(mut send) => {
                return send
                    .send_request(req, end_of_stream)
                    .map(|(resp, tx)| (resp, tx, budget))
                    .map_err(|e| format!("opening stream: {e}"));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => format!("session not ready: {e}"),
        None => "no session".to_owned(),
    })
}

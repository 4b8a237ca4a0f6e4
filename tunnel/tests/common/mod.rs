//! Test fixtures: a real PKI made with rcgen, a real tunnel server and agents on loopback,
//! and local services that say which node they are. Everything binds port 0.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the fixtures"
)]

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use redirector::{OriginalDst, node_table::NodeTable};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use tunnel::{
    identity,
    server::{Routes, Server, ServerConfig},
    tls,
};
use tunnel_agent::session::{self as agent, AgentConfig, AgentMetrics};

pub struct Ca {
    pub cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap().der().clone();
        Ca {
            cert,
            issuer: Issuer::new(p, key),
        }
    }

    fn leaf(&self, p: CertificateParams) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    pub fn server(&self) -> Leaf {
        let mut p = CertificateParams::new(vec!["tunnel.test".to_string()]).unwrap();
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        self.leaf(p)
    }

    pub fn agent(&self, node: &str) -> Leaf {
        self.agent_valid_until(
            node,
            time::OffsetDateTime::now_utc() + time::Duration::days(30),
        )
    }

    pub fn agent_valid_until(&self, node: &str, not_after: time::OffsetDateTime) -> Leaf {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, format!("agent {node}"));
        p.subject_alt_names
            .push(SanType::URI(identity::node_uri(node).try_into().unwrap()));
        p.not_before = not_after - time::Duration::days(60);
        p.not_after = not_after;
        self.leaf(p)
    }
}

/// A captured log, for asserting what an operator would read.
#[derive(Clone, Default)]
pub struct LogBuf(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuf {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Installs a log capture for this (current-thread) test runtime.
pub fn capture_logs() -> (LogBuf, tracing::subscriber::DefaultGuard) {
    let buf = LogBuf::default();
    let b = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || b.clone())
        .with_max_level(tracing::Level::INFO)
        .finish();
    (buf, tracing::subscriber::set_default(sub))
}

pub fn routes(table: &str) -> Routes {
    Routes::from_table(&NodeTable::parse(table, Path::new("test-nodes")).unwrap())
}

pub struct RunningServer {
    pub server: Server,
    pub agent_addr: SocketAddr,
    pub stop: CancellationToken,
}

pub async fn start_server(ca: &Ca, routes: Routes) -> RunningServer {
    start_server_with(ca, routes, |_| {}).await
}

/// [`start_server`] with `tune` applied to the configuration first.
pub async fn start_server_with(
    ca: &Ca,
    routes: Routes,
    tune: impl FnOnce(&mut ServerConfig),
) -> RunningServer {
    let leaf = ca.server();
    let mut cfg = ServerConfig::new(
        tls::server_config(std::slice::from_ref(&ca.cert), leaf.chain, leaf.key).unwrap(),
    );
    tune(&mut cfg);
    let server = Server::new(cfg, routes);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let (s, t) = (server.clone(), stop.clone());
    tokio::spawn(async move { s.serve_agents(listener, t).await });
    RunningServer {
        server,
        agent_addr,
        stop,
    }
}

pub struct RunningAgent {
    pub stats: Arc<AgentMetrics>,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

pub fn agent_config(
    ca_trusted: &Ca,
    leaf: Leaf,
    node: &str,
    servers: &[SocketAddr],
    dial: IpAddr,
    ports: &[u16],
) -> AgentConfig {
    AgentConfig {
        node_id: node.to_owned(),
        servers: servers.iter().map(ToString::to_string).collect(),
        resolver: agent::dns_resolver(),
        resolve_interval: Duration::from_secs(30),
        server_name: ServerName::try_from("tunnel.test").unwrap(),
        tls: tls::agent_config(std::slice::from_ref(&ca_trusted.cert), leaf.chain, leaf.key)
            .unwrap()
            .into(),
        allowed_ports: ports.iter().copied().collect::<BTreeSet<_>>(),
        dial: vec![dial],
        stream_window: 1 << 20,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        keepalive: Default::default(),
        drain_timeout: Duration::from_secs(30),
        trimmer: None,
        source: None,
        resume: Default::default(),
        flows: Default::default(),
        handoff: Default::default(),
    }
}

pub fn start_agent(cfg: AgentConfig) -> RunningAgent {
    let stats = Arc::new(AgentMetrics::default());
    let stop = CancellationToken::new();
    let (s, t) = (stats.clone(), stop.clone());
    let task = tokio::spawn(async move { agent::run(cfg, s, t).await });
    RunningAgent { stats, stop, task }
}

/// Starts `node`'s agent towards `srv`, dialling `dial` for `ports`, and waits for its session.
pub async fn node_agent(
    ca: &Ca,
    srv: &RunningServer,
    node: &str,
    dial: &str,
    ports: &[u16],
) -> RunningAgent {
    let a = start_agent(agent_config(
        ca,
        ca.agent(node),
        node,
        &[srv.agent_addr],
        dial.parse().unwrap(),
        ports,
    ));
    wait_for(
        || srv.server.connected_nodes().iter().any(|n| n == node),
        "the agent's session",
    )
    .await;
    a
}

pub async fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A service on `ip`:`port` (0 = any) that greets with `name`, echoes until EOF, then says
/// "bye <n>" with the number of bytes it got, and closes.
pub async fn greeting_service(ip: IpAddr, port: u16, name: &'static str) -> u16 {
    // Deep backlog: 1,000 streams opened at once would overflow the default (see tunnel::listen).
    let l = tunnel::listen(SocketAddr::new(ip, port)).unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = s.write_all(format!("{name}\n").as_bytes()).await;
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0usize;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            total += n;
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(format!("bye {total}\n").as_bytes()).await;
            });
        }
    });
    port
}

/// A client connection handed to the server as if redirected from `orig`: returns the
/// client's end and the server's handling task.
pub async fn redirected(
    server: &Server,
    orig: SocketAddr,
) -> (
    TcpStream,
    tokio::task::JoinHandle<Result<tunnel::relay::Outcome, tunnel::server::Refusal>>,
) {
    let ingress = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(ingress.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = ingress.accept().await.unwrap();
    let s = server.clone();
    let task = tokio::spawn(async move {
        s.handle_redirected(
            accepted,
            Some(OriginalDst {
                addr: orig,
                from_pod: false,
                ambiguous: false,
                probe: false,
            }),
        )
        .await
    });
    (client, task)
}

/// Reads everything until EOF (Err on a reset).
pub async fn read_all(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).await?;
    Ok(v)
}

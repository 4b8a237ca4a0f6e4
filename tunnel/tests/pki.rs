//! Certificates end to end, with real rustls handshakes on loopback: a CA created in a
//! directory, enrollment with a bootstrap token (the key stays with the agent; only a CSR
//! travels), every bad enrollment refused with its reason while the endpoint keeps serving,
//! renewal with session rotation while a stream is transferring (every byte arrives), and a CA
//! rotation with an overlap in which both CAs are trusted.
mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use common::{greeting_service, read_all, redirected, routes, wait_for};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tokio_util::sync::CancellationToken;
use tunnel::{
    pki::{
        ca::{CaDir, node_csr},
        enroll::{self, Enroller},
        material::ServerPki,
        token::TokenStore,
    },
    server::{Server, ServerConfig},
    tls::{self, Live},
};
use tunnel_agent::{
    enroll::{self as agent_enroll, AgentFiles},
    pki::{AgentPki, Enrollment, renew_forever},
    session::{self as agent, AgentConfig, AgentMetrics},
};

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tunnel-pki-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tunnel server keeping its CA in a directory, with the enrollment endpoint; its TLS
/// reloads every 100 ms when the CA files change.
struct Cluster {
    dir: PathBuf,
    server: Server,
    agents_at: SocketAddr,
    enroll_at: String,
    tokens: TokenStore,
    stop: CancellationToken,
}

async fn cluster(name: &str, lifetime: Duration) -> Cluster {
    let dir = temp(name);
    let ca = CaDir::new(&dir.join("ca"));
    assert!(ca.ensure().unwrap(), "created on first start");
    let pki = Arc::new(ServerPki::CaDir {
        ca: CaDir::new(&dir.join("ca")),
        names: vec!["tunnel.test".into(), "127.0.0.1".into()],
        lifetime: Duration::from_secs(3600),
    });
    let stop = CancellationToken::new();
    let cfg = ServerConfig::new(pki.agents_config().unwrap());
    let live = cfg.tls.clone();
    let server = Server::new(cfg, routes("edge-a 198.51.100.10\nedge-b 198.51.100.11\n"));
    let p = pki.clone();
    tokio::spawn(tls::follow_files(
        live,
        pki.watched(),
        move || p.agents_config(),
        Duration::from_millis(100),
        stop.clone(),
    ));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agents_at = l.local_addr().unwrap();
    let (s, t) = (server.clone(), stop.clone());
    tokio::spawn(async move { s.serve_agents(l, t).await });

    let enroll_live = Live::new(pki.enrollment_config().unwrap());
    let p = pki.clone();
    tokio::spawn(tls::follow_files(
        enroll_live.clone(),
        pki.watched(),
        move || p.enrollment_config(),
        Duration::from_millis(100),
        stop.clone(),
    ));
    let tokens_path = dir.join("tokens");
    let enroller = Arc::new(Enroller {
        ca,
        tokens: TokenStore::new(&tokens_path),
        lifetime,
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let enroll_at = l.local_addr().unwrap().to_string();
    tokio::spawn(enroll::serve(
        l,
        enroll_live,
        enroller,
        Default::default(),
        stop.clone(),
    ));
    Cluster {
        tokens: TokenStore::new(&tokens_path),
        dir,
        server,
        agents_at,
        enroll_at,
        stop,
    }
}

impl Cluster {
    fn ca(&self) -> CaDir {
        CaDir::new(&self.dir.join("ca"))
    }

    /// An enrolled agent's material, in its own directory, bootstrapped with the current CA.
    fn agent_pki(&self, node: &str, token: Option<String>) -> AgentPki {
        let bootstrap = self.dir.join(format!("bootstrap-{node}.crt"));
        std::fs::write(&bootstrap, self.ca().bundle().unwrap()).unwrap();
        AgentPki::Enrolled {
            files: AgentFiles {
                dir: self.dir.join(format!("agent-{node}")),
            },
            bootstrap_ca: bootstrap,
            via: Enrollment::Endpoint {
                endpoint: self.enroll_at.clone(),
                token,
                server_name: name(),
            },
        }
    }

    fn agent_config(&self, node: &str, tls: Live<rustls::ClientConfig>) -> AgentConfig {
        AgentConfig {
            node_id: node.into(),
            servers: vec![self.agents_at.to_string()],
            resolver: agent::dns_resolver(),
            resolve_interval: Duration::from_secs(30),
            server_name: ServerName::try_from("tunnel.test").unwrap(),
            tls,
            allowed_ports: [0u16].into_iter().collect(),
            dial: vec!["127.0.0.1".parse().unwrap()],
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
}

/// One redirected connection to edge-a's greeting service on `port`: sends `payload`,
/// half-closes, returns everything it got back.
async fn exchange(server: &Server, port: u16, payload: &[u8]) -> Vec<u8> {
    let (mut client, _t) =
        redirected(server, format!("198.51.100.10:{port}").parse().unwrap()).await;
    client.write_all(payload).await.unwrap();
    client.shutdown().await.unwrap();
    read_all(&mut client).await.unwrap()
}

fn name() -> ServerName<'static> {
    ServerName::try_from("tunnel.test").unwrap()
}

/// The error an enrollment request is refused with (it must be refused).
async fn refusal(
    c: &Cluster,
    tls: std::sync::Arc<rustls::ClientConfig>,
    path: &str,
    bearer: Option<&str>,
    csr: &str,
) -> String {
    agent_enroll::request(&c.enroll_at, name(), tls, path, bearer, csr)
        .await
        .expect_err("the request was refused")
        .to_string()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn an_agent_enrolls_with_a_token_and_its_session_carries_streams() {
    let c = cluster("enroll", Duration::from_secs(3600)).await;
    let token = c.tokens.create("edge-a", Duration::from_secs(600)).unwrap();
    let pki = c.agent_pki("edge-a", Some(token));
    pki.prepare("edge-a").await.unwrap();
    let AgentPki::Enrolled { files, .. } = &pki else {
        unreachable!()
    };
    for f in [files.key(), files.cert(), files.ca()] {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    // A second prepare with the certificate in place needs no token (the token is spent).
    pki.prepare("edge-a").await.unwrap();

    let port = greeting_service("127.0.0.1".parse().unwrap(), 0, "edge-a").await;
    let mut cfg = c.agent_config("edge-a", Live::new(pki.config().unwrap()));
    cfg.allowed_ports = [port].into_iter().collect();
    let stop = CancellationToken::new();
    tokio::spawn(agent::run(
        cfg,
        Arc::new(AgentMetrics::default()),
        stop.clone(),
    ));
    wait_for(
        || c.server.connected_nodes() == ["edge-a"],
        "edge-a's session",
    )
    .await;
    assert_eq!(exchange(&c.server, port, b"hi").await, b"edge-a\nhibye 2\n");
    stop.cancel();
    c.stop.cancel();
}

#[tokio::test]
async fn bad_enrollments_are_refused_with_their_reason_and_the_endpoint_keeps_serving() {
    let c = cluster("bad", Duration::from_secs(3600)).await;
    let err = |r: tunnel::Result<()>| r.unwrap_err().to_string();

    // Unknown token (right shape, never created).
    let e = err(c
        .agent_pki(
            "edge-a",
            Some(format!("{}.{}", "ab".repeat(4), "cd".repeat(16))),
        )
        .prepare("edge-a")
        .await);
    assert!(e.contains("403") && e.contains("is unknown"), "{e}");
    // A token for edge-a used by an agent claiming edge-b.
    let t = c.tokens.create("edge-a", Duration::from_secs(600)).unwrap();
    let e = err(c
        .agent_pki("edge-b", Some(t.clone()))
        .prepare("edge-b")
        .await);
    assert!(
        e.contains("is for node \"edge-a\", but the CSR asks for node \"edge-b\""),
        "{e}"
    );
    // Used: first use succeeds, the second is refused.
    c.agent_pki("edge-a", Some(t.clone()))
        .prepare("edge-a")
        .await
        .unwrap();
    let e = err(c.agent_pki("edge-x", Some(t)).prepare("edge-x").await);
    assert!(e.contains("already used"), "{e}");
    // Expired.
    let t = c.tokens.create("edge-b", Duration::ZERO).unwrap();
    let e = err(c.agent_pki("edge-b", Some(t)).prepare("edge-b").await);
    assert!(e.contains("expired"), "{e}");
    // No token and no certificate: the agent says what to do before asking anyone.
    let e = err(c.agent_pki("edge-c", None).prepare("edge-c").await);
    assert!(e.contains("tunnel token create --node edge-c"), "{e}");
    // Renewal without a client certificate, and a CSR for another node with a valid certificate.
    let anon = tls::anonymous_client_config(
        &tls::PemFiles::load_certs(&c.ca().dir.join("ca.crt")).unwrap(),
    )
    .unwrap();
    let (csr_b, _) = node_csr("edge-b").unwrap();
    let e = refusal(&c, anon.clone(), "/v1/renew", None, &csr_b).await;
    assert!(
        e.contains("401") && e.contains("current client certificate"),
        "{e}"
    );
    let a = c.agent_pki("edge-a", None);
    let e = refusal(&c, a.config().unwrap(), "/v1/renew", None, &csr_b).await;
    assert!(
        e.contains("asks for node \"edge-b\"") && e.contains("belongs to node \"edge-a\""),
        "{e}"
    );
    let e = refusal(&c, anon, "/v1/enroll", Some("x.y"), "not a CSR").await;
    assert!(e.contains("400") && e.contains("malformed CSR"), "{e}");
    // After all that, a good enrollment still works.
    let t = c.tokens.create("edge-b", Duration::from_secs(600)).unwrap();
    c.agent_pki("edge-b", Some(t))
        .prepare("edge-b")
        .await
        .unwrap();
    c.stop.cancel();
}

#[tokio::test]
async fn renewal_moves_sessions_onto_the_new_certificate_without_dropping_a_stream() {
    // Certificates live 6 s: renewal at 4 s, during the transfer below.
    let c = cluster("rotate", Duration::from_secs(6)).await;
    let t = c.tokens.create("edge-a", Duration::from_secs(600)).unwrap();
    let pki = Arc::new(c.agent_pki("edge-a", Some(t)));
    pki.prepare("edge-a").await.unwrap();
    let AgentPki::Enrolled { files, .. } = &*pki else {
        unreachable!()
    };
    let first_cert = std::fs::read_to_string(files.cert()).unwrap();
    let port = greeting_service("127.0.0.1".parse().unwrap(), 0, "edge-a").await;
    let live = Live::new(pki.config().unwrap());
    let mut cfg = c.agent_config("edge-a", live.clone());
    cfg.allowed_ports = [port].into_iter().collect();
    let stop = CancellationToken::new();
    let stats = Arc::new(AgentMetrics::default());
    tokio::spawn(agent::run(cfg, stats.clone(), stop.clone()));
    tokio::spawn(renew_forever(
        pki.clone(),
        "edge-a".into(),
        live,
        stop.clone(),
    ));
    wait_for(
        || c.server.connected_nodes() == ["edge-a"],
        "edge-a's session",
    )
    .await;
    let accepted = || c.server.stats().sessions_accepted.get();
    assert_eq!(accepted(), 1);

    // A stream sending a numbered line every 20 ms for 7 s: across the renewal.
    let (mut client, _t) =
        redirected(&c.server, format!("198.51.100.10:{port}").parse().unwrap()).await;
    let mut sent = Vec::new();
    let (mut rd, mut wr) = client.split();
    let reader = async {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.map(|_| got)
    };
    let writer = async {
        for i in 0..350u32 {
            let line = format!("line {i}\n");
            wr.write_all(line.as_bytes()).await.unwrap();
            sent.extend_from_slice(line.as_bytes());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The session carrying this stream was told to drain (GOAWAY) while it was open.
        let drained = stats.sessions_drained.get();
        wr.shutdown().await.unwrap();
        drained
    };
    let (got, drained_during_stream) = tokio::join!(reader, writer);
    assert!(
        drained_during_stream >= 1,
        "no session drained during the stream"
    );
    let got = got.expect("the stream ended cleanly, not reset");
    let mut want = b"edge-a\n".to_vec();
    want.extend_from_slice(&sent);
    want.extend_from_slice(format!("bye {}\n", sent.len()).as_bytes());
    assert_eq!(got.len(), want.len());
    assert!(got == want, "every byte arrived, in order");

    // Renewed (new certificate on disk), a second session opened, and new streams work.
    assert_ne!(std::fs::read_to_string(files.cert()).unwrap(), first_cert);
    assert!(accepted() >= 2, "sessions accepted: {}", accepted());
    assert!(stats.sessions_established.get() >= 2);
    assert_eq!(exchange(&c.server, port, b"x").await, b"edge-a\nxbye 1\n");
    stop.cancel();
    c.stop.cancel();
}

#[tokio::test]
async fn ca_rotation_trusts_both_cas_during_the_overlap_and_only_the_new_one_after() {
    let c = cluster("ca-rotation", Duration::from_secs(3600)).await;
    let enroll = |node: &'static str| {
        let t = c.tokens.create(node, Duration::from_secs(600)).unwrap();
        c.agent_pki(node, Some(t))
    };
    let connect = |pki: &AgentPki, node: &str| {
        let cfg = c.agent_config(node, Live::new(pki.config().unwrap()));
        let stop = CancellationToken::new();
        tokio::spawn(agent::run(
            cfg,
            Arc::new(AgentMetrics::default()),
            stop.clone(),
        ));
        stop
    };
    let old = enroll("edge-a");
    old.prepare("edge-a").await.unwrap();

    c.ca().rotate().unwrap();
    // Servers reload: both CAs trusted, the server certificate still from the old CA.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let a = connect(&old, "edge-a");
    wait_for(
        || c.server.connected_nodes().contains(&"edge-a".to_string()),
        "old-CA agent during the overlap",
    )
    .await;
    let new = enroll("edge-b");
    new.prepare("edge-b").await.unwrap();
    let AgentPki::Enrolled { files, .. } = &new else {
        unreachable!()
    };
    assert_eq!(
        std::fs::read_to_string(files.ca())
            .unwrap()
            .matches("BEGIN CERTIFICATE")
            .count(),
        2,
        "the bundle carries both CAs"
    );
    let b = connect(&new, "edge-b");
    wait_for(
        || c.server.connected_nodes() == ["edge-a", "edge-b"],
        "new-CA agent during the overlap",
    )
    .await;
    a.cancel();
    b.cancel();

    c.ca().finish_rotation().unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    wait_for(|| c.server.connected_nodes().is_empty(), "sessions closed").await;
    let rejected = c.server.stats().sessions_rejected.get();
    // The new-CA agent reconnects (its bundle holds the new CA, which now signs the server).
    let b = connect(&new, "edge-b");
    wait_for(
        || c.server.connected_nodes() == ["edge-b"],
        "new-CA agent after the rotation",
    )
    .await;
    // An agent still on an old-CA certificate is refused.
    let a = connect(&old, "edge-a");
    wait_for(
        || c.server.stats().sessions_rejected.get() > rejected,
        "old-CA agent refused",
    )
    .await;
    assert!(!c.server.connected_nodes().contains(&"edge-a".to_string()));
    a.cancel();
    b.cancel();
    c.stop.cancel();
}

/// A server that issues its own certificate from the CA it keeps reissues it at a third of its
/// lifetime: agents still connect after the first certificate has expired.
#[tokio::test]
async fn the_servers_own_certificate_is_reissued_before_it_expires() {
    let dir = temp("reissue");
    let ca = CaDir::new(&dir);
    ca.ensure().unwrap();
    let pki = Arc::new(ServerPki::CaDir {
        ca: CaDir::new(&dir),
        names: vec!["tunnel.test".into()],
        lifetime: Duration::from_secs(3),
    });
    let stop = CancellationToken::new();
    let cfg = ServerConfig::new(pki.agents_config().unwrap());
    let live = cfg.tls.clone();
    let server = Server::new(cfg, routes("edge-a 198.51.100.10\n"));
    let p = pki.clone();
    tokio::spawn(tls::rebuild_every(
        live,
        move || p.agents_config(),
        pki.reissue_period().unwrap(),
        stop.clone(),
    ));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let (s, t) = (server.clone(), stop.clone());
    tokio::spawn(async move { s.serve_agents(l, t).await });
    // An agent certificate from the same CA, valid long after the server's first one.
    let (csr, key) = node_csr("edge-a").unwrap();
    let cert = ca
        .current()
        .unwrap()
        .sign_node_csr(&csr, "edge-a", Duration::from_secs(3600))
        .unwrap();
    let m = tls::PemFiles::from_pem(&ca.bundle().unwrap(), &cert, &key, "test").unwrap();
    // Past the first server certificate's expiry (3 s after issue).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let agent_tls = tls::agent_config(&m.ca, m.chain, m.key).unwrap();
    let tcp = tokio::net::TcpStream::connect(at).await.unwrap();
    let handshake = tokio_rustls::TlsConnector::from(agent_tls)
        .connect(name(), tcp)
        .await;
    assert!(
        handshake.is_ok(),
        "server certificate not reissued: {:?}",
        handshake.err()
    );
    stop.cancel();
    std::fs::remove_dir_all(&dir).unwrap();
}

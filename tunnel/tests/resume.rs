//! Streams outlive their session: the agent's link to the server is cut (held silent until both
//! keepalives declare the session dead, or reset outright), and a stream in full flow carries
//! on over the agent's next session with every byte once, in order; one whose resume window
//! passes is reset at both ends; one whose agent restarted is refused and reset at once; a
//! half-close and a reset made during the outage reach the service after it.
//! Real TLS, real HTTP/2, real TCP on loopback; the cut is a userspace relay between the agent
//! and the server.
mod common;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tunnel_proto::{keepalive::Keepalive, resume::ResumeConfig};

/// How the link behaves now.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Up,
    /// Nothing passes (bytes wait in the relay), as on a link whose packets are dropped.
    Silent,
}

/// A TCP relay between agents and the server that can go silent, or reset every connection
/// through it.
struct Link {
    at: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Bumped to reset every connection through the link.
    cut: watch::Sender<u64>,
}

impl Link {
    async fn to(server: SocketAddr) -> Link {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        let (mode, _) = watch::channel(Mode::Up);
        let (cut, _) = watch::channel(0u64);
        let (m, c) = (mode.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((a, _)) = l.accept().await else { return };
                let (m, c) = (m.subscribe(), c.subscribe());
                tokio::spawn(async move {
                    let Ok(b) = TcpStream::connect(server).await else {
                        return;
                    };
                    pipe(a, b, m, c).await
                });
            }
        });
        Link { at, mode, cut }
    }

    fn set(&self, m: Mode) {
        self.mode.send_replace(m);
    }

    fn reset_all(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

async fn pipe(
    a: TcpStream,
    b: TcpStream,
    mode: watch::Receiver<Mode>,
    mut cut: watch::Receiver<u64>,
) {
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let one = |mut r: tokio::net::tcp::OwnedReadHalf,
               mut w: tokio::net::tcp::OwnedWriteHalf,
               mut mode: watch::Receiver<Mode>| async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if mode.wait_for(|m| *m == Mode::Up).await.is_err() {
                return;
            }
            if w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let (x, y) = (one(ar, bw, mode.clone()), one(br, aw, mode));
    cut.mark_unchanged();
    tokio::select! {
        _ = async { tokio::join!(x, y) } => {}
        // Dropping both halves of both sockets with SO_LINGER 0 would be a reset; a plain
        // drop is a FIN, which an h2 peer sees as its session closing just the same.
        _ = cut.changed() => {}
    }
}

fn fast_keepalive() -> Keepalive {
    Keepalive {
        interval: Duration::from_millis(300),
        timeout: Duration::from_millis(300),
    }
}

fn resume(window: Duration) -> ResumeConfig {
    ResumeConfig {
        window,
        ..ResumeConfig::default()
    }
}

const NODES: &str = "edge-a 192.0.2.10\nedge-b 192.0.2.11\n";

struct Setup {
    ca: Ca,
    srv: RunningServer,
    link: Link,
    agent: RunningAgent,
    port: u16,
}

/// A server, edge-a's agent behind a [`Link`] (both with `window` and fast keepalives), and a
/// greeting service edge-a serves.
async fn setup(window: Duration) -> Setup {
    let ca = Ca::new("resume-ca");
    let srv = start_server_with(&ca, routes(NODES), |c| {
        c.keepalive = fast_keepalive();
        c.resume = resume(window);
    })
    .await;
    let link = Link::to(srv.agent_addr).await;
    let port = greeting_service("127.0.0.1".parse().unwrap(), 0, "edge-a").await;
    let agent = start_edge_a(&ca, &srv, &link, port, window).await;
    Setup {
        ca,
        srv,
        link,
        agent,
        port,
    }
}

async fn start_edge_a(
    ca: &Ca,
    srv: &RunningServer,
    link: &Link,
    port: u16,
    window: Duration,
) -> RunningAgent {
    let mut cfg = agent_config(
        ca,
        ca.agent("edge-a"),
        "edge-a",
        &[link.at],
        "127.0.0.1".parse().unwrap(),
        &[port],
    );
    cfg.keepalive = fast_keepalive();
    cfg.resume = resume(window);
    let before = srv.server.stats().sessions_accepted.get();
    let a = start_agent(cfg);
    wait_for(
        || srv.server.stats().sessions_accepted.get() > before,
        "edge-a's session",
    )
    .await;
    a
}

/// The byte at offset `i` of the test pattern (not periodic at any small length).
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// Sends `total` pattern bytes through the greeting service and checks every echoed byte as it
/// arrives; `progress` counts the bytes checked. Returns the service's closing line.
async fn echo_pattern(
    client: TcpStream,
    total: u64,
    progress: Arc<AtomicU64>,
) -> std::io::Result<String> {
    let (mut rd, mut wr) = client.into_split();
    let writer = tokio::spawn(async move {
        let mut off = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        while off < total {
            let n = (total - off).min(buf.len() as u64) as usize;
            for (k, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(off + k as u64);
            }
            wr.write_all(&buf[..n]).await?;
            off += n as u64;
        }
        // Half-close: the service answers "bye <n>" only after it saw EOF.
        wr.shutdown().await?;
        std::io::Result::Ok(wr)
    });
    let mut greeting = [0u8; 7];
    rd.read_exact(&mut greeting).await?;
    assert_eq!(&greeting, b"edge-a\n");
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    while off < total {
        let want = (total - off).min(buf.len() as u64) as usize;
        let n = rd.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(std::io::Error::other(format!("EOF after {off} of {total}")));
        }
        for (k, b) in buf[..n].iter().enumerate() {
            let at = off + k as u64;
            if *b != pattern(at) {
                return Err(std::io::Error::other(format!("byte {at} differs")));
            }
        }
        off += n as u64;
        progress.store(off, Ordering::Relaxed);
    }
    let mut rest = Vec::new();
    rd.read_to_end(&mut rest).await?;
    let _wr = writer.await.unwrap()?;
    Ok(String::from_utf8_lossy(&rest).into_owned())
}

fn orig(port: u16) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 10], port))
}

/// Cuts the link once the transfer is a quarter through (and again at each of `again`, in
/// eighths), in `how`, and restores it after `hold`.
async fn transfer_across(s: &Setup, cut: impl Fn(&Link), hold: Duration) {
    transfer_cut_at(s, cut, hold, &[2]).await
}

async fn transfer_cut_at(s: &Setup, cut: impl Fn(&Link), hold: Duration, eighths: &[u64]) {
    const TOTAL: u64 = 48 << 20;
    let (client, task) = redirected(&s.srv.server, orig(s.port)).await;
    let progress = Arc::new(AtomicU64::new(0));
    let transfer = tokio::spawn(echo_pattern(client, TOTAL, progress.clone()));
    let sessions = s.srv.server.stats().sessions_accepted.get();
    let mut at_cut = 0;
    for e in eighths {
        wait_for(
            || progress.load(Ordering::Relaxed) > TOTAL * e / 8,
            "the next cut's point",
        )
        .await;
        cut(&s.link);
        at_cut = progress.load(Ordering::Relaxed);
        tokio::time::sleep(hold).await;
        s.link.set(Mode::Up);
    }
    let bye = tokio::time::timeout(Duration::from_secs(30), transfer)
        .await
        .expect("the transfer finishes after the link is back")
        .unwrap()
        .expect("every byte echoed exactly once and in order, then a clean end");
    assert_eq!(bye, format!("bye {TOTAL}\n"));
    assert!(
        at_cut < TOTAL,
        "the cut came mid-transfer ({at_cut} of {TOTAL})"
    );
    let out = task.await.unwrap().expect("relayed, not refused");
    assert_eq!(out.end, tunnel::relay::End::Closed, "{out:?}");
    assert_eq!(out.tcp_to_stream, TOTAL);
    assert!(
        s.srv.server.stats().sessions_accepted.get() > sessions,
        "the agent came back on a new session"
    );
    let cuts = eighths.len() as u64;
    assert!(s.srv.server.stats().resume.resumed.get() >= cuts);
    assert!(s.agent.stats.resume.resumed.get() >= cuts);
    assert_eq!(s.srv.server.stats().streams_reset.get(), 0);
    assert_eq!(s.srv.server.stats().resume.parked.get(), 0);
}

#[tokio::test]
async fn a_stream_in_full_flow_survives_a_silent_link_that_kills_its_session() {
    let s = setup(Duration::from_secs(30)).await;
    let dead_before = s.srv.server.stats().sessions_dead.get();
    // 2 s of silence: both keepalives (0.6 s) declare the session dead.
    transfer_across(&s, |l| l.set(Mode::Silent), Duration::from_secs(2)).await;
    assert!(
        s.srv.server.stats().sessions_dead.get() > dead_before,
        "the server's keepalive found the session dead"
    );
}

#[tokio::test]
async fn a_resumed_stream_survives_the_next_outage_too() {
    let s = setup(Duration::from_secs(30)).await;
    transfer_cut_at(&s, |l| l.set(Mode::Silent), Duration::from_secs(2), &[2, 5]).await;
}

#[tokio::test]
async fn a_stream_survives_its_session_being_closed_under_it() {
    let s = setup(Duration::from_secs(30)).await;
    transfer_across(&s, Link::reset_all, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_stream_whose_window_passes_is_reset_at_both_ends() {
    let s = setup(Duration::from_millis(1500)).await;
    let (mut client, task) = redirected(&s.srv.server, orig(s.port)).await;
    let mut greeting = [0u8; 7];
    client.read_exact(&mut greeting).await.unwrap();
    client.write_all(b"before\n").await.unwrap();
    let mut echo = [0u8; 7];
    client.read_exact(&mut echo).await.unwrap();
    s.link.set(Mode::Silent);
    // Both ends park the stream and give up 1.5 s after they saw the session dead.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest))
        .await
        .expect("the client learns of the end");
    assert!(r.is_err(), "a reset, not a clean EOF: {r:?} {rest:?}");
    assert_eq!(task.await.unwrap().unwrap().end, tunnel::relay::End::Reset);
    let m = &s.srv.server.stats().resume;
    wait_for(
        || failed(&s.agent.stats.resume, "window_expired") == 1,
        "the agent's window",
    )
    .await;
    assert_eq!(failed(m, "window_expired"), 1);
    assert_eq!(m.parked.get(), 0);
    assert_eq!(s.agent.stats.resume.parked.get(), 0);
    assert_eq!(m.resumed.get(), 0);
}

#[tokio::test]
async fn a_restarted_agent_refuses_the_resume_and_the_client_is_reset_at_once() {
    let s = setup(Duration::from_secs(30)).await;
    let (mut client, task) = redirected(&s.srv.server, orig(s.port)).await;
    let mut greeting = [0u8; 7];
    client.read_exact(&mut greeting).await.unwrap();
    // edge-b (another node) is up all along: its session is never asked.
    let b = node_agent(&s.ca, &s.srv, "edge-b", "127.0.0.1", &[s.port]).await;
    // The old agent process is gone (its parked streams with it), a new one comes up.
    s.agent.stop.cancel();
    s.agent.task.abort();
    s.link.reset_all();
    let t0 = std::time::Instant::now();
    let new = start_edge_a(&s.ca, &s.srv, &s.link, s.port, Duration::from_secs(30)).await;
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest))
        .await
        .expect("the client learns of the end");
    assert!(r.is_err(), "a reset, not a clean EOF: {r:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "long before the window"
    );
    assert_eq!(task.await.unwrap().unwrap().end, tunnel::relay::End::Reset);
    assert_eq!(failed(&s.srv.server.stats().resume, "stream_gone"), 1);
    assert_eq!(
        new.stats
            .refused
            .get_or_create(&reason("stream_gone"))
            .get(),
        1
    );
    assert_eq!(
        b.stats.refused.get_or_create(&reason("stream_gone")).get(),
        0
    );
    assert_eq!(b.stats.streams_total.get(), 0, "edge-b was never asked");
}

fn reason(r: &'static str) -> tunnel_proto::keepalive::Reason {
    tunnel_proto::keepalive::Reason { reason: r }
}

fn failed(m: &tunnel_proto::resume::ResumeMetrics, reason: &'static str) -> u64 {
    m.failed.get_or_create(&self::reason(reason)).get()
}

/// A service that reads each connection to its end and reports how it ended: `Ok(bytes)` at
/// EOF (after answering `got <bytes>` and closing), `Err(kind)` on an error.
async fn observer() -> (
    u16,
    tokio::sync::mpsc::UnboundedReceiver<Result<usize, std::io::ErrorKind>>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let r = s.read_to_end(&mut buf).await.map_err(|e| e.kind());
                if r.is_ok() {
                    let _ = s.write_all(format!("got {}\n", buf.len()).as_bytes()).await;
                }
                let _ = tx.send(r.map(|_| buf.len()));
            });
        }
    });
    (port, rx)
}

#[tokio::test]
async fn a_half_close_and_a_reset_made_during_the_outage_arrive_after_it() {
    let ca = Ca::new("resume-ca");
    let window = Duration::from_secs(30);
    let srv = start_server_with(&ca, routes(NODES), |c| {
        c.keepalive = fast_keepalive();
        c.resume = resume(window);
    })
    .await;
    let link = Link::to(srv.agent_addr).await;
    let (port, mut ended) = observer().await;
    let agent = start_edge_a(&ca, &srv, &link, port, window).await;
    let (mut closing, closing_task) = redirected(&srv.server, orig(port)).await;
    let (resetting, resetting_task) = redirected(&srv.server, orig(port)).await;
    closing.write_all(b"hello").await.unwrap();
    let mut resetting = resetting;
    resetting.write_all(b"hi").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    link.set(Mode::Silent);
    wait_for(
        || agent.stats.resume.parked.get() == 2 && srv.server.stats().resume.parked.get() == 2,
        "both ends to park both streams",
    )
    .await;
    // During the outage: one client half-closes, the other resets.
    closing.shutdown().await.unwrap();
    tunnel_proto::relay::abort(&resetting);
    drop(resetting);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        ended.try_recv().is_err(),
        "nothing reaches the service during the outage"
    );
    link.set(Mode::Up);
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(
            tokio::time::timeout(Duration::from_secs(10), ended.recv())
                .await
                .expect("the service learns of both ends")
                .unwrap(),
        );
    }
    got.sort_by_key(|r| r.is_err());
    assert_eq!(got, vec![Ok(5), Err(std::io::ErrorKind::ConnectionReset)]);
    // The half-closed stream still carried the service's answer back, then a clean end.
    let answer = read_all(&mut closing).await.expect("a clean end");
    assert_eq!(answer, b"got 5\n");
    assert_eq!(
        closing_task.await.unwrap().unwrap().end,
        tunnel::relay::End::Closed
    );
    assert_eq!(
        resetting_task.await.unwrap().unwrap().end,
        tunnel::relay::End::Reset
    );
    assert_eq!(srv.server.stats().resume.resumed.get(), 2);
}

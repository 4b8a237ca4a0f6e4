//! The enrollment endpoint faces the internet before any authentication. Over real TLS on
//! loopback: a connection that goes quiet after the handshake, a request head sent a byte at a
//! time and a body sent a byte at a time are all closed at their deadlines (the body with a 408
//! that says why); a body or a head over its size is answered 413 or 431 and the client reads
//! the answer before the close; token guessing from one source is refused with 429 after the
//! limit while another source still enrolls; and no refused request rewrites the token store.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket},
};
use tokio_util::sync::CancellationToken;
use tunnel::{
    pki::{
        ca::{CaDir, node_csr},
        enroll::{self, Enroller, Serving},
        enroll_limits::EnrollLimits,
        material::ServerPki,
        token::TokenStore,
    },
    tls::{self, Live},
};

struct Endpoint {
    at: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    tokens: TokenStore,
    tokens_path: PathBuf,
    refused: prometheus_client::metrics::family::Family<
        enroll::Reason,
        prometheus_client::metrics::counter::Counter,
    >,
    stop: CancellationToken,
}

const SECOND: Duration = Duration::from_secs(1);

async fn endpoint(name: &str) -> Endpoint {
    let dir = std::env::temp_dir().join(format!("enroll-limits-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca = CaDir::new(&dir.join("ca"));
    ca.ensure().unwrap();
    let pki = ServerPki::CaDir {
        ca: CaDir::new(&dir.join("ca")),
        names: vec!["tunnel.test".into()],
        lifetime: Duration::from_secs(3600),
    };
    let tokens_path = dir.join("tokens");
    let enroller = Arc::new(Enroller {
        ca,
        tokens: TokenStore::new(&tokens_path),
        lifetime: Duration::from_secs(3600),
    });
    let serving = Serving {
        // Short deadlines so the test is quick; the defaults are 10 s each.
        limits: EnrollLimits {
            handshake: SECOND,
            head: SECOND,
            body: SECOND,
            failures_per_source: 5,
            ..Default::default()
        },
        ..Default::default()
    };
    let refused = serving.refused.clone();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(enroll::serve(
        l,
        Live::new(pki.enrollment_config().unwrap()),
        enroller,
        serving,
        stop.clone(),
    ));
    let tls = tls::anonymous_client_config(
        &tls::PemFiles::load_certs(&dir.join("ca").join("ca.crt")).unwrap(),
    )
    .unwrap();
    Endpoint {
        at,
        tls,
        tokens: TokenStore::new(&tokens_path),
        tokens_path,
        refused,
        stop,
    }
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

impl Endpoint {
    /// A TLS connection from `from` (any address of 127.0.0.0/8).
    async fn connect_from(&self, from: IpAddr) -> Tls {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::new(from, 0)).unwrap();
        let tcp = s.connect(self.at).await.unwrap();
        tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(ServerName::try_from("tunnel.test").unwrap(), tcp)
            .await
            .expect("TLS handshake")
    }

    async fn connect(&self) -> Tls {
        self.connect_from([127, 0, 0, 1].into()).await
    }

    fn count(&self, reason: &'static str) -> u64 {
        self.refused.get_or_create(&enroll::Reason { reason }).get()
    }
}

/// Everything until the server closes; how long that took.
async fn read_to_close(c: &mut Tls, within: Duration) -> (String, Duration) {
    let t = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, c.read_to_end(&mut out))
        .await
        .expect("the server closed the connection");
    (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
}

fn post(path: &str, bearer: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: tunnel.test\r\nAuthorization: Bearer {bearer}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn slow_clients_are_cut_at_each_deadline() {
    let e = endpoint("slow").await;
    // Quiet after the handshake.
    let mut idle = e.connect().await;
    let (got, took) = read_to_close(&mut idle, 5 * SECOND).await;
    assert!(got.is_empty(), "{got}");
    assert!(took < 3 * SECOND, "held {took:?}");
    // A head a byte every 200 ms: never done within the deadline.
    let head = e.connect().await;
    let (mut rx, mut tx) = tokio::io::split(head);
    let t = Instant::now();
    let writer = tokio::spawn(async move {
        for b in b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n" {
            if tx.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut got = Vec::new();
    let _ = tokio::time::timeout(10 * SECOND, rx.read_to_end(&mut got)).await;
    writer.abort();
    assert!(
        t.elapsed() < 3 * SECOND,
        "the slow head was held {:?}",
        t.elapsed()
    );
    // A body a byte every 200 ms: 408, and the reason reaches the client.
    let mut body = e.connect().await;
    body.write_all(b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        .await
        .unwrap();
    let writer = async {
        for _ in 0..100 {
            if body.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let _ = tokio::time::timeout(2 * SECOND, writer).await;
    let (got, _) = read_to_close(&mut body, 5 * SECOND).await;
    assert!(
        got.starts_with("HTTP/1.1 408") && got.contains("request body not complete within 1s"),
        "{got}"
    );
    assert!(e.count("head_timeout") >= 2, "idle and slow head counted");
    assert_eq!(e.count("body_timeout"), 1);
    e.stop.cancel();
}

#[tokio::test]
async fn oversized_requests_are_answered_before_the_close() {
    let e = endpoint("size").await;
    // A body of 1 MiB, all sent: the 413 still arrives (a plain close would reset it away).
    let mut c = e.connect().await;
    let big = "x".repeat(1 << 20);
    let _ = c.write_all(post("/v1/enroll", "t", &big).as_bytes()).await;
    let (got, _) = read_to_close(&mut c, 5 * SECOND).await;
    assert!(
        got.starts_with("HTTP/1.1 413") && got.contains("request body over 16384 bytes"),
        "{got}"
    );
    // A head of 64 KiB: hyper's 431.
    let mut c = e.connect().await;
    let header = format!(
        "POST /v1/enroll HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "y".repeat(64 * 1024)
    );
    let _ = c.write_all(header.as_bytes()).await;
    let (got, _) = read_to_close(&mut c, 5 * SECOND).await;
    assert!(got.starts_with("HTTP/1.1 431"), "{got:.200}");
    assert_eq!(e.count("body_too_large"), 1);
    assert_eq!(e.count("head_too_large"), 1);
    e.stop.cancel();
}

#[tokio::test]
async fn token_guessing_is_limited_per_source_and_refusals_leave_the_token_store_alone() {
    let e = endpoint("guess").await;
    let good = e.tokens.create("edge-a", Duration::from_secs(600)).unwrap();
    let stored = std::fs::read(&e.tokens_path).unwrap();
    let (csr, _) = node_csr("edge-a").unwrap();
    let ask = |from: [u8; 4], token: String| {
        let (e, csr) = (&e, csr.clone());
        async move {
            let mut c = e.connect_from(from.into()).await;
            c.write_all(post("/v1/enroll", &token, &csr).as_bytes())
                .await
                .unwrap();
            read_to_close(&mut c, 5 * SECOND).await.0
        }
    };
    // Five wrong guesses: each refused for what it is.
    for i in 0..5 {
        let guess = format!("{:08x}.{}", i, "0".repeat(32));
        let got = ask([127, 0, 0, 2], guess).await;
        assert!(
            got.starts_with("HTTP/1.1 403") && got.contains("is unknown"),
            "{got}"
        );
    }
    // The sixth, even with the right token: 429 with when to try again.
    let got = ask([127, 0, 0, 2], good.clone()).await;
    assert!(
        got.starts_with("HTTP/1.1 429")
            && got.contains("too many failed enrollments from 127.0.0.2")
            && got.contains("try again in"),
        "{got}"
    );
    assert_eq!(
        std::fs::read(&e.tokens_path).unwrap(),
        stored,
        "refused requests left the token store as it was"
    );
    // Another source is not held back by the first one's guesses.
    let got = ask([127, 0, 0, 3], good.clone()).await;
    assert!(
        got.starts_with("HTTP/1.1 200") && got.contains("certificate"),
        "{got:.300}"
    );
    let got = ask([127, 0, 0, 3], good).await;
    assert!(
        got.starts_with("HTTP/1.1 403") && got.contains("already used"),
        "{got}"
    );
    assert_eq!(e.count("forbidden"), 6);
    assert_eq!(e.count("rate_limited"), 1);
    e.stop.cancel();
}

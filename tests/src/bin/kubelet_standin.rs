//! A stand-in kubelet for the demo: HTTPS with its own serving certificate, and client
//! certificates required (as a kubelet requires the API server's), so a connection that works
//! through the tunnel proves the TLS passed end to end, untouched.
//!
//! - `GET /healthz` -> `ok <node>`
//! - `GET /containerLogs/<ns>/<pod>/<container>` -> a chunked stream of log lines, 200 ms apart
//!   (like `kubectl logs -f`)
//! - `POST /exec/<ns>/<pod>/<container>` with `Upgrade: edge-demo-exec` -> `101`, then an
//!   exec-like bidirectional stream: it reads the client's input until the client half-closes
//!   (TLS close_notify, then TCP FIN), and only then answers with the whole output, so the
//!   answer arrives only if half-close travels the path in both directions.
//!
//! `kubelet-standin --node <name> --listen <addr> --ca <client CA> --cert <pem> --key <pem>`
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use clap::Parser;
use rustls::{ServerConfig, ServerConnection, StreamOwned, server::WebPkiClientVerifier};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    node: String,
    #[arg(long)]
    listen: SocketAddr,
    /// CA that client certificates must chain to.
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// Log lines per `/containerLogs` stream.
    #[arg(long, default_value_t = 5)]
    log_lines: u32,
}

type Tls = StreamOwned<ServerConnection, TcpStream>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pem = tunnel::tls::PemFiles::load(&args.ca, &args.cert, &args.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in pem.ca {
        roots.add(c)?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let config = Arc::new(
        ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(pem.chain, pem.key)?,
    );
    let listener = TcpListener::bind(args.listen)?;
    eprintln!("kubelet stand-in for {} on {}", args.node, args.listen);
    let args = Arc::new(args);
    for conn in listener.incoming() {
        let Ok(tcp) = conn else { continue };
        let (config, args) = (config.clone(), args.clone());
        std::thread::spawn(move || {
            let peer = tcp.peer_addr().ok();
            if let Err(e) = serve(tcp, config, &args) {
                eprintln!("{peer:?}: {e}");
            }
        });
    }
    Ok(())
}

fn serve(tcp: TcpStream, config: Arc<ServerConfig>, args: &Args) -> anyhow::Result<()> {
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut tls = BufReader::new(StreamOwned::new(ServerConnection::new(config)?, tcp));
    let mut request = String::new();
    tls.read_line(&mut request)?;
    let mut upgrade = false;
    loop {
        let mut h = String::new();
        if tls.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        let h = h.to_ascii_lowercase();
        upgrade |= h.starts_with("upgrade:") && h.contains("edge-demo-exec");
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let node = &args.node;
    let mut tls = tls.into_inner();
    if path == "/healthz" {
        respond(&mut tls, "200 OK", &format!("ok {node}\n"))?;
    } else if path.starts_with("/containerLogs/") {
        write!(
            tls,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )?;
        for i in 1..=args.log_lines {
            let line = format!("{node} {path}: log line {i}\n");
            write!(tls, "{:x}\r\n{line}\r\n", line.len())?;
            tls.flush()?;
            std::thread::sleep(Duration::from_millis(200));
        }
        write!(tls, "0\r\n\r\n")?;
    } else if path.starts_with("/exec/") && upgrade {
        write!(
            tls,
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: edge-demo-exec\r\n\r\n"
        )?;
        tls.flush()?;
        // Everything up to the client's half-close is the command's input. (The BufReader
        // dropped above held nothing past the headers: the client sends only after the 101.)
        let mut input = Vec::new();
        tls.read_to_end(&mut input)?;
        let text = String::from_utf8_lossy(&input);
        writeln!(
            tls,
            "{}{node}: read {} bytes until the client's half-close; exit 0",
            text.to_uppercase(),
            input.len()
        )?;
    } else {
        respond(&mut tls, "404 Not Found", &format!("{node}: no {path}\n"))?;
    }
    tls.conn.send_close_notify();
    tls.flush()?;
    Ok(())
}

fn respond(tls: &mut Tls, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        tls,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

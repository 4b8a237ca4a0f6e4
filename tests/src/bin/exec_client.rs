//! The client side of the kubelet stand-in's exec-like stream (as `kubectl exec` with stdin
//! closed after the input): upgrade, send the input, half-close (TLS close_notify, then TCP
//! FIN), then print everything the other end sends until it closes. The output can only arrive
//! if the half-close reached the far end and the far end could still answer.
//!
//! `exec-client --host <name-or-ip> --port P --path /exec/... --ca --cert --key --input TEXT`
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpStream, ToSocketAddrs},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use clap::Parser;
use rustls::{ClientConfig, ClientConnection, StreamOwned, pki_types::ServerName};

#[derive(Parser)]
struct Args {
    /// Name (resolved through the system resolver, so /etc/hosts) or address.
    #[arg(long)]
    host: String,
    #[arg(long, default_value_t = 10250)]
    port: u16,
    #[arg(long, default_value = "/exec/default/web/app")]
    path: String,
    /// CA of the kubelet serving certificates.
    #[arg(long)]
    ca: PathBuf,
    /// Client certificate and key (the API server's kubelet client identity).
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long)]
    input: String,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let pem = tunnel::tls::PemFiles::load(&a.ca, &a.cert, &a.key)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in pem.ca {
        roots.add(c)?;
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(pem.chain, pem.key)?;
    let addr = (a.host.as_str(), a.port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", a.host))?
        .next()
        .with_context(|| format!("{} has no address", a.host))?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    let name = ServerName::try_from(a.host.clone())?;
    let mut tls = StreamOwned::new(ClientConnection::new(Arc::new(config), name)?, tcp);
    write!(
        tls,
        "POST {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: edge-demo-exec\r\n\r\n",
        a.path, a.host
    )?;
    tls.flush()?;
    let mut reader = BufReader::new(tls);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    if !status.contains(" 101 ") {
        bail!("no upgrade: {}", status.trim_end());
    }
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
    }
    let mut tls = reader.into_inner();
    tls.write_all(a.input.as_bytes())?;
    tls.conn.send_close_notify();
    tls.flush()?;
    tls.sock.shutdown(Shutdown::Write)?;
    let mut out = String::new();
    tls.read_to_string(&mut out)
        .context("reading the output after the half-close")?;
    print!("{out}");
    Ok(())
}

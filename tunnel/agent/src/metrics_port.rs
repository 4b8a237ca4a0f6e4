//! Where the agent serves `/metrics`, `/healthz` and `/readyz`, when two agents share a node.
//!
//! The agent runs on the host's network. During a rolling upgrade with a surge pod
//! (`maxSurge: 1`, `maxUnavailable: 0`) the new agent starts beside the old one, and a fixed
//! port would stop it at once. So the agent takes the first free port of a short span, and
//! writes the address it took to a file in its own pod's volume, where `tunnel-agent probe`
//! finds it: each pod's probes reach that pod's agent, not whichever holds the first port.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use tunnel_proto::{Error, Result};

/// Binds the first free port of `addr.port() .. addr.port() + span` (port 0: any port).
pub fn bind(addr: SocketAddr, span: u16) -> Result<tokio::net::TcpListener> {
    let last = if addr.port() == 0 {
        0
    } else {
        addr.port().saturating_add(span.max(1) - 1)
    };
    let mut busy = Vec::new();
    for port in addr.port()..=last {
        let at = SocketAddr::new(addr.ip(), port);
        match tunnel_proto::listen(at) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => busy.push(port),
            Err(e) => return Err(Error::io(format!("cannot listen on {at} (metrics)"), e)),
        }
    }
    Err(Error::Refused(format!(
        "cannot listen on {} (metrics): ports {}-{last} are all in use (another agent on this node holds them?); widen --metrics-port-span or pick another --metrics-listen",
        addr.ip(),
        addr.port(),
    )))
    .inspect_err(|_| tracing::debug!(?busy, "metrics ports in use"))
}

/// Records where the metrics endpoint listens, replacing the file whole.
pub fn record(file: &Path, at: SocketAddr) -> Result<()> {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, format!("{at}\n"))
        .and_then(|()| std::fs::rename(&tmp, file))
        .map_err(|e| {
            Error::io(
                format!("writing the metrics address to {}", file.display()),
                e,
            )
        })
}

/// `tunnel-agent probe`: GET `path` from the agent whose address `file` records; Ok when it
/// answers 200. A listener on every address is reached on loopback.
pub fn probe(file: &Path, path: &str, timeout: Duration) -> std::result::Result<(), String> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        format!(
            "reading {}: {e} (has this pod's agent started its metrics endpoint? --metrics-addr-file)",
            file.display()
        )
    })?;
    let mut at: SocketAddr = text
        .trim()
        .parse()
        .map_err(|e| format!("{}: {text:?} is not an address: {e}", file.display()))?;
    if at.ip().is_unspecified() {
        at.set_ip(if at.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let mut s = TcpStream::connect_timeout(&at, timeout).map_err(|e| format!("{at}: {e}"))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {at}\r\n\r\n").map_err(|e| format!("{at}: {e}"))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .map_err(|e| format!("{at}: {e}"))?;
    let status = answer.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(format!(
            "{at}{path}: {status:?} {}",
            answer.lines().last().unwrap_or("")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_agent_takes_the_next_port_and_a_full_span_names_the_fix() {
        // A free pair: bind an ephemeral port, then use it and the next.
        let (first, _second) = loop {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let p = l.local_addr().unwrap().port();
            drop(l);
            if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
                break (p, p + 1);
            }
        };
        let base: SocketAddr = format!("127.0.0.1:{first}").parse().unwrap();
        let a = bind(base, 2).unwrap();
        let b = bind(base, 2).unwrap();
        assert_eq!(a.local_addr().unwrap().port(), first);
        assert_eq!(b.local_addr().unwrap().port(), first + 1);
        let e = bind(base, 2).unwrap_err().to_string();
        assert!(
            e.contains(&format!("ports {first}-{}", first + 1))
                && e.contains("--metrics-port-span"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn the_probe_reaches_the_recorded_agent_and_fails_on_anything_but_200() {
        let file = std::env::temp_dir().join(format!(
            "agent-metrics-addr-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        let e = probe(&file, "/readyz", Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("--metrics-addr-file"), "{e}");
        let l = bind("0.0.0.0:0".parse().unwrap(), 1).unwrap();
        record(&file, l.local_addr().unwrap()).unwrap();
        let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ready.clone();
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(edge_cli::http::serve(
            l,
            prometheus_client::registry::Registry::default(),
            std::sync::Arc::new(move || r.load(std::sync::atomic::Ordering::Relaxed)),
            stop.clone(),
        ));
        let f = file.clone();
        let check = move || probe(&f, "/readyz", Duration::from_secs(2));
        let e = tokio::task::spawn_blocking(check.clone()).await.unwrap();
        assert!(e.unwrap_err().contains("503"), "not ready yet");
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        tokio::task::spawn_blocking(check).await.unwrap().unwrap();
        stop.cancel();
        std::fs::remove_file(&file).unwrap();
    }
}

//! The tunnel server's part of an explanation: `GET /debug/explain?ip=&port=` on its metrics
//! listener (loopback callers only), answered with its route for the address, the node's
//! sessions and reachability, and its agent's answer to a port check.
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use super::{AMBIGUOUS_FIX, Builder, Explanation, Verdict};

/// The port check opens a stream to the agent (at most 5 s on the server's side).
const TIMEOUT: Duration = Duration::from_secs(10);

fn get(server: SocketAddr, ip: IpAddr, port: u16) -> Result<Value, String> {
    let mut s = TcpStream::connect_timeout(&server, TIMEOUT).map_err(|e| e.to_string())?;
    let _ = s.set_read_timeout(Some(TIMEOUT));
    write!(
        s,
        "GET /debug/explain?ip={ip}&port={port} HTTP/1.0\r\nHost: explain\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    let v: Value = serde_json::from_str(body)
        .map_err(|_| format!("HTTP {status}, not an explanation: {}", body.trim()))?;
    match status {
        "200" => Ok(v),
        "404" => Err(format!(
            "HTTP 404 ({}): a tunnel server older than explain, or not a tunnel server",
            v["error"].as_str().unwrap_or("")
        )),
        _ => Err(format!(
            "HTTP {status}: {}",
            v["error"].as_str().unwrap_or(body.trim())
        )),
    }
}

/// Seconds since `unix`.
fn age(unix: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    now.saturating_sub(unix)
}

pub(super) fn ask(
    mut b: Builder,
    server: SocketAddr,
    ip: IpAddr,
    port: u16,
    owners: &[String],
    ingress: SocketAddr,
) -> Explanation {
    let v = match get(server, ip, port) {
        Ok(v) => v,
        Err(e) => {
            b.step(
                "tunnel",
                false,
                format!("the tunnel server at {server} could not be asked: {e}"),
            );
            return b.end(
                Verdict::Unknown,
                None,
                None,
                format!("redirected by the kernel to {ingress}; what the tunnel server does is unknown"),
                Some("pass --server with the tunnel server's --metrics-listen address (on this host), and check that the server runs".into()),
            );
        }
    };
    let replica = v["replica"].as_str().unwrap_or("?").to_owned();
    let route = &v["route"];
    match route["kind"].as_str() {
        Some("ambiguous") => {
            let nodes: Vec<&str> = route["nodes"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            b.step(
                "tunnel",
                false,
                format!(
                    "replica {replica}: {ip} is listed by nodes {}",
                    nodes.join(", ")
                ),
            );
            return b.end(
                Verdict::Refused,
                None,
                Some("ambiguous_address"),
                format!("refused (ambiguous_address): {ip} belongs to nodes {}, and the tunnel refuses it rather than guess", nodes.join(", ")),
                Some(AMBIGUOUS_FIX.into()),
            );
        }
        Some("node") => {}
        _ => {
            b.step(
                "tunnel",
                false,
                format!("replica {replica} has no route for {ip}"),
            );
            return b.end(
                Verdict::Refused,
                None,
                Some("unknown_node"),
                format!("refused (unknown_node): the kernel redirects {ip}, but the tunnel server's node table does not list it"),
                Some("the redirector and the tunnel server must follow the same node table (--node-table): check both, and the server's log".into()),
            );
        }
    }
    let n = &v["node"];
    let node = n["node"].as_str().unwrap_or("?").to_owned();
    let differs = !owners.is_empty() && !owners.contains(&node);
    b.step(
        "tunnel",
        !differs,
        if differs {
            format!("replica {replica} routes {ip} to node {node}, but this node table names {}: the two follow different tables", owners.join(", "))
        } else {
            format!("replica {replica} routes {ip} to node {node}")
        },
    );
    let sessions = n["sessions"].as_array().cloned().unwrap_or_default();
    let Some(newest) = sessions.last() else {
        let last = match n["last_reached_unix"].as_u64() {
            Some(t) => format!("; it last answered {} s ago", age(t)),
            None => "; it has not connected since this server started".into(),
        };
        b.step(
            "session",
            false,
            format!("node {node} has no session on replica {replica}{last}"),
        );
        return b.end(
            Verdict::Refused,
            Some(node.clone()),
            Some("no_session"),
            format!("refused (no_session): node {node}'s agent has no session to replica {replica}"),
            Some(format!("check the agent on {node}: that it runs, its log, its --servers (it must reach this replica's agent port), and its certificate (tunnel_server_sessions_rejected_total and the server's log name refused ones)")),
        );
    };
    let older = sessions.len() - 1;
    b.step(
        "session",
        true,
        format!(
            "node {node} has a session from {}, up for {} s{}",
            newest["peer"].as_str().unwrap_or("?"),
            newest["since_unix"].as_u64().map(age).unwrap_or(0),
            if older > 0 {
                format!(" ({older} older one(s) draining or standing by)")
            } else {
                String::new()
            }
        ),
    );
    let detail = n["port_check_detail"].as_str().unwrap_or("");
    match n["port_check"].as_str() {
        Some("allowed") => {
            b.step("agent", true, format!("{node}'s agent allows port {port}"));
            b.end(
                Verdict::Redirected,
                Some(node.clone()),
                None,
                format!("redirected to node {node} (through {ingress} and replica {replica})"),
                None,
            )
        }
        Some("not_allowed") => {
            b.step(
                "agent",
                false,
                format!("{node}'s agent does not allow port {port}: {detail}"),
            );
            b.end(
                Verdict::Refused,
                Some(node.clone()),
                Some("agent_refused"),
                format!("refused (agent_refused): node {node}'s agent does not allow port {port}"),
                Some(format!("add {port} to the agent's --ports (TUNNEL_PORTS) on {node}, if it should be reachable")),
            )
        }
        Some("unknown") => {
            b.step("agent", true, format!("{node}'s agent answers, but predates port checks: whether it allows {port} is unknown"));
            b.end(
                Verdict::Redirected,
                Some(node.clone()),
                None,
                format!("redirected to node {node} (through {ingress} and replica {replica}); the agent's allow-list was not learnt"),
                Some(format!("upgrade the agent on {node} to learn its allow-list here")),
            )
        }
        _ => {
            b.step(
                "agent",
                false,
                format!("{node}'s agent did not answer: {detail}"),
            );
            b.end(
                Verdict::Refused,
                Some(node.clone()),
                Some("stream_open_failed"),
                format!("refused (stream_open_failed): node {node}'s session is up, but its agent does not answer streams"),
                Some(format!("the agent on {node} hangs or cannot serve streams: see its log and tunnel_agent_* metrics; restarting it opens a new session")),
            )
        }
    }
}

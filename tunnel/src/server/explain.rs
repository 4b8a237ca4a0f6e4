//! What this server knows of one redirected destination, for `redirector explain`: how it
//! routes the address, the node's sessions (since when, from where), its reachability, and
//! whether its agent allows the port (asked with a health stream naming it, which the agent
//! answers itself without dialling). Served as JSON on the metrics listener, to loopback
//! callers only: `GET /debug/explain?ip=ADDR&port=PORT`.
use std::{
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use super::{Route, Server, open_stream, wire};

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// This replica's name as Events and explain report it: its pod (the manifest sets
/// `POD_NAME`), else its host name.
pub fn replica_name() -> String {
    std::env::var("POD_NAME")
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().into()))
        .unwrap_or_else(|_| "tunnel-server".into())
}

impl Server {
    /// The route, sessions, reachability and port check for a connection to `ip`:`port`.
    pub async fn explain(&self, ip: IpAddr, port: u16) -> Value {
        let route = match self.route(&ip.to_canonical()).await {
            None => json!({"kind": "none"}),
            Some(Route::Ambiguous(nodes)) => {
                let nodes: Vec<&str> = nodes.iter().map(|n| &**n).collect();
                json!({"kind": "ambiguous", "nodes": nodes})
            }
            Some(Route::Node(n)) => json!({"kind": "node", "node": &*n}),
        };
        let node = match route["node"].as_str() {
            Some(n) => Some(self.explain_node(n, port).await),
            None => None,
        };
        json!({"replica": &*self.0.replica, "route": route, "node": node})
    }

    async fn explain_node(&self, node: &str, port: u16) -> Value {
        let sessions: Vec<Value> = self
            .0
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .map(|live| {
                live.iter()
                    .map(|s| json!({"id": s.id, "peer": s.peer.to_string(), "since_unix": unix(s.since)}))
                    .collect()
            })
            .unwrap_or_default();
        let seen = self.0.reach.get(node);
        let (check, detail) = if sessions.is_empty() {
            ("no_session", String::new())
        } else {
            self.port_check(node, port).await
        };
        json!({
            "node": node,
            "sessions": sessions,
            "reachable": seen.reachable,
            "last_reached_unix": seen.last_reached.map(unix),
            "certificate_expires_unix": seen.cert_expires.map(unix),
            "port": port,
            "port_check": check,
            "port_check_detail": detail,
        })
    }

    /// Asks the node's agent whether it allows `port`: `allowed`, `not_allowed`, `unknown` (an
    /// agent that predates port checks), or `failed` with why.
    async fn port_check(&self, node: &str, port: u16) -> (&'static str, String) {
        let timeout = self.0.cfg.open_timeout.min(Duration::from_secs(5));
        let ask = async {
            let req = wire::health_request(node, port).map_err(|e| e.to_string())?;
            let (resp, _body, _) = open_stream(self.candidates(node), req, true).await?;
            resp.await.map_err(|e| format!("awaiting the agent: {e}"))
        };
        match tokio::time::timeout(timeout, ask).await {
            Err(_) => ("failed", format!("no answer within {timeout:?}")),
            Ok(Err(e)) => ("failed", e),
            Ok(Ok(resp)) if resp.status() == http::StatusCode::OK => {
                if resp.headers().contains_key(wire::PORT_ALLOWED_HEADER) {
                    self.0.reach.reached(node);
                    ("allowed", String::new())
                } else {
                    ("unknown", "the agent predates port checks".into())
                }
            }
            Ok(Ok(resp)) => {
                self.0.reach.reached(node);
                let (why, text) = wire::refusal_of(&resp);
                match why {
                    Some(wire::Refusal::PortNotAllowed) => ("not_allowed", text),
                    _ => ("failed", format!("{}: {text}", resp.status())),
                }
            }
        }
    }
}

/// Explanations asked for at once: each may open a health stream, and the metrics port may be
/// reachable by more than the operator.
const EXPLAIN_IN_FLIGHT: usize = 8;

/// `/debug/explain?ip=ADDR&port=PORT` on the metrics listener.
pub fn debug_handler(server: Server) -> edge_cli::http::Debug {
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(EXPLAIN_IN_FLIGHT));
    std::sync::Arc::new(move |rest: String, query: String| {
        let (server, limit) = (server.clone(), limit.clone());
        Box::pin(async move {
            if rest != "explain" {
                return None;
            }
            let err = |status, msg: String| Some((status, json!({"error": msg}).to_string()));
            let Ok(_permit) = limit.try_acquire() else {
                return err(
                    503,
                    format!("{EXPLAIN_IN_FLIGHT} explanations in flight: retry"),
                );
            };
            let param = |k: &str| {
                query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                    .map(str::to_owned)
            };
            let ip = param("ip").and_then(|v| v.parse::<IpAddr>().ok());
            let port = param("port").and_then(|v| v.parse::<u16>().ok());
            match (ip, port) {
                (Some(ip), Some(port)) => Some((200, server.explain(ip, port).await.to_string())),
                _ => err(400, format!("expected ?ip=ADDR&port=PORT, got {query:?}")),
            }
        })
    })
}

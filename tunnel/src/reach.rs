//! Per-node reachability, the server's part of the self-check: when each node last answered a
//! stream, and whether it answers now.
//!
//! A session that is up is not yet proof: an agent whose process hangs keeps its TCP session
//! until the keepalive gives up, and one that cannot serve streams (out of descriptors) keeps it
//! for ever. So a node counts as reached when its agent answers a stream: a redirected
//! connection it accepted, or, for a node that carried none for a whole interval, a health
//! stream the agent answers itself without dialling anything (`--node-check-interval`). Busy
//! nodes cost nothing; an idle one costs one small stream per interval (about 300 bytes on the
//! wire with TLS and TCP headers, so 86 KB a day at the default 5 minutes).
//!
//! Exported per node as `tunnel_server_node_reachable` (1/0) and
//! `tunnel_server_node_last_reached_timestamp_seconds`, for every node of the node table and
//! every node with a session, so a node that never connected shows as unreachable too.
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, gauge::ConstGauge},
};

/// What is known of one node.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Seen {
    /// Its agent answered the last stream or check, and a session is up.
    pub reachable: bool,
    /// When it last answered (None: never, since this server started).
    pub last_reached: Option<SystemTime>,
    /// When the certificate of its newest session expires: a node whose renewal is failing
    /// shows here first, and an edge agent behind NAT cannot be scraped to tell.
    pub cert_expires: Option<SystemTime>,
    /// Since when it has been unreachable (None while reachable); a table node never seen is
    /// unreachable since this server started.
    pub down_since: Option<SystemTime>,
}

/// Shared by the server's sessions, streams and checker; cheap to lock (one map lookup).
pub struct Reach {
    nodes: Mutex<HashMap<Arc<str>, Seen>>,
    started: SystemTime,
}

impl Default for Reach {
    fn default() -> Self {
        Self {
            nodes: Mutex::default(),
            started: SystemTime::now(),
        }
    }
}

impl Reach {
    fn with(&self, node: &str, f: impl FnOnce(&mut Seen)) {
        let mut m = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        match m.get_mut(node) {
            Some(s) => f(s),
            None => f(m.entry(Arc::from(node)).or_default()),
        }
    }

    /// The node's agent answered (a stream, a health check, a new session).
    pub fn reached(&self, node: &str) {
        self.with(node, |s| {
            s.reachable = true;
            s.last_reached = Some(SystemTime::now());
            s.down_since = None;
        });
    }

    /// A new session came up with a certificate valid until `expires`.
    pub fn session_up(&self, node: &str, expires: Option<SystemTime>) {
        self.with(node, |s| {
            s.reachable = true;
            s.last_reached = Some(SystemTime::now());
            s.cert_expires = expires.or(s.cert_expires);
            s.down_since = None;
        });
    }

    /// Its last session ended, or a check went unanswered.
    pub fn lost(&self, node: &str) {
        let started = self.started;
        self.with(node, |s| {
            if s.reachable || s.down_since.is_none() {
                // A node first seen failing has been down since it was last reached, or for
                // as long as this server knows.
                s.down_since = Some(if s.reachable {
                    SystemTime::now()
                } else {
                    s.last_reached.unwrap_or(started)
                });
            }
            s.reachable = false;
        });
    }

    pub fn get(&self, node: &str) -> Seen {
        let m = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        m.get(node).copied().unwrap_or_default()
    }

    /// Whether `node` carried no answered stream for `interval`: it gets a health check.
    pub fn due(&self, node: &str, interval: Duration) -> bool {
        match self.get(node).last_reached {
            None => true,
            Some(t) => t.elapsed().map_or(true, |e| e >= interval),
        }
    }

    /// Every node in `known` and every node ever seen, with what is known of it.
    pub fn snapshot(&self, known: impl IntoIterator<Item = String>) -> BTreeMap<String, Seen> {
        let m = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: BTreeMap<String, Seen> = m.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        for n in known {
            out.entry(n).or_insert(Seen {
                down_since: Some(self.started),
                ..Seen::default()
            });
        }
        out
    }
}

/// The per-node gauges, read at scrape time from a snapshot function.
pub struct ReachCollector<F>(pub F);

impl<F> std::fmt::Debug for ReachCollector<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReachCollector")
    }
}

impl<F> Collector for ReachCollector<F>
where
    F: Fn() -> BTreeMap<String, Seen> + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let nodes = (self.0)();
        let mut family = encoder.encode_descriptor(
            "tunnel_server_node_reachable",
            "1 when the node's agent answered its last stream or health check and a session is up",
            None,
            MetricType::Gauge,
        )?;
        for (node, seen) in &nodes {
            let g = ConstGauge::new(i64::from(seen.reachable));
            g.encode(family.encode_family(&[("node", node.as_str())])?)?;
        }
        times(
            &mut encoder,
            "tunnel_server_node_last_reached_timestamp_seconds",
            "When the node's agent last answered a stream or health check (Unix time; absent: never since this server started)",
            &nodes,
            |s| s.last_reached,
        )?;
        times(
            &mut encoder,
            "tunnel_server_node_certificate_expiry_timestamp_seconds",
            "When the client certificate of the node's newest session expires (Unix time)",
            &nodes,
            |s| s.cert_expires,
        )?;
        Ok(())
    }
}

/// A per-node gauge family of Unix times; nodes without one are left out.
fn times(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    nodes: &BTreeMap<String, Seen>,
    pick: fn(&Seen) -> Option<SystemTime>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (node, seen) in nodes {
        let Some(t) = pick(seen) else { continue };
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        ConstGauge::new(secs).encode(family.encode_family(&[("node", node.as_str())])?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_due_until_it_answers_and_again_once_quiet_for_an_interval() {
        let r = Reach::default();
        assert!(r.due("edge-a", Duration::from_secs(60)));
        r.reached("edge-a");
        assert!(!r.due("edge-a", Duration::from_secs(60)));
        assert!(r.due("edge-a", Duration::ZERO));
        assert!(r.get("edge-a").reachable);
        r.lost("edge-a");
        let s = r.get("edge-a");
        assert!(!s.reachable);
        assert!(s.last_reached.is_some(), "the last success is kept");
        let since = s.down_since.expect("down since now");
        r.lost("edge-a");
        assert_eq!(
            r.get("edge-a").down_since,
            Some(since),
            "a second failure keeps the start"
        );
    }

    #[test]
    fn the_snapshot_lists_table_nodes_never_seen_as_unreachable() {
        let r = Reach::default();
        r.reached("edge-a");
        let snap = r.snapshot(["edge-a".to_owned(), "edge-b".to_owned()]);
        assert!(snap["edge-a"].reachable);
        assert!(snap["edge-a"].down_since.is_none());
        assert!(!snap["edge-b"].reachable);
        assert!(snap["edge-b"].last_reached.is_none());
        assert!(
            snap["edge-b"].down_since.is_some(),
            "down since the server started"
        );
    }

    #[test]
    fn the_gauges_name_every_node_and_only_timestamps_that_exist() {
        let r = Arc::new(Reach::default());
        r.reached("edge-a");
        let r2 = r.clone();
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(ReachCollector(move || {
            r2.snapshot(["edge-b".to_owned()])
        })));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains("tunnel_server_node_reachable{node=\"edge-a\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tunnel_server_node_reachable{node=\"edge-b\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("tunnel_server_node_last_reached_timestamp_seconds{node=\"edge-a\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("last_reached_timestamp_seconds{node=\"edge-b\"}"),
            "{text}"
        );
    }
}

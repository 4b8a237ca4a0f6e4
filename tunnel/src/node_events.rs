//! Kubernetes Events on a Node whose tunnel stays down (`--node-events-after`): `kubectl
//! describe node edge-7` then says, where an operator looks first, that this master has not
//! reached the node's agent for ten minutes, and later that it has again.
//!
//! One Warning (`EdgeTunnelDown`) when a node has been unreachable through this server for the
//! threshold, one Normal (`EdgeTunnelUp`) when it answers again; nothing in between, whatever
//! the node does. At most [`PER_ROUND`] Down Events per round: a master cut off from its whole
//! fleet must not post 10,000 Events at once (the rest follow in later rounds).
use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio_util::sync::CancellationToken;

use crate::{reach::Seen, server::Server};

pub const DOWN: &str = "EdgeTunnelDown";
pub const UP: &str = "EdgeTunnelUp";
/// The Events' reporting controller.
pub const CONTROLLER: &str = "edge-redirector-tunnel";
pub const PER_ROUND: usize = 100;

/// What changed for one node since the last round.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Down { node: String, for_: Duration },
    Up { node: String },
}

/// Which nodes have had their Down Event (and so get an Up one).
pub struct Alarms {
    after: Duration,
    reported: BTreeSet<String>,
}

impl Alarms {
    pub fn new(after: Duration) -> Self {
        Self {
            after,
            reported: BTreeSet::new(),
        }
    }

    /// The Events to post for `nodes` at `now`.
    pub fn round(&mut self, nodes: &BTreeMap<String, Seen>, now: SystemTime) -> Vec<Change> {
        let mut out = Vec::new();
        let mut downs = 0;
        for (node, seen) in nodes {
            if seen.reachable {
                if self.reported.remove(node) {
                    out.push(Change::Up { node: node.clone() });
                }
                continue;
            }
            let Some(since) = seen.down_since else {
                continue;
            };
            let for_ = now.duration_since(since).unwrap_or_default();
            if for_ >= self.after && downs < PER_ROUND && self.reported.insert(node.clone()) {
                downs += 1;
                out.push(Change::Down {
                    node: node.clone(),
                    for_,
                });
            }
        }
        // A node removed from the table is forgotten, Event or not.
        self.reported.retain(|n| nodes.contains_key(n));
        out
    }
}

/// Posts `change` as an Event on its Node. A refused Event is logged, never fatal.
pub async fn publish(recorder: &Recorder, change: &Change, instance: &str) {
    let (node, type_, reason, note) = match change {
        Change::Down { node, for_ } => (
            node,
            EventType::Warning,
            DOWN,
            format!(
                "unreachable through the tunnel server {instance} for {}s: no agent session answers streams. Check the agent pod on this node (its log says why its session fails) and the node's uplink",
                for_.as_secs()
            ),
        ),
        Change::Up { node } => (
            node,
            EventType::Normal,
            UP,
            format!("reachable again through the tunnel server {instance}"),
        ),
    };
    let regarding = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.clone()),
        ..Default::default()
    };
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Tunnel".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, &regarding).await {
        tracing::warn!(node = %node, reason, "could not publish a Kubernetes Event (grant create/patch on events.k8s.io events): {e}");
    }
}

/// Rounds every quarter of `after` (between 1 and 30 s) until `shutdown`.
pub async fn run(
    server: Server,
    client: kube::Client,
    after: Duration,
    instance: String,
    shutdown: CancellationToken,
) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: CONTROLLER.into(),
            instance: Some(instance.clone()),
        },
    );
    let mut alarms = Alarms::new(after);
    let mut tick =
        tokio::time::interval((after / 4).clamp(Duration::from_secs(1), Duration::from_secs(30)));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for change in alarms.round(&server.reachability(), SystemTime::now()) {
            publish(&recorder, &change, &instance).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down(secs_ago: u64, now: SystemTime) -> Seen {
        Seen {
            down_since: Some(now - Duration::from_secs(secs_ago)),
            ..Seen::default()
        }
    }

    #[test]
    fn one_down_event_after_the_threshold_and_one_up_event_when_it_answers() {
        let now = SystemTime::now();
        let mut a = Alarms::new(Duration::from_secs(600));
        let mut nodes = BTreeMap::from([
            ("edge-a".to_owned(), down(30, now)),
            ("edge-b".to_owned(), down(700, now)),
        ]);
        let first = a.round(&nodes, now);
        assert_eq!(first.len(), 1, "{first:?}");
        assert!(
            matches!(&first[0], Change::Down { node, for_ } if node == "edge-b" && for_.as_secs() == 700)
        );
        assert!(a.round(&nodes, now).is_empty(), "reported once");
        nodes.get_mut("edge-b").unwrap().reachable = true;
        nodes.get_mut("edge-b").unwrap().down_since = None;
        assert_eq!(
            a.round(&nodes, now),
            vec![Change::Up {
                node: "edge-b".into()
            }]
        );
        assert!(a.round(&nodes, now).is_empty());
        // edge-a was never reported: no Up for it when it comes back.
        nodes.get_mut("edge-a").unwrap().reachable = true;
        assert!(a.round(&nodes, now).is_empty());
    }

    #[test]
    fn a_whole_fleet_going_down_is_reported_a_hundred_per_round() {
        let now = SystemTime::now();
        let mut a = Alarms::new(Duration::from_secs(60));
        let nodes: BTreeMap<String, Seen> = (0..250)
            .map(|i| (format!("edge-{i:03}"), down(120, now)))
            .collect();
        let sizes: Vec<usize> = (0..4).map(|_| a.round(&nodes, now).len()).collect();
        assert_eq!(sizes, [100, 100, 50, 0]);
    }
}

//! Kubernetes Events on Node objects, so an operator sees a node's problem where they look:
//! `kubectl describe node <name>`. Publishing never fails the caller: a refused Event is
//! logged, and the node table is kept in step regardless.
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};

pub const CONTROLLER: &str = "edge-redirector";

/// Reasons, in the Events' `reason` field.
pub mod reason {
    pub const AMBIGUOUS_ADDRESS: &str = "EdgeRedirectorAmbiguousAddress";
    pub const POOL_EXHAUSTED: &str = "EdgeRedirectorPoolExhausted";
    pub const UNUSABLE_ADDRESS: &str = "EdgeRedirectorUnusableAddress";
}

pub struct NodeEvents {
    recorder: Recorder,
}

impl NodeEvents {
    /// `instance`: this replica (its pod or host name), so Events say which master saw it.
    pub fn new(client: Client, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: CONTROLLER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client, reporter),
        }
    }

    /// A Warning Event on Node `node` (uid when known, so it attaches to this incarnation).
    pub async fn warn(&self, node: &str, uid: Option<String>, reason: &str, note: &str) {
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.into()),
            uid,
            ..Default::default()
        };
        let ev = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            // The API limits notes to 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: "Redirect".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &regarding).await {
            tracing::warn!(
                node,
                reason,
                "could not publish a Kubernetes Event (grant create/patch on events.k8s.io events): {e}"
            );
        }
    }
}

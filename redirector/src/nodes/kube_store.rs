//! Cluster mode's allocation store: one ConfigMap (`<node-name> <address>` lines under one
//! key), swapped by resourceVersion: a replace carrying a stale resourceVersion gets 409
//! Conflict from the API server, and the allocator rereads. Persisted in the cluster, so a
//! node keeps its address across restarts of every replica.
//!
//! Size: a ConfigMap holds at most 1 MiB, about 30,000 nodes at ~34 bytes a line. The API
//! server's refusal is reported with that limit named.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

use super::{
    error::{Result, SyncError},
    pool::Allocations,
    store::{AllocationStore, Saved, parse, render},
};

pub const KEY: &str = "allocations";

pub struct KubeStore {
    api: Api<ConfigMap>,
    name: String,
}

impl KubeStore {
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
        }
    }

    fn what(&self) -> String {
        format!(
            "ConfigMap {}/{}",
            self.api.namespace().unwrap_or("default"),
            self.name
        )
    }

    fn describe(&self, op: &str, e: kube::Error) -> SyncError {
        let hint = match &e {
            kube::Error::Api(s) if s.is_forbidden() => {
                "; grant get, create and update on it (deploy/rbac.yaml)"
            }
            kube::Error::Api(s) if s.is_invalid() || s.code == 413 => {
                "; a ConfigMap holds at most 1 MiB (about 30,000 nodes): use a smaller node selection per pool"
            }
            _ => "",
        };
        SyncError::Api {
            what: format!("{op} {}", self.what()),
            hint,
            source: e,
        }
    }
}

impl AllocationStore for KubeStore {
    async fn load(&self) -> Result<(Allocations, String)> {
        match self.api.get_opt(&self.name).await {
            Ok(None) => Ok((Allocations::new(), String::new())),
            Ok(Some(cm)) => {
                let text = cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get(KEY))
                    .map(String::as_str)
                    .unwrap_or("");
                let version = cm.metadata.resource_version.unwrap_or_default();
                Ok((parse(text, &self.what())?, version))
            }
            Err(e) => Err(self.describe("reading", e)),
        }
    }

    async fn save(&self, allocations: &Allocations, version: &str) -> Result<Saved> {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: (!version.is_empty()).then(|| version.to_owned()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "edge-redirector".to_owned(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(KEY.to_owned(), render(allocations))])),
            ..Default::default()
        };
        let pp = PostParams::default();
        let result = if version.is_empty() {
            self.api.create(&pp, &cm).await
        } else {
            self.api.replace(&self.name, &pp, &cm).await
        };
        match result {
            Ok(cm) => Ok(Saved::Yes(cm.metadata.resource_version.unwrap_or_default())),
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => {
                Ok(Saved::Conflict)
            }
            Err(e) => Err(self.describe("writing", e)),
        }
    }
}

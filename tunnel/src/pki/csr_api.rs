//! Enrollment through the Kubernetes CSR API, for agents that run as pods: the agent files a
//! `CertificateSigningRequest` with signer [`SIGNER`] using its service account; the approver
//! and signer here (in the tunnel server) approve it only if the requester is the agents'
//! service account *and* its token was bound to a pod on the very node the CSR names
//! (`authentication.kubernetes.io/node-name` in the request's user info, Kubernetes 1.30+),
//! then sign it with the tunnel CA. A CSR for another node is denied, naming both.
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::{
    ByteString,
    api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestCondition},
};
use kube::{
    Api, Client,
    api::PostParams,
    runtime::{WatchStreamExt, watcher},
};
use tokio_util::sync::CancellationToken;

use crate::{
    error::{Error, Result},
    pki::ca::{CaDir, csr_node},
};

/// The signer name agents ask for; no built-in signer acts on it.
pub const SIGNER: &str = tunnel_proto::identity::CSR_SIGNER;
/// The user-info key a bound service account token carries its pod's node in.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// What the approver accepts.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The agents' service account user name, `system:serviceaccount:<ns>:<name>`.
    pub agent_user: String,
    pub lifetime: Duration,
}

/// The approver's verdict on one CSR: Ok(node) to approve and sign, Err(reason) to deny.
pub fn decide(
    csr: &CertificateSigningRequest,
    policy: &Policy,
) -> std::result::Result<String, String> {
    let spec = &csr.spec;
    let pem = String::from_utf8_lossy(&spec.request.0);
    let node = csr_node(&pem).map_err(|e| e.to_string())?;
    let user = spec.username.as_deref().unwrap_or("");
    if user != policy.agent_user {
        return Err(format!(
            "requested by {user:?}, not the agents' service account {:?}",
            policy.agent_user
        ));
    }
    let from: Vec<&String> = spec
        .extra
        .as_ref()
        .and_then(|e| e.get(NODE_NAME_EXTRA))
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    match from.as_slice() {
        [n] if **n == node => Ok(node),
        [n] => Err(format!(
            "the CSR asks for node {node:?} but was requested from a pod on node {n:?}; an agent can only enroll as its own node"
        )),
        _ => Err(format!(
            "the requester's token names no node ({NODE_NAME_EXTRA}); use a bound service account token of a pod (Kubernetes 1.30+)"
        )),
    }
}

fn condition(csr: &CertificateSigningRequest, kind: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == kind))
}

/// Approves or denies, then signs approved CSRs of [`SIGNER`], until `stop`.
pub async fn run_signer(client: Client, ca: CaDir, policy: Policy, stop: CancellationToken) {
    let api: Api<CertificateSigningRequest> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("spec.signerName={SIGNER}"));
    let mut events = watcher(api.clone(), cfg)
        .default_backoff()
        .applied_objects()
        .boxed();
    loop {
        let csr = tokio::select! {
            _ = stop.cancelled() => return,
            ev = events.next() => match ev {
                Some(Ok(csr)) => csr,
                Some(Err(e)) => { tracing::warn!("CSR watch: {e}"); continue; }
                None => return,
            },
        };
        if let Err(e) = handle(&api, &ca, &policy, csr).await {
            tracing::warn!("CSR: {e}");
        }
    }
}

async fn handle(
    api: &Api<CertificateSigningRequest>,
    ca: &CaDir,
    policy: &Policy,
    mut csr: CertificateSigningRequest,
) -> Result<()> {
    let name = csr.metadata.name.clone().unwrap_or_default();
    let issued = csr
        .status
        .as_ref()
        .and_then(|s| s.certificate.as_ref())
        .is_some_and(|c| !c.0.is_empty());
    if issued || condition(&csr, "Denied") || condition(&csr, "Failed") {
        return Ok(());
    }
    let err = |what: &str, e: kube::Error| Error::Refused(format!("{what} CSR {name}: {e}"));
    let verdict = decide(&csr, policy);
    if !condition(&csr, "Approved") {
        let (kind, reason, message) = match &verdict {
            Ok(node) => (
                "Approved",
                "EdgeRedirectorNodeMatches",
                format!("the requester runs on node {node}"),
            ),
            Err(why) => ("Denied", "EdgeRedirectorNodeMismatch", why.clone()),
        };
        let status = csr.status.get_or_insert_with(Default::default);
        status
            .conditions
            .get_or_insert_with(Vec::new)
            .push(CertificateSigningRequestCondition {
                type_: kind.into(),
                status: "True".into(),
                reason: Some(reason.into()),
                message: Some(message.clone()),
                ..Default::default()
            });
        csr = api
            .replace_subresource("approval", &name, &PostParams::default(), &csr)
            .await
            .map_err(|e| err("approving", e))?;
        match &verdict {
            Ok(node) => tracing::info!(csr = %name, node = %node, "CSR approved"),
            Err(why) => {
                tracing::warn!(csr = %name, "CSR denied: {why}");
                return Ok(());
            }
        }
    }
    let Ok(node) = verdict else { return Ok(()) };
    let pem = String::from_utf8_lossy(&csr.spec.request.0).into_owned();
    let cert = ca.current()?.sign_node_csr(&pem, &node, policy.lifetime)?;
    csr.status.get_or_insert_with(Default::default).certificate =
        Some(ByteString(cert.into_bytes()));
    api.replace_subresource("status", &name, &PostParams::default(), &csr)
        .await
        .map_err(|e| err("signing", e))?;
    tracing::info!(csr = %name, node = %node, "CSR signed");
    Ok(())
}

//! Enrollment through the Kubernetes CSR API, and the tunnel's Node Events, against kube-rs's
//! `tower-test` mock service (no kube-apiserver runs on these machines). The signer's requests interleave (the CSR watch,
//! approvals, status updates), so it is answered by a small fake API server behind the mock
//! that records what it was asked; the agent's side is a strict request-by-request scenario.
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::{ByteString, api::certificates::v1::CertificateSigningRequest};
use kube::{Client, client::Body};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tunnel::pki::{
    ca::{CaDir, node_csr},
    csr_api::{self, NODE_NAME_EXTRA, Policy, SIGNER},
};
use tunnel_agent::csr_api::{Reply, Transport, request as agent_csr_request};

/// The agent's CSR client talks plain HTTP/JSON to the API server (no kube client): this
/// stands in for the API server the way tower-test's handle does for kube's.
struct AgentApi(tokio::sync::mpsc::UnboundedSender<(Request<Vec<u8>>, AgentReply)>);
struct AgentReply(tokio::sync::oneshot::Sender<Response<Vec<u8>>>);
struct AgentHandle(tokio::sync::mpsc::UnboundedReceiver<(Request<Vec<u8>>, AgentReply)>);

impl Transport for AgentApi {
    fn call(&self, req: Request<Vec<u8>>) -> Reply<'_> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = self.0.send((req, AgentReply(tx)));
        Box::pin(async move {
            sent.map_err(|_| tunnel::Error::Refused("API server stand-in gone".into()))?;
            rx.await
                .map_err(|_| tunnel::Error::Refused("API server stand-in gave no answer".into()))
        })
    }
}

impl AgentReply {
    fn send_response(self, r: Response<Vec<u8>>) {
        let _ = self.0.send(r);
    }
}

impl AgentHandle {
    async fn next_request(&mut self) -> Option<(Request<Vec<u8>>, AgentReply)> {
        self.0.recv().await
    }
}

fn agent_api() -> (AgentApi, AgentHandle) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (AgentApi(tx), AgentHandle(rx))
}

fn agent_respond(code: StatusCode, body: &Value) -> Response<Vec<u8>> {
    let mut r = Response::new(serde_json::to_vec(body).unwrap());
    *r.status_mut() = code;
    r
}

fn agent_body(req: Request<Vec<u8>>) -> Value {
    serde_json::from_slice(req.body()).unwrap()
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const AGENT_USER: &str = "system:serviceaccount:edge-redirector:edge-redirector-agent";

fn mock() -> (Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    let mut r = Response::new(Body::from(serde_json::to_vec(body).unwrap()));
    *r.status_mut() = code;
    r
}

fn policy() -> Policy {
    Policy {
        agent_user: AGENT_USER.into(),
        lifetime: Duration::from_secs(3600),
    }
}

/// A CSR object asking for `asks_for`, filed by `user` from a pod on `from_node`.
fn csr_object(name: &str, asks_for: &str, user: &str, from_node: Option<&str>) -> Value {
    let (pem, _key) = node_csr(asks_for).unwrap();
    let mut spec = json!({
        "request": ByteString(pem.into_bytes()),
        "signerName": SIGNER,
        "usages": ["client auth"],
        "username": user,
    });
    if let Some(n) = from_node {
        spec["extra"] = json!({ NODE_NAME_EXTRA: [n] });
    }
    json!({"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
           "metadata": {"name": name, "resourceVersion": "1"}, "spec": spec})
}

#[test]
fn the_approver_accepts_only_the_agents_account_on_the_node_it_names() {
    let csr = |asks: &str, user: &str, from: Option<&str>| -> CertificateSigningRequest {
        serde_json::from_value(csr_object("x", asks, user, from)).unwrap()
    };
    assert_eq!(
        csr_api::decide(&csr("edge-a", AGENT_USER, Some("edge-a")), &policy()),
        Ok("edge-a".into())
    );
    let e = csr_api::decide(&csr("edge-b", AGENT_USER, Some("edge-a")), &policy()).unwrap_err();
    assert!(
        e.contains("asks for node \"edge-b\"") && e.contains("pod on node \"edge-a\""),
        "{e}"
    );
    let e = csr_api::decide(
        &csr(
            "edge-a",
            "system:serviceaccount:default:other",
            Some("edge-a"),
        ),
        &policy(),
    )
    .unwrap_err();
    assert!(e.contains("not the agents' service account"), "{e}");
    let e = csr_api::decide(&csr("edge-a", AGENT_USER, None), &policy()).unwrap_err();
    assert!(e.contains("names no node") && e.contains("1.30"), "{e}");
}

#[derive(Default)]
struct Seen {
    approvals: Vec<Value>,
    statuses: Vec<Value>,
}

async fn body(req: Request<Body>) -> Value {
    serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap()
}

async fn fake_api(mut api: Handle, seen: Arc<Mutex<Seen>>) {
    let base = "/apis/certificates.k8s.io/v1/certificatesigningrequests";
    let mut parked = Vec::new();
    while let Some((req, send)) = api.next_request().await {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let reply = match (req.method().clone(), path.as_str()) {
            (Method::GET, p) if p == base && !query.contains("watch=true") => {
                assert!(
                    query.contains(
                        "fieldSelector=spec.signerName%3Dedge-redirector.io%2Ftunnel-agent"
                    ),
                    "{query}"
                );
                respond(
                    StatusCode::OK,
                    &json!({"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequestList",
                    "metadata": {"resourceVersion": "5"},
                    "items": [csr_object("good", "edge-a", AGENT_USER, Some("edge-a")),
                              csr_object("bad", "edge-b", AGENT_USER, Some("edge-a"))]}),
                )
            }
            (Method::GET, p) if p == base => {
                parked.push(send);
                continue;
            }
            (Method::PUT, p) if p.ends_with("/approval") => {
                let b = body(req).await;
                seen.lock().unwrap().approvals.push(b.clone());
                respond(StatusCode::OK, &b)
            }
            (Method::PUT, p) if p.ends_with("/status") => {
                let b = body(req).await;
                seen.lock().unwrap().statuses.push(b.clone());
                respond(StatusCode::OK, &b)
            }
            (m, p) => panic!("unexpected {m} {p}?{query}"),
        };
        send.send_response(reply);
    }
}

#[tokio::test]
async fn the_signer_signs_a_csr_for_the_requesters_node_and_denies_one_for_another() {
    let dir = std::env::temp_dir().join(format!("csr-signer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = CaDir::new(&dir);
    ca.ensure().unwrap();
    let (client, api) = mock();
    let seen = Arc::new(Mutex::new(Seen::default()));
    tokio::spawn(fake_api(api, seen.clone()));
    let stop = CancellationToken::new();
    tokio::spawn(csr_api::run_signer(
        client,
        CaDir::new(&dir),
        policy(),
        stop.clone(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let done = {
            let s = seen.lock().unwrap();
            s.approvals.len() == 2 && s.statuses.len() == 1
        };
        if done {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "signer did not act");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = seen.lock().unwrap();
    let verdict = |name: &str| {
        let a = s
            .approvals
            .iter()
            .find(|a| a["metadata"]["name"] == name)
            .unwrap();
        a["status"]["conditions"][0].clone()
    };
    assert_eq!(verdict("good")["type"], "Approved");
    let denied = verdict("bad");
    assert_eq!(denied["type"], "Denied");
    assert!(
        denied["message"]
            .as_str()
            .unwrap()
            .contains("asks for node \"edge-b\""),
        "{denied}"
    );
    // Only the good one was signed, and its certificate names its node.
    assert_eq!(s.statuses[0]["metadata"]["name"], "good");
    let cert: ByteString =
        serde_json::from_value(s.statuses[0]["status"]["certificate"].clone()).unwrap();
    let der = CertificateDer::from_pem_slice(&cert.0).unwrap();
    assert_eq!(tunnel::identity::node_id_from_cert(&der).unwrap(), "edge-a");
    stop.cancel();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_agent_files_a_csr_and_waits_for_its_certificate_or_its_denial() {
    let (pem, _key) = node_csr("edge-a").unwrap();
    let (client, mut api) = agent_api();
    let server = tokio::spawn(async move {
        let (req, send) = api.next_request().await.unwrap();
        assert_eq!(req.method(), Method::POST);
        let mut b = agent_body(req);
        assert_eq!(b["spec"]["signerName"], SIGNER);
        assert_eq!(b["metadata"]["generateName"], "edge-redirector-edge-a-");
        b["metadata"]["name"] = json!("edge-redirector-edge-a-x1");
        send.send_response(agent_respond(StatusCode::CREATED, &b));
        // Pending, then signed.
        let (req, send) = api.next_request().await.unwrap();
        assert!(req.uri().path().ends_with("/edge-redirector-edge-a-x1"));
        send.send_response(agent_respond(StatusCode::OK, &b));
        let (_, send) = api.next_request().await.unwrap();
        b["status"] =
            json!({"certificate": ByteString(b"-----BEGIN CERTIFICATE-----\nsigned\n".to_vec())});
        send.send_response(agent_respond(StatusCode::OK, &b));
        // A second CSR, denied.
        let (req, send) = api.next_request().await.unwrap();
        let mut b = agent_body(req);
        b["metadata"]["name"] = json!("edge-redirector-edge-a-x2");
        send.send_response(agent_respond(StatusCode::CREATED, &b));
        let (_, send) = api.next_request().await.unwrap();
        b["status"] = json!({"conditions": [{"type": "Denied", "status": "True", "message": "the CSR asks for node \"edge-a\" but was requested from a pod on node \"edge-b\""}]});
        send.send_response(agent_respond(StatusCode::OK, &b));
    });
    let cert = agent_csr_request(
        &client,
        "edge-a",
        &pem,
        Duration::from_secs(3600),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(cert.contains("signed"));
    let e = agent_csr_request(
        &client,
        "edge-a",
        &pem,
        Duration::from_secs(3600),
        Duration::from_secs(10),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("denied") && e.contains("pod on node \"edge-b\""),
        "{e}"
    );
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_node_event_names_the_node_the_reason_and_this_replica() {
    use tunnel::node_events::{Change, DOWN, UP, publish};
    let (client, mut api) = mock();
    let recorder = kube::runtime::events::Recorder::new(
        client,
        kube::runtime::events::Reporter {
            controller: tunnel::node_events::CONTROLLER.into(),
            instance: Some("master-1".into()),
        },
    );
    let seen = tokio::spawn(async move {
        let mut bodies = Vec::new();
        for _ in 0..2 {
            let (req, send) = api.next_request().await.unwrap();
            assert_eq!(req.method(), Method::POST);
            assert_eq!(
                req.uri().path(),
                "/apis/events.k8s.io/v1/namespaces/default/events"
            );
            let b = body(req).await;
            send.send_response(respond(StatusCode::CREATED, &b));
            bodies.push(b);
        }
        bodies
    });
    let down = Change::Down {
        node: "edge-a".into(),
        for_: Duration::from_secs(620),
    };
    publish(&recorder, &down, "master-1").await;
    publish(
        &recorder,
        &Change::Up {
            node: "edge-a".into(),
        },
        "master-1",
    )
    .await;
    let bodies = tokio::time::timeout(Duration::from_secs(5), seen)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bodies[0]["regarding"]["kind"], "Node");
    assert_eq!(bodies[0]["regarding"]["name"], "edge-a");
    assert_eq!(bodies[0]["reason"], DOWN);
    assert_eq!(bodies[0]["type"], "Warning");
    let note = bodies[0]["note"].as_str().unwrap();
    assert!(note.contains("master-1") && note.contains("620s"), "{note}");
    assert_eq!(bodies[0]["reportingInstance"], "master-1");
    assert_eq!(bodies[1]["reason"], UP);
    assert_eq!(bodies[1]["type"], "Normal");
}

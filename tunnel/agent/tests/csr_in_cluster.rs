//! The agent's CSR API client against an HTTPS stand-in for the API server: real TLS trusting
//! the cluster CA the pod is given, the service account's token as a bearer, the two REST calls
//! a CSR takes, and an API error that reaches the operator with its hint.
#![cfg(feature = "csr-api")]
use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tunnel_agent::csr_api::{InCluster, request};

fn temp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("agent-csr-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Serves HTTPS on 127.0.0.1 with a certificate for that address; returns its port and the
/// requests it saw (method, path, authorization, body).
async fn api_server(
    forbid: bool,
) -> (
    u16,
    String,
    Arc<Mutex<Vec<(String, String, String, Value)>>>,
) {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(cert.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, seen) = (acceptor.clone(), s.clone());
            tokio::spawn(async move {
                let tls = acceptor.accept(tcp).await.unwrap();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let auth = parts
                            .headers
                            .get("authorization")
                            .and_then(|a| a.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        seen.lock().unwrap().push((
                            parts.method.to_string(),
                            parts.uri.path().to_owned(),
                            auth,
                            v,
                        ));
                        let (code, answer) = if forbid {
                            (
                                StatusCode::FORBIDDEN,
                                json!({"kind": "Status", "message": "certificatesigningrequests is forbidden"}),
                            )
                        } else if parts.method == hyper::Method::POST {
                            (
                                StatusCode::CREATED,
                                json!({"metadata": {"name": "edge-redirector-edge-a-abc"}}),
                            )
                        } else {
                            let pem = base64::engine::general_purpose::STANDARD
                                .encode("-----BEGIN CERTIFICATE-----\nsigned\n");
                            (StatusCode::OK, json!({"status": {"certificate": pem}}))
                        };
                        let mut r = Response::new(Full::new(Bytes::from(answer.to_string())));
                        *r.status_mut() = code;
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, cert.pem(), seen)
}

type Seen = Arc<Mutex<Vec<(String, String, String, Value)>>>;

/// The client as a pod has it: the stand-in's CA and a token file in `dir`.
async fn in_cluster(
    name: &str,
    forbid: bool,
    token: &str,
) -> (std::path::PathBuf, InCluster, Seen) {
    let dir = temp(name);
    let (port, ca, seen) = api_server(forbid).await;
    std::fs::write(dir.join("ca.crt"), ca).unwrap();
    std::fs::write(dir.join("token"), token).unwrap();
    let api = InCluster::new(
        "127.0.0.1",
        &port.to_string(),
        &dir.join("ca.crt"),
        &dir.join("token"),
    )
    .unwrap();
    (dir, api, seen)
}

#[tokio::test]
async fn a_csr_is_filed_and_read_back_over_tls_with_the_service_account_token() {
    let (dir, api, seen) = in_cluster("ok", false, "tok-123\n").await;
    let cert = request(
        &api,
        "edge-a",
        "CSR PEM",
        Duration::from_secs(3600),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(cert, "-----BEGIN CERTIFICATE-----\nsigned\n");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let base = "/apis/certificates.k8s.io/v1/certificatesigningrequests";
    assert_eq!((seen[0].0.as_str(), seen[0].1.as_str()), ("POST", base));
    assert_eq!(seen[1].1, format!("{base}/edge-redirector-edge-a-abc"));
    for s in &seen {
        assert_eq!(s.2, "Bearer tok-123", "the token file, trimmed");
    }
    let spec = &seen[0].3["spec"];
    assert_eq!(spec["signerName"], "edge-redirector.io/tunnel-agent");
    assert_eq!(spec["expirationSeconds"], 3600);
    let csr = base64::engine::general_purpose::STANDARD
        .decode(spec["request"].as_str().unwrap())
        .unwrap();
    assert_eq!(csr, b"CSR PEM");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_forbidden_answer_says_which_permission_is_missing() {
    let (dir, api, _) = in_cluster("forbidden", true, "tok").await;
    let e = request(
        &api,
        "edge-a",
        "CSR",
        Duration::from_secs(60),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("403") && e.contains("needs create on certificatesigningrequests"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn outside_a_pod_the_error_says_where_the_csr_api_is_reached_from() {
    // SAFETY: this test binary's other tests never read these variables.
    unsafe { std::env::remove_var("KUBERNETES_SERVICE_HOST") };
    let e = InCluster::from_env()
        .err()
        .expect("no API server here")
        .to_string();
    assert!(
        e.contains("KUBERNETES_SERVICE_HOST") && e.contains("from a pod"),
        "{e}"
    );
}

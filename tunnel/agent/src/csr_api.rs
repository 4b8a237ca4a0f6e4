//! Enrollment through the Kubernetes CSR API (feature `csr-api`), for agents that run as pods:
//! the agent files a `CertificateSigningRequest` for signer [`CSR_SIGNER`] as its service
//! account, and a tunnel server running `--csr-signer` approves and signs it.
//!
//! Two REST calls (create, then read until signed or denied), made with the HTTP/1.1 client and
//! rustls the agent already has, not a Kubernetes client library: kube-rs and k8s-openapi would
//! double the agent's size for these two calls. The transport is a trait so that tests can
//! play the API server's part.
use std::{future::Future, path::Path, pin::Pin, sync::Arc, time::Duration};

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tunnel_proto::{
    error::{Error, Result},
    identity::CSR_SIGNER,
    tls::{self, PemFiles},
};

const CSRS: &str = "/apis/certificates.k8s.io/v1/certificatesigningrequests";
/// Where a pod's service account credentials are mounted.
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

pub type Reply<'a> = Pin<Box<dyn Future<Output = Result<Response<Vec<u8>>>> + Send + 'a>>;

/// Carries one request to the API server and brings back its answer.
pub trait Transport: Send + Sync {
    fn call(&self, req: Request<Vec<u8>>) -> Reply<'_>;
}

/// The API server as a pod sees it: `KUBERNETES_SERVICE_HOST`/`_PORT`, the service account's
/// token (read anew for every call: the kubelet rotates it) and the cluster CA.
pub struct InCluster {
    authority: String,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    token_file: std::path::PathBuf,
}

impl InCluster {
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| {
            std::env::var(k).map_err(|_| {
                Error::Config(format!(
                    "--csr-api: {k} is not set; the CSR API is reached from a pod (in-cluster service account)"
                ))
            })
        };
        let (host, port) = (
            var("KUBERNETES_SERVICE_HOST")?,
            var("KUBERNETES_SERVICE_PORT")?,
        );
        let dir = Path::new(SERVICE_ACCOUNT);
        Self::new(&host, &port, &dir.join("ca.crt"), &dir.join("token"))
    }

    /// The API server at `host:port`, trusted through `ca`, authenticated by the token in
    /// `token_file`.
    pub fn new(host: &str, port: &str, ca: &Path, token_file: &Path) -> Result<Self> {
        let roots = PemFiles::load_certs(ca)?;
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|e| Error::Config(format!("API server host {host:?}: {e}")))?;
        let authority = match host.parse::<std::net::Ipv6Addr>() {
            Ok(_) => format!("[{host}]:{port}"),
            Err(_) => format!("{host}:{port}"),
        };
        Ok(Self {
            authority,
            server_name,
            tls: tls::anonymous_client_config(&roots)?,
            token_file: token_file.to_owned(),
        })
    }

    async fn send(&self, req: Request<Vec<u8>>) -> Result<Response<Vec<u8>>> {
        let at = &self.authority;
        let token = std::fs::read_to_string(&self.token_file).map_err(|e| {
            Error::io(
                format!(
                    "reading the service account token {}",
                    self.token_file.display()
                ),
                e,
            )
        })?;
        let tcp = tokio::net::TcpStream::connect(at)
            .await
            .map_err(|e| Error::io(format!("connecting to the API server {at}"), e))?;
        let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| Error::io(format!("TLS with the API server {at}"), e))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Error::Refused(format!("HTTP with the API server {at}: {e}")))?;
        tokio::spawn(conn);
        let (mut parts, body) = req.into_parts();
        parts.headers.insert(
            http::header::HOST,
            at.parse()
                .map_err(|e| Error::Config(format!("{at}: {e}")))?,
        );
        let bearer = format!("Bearer {}", token.trim());
        parts.headers.insert(
            http::header::AUTHORIZATION,
            bearer.parse().map_err(|_| {
                Error::Config("the service account token is not a header value".into())
            })?,
        );
        let what = format!("{} {}", parts.method, parts.uri);
        let resp = send
            .send_request(Request::from_parts(parts, Full::new(Bytes::from(body))))
            .await
            .map_err(|e| Error::Refused(format!("{what} at {at}: {e}")))?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, 1 << 20)
            .collect()
            .await
            .map_err(|e| Error::Refused(format!("{what} at {at}: reading the answer: {e}")))?
            .to_bytes();
        Ok(Response::from_parts(parts, body.to_vec()))
    }
}

impl Transport for InCluster {
    fn call(&self, req: Request<Vec<u8>>) -> Reply<'_> {
        Box::pin(self.send(req))
    }
}

async fn call(
    api: &dyn Transport,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<(StatusCode, Value)> {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body.map(|b| b.to_string().into_bytes()).unwrap_or_default())
        .map_err(|e| Error::Refused(e.to_string()))?;
    let resp = api.call(req).await?;
    let status = resp.status();
    let v = serde_json::from_slice(resp.body())
        .unwrap_or_else(|_| json!({"message": String::from_utf8_lossy(resp.body()).into_owned()}));
    Ok((status, v))
}

fn api_refusal(what: &str, status: StatusCode, v: &Value, hint: &str) -> Error {
    let msg = v["message"].as_str().unwrap_or("");
    Error::Refused(format!(
        "{what}: the API server answered {status}: {msg}{hint}"
    ))
}

/// Files a CSR for `node` and waits up to `wait` for its certificate (or its denial).
pub async fn request(
    api: &dyn Transport,
    node: &str,
    csr_pem: &str,
    lifetime: Duration,
    wait: Duration,
) -> Result<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let csr = json!({
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"generateName": format!("edge-redirector-{node}-")},
        "spec": {
            "request": b64.encode(csr_pem),
            "signerName": CSR_SIGNER,
            "usages": ["client auth", "digital signature"],
            "expirationSeconds": lifetime.as_secs().min(i32::MAX as u64),
        },
    });
    let what = format!("filing a CSR for node {node}");
    let (status, created) = call(api, Method::POST, CSRS, Some(&csr)).await?;
    if !status.is_success() {
        let hint = match status {
            StatusCode::FORBIDDEN => {
                " (the agent's service account needs create on certificatesigningrequests)"
            }
            _ => "",
        };
        return Err(api_refusal(&what, status, &created, hint));
    }
    let name = created["metadata"]["name"]
        .as_str()
        .ok_or_else(|| Error::Refused(format!("{what}: the API server's answer names no CSR")))?
        .to_owned();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let (status, c) = call(api, Method::GET, &format!("{CSRS}/{name}"), None).await?;
        if !status.is_success() {
            return Err(api_refusal(&format!("reading CSR {name}"), status, &c, ""));
        }
        if let Some(cert) = c["status"]["certificate"]
            .as_str()
            .filter(|c| !c.is_empty())
        {
            let pem = b64.decode(cert).map_err(|e| {
                Error::Refused(format!("CSR {name}: the certificate is not base64: {e}"))
            })?;
            return Ok(String::from_utf8_lossy(&pem).into_owned());
        }
        let conditions = c["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(d) = conditions
            .iter()
            .find(|d| d["type"] == "Denied" || d["type"] == "Failed")
        {
            return Err(Error::Identity(format!(
                "CSR {name} {}: {}",
                d["type"].as_str().unwrap_or("").to_lowercase(),
                d["message"].as_str().unwrap_or("")
            )));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Refused(format!(
                "CSR {name} not signed in {wait:?}: is a tunnel server running with --csr-signer?"
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

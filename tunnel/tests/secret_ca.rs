//! The CA kept in a Kubernetes Secret, against kube-rs's `tower-test` mock service (there is no
//! kube-apiserver on these machines), request by request: created on first start, a racing
//! replica's AlreadyExists taken as "use theirs", mirrored into private files, and a rotation
//! written back by resourceVersion with a conflict and retry.
use std::{collections::BTreeMap, time::Duration};

use http::{Method, Request, Response, StatusCode};
use kube::{Client, client::Body};
use serde_json::{Value, json};
use tunnel::pki::{ca::CaDir, secret::SecretCa};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const PATH: &str = "/api/v1/namespaces/edge-redirector/secrets/tunnel-ca";

fn mock() -> (SecretCa, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    (
        SecretCa::new(client, "edge-redirector", "tunnel-ca"),
        handle,
    )
}

fn respond(code: StatusCode, body: Value) -> Response<Body> {
    let mut r = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
    *r.status_mut() = code;
    r
}

fn status(code: StatusCode, reason: &str) -> Response<Body> {
    respond(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code.as_u16(), "message": reason}),
    )
}

async fn body(req: Request<Body>) -> Value {
    serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap()
}

fn secret(data: &Value, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
           "metadata": {"name": "tunnel-ca", "namespace": "edge-redirector", "resourceVersion": rv},
           "data": data})
}

fn temp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("secret-ca-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[tokio::test]
async fn created_on_first_start_mirrored_and_rotated_by_resource_version() {
    let (ca, mut api) = mock();
    let dir = temp("lifecycle");
    let server = tokio::spawn(async move {
        // ensure(): absent, so created with a CA certificate and key.
        let (req, send) = api.next_request().await.unwrap();
        assert_eq!((req.method(), req.uri().path()), (&Method::GET, PATH));
        send.send_response(status(StatusCode::NOT_FOUND, "NotFound"));
        let (req, send) = api.next_request().await.unwrap();
        assert_eq!(req.method(), Method::POST);
        let created = body(req).await;
        let data = created["data"].clone();
        assert!(
            data["ca.crt"].is_string() && data["ca.key"].is_string(),
            "{created}"
        );
        send.send_response(respond(StatusCode::CREATED, secret(&data, "1")));

        // pull(): the mirror gets both files.
        let (_, send) = api.next_request().await.unwrap();
        send.send_response(respond(StatusCode::OK, secret(&data, "1")));

        // update(rotate): the first write loses a race (409), the reread one wins.
        let (_, send) = api.next_request().await.unwrap();
        send.send_response(respond(StatusCode::OK, secret(&data, "1")));
        let (req, send) = api.next_request().await.unwrap();
        assert_eq!(req.method(), Method::PUT);
        assert_eq!(body(req).await["metadata"]["resourceVersion"], "1");
        send.send_response(status(StatusCode::CONFLICT, "Conflict"));
        let (_, send) = api.next_request().await.unwrap();
        send.send_response(respond(StatusCode::OK, secret(&data, "2")));
        let (req, send) = api.next_request().await.unwrap();
        let rotated = body(req).await;
        assert_eq!(rotated["metadata"]["resourceVersion"], "2");
        let keys: Vec<&str> = rotated["data"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            ["ca-previous.crt", "ca-previous.key", "ca.crt", "ca.key"]
        );
        assert_eq!(
            rotated["data"]["ca-previous.crt"], data["ca.crt"],
            "the old CA is kept, trusted"
        );
        assert_ne!(rotated["data"]["ca.crt"], data["ca.crt"], "a new CA signs");
        send.send_response(respond(StatusCode::OK, rotated.clone()));

        // pull() after the rotation: four files now.
        let (_, send) = api.next_request().await.unwrap();
        send.send_response(respond(StatusCode::OK, rotated));
    });
    assert!(ca.ensure().await.unwrap(), "created");
    assert!(ca.pull(&dir).await.unwrap());
    let mirrored = CaDir::new(&dir);
    let first = mirrored.current().unwrap().cert_pem;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(dir.join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    ca.update(CaDir::rotate).await.unwrap();
    assert!(ca.pull(&dir).await.unwrap());
    assert_eq!(
        mirrored.for_server().unwrap().cert_pem,
        first,
        "servers keep the old CA's certificate in the overlap"
    );
    assert_eq!(
        mirrored
            .bundle()
            .unwrap()
            .matches("BEGIN CERTIFICATE")
            .count(),
        2
    );
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_replica_racing_the_creation_uses_the_winners_ca() {
    let (ca, mut api) = mock();
    let server = tokio::spawn(async move {
        let (_, send) = api.next_request().await.unwrap();
        send.send_response(status(StatusCode::NOT_FOUND, "NotFound"));
        let (_, send) = api.next_request().await.unwrap();
        send.send_response(status(StatusCode::CONFLICT, "AlreadyExists"));
    });
    assert!(
        !ca.ensure().await.unwrap(),
        "not created by this replica, and not an error"
    );
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();

    // A Secret without the CA's key is an error naming the fix.
    let (ca, mut api) = mock();
    let server = tokio::spawn(async move {
        let (_, send) = api.next_request().await.unwrap();
        let data: BTreeMap<&str, &str> = BTreeMap::from([("ca.crt", "eA==")]);
        send.send_response(respond(StatusCode::OK, secret(&json!(data), "3")));
    });
    let e = ca.pull(&temp("broken")).await.unwrap_err().to_string();
    assert!(
        e.contains("lacks ca.crt or ca.key") && e.contains("delete it"),
        "{e}"
    );
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
}

//! The Kubernetes side of node sync, against kube-rs's `tower-test` mock service (there is no
//! kube-apiserver on these machines): the allocation conflict-and-retry path as a strict
//! request-by-request scenario, Event creation, and the Node watcher end to end. For the
//! watcher the requests interleave (watch, ConfigMap reads and writes, Events), which a fixed
//! sequence cannot express, so that test answers them with a small in-process fake API
//! server behind the same mock: it keeps one ConfigMap with real resourceVersion
//! compare-and-swap and records everything else.
use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http::{Method, Request, Response, StatusCode};
use kube::{Client, client::Body};
use redirector::nodes::{
    events::{NodeEvents, reason},
    pool::Pool,
    store::{KubeStore, allocate},
    sync::{KubeSync, SyncConfig, SyncMetrics, run_kube},
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn mock() -> (Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
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

fn configmap(data: &str, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "edge-redirector-tunnel-addresses", "namespace": "edge-redirector", "resourceVersion": rv},
           "data": {"allocations": data}})
}

async fn body_json(req: Request<Body>) -> Value {
    let bytes = req.into_body().collect_bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

const CM_PATH: &str =
    "/api/v1/namespaces/edge-redirector/configmaps/edge-redirector-tunnel-addresses";

#[tokio::test]
async fn allocation_conflict_rereads_and_retries_without_taking_a_taken_address() {
    let (client, mut api) = mock();
    let server = tokio::spawn(async move {
        let (req, send) = api.next_request().await.unwrap();
        assert_eq!((req.method(), req.uri().path()), (&Method::GET, CM_PATH));
        send.send_response(respond(
            StatusCode::OK,
            configmap("other 100.64.0.1\n", "5"),
        ));

        // Our write carries the version we read; someone else wrote first: 409.
        let (req, send) = api.next_request().await.unwrap();
        assert_eq!((req.method(), req.uri().path()), (&Method::PUT, CM_PATH));
        let b = body_json(req).await;
        assert_eq!(b["metadata"]["resourceVersion"], "5");
        assert!(
            b["data"]["allocations"]
                .as_str()
                .unwrap()
                .contains("mine 100.64.0.2\n")
        );
        send.send_response(status(StatusCode::CONFLICT, "Conflict"));

        // Reread: the other writer took .2.
        let (req, send) = api.next_request().await.unwrap();
        assert_eq!(req.method(), Method::GET);
        send.send_response(respond(
            StatusCode::OK,
            configmap("other 100.64.0.1\nthird 100.64.0.2\n", "6"),
        ));

        let (req, send) = api.next_request().await.unwrap();
        assert_eq!(req.method(), Method::PUT);
        let b = body_json(req).await;
        assert_eq!(b["metadata"]["resourceVersion"], "6");
        assert_eq!(
            b["data"]["allocations"],
            "mine 100.64.0.3\nother 100.64.0.1\nthird 100.64.0.2\n"
        );
        send.send_response(respond(StatusCode::OK, configmap("", "7")));
    });
    let store = KubeStore::new(
        client,
        "edge-redirector",
        "edge-redirector-tunnel-addresses",
    );
    let pool = Pool::parse("100.64.0.0/24").unwrap();
    let wanted = BTreeSet::from(["mine".to_owned()]);
    // Hold the others: they are nodes this replica has not seen yet.
    let (plan, _) = allocate(&store, &pool, &wanted, &|_| true).await.unwrap();
    assert_eq!(plan.allocations["mine"], IpAddr::from([100, 64, 0, 3]));
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_node_event_is_created_on_the_node() {
    let (client, mut api) = mock();
    let server = tokio::spawn(async move {
        let (req, send) = api.next_request().await.unwrap();
        assert_eq!(req.method(), Method::POST);
        assert_eq!(
            req.uri().path(),
            "/apis/events.k8s.io/v1/namespaces/default/events"
        );
        let b = body_json(req).await;
        send.send_response(respond(StatusCode::CREATED, b.clone()));
        b
    });
    NodeEvents::new(client, Some("master-1".into()))
        .warn(
            "edge-a",
            Some("uid-a".into()),
            reason::AMBIGUOUS_ADDRESS,
            "address 192.0.2.10 is listed by nodes [\"edge-a\", \"edge-b\"]",
        )
        .await;
    let ev = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev["regarding"]["kind"], "Node");
    assert_eq!(ev["regarding"]["name"], "edge-a");
    assert_eq!(ev["regarding"]["uid"], "uid-a");
    assert_eq!(ev["reason"], reason::AMBIGUOUS_ADDRESS);
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["reportingController"], "edge-redirector");
    assert!(ev["note"].as_str().unwrap().contains("edge-b"));
}

fn node(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "1",
                        "labels": {"node-role.kubernetes.io/edge": ""}},
           "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
}

/// What the fake API server saw.
#[derive(Default)]
struct Seen {
    list_queries: Vec<String>,
    events: Vec<Value>,
    hosts: Vec<String>,
}

/// Answers the watcher's list and watches, the allocation ConfigMap (with resourceVersion
/// compare-and-swap), Events and the CoreDNS ConfigMap patch.
async fn fake_api(mut api: Handle, seen: Arc<Mutex<Seen>>) {
    let mut cm: Option<(String, u64)> = None;
    let mut watches = 0;
    let mut parked = Vec::new();
    while let Some((req, send)) = api.next_request().await {
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        let query = req.uri().query().unwrap_or("").to_owned();
        let reply = match (method, path.as_str()) {
            (Method::GET, "/api/v1/nodes") if !query.contains("watch=true") => {
                seen.lock().unwrap().list_queries.push(query);
                respond(
                    StatusCode::OK,
                    json!({"kind": "NodeList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": "10"},
                    "items": [node("edge-a", "192.0.2.10"), node("edge-b", "192.0.2.10")]}),
                )
            }
            (Method::GET, "/api/v1/nodes") => {
                watches += 1;
                if watches > 1 {
                    // Later watches stay open and quiet.
                    parked.push(send);
                    continue;
                }
                // A second after the list's reconciliation: a single-node change.
                let ev = json!({"type": "ADDED", "object": node("edge-c", "192.0.2.30")});
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(1000)).await;
                    send.send_response(Response::new(Body::from(format!("{ev}\n").into_bytes())));
                });
                continue;
            }
            (Method::GET, CM_PATH) => match &cm {
                None => status(StatusCode::NOT_FOUND, "NotFound"),
                Some((data, rv)) => respond(StatusCode::OK, configmap(data, &rv.to_string())),
            },
            (Method::POST, "/api/v1/namespaces/edge-redirector/configmaps") => {
                let b = body_json(req).await;
                if cm.is_some() {
                    status(StatusCode::CONFLICT, "AlreadyExists")
                } else {
                    cm = Some((b["data"]["allocations"].as_str().unwrap().to_owned(), 1));
                    respond(StatusCode::CREATED, configmap("", "1"))
                }
            }
            (Method::PUT, CM_PATH) => {
                let b = body_json(req).await;
                let rv: u64 = b["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                match &mut cm {
                    Some((data, cur)) if *cur == rv => {
                        *data = b["data"]["allocations"].as_str().unwrap().to_owned();
                        *cur += 1;
                        respond(StatusCode::OK, configmap(data, &cur.to_string()))
                    }
                    _ => status(StatusCode::CONFLICT, "Conflict"),
                }
            }
            (Method::POST, "/apis/events.k8s.io/v1/namespaces/default/events") => {
                let b = body_json(req).await;
                seen.lock().unwrap().events.push(b.clone());
                respond(StatusCode::CREATED, b)
            }
            (
                Method::PATCH,
                "/api/v1/namespaces/edge-redirector/configmaps/edge-redirector-hosts",
            ) => {
                let b = body_json(req).await;
                seen.lock()
                    .unwrap()
                    .hosts
                    .push(b["data"]["hosts"].as_str().unwrap_or("").to_owned());
                respond(StatusCode::OK, b)
            }
            (m, p) => panic!("unexpected request {m} {p}?{query}"),
        };
        send.send_response(reply);
    }
}

#[tokio::test]
async fn node_watcher_keeps_the_node_table_in_step_with_events_and_coredns_hosts() {
    let dir = std::env::temp_dir().join(format!("node-sync-watch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("nodes.txt");
    let (client, api) = mock();
    let seen = Arc::new(Mutex::new(Seen::default()));
    tokio::spawn(fake_api(api, seen.clone()));
    let shutdown = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let cfg = SyncConfig {
        pool: Pool::parse("198.51.100.0/24").unwrap(),
        out: out.clone(),
        release_after: Duration::from_secs(300),
        resync: Duration::from_secs(30),
    };
    let k = KubeSync {
        selector: "node-role.kubernetes.io/edge".into(),
        namespace: "edge-redirector".into(),
        allocations: "edge-redirector-tunnel-addresses".into(),
        coredns: Some("edge-redirector-hosts".into()),
        instance: Some("master-1".into()),
    };
    let task = tokio::spawn(run_kube(
        client,
        k,
        cfg,
        SyncMetrics::default(),
        ready.clone(),
        shutdown.clone(),
    ));

    // The list (2 nodes) and the watch's ADDED (edge-c: the single-node path, a journal
    // entry with an allocation of its own) end up in the table its followers read.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let snap = loop {
        if let Ok(f) = redirector::follow::Follower::open(&out)
            && f.current().len() == 3
        {
            break f.current();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node table: {:?}",
            std::fs::read_to_string(&out)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(ready.load(Ordering::Relaxed));
    assert_eq!(
        snap.journal_entries(),
        1,
        "edge-c came as one journal entry"
    );
    let t = snap.table().into_owned();
    let table = t.render();
    assert_eq!(t.tunnel.len(), 3, "{table}");
    let distinct: BTreeSet<_> = t.tunnel.values().collect();
    assert_eq!(distinct.len(), 3);
    assert_eq!(t.owners()[&IpAddr::from([192, 0, 2, 10])].len(), 2);

    // Wait for the side effects of the last reconciliation.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let done = {
            let s = seen.lock().unwrap();
            let named: BTreeSet<&str> = s
                .events
                .iter()
                .filter_map(|e| e["regarding"]["name"].as_str())
                .collect();
            if named.len() == 2 && s.hosts.last().is_some_and(|h| h.contains("edge-c")) {
                // Ambiguity: an Event on both nodes, nothing on edge-c.
                assert!(
                    named.contains("edge-a") && named.contains("edge-b"),
                    "{named:?}"
                );
                assert!(
                    s.events
                        .iter()
                        .all(|e| e["reason"] == reason::AMBIGUOUS_ADDRESS)
                );
                for (n, ip) in &t.tunnel {
                    assert!(s.hosts.last().unwrap().contains(&format!("{ip} {n}\n")));
                }
                assert!(
                    s.list_queries[0].contains("labelSelector=node-role.kubernetes.io%2Fedge"),
                    "{:?}",
                    s.list_queries
                );
                true
            } else {
                false
            }
        };
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events or hosts missing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

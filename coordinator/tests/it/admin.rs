//! Admin API: authentication, node reads and updates, validation and error format, audit log, health, metrics and
//! the OpenAPI document.

use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::harness::{Backend, Coord, TestDb, error_code, key};

both_backends! {
    auth_and_node_management => auth_and_node_management;
    bad_inputs_are_400_in_our_format => bad_inputs_are_400_in_our_format;
    audit_health_metrics_openapi => audit_health_metrics_openapi;
    names_are_safe_unique_and_qualified => names_are_safe_unique_and_qualified;
    a_changed_dns_domain_reaches_resuming_nodes => a_changed_dns_domain_reaches_resuming_nodes;
}

/// Names: hostile admin input is a 400 that says what is allowed, joins are made safe (and unique with `-2`),
/// every node shows its FQDN, and the map carries the domain.
async fn names_are_safe_unique_and_qualified(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let token = c.token(json!({"reusable": true})).await;
    let a = c.join(&token, &key(1), "gpu-server").await;
    assert_eq!(a.name, "gpu-server");
    assert_eq!(
        c.join(&token, &key(2), "gpu-server").await.name,
        "gpu-server-2",
        "a collision gets -2"
    );
    assert_eq!(
        c.join(&token, &key(3), "localhost").await.name,
        "node",
        "a reserved hostname is not kept"
    );
    assert_eq!(
        c.join(&token, &key(4), "12345").await.name,
        "node-12345",
        "a number is not an address"
    );
    assert_eq!(c.join(&token, &key(5), "My Mac.local").await.name, "my-mac");

    let path = format!("/api/v1/nodes/{}", a.node_id);
    let long = "x".repeat(300);
    for hostile in [
        "localhost",
        "",
        &long,
        "../x",
        "a b",
        "gpü",
        "10.77.0.3",
        "123",
        "wpad",
        "-x",
        "X",
    ] {
        let r = c
            .admin_send(Method::PATCH, &path, Some(json!({ "name": hostile })))
            .await;
        let status = r.status().as_u16();
        let body: Value = r.json().await.expect("json");
        assert_eq!(status, 400, "PATCH name {hostile:?}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("a-z") && message.contains("63"),
            "says what is allowed: {message}"
        );
        let r = c
            .admin_send(
                Method::POST,
                "/api/v1/nodes",
                Some(json!({"name": hostile, "public_key": key(9).to_string()})),
            )
            .await;
        assert_eq!(r.status(), 400, "device name {hostile:?}");
    }
    let one: Value = c.admin_json(Method::GET, &path).await;
    assert_eq!(one["name"], "gpu-server", "nothing was renamed");
    assert_eq!(one["fqdn"], "gpu-server.mesh.internal");

    let r = c
        .admin_send(Method::PATCH, &path, Some(json!({"name": "gpu-big"})))
        .await;
    let v: Value = r.json().await.expect("json");
    assert_eq!(
        (v["name"].as_str(), v["fqdn"].as_str()),
        (Some("gpu-big"), Some("gpu-big.mesh.internal"))
    );
    let nodes: Vec<Value> = c.admin_json(Method::GET, "/api/v1/nodes").await;
    assert!(
        nodes
            .iter()
            .all(|n| n["fqdn"].as_str().is_some_and(|f| f.ends_with(".mesh.internal")))
    );

    let mut stream = c.stream(&a.credential, None, None).await;
    let meshd_protocol::MapMessage::Full { map } = stream.next(std::time::Duration::from_secs(5)).await else {
        panic!("the first message is the full map");
    };
    assert_eq!(map.dns.expect("dns in the map").domain, "mesh.internal");
    assert_eq!(map.self_node.name, "gpu-big");
    c.stop().await;
}

/// A coordinator restarted with another `--dns-domain` sends every resuming node a full map with it (the domain
/// is only in full maps); restarted with the same settings, a resume stays quiet.
async fn a_changed_dns_domain_reaches_resuming_nodes(backend: Backend) {
    use meshd_protocol::MapMessage;
    use std::time::Duration;
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let token = c.token(json!({"reusable": true})).await;
    let a = c.join(&token, &key(1), "alpha").await;
    let mut stream = c.stream(&a.credential, None, None).await;
    let MapMessage::Full { map } = stream.next(Duration::from_secs(5)).await else {
        panic!("full map first");
    };
    let version = map.version.to_string();
    drop(stream);
    c.stop().await;

    // Same settings: a resume is quiet (no full map).
    let c = Coord::start(&db).await;
    let mut stream = c.stream(&a.credential, Some(&version), None).await;
    assert!(
        !matches!(
            stream.try_next(Duration::from_millis(500)).await,
            Some(MapMessage::Full { .. })
        ),
        "nothing changed: no full map"
    );
    drop(stream);
    c.stop().await;

    let c = Coord::start_with(&db, |config| config.dns_domain = "team.example.com".into()).await;
    let mut stream = c.stream(&a.credential, Some(&version), None).await;
    let MapMessage::Full { map } = stream.next(Duration::from_secs(5)).await else {
        panic!("a resume after a domain change gets a full map");
    };
    assert_eq!(map.dns.expect("dns").domain, "team.example.com");
    let node: Value = c.admin_json(Method::GET, &format!("/api/v1/nodes/{}", a.node_id)).await;
    assert_eq!(node["fqdn"], "alpha.team.example.com");
    c.stop().await;
}

async fn auth_and_node_management(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;

    // No key, malformed key, unknown key, a node credential instead of an admin key.
    let r = c.client.get(c.url("/api/v1/nodes")).send().await.expect("send");
    assert_eq!(error_code(r).await, (401, "unauthorized".into()));
    let r = c
        .client
        .get(c.url("/api/v1/nodes"))
        .bearer_auth("nonsense")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    let mut wrong = c.admin_key.clone();
    wrong.pop();
    wrong.push(if c.admin_key.ends_with('A') { 'B' } else { 'A' });
    let r = c
        .client
        .get(c.url("/api/v1/nodes"))
        .bearer_auth(&wrong)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    let token = c.token(json!({"reusable": true})).await;
    let a = c.join(&token, &key(1), "alpha").await;
    let r = c
        .client
        .get(c.url("/api/v1/nodes"))
        .bearer_auth(&a.credential)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401, "a node credential is not an admin key");
    let r = c
        .client
        .get(c.url("/api/v1/map"))
        .bearer_auth(&c.admin_key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401, "an admin key is not a node credential");

    let b = c.join(&token, &key(2), "beta").await;
    let nodes: Vec<Value> = c.admin_json(Method::GET, "/api/v1/nodes").await;
    assert_eq!(nodes.len(), 2);
    for field in [
        "id",
        "name",
        "ip",
        "public_key",
        "online",
        "last_seen",
        "tags",
        "endpoints",
        "kind",
    ] {
        assert!(nodes[0].get(field).is_some(), "node has `{field}`");
    }
    assert_eq!(nodes[0]["public_key"], key(1).to_string());
    assert_eq!(nodes[0]["kind"], "meshd");

    let one: Value = c.admin_json(Method::GET, &format!("/api/v1/nodes/{}", b.node_id)).await;
    assert_eq!(one["name"], "beta");
    assert_eq!(one["ip"], "10.77.0.3");

    // PATCH: rename, retag, conflicts, validation.
    let r = c
        .admin_send(
            Method::PATCH,
            &format!("/api/v1/nodes/{}", b.node_id),
            Some(json!({"tags": ["b", "a", "a"]})),
        )
        .await;
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["tags"], json!(["a", "b"]));
    assert_eq!(v["name"], "beta");
    let r = c
        .admin_send(
            Method::PATCH,
            &format!("/api/v1/nodes/{}", b.node_id),
            Some(json!({"name": "alpha"})),
        )
        .await;
    assert_eq!(error_code(r).await, (409, "conflict".into()));
    let r = c
        .admin_send(
            Method::PATCH,
            &format!("/api/v1/nodes/{}", b.node_id),
            Some(json!({"name": "Not Valid"})),
        )
        .await;
    assert_eq!(error_code(r).await, (400, "bad_request".into()));
    let r = c
        .admin_send(Method::PATCH, "/api/v1/nodes/999", Some(json!({"name": "x"})))
        .await;
    assert_eq!(error_code(r).await, (404, "not_found".into()));
    let r = c
        .admin_send(
            Method::PATCH,
            &format!("/api/v1/nodes/{}", b.node_id),
            Some(json!({"name": "beta-2"})),
        )
        .await;
    assert_eq!(r.status(), 200);

    // DELETE by admin; the address is then reused by the next node (lowest free).
    let r = c
        .admin_send(Method::DELETE, &format!("/api/v1/nodes/{}", a.node_id), None)
        .await;
    assert_eq!(r.status(), 204);
    let d = c.join(&token, &key(3), "delta").await;
    assert_eq!(d.ip.to_string(), "10.77.0.2");
    assert!(d.node_id > b.node_id, "ids are never reused");
    c.stop().await;
}

async fn bad_inputs_are_400_in_our_format(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let token = c.token(json!({"reusable": true})).await;
    let a = c.join(&token, &key(1), "a").await;
    let join = c.url("/api/v1/join");

    // Broken JSON, wrong types, missing fields, missing content type.
    let r = c
        .client
        .post(&join)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(r).await, (400, "bad_request".into()));
    let r = c
        .client
        .post(&join)
        .json(&json!({"token": token, "public_key": 5, "hostname": "x"}))
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(r).await, (400, "bad_request".into()));
    let r = c
        .client
        .post(&join)
        .json(&json!({"token": token}))
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(r).await, (400, "bad_request".into()));
    let r = c
        .client
        .post(&join)
        .body(json!({"token": token, "public_key": key(9).to_string(), "hostname": "x"}).to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(r).await, (400, "bad_request".into()));

    // Bad keys: short, not base64, all zero.
    for bad in ["AAAA", "not base64!", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="] {
        let r = c
            .client
            .post(&join)
            .json(&json!({"token": token, "public_key": bad, "hostname": "x"}))
            .send()
            .await
            .expect("send");
        let (status, code) = error_code(r).await;
        assert_eq!((status, code.as_str()), (400, "bad_request"), "key {bad}");
    }
    let r = c
        .client
        .post(&join)
        .json(&json!({"token": token, "public_key": key(9).to_string(), "hostname": "h".repeat(300)}))
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(r).await, (400, "bad_request".into()));

    // Oversized body: 413 in our format, never a 500.
    let huge = json!({"token": "x".repeat(200_000), "public_key": key(9).to_string(), "hostname": "x"});
    let r = c.client.post(&join).json(&huge).send().await.expect("send");
    assert_eq!(error_code(r).await, (413, "payload_too_large".into()));

    // Endpoint reports: too many, unusable, not addresses.
    let endpoints = c.url("/api/v1/node/endpoints");
    let many: Vec<String> = (0..17).map(|i| format!("198.18.0.{i}:51820")).collect();
    for body in [
        json!({"endpoints": many}),
        json!({"endpoints": ["0.0.0.0:51820"]}),
        json!({"endpoints": ["198.18.0.1:0"]}),
        json!({"endpoints": ["nope"]}),
        json!({}),
    ] {
        let r = c
            .client
            .put(&endpoints)
            .bearer_auth(&a.credential)
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(error_code(r).await, (400, "bad_request".into()), "{body}");
    }

    // Paths and routes.
    let r = c.admin_send(Method::GET, "/api/v1/nodes/abc", None).await;
    assert_eq!(error_code(r).await, (400, "bad_request".into()));
    let r = c.admin_send(Method::GET, "/api/v1/nodes/424242", None).await;
    assert_eq!(error_code(r).await, (404, "not_found".into()));
    let r = c.admin_send(Method::GET, "/api/v1/nope", None).await;
    assert_eq!(error_code(r).await, (404, "not_found".into()));
    let r = c.admin_send(Method::PUT, "/api/v1/tokens", None).await;
    assert_eq!(error_code(r).await.0, 405);
    let r = c.admin_send(Method::GET, "/api/v1/audit?limit=0", None).await;
    assert_eq!(error_code(r).await, (400, "bad_request".into()));
    let r = c.admin_send(Method::GET, "/api/v1/audit?limit=abc", None).await;
    assert_eq!(error_code(r).await, (400, "bad_request".into()));
    c.stop().await;
}

/// Every route of issue 2 (and the device routes), as (method, OpenAPI path).
const ROUTES: &[(&str, &str)] = &[
    ("get", "/api/v1/info"),
    ("post", "/api/v1/join"),
    ("get", "/api/v1/map"),
    ("put", "/api/v1/node/endpoints"),
    ("get", "/api/v1/node/preshared-keys"),
    ("delete", "/api/v1/node"),
    ("get", "/api/v1/relay"),
    ("post", "/api/v1/tokens"),
    ("get", "/api/v1/tokens"),
    ("delete", "/api/v1/tokens/{id}"),
    ("get", "/api/v1/nodes"),
    ("post", "/api/v1/nodes"),
    ("get", "/api/v1/nodes/{id}"),
    ("patch", "/api/v1/nodes/{id}"),
    ("delete", "/api/v1/nodes/{id}"),
    ("get", "/api/v1/nodes/{id}/wireguard-config"),
    ("get", "/api/v1/audit"),
    ("get", "/api/v1/gateway"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/api/v1/openapi.json"),
];

async fn audit_health_metrics_openapi(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let token = c.token(json!({"reusable": true, "tags": ["t"]})).await;
    let a = c.join(&token, &key(1), "a").await;
    let _ = c
        .admin_send(
            Method::PATCH,
            &format!("/api/v1/nodes/{}", a.node_id),
            Some(json!({"name": "aa"})),
        )
        .await;
    let _ = c
        .admin_send(Method::DELETE, &format!("/api/v1/nodes/{}", a.node_id), None)
        .await;

    let audit: Vec<Value> = c.admin_json(Method::GET, "/api/v1/audit").await;
    let actions: Vec<&str> = audit.iter().map(|e| e["action"].as_str().expect("action")).collect();
    assert_eq!(
        &actions[..4],
        &["node.delete", "node.update", "join", "token.create"],
        "newest first"
    );
    assert!(audit[0]["actor"].as_str().expect("actor").starts_with("apikey:"));
    assert!(audit[2]["actor"].as_str().expect("actor").starts_with("token:"));
    let page: Vec<Value> = c
        .admin_json(Method::GET, &format!("/api/v1/audit?limit=1&before={}", audit[0]["id"]))
        .await;
    assert_eq!(page.len(), 1);
    assert_eq!(page[0]["action"], "node.update");
    let r = c.client.get(c.url("/api/v1/audit")).send().await.expect("send");
    assert_eq!(r.status(), 401);

    let health: Value = c
        .client
        .get(c.url("/healthz"))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(health["status"], "ok");
    assert_eq!(
        health["database"],
        if matches!(backend, Backend::Sqlite) {
            "sqlite"
        } else {
            "postgres"
        }
    );
    assert_eq!(health["writable"], true, "{health}");
    assert!(
        health.get("write_error").is_none(),
        "absent while writes work: {health}"
    );
    let r = c.client.get(c.url("/readyz")).send().await.expect("send");
    assert_eq!(r.status(), 200);
    let ready: Value = r.json().await.expect("json");
    assert_eq!(ready["status"], "ready");

    let b = c.join(&token, &key(2), "b").await;
    let mut s = c.stream(&b.credential, None, None).await;
    let _ = s.next(std::time::Duration::from_secs(5)).await;
    let metrics = c.metrics_text().await;
    for needle in [
        "meshd_nodes 1\n",
        "meshd_nodes_online 1\n",
        "meshd_joins_total",
        "meshd_map_updates_sent_total",
        "meshd_http_request_duration_seconds_bucket",
        "route=\"/api/v1/join\"",
    ] {
        assert!(metrics.contains(needle), "metrics contain {needle:?}");
    }

    let doc: Value = c
        .client
        .get(c.url("/api/v1/openapi.json"))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert!(doc["openapi"].as_str().expect("version").starts_with("3."));
    let paths = doc["paths"].as_object().expect("paths");
    for (method, path) in ROUTES {
        assert!(
            paths.get(*path).and_then(|p| p.get(*method)).is_some(),
            "OpenAPI document lacks {method} {path}"
        );
    }
    let documented: usize = paths
        .values()
        .map(|p| {
            p.as_object()
                .expect("item")
                .keys()
                .filter(|k| *k != "parameters")
                .count()
        })
        .sum();
    assert_eq!(documented, ROUTES.len(), "no undocumented or unexpected routes");
    for schema in [
        "CoordinatorInfo",
        "JoinRequest",
        "JoinResponse",
        "MapMessage",
        "ErrorBody",
        "NodeInfo",
        "TokenInfo",
        "PresharedKeys",
    ] {
        assert!(doc["components"]["schemas"].get(schema).is_some(), "schema {schema}");
    }
    c.stop().await;
}

/// A client that stops sending its body gets a 408 in our format instead of holding the handler forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_body_times_out() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let c = Coord::start_with(&db, |cfg| cfg.request_timeout = std::time::Duration::from_millis(500)).await;
    let first: Result<&'static [u8], std::io::Error> = Ok(b"{\"token\": \"");
    let body = futures::stream::iter([first]).chain(futures::stream::pending());
    let started = std::time::Instant::now();
    let r = c
        .client
        .post(c.url("/api/v1/join"))
        .header("content-type", "application/json")
        .header("content-length", "200")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(r).await, (408, "timeout".into()));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    c.stop().await;
}

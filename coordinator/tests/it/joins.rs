//! Enrolment: the join flow, token rules, concurrency (200 joins, single-use races), re-joins.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::both_backends;
use crate::harness::{Backend, Coord, TestDb, error_code, key, token_id};
use meshd_protocol::JoinToken;

both_backends! {
    join_basics => join_basics;
    two_hundred_concurrent_joins => two_hundred_concurrent_joins;
    single_use_token_race => single_use_token_race;
    token_rules => token_rules;
    small_network_fills_and_reuses => small_network_fills_and_reuses;
}

async fn small_network_fills_and_reuses(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start_with(&db, |cfg| cfg.network = "10.9.0.0/29".parse().expect("cidr")).await;
    let token = c.token(json!({"reusable": true})).await;
    let mut ids = Vec::new();
    for i in 0..5u32 {
        let j = c.join(&token, &key(i), "n").await;
        assert_eq!(j.ip.to_string(), format!("10.9.0.{}", i + 2));
        assert_eq!(j.network.to_string(), "10.9.0.0/29");
        ids.push(j.node_id);
    }
    let r = c.join_raw(&token, &key(9), "n").await;
    assert_eq!(error_code(r).await, (409, "network_full".into()));
    // Free two addresses (a gap in the middle and one at the top): the lowest is reused first.
    for id in [ids[3], ids[1]] {
        let r = c
            .admin_send(reqwest::Method::DELETE, &format!("/api/v1/nodes/{id}"), None)
            .await;
        assert_eq!(r.status(), 204);
    }
    assert_eq!(c.join(&token, &key(10), "n").await.ip.to_string(), "10.9.0.3");
    assert_eq!(c.join(&token, &key(11), "n").await.ip.to_string(), "10.9.0.5");
    let r = c.join_raw(&token, &key(12), "n").await;
    assert_eq!(error_code(r).await, (409, "network_full".into()));
    c.stop().await;
}

async fn join_basics(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let token = c.token(json!({"uses": 3, "tags": ["gpu", "lab"]})).await;
    let parsed = JoinToken::parse(&token).expect("token parses");
    assert_eq!(parsed.coordinator_url, c.base);
    assert!(parsed.fingerprint.is_none(), "plain HTTP: no pin");

    let a = c.join(&token, &key(1), "Laptop").await;
    assert_eq!(a.name, "laptop");
    assert_eq!(a.ip.to_string(), "10.77.0.2", "lowest free address; .1 is reserved");
    assert_eq!(a.network.to_string(), "10.77.0.0/16");
    assert_eq!(a.tags, vec!["gpu", "lab"], "tags inherited from the token");
    assert_eq!(a.protocol_version, meshd_protocol::PROTOCOL_VERSION);
    let b = c.join(&token, &key(2), "laptop").await;
    assert_eq!(b.name, "laptop-2", "a second laptop gets a suffix");
    assert_eq!(b.ip.to_string(), "10.77.0.3");
    assert_ne!(a.node_id, b.node_id);

    // Same key again: same node, same address, fresh credential; the old one stops working, and a stream opened with
    // it ends.
    let mut old_stream = c.stream(&a.credential, None, None).await;
    let _ = old_stream.next(Duration::from_secs(5)).await;
    let again = c.join(&token, &key(1), "renamed-host").await;
    assert!(
        old_stream.ends_within(Duration::from_secs(2)).await,
        "the replaced credential's stream ends"
    );
    assert_eq!(
        (again.node_id, again.ip, again.name.as_str()),
        (a.node_id, a.ip, "laptop")
    );
    assert_ne!(again.credential, a.credential);
    let old = c
        .client
        .get(c.url("/api/v1/map"))
        .bearer_auth(&a.credential)
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(old).await, (401, "unauthorized".into()));

    // The token had 3 uses: two new nodes + the re-join of key 1 with the same token consumed none.
    let tokens: Value = c.admin_json(reqwest::Method::GET, "/api/v1/tokens").await;
    assert_eq!(tokens[0]["uses"], 2);
    assert_eq!(tokens[0]["state"], "active");
    let _ = c.join(&token, &key(3), "x").await;
    let r = c.join_raw(&token, &key(4), "y").await;
    assert_eq!(error_code(r).await, (403, "token_used_up".into()));

    // Hostname sanitising.
    let t2 = c.token(json!({"reusable": true})).await;
    assert_eq!(
        c.join(&t2, &key(5), "GPU Server.lab.example.com").await.name,
        "gpu-server"
    );
    assert_eq!(c.join(&t2, &key(6), "!!!").await.name, "node");
    c.stop().await;
}

async fn two_hundred_concurrent_joins(backend: Backend) {
    const N: u32 = 200;
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let token = c.token(json!({"reusable": true})).await;
    let join_key = c.join_key().await;
    let mut tasks = Vec::new();
    for i in 0..N {
        let client = c.client.clone();
        let url = c.url("/api/v1/join");
        let token = token.clone();
        let node = key(1000 + i);
        let proof = node.proof(&join_key, &token_id(&token), &node, "worker");
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .json(&json!({"token": token, "public_key": node.to_string(), "hostname": "worker", "proof": proof}))
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 200);
            r.json::<meshd_protocol::api::JoinResponse>().await.expect("json")
        }));
    }
    let mut ips = HashSet::new();
    let mut names = HashSet::new();
    let mut ids = HashSet::new();
    for t in tasks {
        let j = t.await.expect("task");
        ips.insert(j.ip);
        names.insert(j.name);
        ids.insert(j.node_id);
    }
    assert_eq!(ips.len(), N as usize, "distinct addresses");
    assert_eq!(names.len(), N as usize, "distinct names");
    assert_eq!(ids.len(), N as usize);
    // Densely packed from .2 up: no address skipped or lost.
    let mut sorted: Vec<u32> = ips.iter().map(|ip| u32::from(*ip)).collect();
    sorted.sort();
    assert_eq!(
        sorted.first().copied(),
        Some(u32::from(std::net::Ipv4Addr::new(10, 77, 0, 2)))
    );
    assert_eq!(sorted.last().copied().expect("last") - sorted[0], N - 1);
    let nodes: Vec<Value> = c.admin_json(reqwest::Method::GET, "/api/v1/nodes").await;
    assert_eq!(nodes.len(), N as usize);
    c.stop().await;
}

async fn single_use_token_race(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    for round in 0..5u32 {
        let token = c.token(json!({})).await;
        let (k1, k2) = (key(100 + 2 * round), key(101 + 2 * round));
        let (r1, r2) = tokio::join!(c.join_raw(&token, &k1, "a"), c.join_raw(&token, &k2, "b"));
        let mut statuses = vec![r1.status().as_u16(), r2.status().as_u16()];
        statuses.sort();
        assert_eq!(statuses, vec![200, 403], "round {round}: exactly one join wins");
        let loser = if r1.status() == 403 { r1 } else { r2 };
        assert_eq!(error_code(loser).await.1, "token_used_up");
    }
    let nodes: Vec<Value> = c.admin_json(reqwest::Method::GET, "/api/v1/nodes").await;
    assert_eq!(nodes.len(), 5, "losers enrolled nothing");
    c.stop().await;
}

async fn token_rules(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;

    // Malformed, unknown, wrong secret.
    let r = c.join_raw("not-a-token", &key(1), "h").await;
    assert_eq!(error_code(r).await, (400, "token_invalid".into()));
    let good = c.token(json!({"reusable": true})).await;
    let mut forged = JoinToken::parse(&good).expect("parse");
    forged.secret[0] ^= 1;
    let r = c.join_raw(&forged.encode(), &key(1), "h").await;
    assert_eq!(error_code(r).await, (401, "token_invalid".into()));
    forged.id = "doesnotexist".into();
    let r = c.join_raw(&forged.encode(), &key(1), "h").await;
    assert_eq!(error_code(r).await, (401, "token_invalid".into()));

    // Expired.
    let short = c.token(json!({"expires": "1s"})).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = c.join_raw(&short, &key(2), "h").await;
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "token_expired");
    assert!(
        body["error"]["message"].as_str().expect("msg").contains("token create"),
        "says what to do next"
    );

    // Revoked: joins refused, revoke is listed, unknown id is 404.
    let revoked = c.token(json!({"reusable": true, "tags": ["x"]})).await;
    let id = JoinToken::parse(&revoked).expect("parse").id;
    let r = c
        .admin_send(reqwest::Method::DELETE, &format!("/api/v1/tokens/{id}"), None)
        .await;
    assert_eq!(r.status(), 204);
    let r = c.join_raw(&revoked, &key(3), "h").await;
    assert_eq!(error_code(r).await, (403, "token_revoked".into()));
    let r = c
        .admin_send(reqwest::Method::DELETE, "/api/v1/tokens/nosuchtoken", None)
        .await;
    assert_eq!(error_code(r).await, (404, "not_found".into()));

    // Single-use: the node that used it may repeat its join (no use consumed); another key may not.
    let single = c.token(json!({})).await;
    let first = c.join(&single, &key(4), "one").await;
    let repeat = c.join(&single, &key(4), "one").await;
    assert_eq!((repeat.node_id, repeat.ip), (first.node_id, first.ip));
    let r = c.join_raw(&single, &key(5), "two").await;
    assert_eq!(error_code(r).await, (403, "token_used_up".into()));

    // Listing shows every token and its state; the secret is never listed.
    let list: Vec<Value> = c.admin_json(reqwest::Method::GET, "/api/v1/tokens").await;
    assert_eq!(list.len(), 4);
    let states: HashSet<&str> = list.iter().map(|t| t["state"].as_str().expect("state")).collect();
    assert_eq!(states, HashSet::from(["active", "expired", "revoked", "used_up"]));
    assert!(
        list.iter()
            .all(|t| t.get("token").is_none() && t.get("secret_hash").is_none())
    );

    // Bad token-create requests.
    for body in [
        json!({"uses": 0}),
        json!({"expires": "soon"}),
        json!({"reusable": true, "uses": 2}),
        json!({"tags": ["bad tag"]}),
        json!({"unknown": 1}),
    ] {
        let r = c
            .admin_send(reqwest::Method::POST, "/api/v1/tokens", Some(body.clone()))
            .await;
        assert_eq!(error_code(r).await, (400, "bad_request".into()), "{body}");
    }
    c.stop().await;
}

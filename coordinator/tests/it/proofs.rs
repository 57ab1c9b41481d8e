//! Proof of possession at join: a token holder cannot take over another node's record with its public key, proofs
//! are bound to the token id and hostname, and the join key published by `GET /api/v1/info` survives restarts.

use std::time::Duration;

use meshd_protocol::MapMessage;
use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::harness::{Backend, Coord, TestDb, key, token_id};

both_backends! {
    hijack_with_another_nodes_key_is_refused => hijack_with_another_nodes_key_is_refused;
    proof_is_bound_to_token_and_hostname => proof_is_bound_to_token_and_hostname;
    join_key_is_stable_across_restart => join_key_is_stable_across_restart;
}

/// Asserts a 401 `proof_invalid` whose message says what is wrong.
async fn assert_proof_invalid(r: reqwest::Response, what: &str) {
    assert_eq!(r.status(), 401, "{what}");
    let body: Value = r.json().await.expect("error body");
    assert_eq!(body["error"]["code"], "proof_invalid", "{what}: {body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("private key"), "{what}: {message}");
}

async fn nodes(c: &Coord) -> Vec<Value> {
    c.admin_json(Method::GET, "/api/v1/nodes").await
}

async fn hijack_with_another_nodes_key_is_refused(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let token = c.token(json!({"reusable": true})).await;
    let join_key = c.join_key().await;
    let (victim_key, attacker_key) = (key(1), key(2));
    let victim = c.join(&token, &victim_key, "victim").await;
    let attacker = c.join(&token, &attacker_key, "attacker").await;
    let mut victim_stream = c.stream(&victim.credential, None, None).await;
    assert!(matches!(
        victim_stream.next(Duration::from_secs(5)).await,
        MapMessage::Full { .. }
    ));
    let tid = token_id(&token);

    // The attacker holds the shared token and the victim's public key (it is in every map), not its private key.
    let r = c.join_with_proof(&token, &victim_key, "victim", None).await;
    assert_proof_invalid(r, "no proof").await;
    let r = c.join_with_proof(&token, &victim_key, "victim", Some("")).await;
    assert_proof_invalid(r, "empty proof").await;
    let r = c
        .join_with_proof(&token, &victim_key, "victim", Some("not base64!"))
        .await;
    assert_proof_invalid(r, "garbage proof").await;
    let r = c
        .join_with_proof(&token, &victim_key, "victim", Some(&format!("{}=", "A".repeat(43))))
        .await;
    assert_proof_invalid(r, "32 zero bytes").await;
    let forged = attacker_key.proof(&join_key, &tid, &victim_key, "victim");
    let r = c.join_with_proof(&token, &victim_key, "victim", Some(&forged)).await;
    assert_proof_invalid(r, "proof made with the attacker's own private key").await;
    let forged = attacker_key.proof(&join_key, &tid, &attacker_key, "victim");
    let r = c.join_with_proof(&token, &victim_key, "victim", Some(&forged)).await;
    assert_proof_invalid(r, "the attacker's valid proof for its own key").await;

    // Nothing changed: same nodes, no re-join in the audit log, the victim's credential and stream keep working.
    let after = nodes(&c).await;
    assert_eq!(after.len(), 2);
    assert_eq!(after[0]["id"], victim.node_id);
    assert_eq!(after[0]["name"], "victim");
    let audit: Value = c.admin_json(Method::GET, "/api/v1/audit").await;
    assert!(!audit.to_string().contains("rejoin"), "no re-join happened: {audit}");
    let r = c
        .client
        .put(c.url("/api/v1/node/endpoints"))
        .bearer_auth(&victim.credential)
        .json(&json!({"endpoints": ["198.18.0.10:51820"]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 204, "the victim's credential still works");
    let r = c
        .client
        .put(c.url("/api/v1/node/endpoints"))
        .bearer_auth(&attacker.credential)
        .json(&json!({"endpoints": ["198.18.0.20:51820"]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 204);
    victim_stream
        .until(Duration::from_secs(5), |m| {
            matches!(m, MapMessage::PeerChanged { peer, .. }
                if peer.id == attacker.node_id && peer.endpoints == vec!["198.18.0.20:51820".parse::<std::net::SocketAddr>().expect("addr")])
        })
        .await;

    // The real owner still re-joins with its own proof: same node, fresh credential.
    let again = c.join(&token, &victim_key, "victim").await;
    assert_eq!((again.node_id, again.ip), (victim.node_id, victim.ip));
    c.stop().await;
}

async fn proof_is_bound_to_token_and_hostname(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let join_key = c.join_key().await;
    let first = c.token(json!({"reusable": true})).await;
    let second = c.token(json!({"reusable": true})).await;
    let node = key(7);

    // A valid proof of the node's own key, made for the first token, sent with the second: refused (fresh join).
    let for_first = node.proof(&join_key, &token_id(&first), &node, "gpu");
    let r = c.join_with_proof(&second, &node, "gpu", Some(&for_first)).await;
    assert_proof_invalid(r, "proof for another token id").await;
    // Made for hostname `gpu`, sent with `laptop`: refused.
    let r = c.join_with_proof(&first, &node, "laptop", Some(&for_first)).await;
    assert_proof_invalid(r, "proof for another hostname").await;
    // Made against another coordinator's join key: refused.
    let elsewhere = node.proof(&key(99), &token_id(&first), &node, "gpu");
    let r = c.join_with_proof(&first, &node, "gpu", Some(&elsewhere)).await;
    assert_proof_invalid(r, "proof against another join key").await;
    assert!(nodes(&c).await.is_empty(), "refused joins enrolled nothing");
    let tokens: Vec<Value> = c.admin_json(Method::GET, "/api/v1/tokens").await;
    assert!(
        tokens.iter().all(|t| t["uses"] == 0),
        "refused joins use no token: {tokens:?}"
    );

    // The matching proof joins; then the same rules hold for a re-join.
    let r = c.join_with_proof(&first, &node, "gpu", Some(&for_first)).await;
    assert_eq!(r.status(), 200);
    let r = c.join_with_proof(&second, &node, "gpu", Some(&for_first)).await;
    assert_proof_invalid(r, "re-join with a proof for another token id").await;
    let r = c.join_with_proof(&first, &node, "renamed", Some(&for_first)).await;
    assert_proof_invalid(r, "re-join with a proof for another hostname").await;
    c.stop().await;
}

async fn join_key_is_stable_across_restart(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let before = c.join_key().await;
    let info: Value = c
        .client
        .get(c.url("/api/v1/info"))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let stun_ports = info["stun_ports"].as_array().expect("stun_ports").clone();
    assert_eq!(stun_ports.len(), 2, "two STUN ports");
    assert_eq!(
        info,
        json!({"protocol_version": 1, "join_key": before.to_string(), "stun_ports": stun_ports, "relay": true,
            "gateway_port": info["gateway_port"]})
    );
    let token = c.token(json!({"reusable": true})).await;
    let node = key(3);
    let proof = node.proof(&before, &token_id(&token), &node, "n");
    c.stop().await;

    let c = Coord::start(&db).await;
    assert_eq!(c.join_key().await, before, "the join key survives a restart");
    let r = c.join_with_proof(&token, &node, "n", Some(&proof)).await;
    assert_eq!(r.status(), 200, "a proof made before the restart still holds");
    c.stop().await;

    // Another database has another key.
    let other_db = TestDb::new(&backend).await;
    let other = Coord::start(&other_db).await;
    assert_ne!(other.join_key().await, before);
    other.stop().await;
}

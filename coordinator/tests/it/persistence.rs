//! Restart persistence: same nodes, same addresses, tokens and credentials still valid.

use std::time::Duration;

use meshd_protocol::MapMessage;
use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::harness::{Backend, Coord, TestDb, error_code, key};

both_backends! {
    restart_keeps_everything => restart_keeps_everything;
}

async fn restart_keeps_everything(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let token = c.token(json!({"uses": 10})).await;
    let mut joined = Vec::new();
    for i in 0..5 {
        joined.push(c.join(&token, &key(i), &format!("host{i}")).await);
    }
    let used_up = c.token(json!({})).await;
    let _ = c.join(&used_up, &key(50), "once").await;
    let before: Vec<Value> = c.admin_json(Method::GET, "/api/v1/nodes").await;
    let mut stream = c.stream(&joined[0].credential, None, None).await;
    let version_before = stream.next(Duration::from_secs(5)).await.version();
    c.stop().await;
    assert!(
        stream.ends_within(Duration::from_secs(5)).await,
        "streams end at shutdown"
    );

    // A node online before the restart is held online for the presence grace (reconnecting within it is no change
    // at all); without a stream it then goes offline.
    let c = Coord::start_with(&db, |cfg| cfg.presence_grace = Duration::from_secs(1)).await;
    let after: Vec<Value> = c.admin_json(Method::GET, "/api/v1/nodes").await;
    assert_eq!(after.len(), before.len());
    for (b, a) in before.iter().zip(&after) {
        for field in ["id", "name", "ip", "public_key", "tags"] {
            assert_eq!(b[field], a[field], "{field} survives a restart");
        }
        let streamed = a["id"] == serde_json::json!(joined[0].node_id);
        assert_eq!(a["online"], streamed, "only the node that had a stream is held online");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now: Vec<Value> = c.admin_json(Method::GET, "/api/v1/nodes").await;
        if now.iter().all(|a| a["online"] == false) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no stream is connected after the grace: offline"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Credentials still work; versions keep growing.
    let mut stream = c.stream(&joined[0].credential, None, None).await;
    match stream.next(Duration::from_secs(5)).await {
        MapMessage::Full { map } => {
            assert!(map.version > version_before);
            assert_eq!(map.self_node.ip, joined[0].ip);
            assert_eq!(map.peers.len(), 5);
        }
        other => panic!("expected full map, got {other:?}"),
    }
    // The token keeps its remaining uses; the used-up one stays used up.
    let more = c.join(&token, &key(9), "late").await;
    assert_eq!(more.ip.to_string(), "10.77.0.8");
    let again = c.join(&token, &key(3), "whatever").await;
    assert_eq!((again.node_id, again.ip), (joined[3].node_id, joined[3].ip));
    let r = c.join_raw(&used_up, &key(51), "x").await;
    assert_eq!(error_code(r).await, (403, "token_used_up".into()));
    c.stop().await;
}

//! Two coordinator processes (here: two instances in one process, each with its own pool, broker and LISTEN
//! connection) on one PostgreSQL database: a change made through one reaches streams open on the other.

use std::time::{Duration, Instant};

use meshd_protocol::MapMessage;
use reqwest::Method;
use serde_json::json;

use crate::harness::{Backend, Coord, TestDb, key};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn change_on_one_replica_reaches_streams_on_another() {
    let Some(backend) = Backend::postgres() else { return };
    let db = TestDb::new(&backend).await;
    let a = Coord::start(&db).await;
    let b = Coord::start(&db).await;
    assert_eq!(
        a.join_key().await,
        b.join_key().await,
        "replicas on one database share the join key, so a proof made against one is valid at the other"
    );
    let token = a.token(json!({"reusable": true})).await;
    let n1 = a.join(&token, &key(1), "one").await;
    let n2 = b.join(&token, &key(2), "two").await;
    assert_ne!(n1.ip, n2.ip);

    let mut on_b = b.stream(&n1.credential, None, None).await;
    let _ = on_b.next(Duration::from_secs(5)).await;
    let started = Instant::now();
    let r = a
        .admin(Method::PATCH, &format!("/api/v1/nodes/{}", n2.node_id))
        .json(&json!({"name": "renamed"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let m = on_b
        .until(
            Duration::from_secs(2),
            |m| matches!(m, MapMessage::PeerChanged { peer, .. } if peer.name == "renamed"),
        )
        .await;
    eprintln!("cross-replica change arrived after {:?} ({m:?})", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(2));

    let started = Instant::now();
    let r = a
        .admin(Method::DELETE, &format!("/api/v1/nodes/{}", n2.node_id))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 204);
    let _ = on_b
        .until(
            Duration::from_secs(2),
            |m| matches!(m, MapMessage::PeerRemoved { id, .. } if *id == n2.node_id),
        )
        .await;
    assert!(started.elapsed() < Duration::from_secs(2));
    a.stop().await;
    b.stop().await;
}

//! The agent's control loop against the real coordinator: join, follow, resume, degraded mode, removal, leave.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use meshd_node::ctl::{self, CtlClient};
use meshd_node::daemon::{Phase, StopReason};
use meshd_node::endpoints;
use meshd_protocol::MapMessage;
use tokio_util::sync::CancellationToken;

use crate::harness::{Coordinator, FAKE_INTERFACE, FAKE_PORT, Node, eventually};

const WAIT: Duration = Duration::from_secs(15);

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_follow_resume_degrade_and_removal_over_pinned_tls() {
    let mut coordinator = Coordinator::start(true);
    let token = coordinator.token(&["--reusable"]);
    assert!(
        meshd_protocol::JoinToken::parse(&token)
            .expect("token")
            .fingerprint
            .is_some(),
        "TLS tokens pin"
    );

    // Join: identity saved privately, addresses distinct and inside the network.
    let alpha = Node::enrol(&token, "alpha").await.expect("alpha joins");
    let beta = Node::enrol(&token, "beta").await.expect("beta joins");
    assert_eq!(alpha.identity.name, "alpha");
    assert_ne!(alpha.identity.ip, beta.identity.ip);
    assert!(alpha.identity.network.contains(&alpha.identity.ip));
    for path in [
        alpha.state.key_path(),
        alpha.state.credential_path(),
        alpha.state.identity_path(),
    ] {
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }

    // Follow: each agent gets the other as a peer, with the reported endpoints.
    let run_alpha = alpha.start();
    let run_beta = beta.start();
    eventually(WAIT, "alpha configures beta", || {
        run_alpha.engine.peer(&beta.identity.public_key).is_some()
    })
    .await;
    let peer = run_alpha.engine.peer(&beta.identity.public_key).expect("beta");
    assert_eq!(peer.name, "beta");
    assert_eq!(
        peer.allowed_ips,
        vec![ipnet::Ipv4Net::new(beta.identity.ip, 32).expect("/32")]
    );
    assert_eq!(peer.persistent_keepalive, Some(25));
    assert_eq!(run_alpha.phase(), Phase::Running);
    let expected = endpoints::candidate_endpoints(
        &endpoints::local_addresses().expect("addresses"),
        FAKE_INTERFACE,
        beta.identity.network,
        FAKE_PORT,
    );
    // Beta reports its STUN-mapped address (its fake engine's socket on loopback) first, then its local addresses.
    eventually(WAIT, "beta's endpoints reach alpha", || {
        let own = run_beta.engine.own_endpoints();
        own.len() == expected.len() + 1
            && own[1..] == expected[..]
            && run_alpha
                .engine
                .peer(&beta.identity.public_key)
                .is_some_and(|p| p.endpoints == own)
    })
    .await;
    eventually(WAIT, "alpha caches the map", || {
        alpha
            .cache()
            .load()
            .ok()
            .flatten()
            .is_some_and(|m| m.peers.iter().any(|p| p.name == "beta"))
    })
    .await;

    // Status over the control socket merges names from the map with the engine's view.
    let lock = ctl::lock_state_dir(&alpha.state).expect("lock");
    let listener = ctl::bind(&alpha.state, None, &lock).expect("bind");
    let ctl_stop = CancellationToken::new();
    let server = tokio::spawn(ctl::serve(listener, run_alpha.agent.clone(), ctl_stop.clone()));
    let status = CtlClient::new(&alpha.state).status().await.expect("status");
    assert_eq!(status.self_node.name, "alpha");
    assert_eq!(status.self_node.ip, alpha.identity.ip);
    let json = serde_json::to_value(&status).expect("json");
    assert_eq!(json["peers"][0]["name"], "beta");
    assert_eq!(json["peers"][0]["path"], "none", "the fake data plane has no path");
    assert!(json["peers"][0]["last_handshake"].is_null());
    ctl_stop.cancel();
    server.await.expect("ctl server stops");
    drop(lock);

    // Resume: stop alpha, let the network change, check the coordinator replays only what alpha missed.
    let version = run_alpha.map().expect("map").version;
    assert_eq!(run_alpha.stop().await, StopReason::Shutdown);
    let gamma = Node::enrol(&token, "gamma").await.expect("gamma joins");
    let mut stream = alpha
        .client()
        .open_map(&alpha.credential, Some(version))
        .await
        .expect("resume");
    let first = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a message")
        .expect("open")
        .expect("valid");
    match first {
        MapMessage::PeerAdded { peer, version: v } => {
            assert_eq!(peer.name, "gamma");
            assert!(v > version);
        }
        other => panic!("resuming from {version} should replay the missed delta, got {other:?}"),
    }
    drop(stream);

    // Degraded: with the coordinator down, `up` applies the cached map at once and keeps retrying.
    coordinator.stop();
    let run_alpha = alpha.start();
    assert!(
        run_alpha.engine.peer(&beta.identity.public_key).is_some(),
        "cached peers configured before any stream"
    );
    assert_eq!(run_alpha.engine.reconfigures(), 1, "the cache is applied once");
    eventually(WAIT, "alpha degraded", || run_alpha.phase() == Phase::Degraded).await;
    coordinator.restart();
    eventually(Duration::from_secs(40), "alpha back and sees gamma", || {
        run_alpha.phase() == Phase::Running && run_alpha.engine.peer(&gamma.identity.public_key).is_some()
    })
    .await;
    // beta reconnected too (its loop kept running).
    eventually(Duration::from_secs(40), "beta sees gamma", || {
        run_beta.engine.peer(&gamma.identity.public_key).is_some()
    })
    .await;

    // Removal: the admin deletes beta. Alpha drops it within 2 s; beta's agent stops with everything cleared.
    let deleted_at = std::time::Instant::now();
    coordinator.delete_node(&token, beta.identity.node_id).await;
    eventually(Duration::from_secs(2), "alpha drops beta within 2 s", || {
        run_alpha.engine.peer(&beta.identity.public_key).is_none()
    })
    .await;
    let reason = tokio::time::timeout(WAIT, run_beta.task)
        .await
        .expect("beta stops")
        .expect("no panic");
    assert_eq!(reason, StopReason::Removed);
    assert!(run_beta.engine.peers().is_empty(), "a removed node keeps no peers");
    assert!(run_beta.agent.map().is_none());
    assert!(
        !beta.state.cache_path().exists(),
        "a removed node deletes its cached map"
    );
    eprintln!("beta removed; alpha dropped it after {:?}", deleted_at.elapsed());

    // Leave: gamma leaves; alpha drops it.
    gamma.client().leave(&gamma.credential).await.expect("gamma leaves");
    eventually(WAIT, "alpha drops gamma", || {
        run_alpha.engine.peer(&gamma.identity.public_key).is_none()
    })
    .await;
    assert!(matches!(
        gamma.client().leave(&gamma.credential).await,
        Err(meshd_node::control::ControlError::Unauthorized { .. })
    ));
    assert_eq!(run_alpha.stop().await, StopReason::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_coordinator_and_ctl_down() {
    let coordinator = Coordinator::start(false);
    let token = coordinator.token(&["--uses", "2"]);
    assert!(
        meshd_protocol::JoinToken::parse(&token)
            .expect("token")
            .fingerprint
            .is_none()
    );
    let one = Node::enrol(&token, "one").await.expect("joins over http");
    let two = Node::enrol(&token, "two").await.expect("joins over http");
    assert!(one.identity.fingerprint.is_none());
    let run_one = one.start();
    eventually(WAIT, "one sees two", || {
        run_one.engine.peer(&two.identity.public_key).is_some()
    })
    .await;

    // `meshd down` over the control socket stops the agent cleanly.
    let lock = ctl::lock_state_dir(&one.state).expect("lock");
    let listener = ctl::bind(&one.state, None, &lock).expect("bind");
    let (agent, shutdown) = (run_one.agent.clone(), run_one.shutdown.clone());
    // As the daemon does: the socket closes once the agent is done.
    let server = tokio::spawn(async move { drop(ctl::serve(listener, agent, shutdown).await) });
    assert!(CtlClient::new(&one.state).down().await.expect("down"), "it was running");
    let reason = tokio::time::timeout(WAIT, run_one.task)
        .await
        .expect("stops")
        .expect("no panic");
    assert_eq!(reason, StopReason::Shutdown);
    server.await.expect("ctl server stops");
    assert!(
        !CtlClient::new(&one.state).down().await.expect("down again"),
        "no longer running"
    );
}

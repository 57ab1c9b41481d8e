//! The relay client and STUN discovery against the real coordinator: pinned TLS, forwarding between two nodes,
//! reconnecting after a coordinator restart, the engine told on every change, refused credentials, and the
//! STUN-mapped address reaching the endpoint report, the engine and `meshd netcheck`.

use std::time::Duration;

use bytes::Bytes;
use meshd_node::control::ControlError;
use meshd_node::ctl::{self, CtlClient};
use meshd_node::engine::RelayDatagram;
use meshd_node::netcheck::{CheckSource, Mapping};
use tokio_util::sync::CancellationToken;

use crate::harness::{Coordinator, FakeEngine, Node, eventually};

const WAIT: Duration = Duration::from_secs(20);

/// Sends `payload` from `from`'s relay channel to `to` and checks it arrives at `to`'s engine, sender named.
async fn relayed(from: (&Node, &FakeEngine), to: (&Node, &FakeEngine), payload: &'static [u8]) {
    from.1
        .relay_out
        .send(RelayDatagram {
            peer: to.0.identity.public_key,
            datagram: Bytes::from_static(payload),
        })
        .await
        .expect("queue");
    let got = to.1.relay_recv(WAIT).await.expect("the datagram crosses the relay");
    assert_eq!(got.peer, from.0.identity.public_key, "the receiver learns who sent it");
    assert_eq!(&got.datagram[..], payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_forwards_over_pinned_tls_and_reconnects_after_a_coordinator_restart() {
    let mut coordinator = Coordinator::start(true);
    let token = coordinator.token(&["--reusable"]);
    let alpha = Node::enrol(&token, "alpha").await.expect("alpha joins");
    let beta = Node::enrol(&token, "beta").await.expect("beta joins");
    let (alpha_engine, beta_engine) = (
        std::sync::Arc::new(FakeEngine::default()),
        std::sync::Arc::new(FakeEngine::default()),
    );
    let shutdown = CancellationToken::new();
    let (alpha_relay, alpha_status) = alpha.relay_client(alpha_engine.clone());
    let (beta_relay, _) = beta.relay_client(beta_engine.clone());
    let alpha_task = tokio::spawn(alpha_relay.run(shutdown.clone()));
    let beta_task = tokio::spawn(beta_relay.run(shutdown.clone()));

    eventually(WAIT, "both relay clients connect", || {
        alpha_engine.relay_connected() && beta_engine.relay_connected()
    })
    .await;
    assert_eq!(alpha_engine.relay_connected_calls(), [true], "told once");
    relayed(
        (&alpha, &alpha_engine),
        (&beta, &beta_engine),
        b"wireguard bytes from alpha",
    )
    .await;
    relayed(
        (&beta, &beta_engine),
        (&alpha, &alpha_engine),
        b"and an answer from beta",
    )
    .await;
    eventually(WAIT, "the first relay ping is answered", || {
        alpha_status.snapshot().latency_ms.is_some()
    })
    .await;

    // The coordinator goes away: the engine hears "relay down", then "up" again once it is back.
    coordinator.stop();
    eventually(WAIT, "alpha notices the relay is gone", || {
        !alpha_engine.relay_connected()
    })
    .await;
    assert!(alpha_status.snapshot().last_error.is_some() || !alpha_status.snapshot().connected);
    coordinator.restart();
    eventually(Duration::from_secs(40), "both reconnect", || {
        alpha_engine.relay_connected() && beta_engine.relay_connected()
    })
    .await;
    assert_eq!(&alpha_engine.relay_connected_calls()[..3], [true, false, true]);
    relayed((&alpha, &alpha_engine), (&beta, &beta_engine), b"after the restart").await;

    // A clean shutdown ends the task and leaves the engine told "down".
    shutdown.cancel();
    for task in [alpha_task, beta_task] {
        tokio::time::timeout(WAIT, task)
            .await
            .expect("stops")
            .expect("no panic");
    }
    assert!(!alpha_engine.relay_connected() && !beta_engine.relay_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_refuses_a_bad_credential_and_says_so() {
    let coordinator = Coordinator::start(true);
    let token = coordinator.token(&[]);
    let node = Node::enrol(&token, "gamma").await.expect("joins");
    let client = meshd_node::control::ControlClient::for_relay(
        &node.identity.coordinator_url,
        node.identity.pinned().expect("pin"),
    )
    .expect("client");
    let error = client.open_relay("not-a-credential").await.expect_err("refused");
    assert!(matches!(error, ControlError::Unauthorized { .. }), "{error}");

    // A relay client with a refused credential keeps the engine's relay down and records why.
    let engine = std::sync::Arc::new(FakeEngine::default());
    let (mut relay, status) = node.relay_client(engine.clone());
    relay.credential = "not-a-credential".into();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(relay.run(shutdown.clone()));
    eventually(WAIT, "the failure is recorded", || {
        status.snapshot().last_error.is_some()
    })
    .await;
    assert!(engine.relay_connected_calls().is_empty(), "never up");
    assert!(
        status.snapshot().last_error.is_some_and(|e| e.contains("credential")),
        "{:?}",
        status.snapshot()
    );
    shutdown.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("stops")
        .expect("no panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stun_mapped_address_is_reported_and_netcheck_sees_it() {
    let coordinator = Coordinator::start(true);
    let token = coordinator.token(&["--reusable"]);
    let alpha = Node::enrol(&token, "alpha").await.expect("alpha joins");
    let beta = Node::enrol(&token, "beta").await.expect("beta joins");
    let run_alpha = alpha.start();
    let run_beta = beta.start();

    // Alpha's fake engine answers STUN from 127.0.0.1:<its socket>: that mapped address becomes an own endpoint,
    // is reported, and reaches beta in the map.
    eventually(WAIT, "alpha learns its mapped address", || {
        run_alpha
            .engine
            .own_endpoints()
            .first()
            .is_some_and(|e| e.ip().is_loopback())
    })
    .await;
    let mapped = run_alpha.engine.own_endpoints()[0];
    eventually(WAIT, "beta's map carries alpha's mapped address", || {
        run_beta
            .engine
            .peer(&alpha.identity.public_key)
            .is_some_and(|p| p.endpoints.contains(&mapped))
    })
    .await;

    // netcheck through the agent: both STUN ports answer with the same mapping (loopback has no NAT).
    let lock = ctl::lock_state_dir(&alpha.state).expect("lock");
    let listener = ctl::bind(&alpha.state, None, &lock).expect("bind");
    let ctl_stop = CancellationToken::new();
    let server = tokio::spawn(ctl::serve(listener, run_alpha.agent.clone(), ctl_stop.clone()));
    let report = CtlClient::new(&alpha.state).netcheck().await.expect("netcheck");
    assert_eq!(report.source, CheckSource::Agent);
    assert!(report.udp_reachable, "{report:?}");
    assert_eq!(report.mapped, Some(mapped));
    assert_eq!(report.probes.len(), 2, "two STUN ports: {report:?}");
    assert_eq!(report.mapping, Mapping::EndpointIndependent);
    assert!(
        report.relay.is_some_and(|r| !r.connected),
        "no relay client runs in this test"
    );
    let status = CtlClient::new(&alpha.state).status().await.expect("status");
    assert!(status.self_node.endpoints.contains(&mapped.to_string()), "{status:?}");
    ctl_stop.cancel();
    drop(server.await.expect("ctl server"));

    run_alpha.stop().await;
    run_beta.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netcheck_without_an_agent_runs_standalone_and_says_so() {
    let coordinator = Coordinator::start(false);
    let token = coordinator.token(&[]);
    let node = Node::enrol(&token, "delta").await.expect("joins");
    let root = node.state.root().to_path_buf();
    let run = move |args: &'static [&'static str]| {
        let root = root.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_meshd"))
                .arg("--state-dir")
                .arg(&root)
                .args(args)
                .env_remove("MESHD_STATE_DIR")
                .output()
                .expect("run meshd")
        })
    };
    let out = run(&["netcheck", "--json"]).await.expect("join");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(json["source"], "standalone");
    assert_eq!(json["udp_reachable"], true, "{json}");
    assert_eq!(json["mapping"], "endpoint_independent", "one socket, loopback: {json}");
    assert!(json["relay"].is_null(), "{json}");
    let out = run(&["netcheck"]).await.expect("join");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("agent is not running: standalone check"), "{text}");
    assert!(text.contains("UDP:      reachable"), "{text}");

    // Not joined: nothing to check against, and the message says what to do.
    let empty = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshd"))
        .arg("--state-dir")
        .arg(empty.path())
        .arg("netcheck")
        .env_remove("MESHD_STATE_DIR")
        .output()
        .expect("run meshd");
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
}

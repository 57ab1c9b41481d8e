//! Connection limits of the listener: idle and slow connections are closed, one address cannot hold more than its
//! share, and map streams outlive the idle timeout.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use meshd_coordinator::config::ConnectionLimits;
use serde_json::json;

use crate::harness::{Backend, Coord, TestDb, key};

/// True when the server closes `tcp` within `within` (EOF or reset), false when it stays open that long.
fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    tcp.set_read_timeout(Some(within)).expect("timeout");
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => return true,
            // A response (the idle case reads one first); keep reading until EOF.
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
        if Instant::now() > deadline {
            return false;
        }
    }
}

fn connect(c: &Coord) -> TcpStream {
    let addr = c.base.trim_start_matches("http://");
    TcpStream::connect(addr).expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_and_slow_connections_are_closed_streams_are_not() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let c = Coord::start_with(&db, |cfg| {
        cfg.limits = ConnectionLimits {
            header_timeout: Duration::from_millis(800),
            idle_timeout: Duration::from_millis(800),
            max_per_ip: 0,
        };
    })
    .await;
    let token = c.token(json!({"reusable": true})).await;
    let a = c.join(&token, &key(1), "a").await;
    let mut stream = c.stream(&a.credential, None, None).await;
    stream.next(Duration::from_secs(5)).await;

    let checks = tokio::task::spawn_blocking({
        let c_base = c.base.clone();
        move || {
            let addr = c_base.trim_start_matches("http://").to_string();
            // Sends nothing.
            let mut silent = TcpStream::connect(&addr).expect("connect");
            // Half a request head.
            let mut slow = TcpStream::connect(&addr).expect("connect");
            slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").expect("write");
            // One request, then idle on a kept-alive connection.
            let mut idle = TcpStream::connect(&addr).expect("connect");
            idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("write");
            (
                closed_within(&mut silent, Duration::from_secs(5)),
                closed_within(&mut slow, Duration::from_secs(5)),
                closed_within(&mut idle, Duration::from_secs(5)),
            )
        }
    })
    .await
    .expect("checks");
    assert_eq!(
        checks,
        (true, true, true),
        "silent, half-head and idle connections are closed"
    );

    // The map stream outlived the timeouts (it has its own keepalives): the next change still reaches it.
    let b = c.join(&token, &key(2), "b").await;
    stream
        .until(
            Duration::from_secs(5),
            |m| matches!(m, meshd_protocol::MapMessage::PeerAdded { peer, .. } if peer.id == b.node_id),
        )
        .await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_address_cannot_take_every_connection() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let c = Coord::start_with(&db, |cfg| {
        cfg.limits = ConnectionLimits {
            max_per_ip: 6,
            ..ConnectionLimits::default()
        };
    })
    .await;
    let base = c.base.clone();
    let (held, refused_after) = tokio::task::spawn_blocking(move || {
        let addr = base.trim_start_matches("http://").to_string();
        let mut held = Vec::new();
        // The harness's own client may hold a connection or two: open until one is refused (bounded).
        for i in 0..10 {
            let mut tcp = TcpStream::connect(&addr).expect("connect");
            if closed_within(&mut tcp, Duration::from_millis(300)) {
                return (held, Some(i));
            }
            held.push(tcp);
        }
        (held, None)
    })
    .await
    .expect("opening");
    let refused_after = refused_after.expect("a connection beyond the cap is closed at once");
    assert!(refused_after <= 6, "at most 6 held, refused after {refused_after}");
    // Closing one frees its place.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = c.client.get(c.url("/healthz")).send().await.expect("healthz");
    assert_eq!(r.status(), 200);
    let metrics = c.metrics_text().await;
    assert!(
        metrics.contains("meshd_connections_refused_total{reason=\"per_ip_limit\"}"),
        "counted: {metrics}"
    );
    let _ = connect(&c);
    c.stop().await;
}

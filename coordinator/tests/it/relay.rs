//! STUN and the relay against a real coordinator: a UDP client learns its own address from both STUN ports; agents
//! exchange datagrams through `GET /api/v1/relay` (over TLS), only receive what is addressed to them, are refused
//! without a valid credential or as a device, lose the connection when deleted, get `PeerGone` for absent peers,
//! and a flood towards a slow receiver is dropped instead of stalling other pairs.

use std::time::{Duration, Instant};

use meshd_protocol::api::CoordinatorInfo;
use meshd_protocol::relay::{self, RelayFrame};
use meshd_protocol::stun::{TransactionId, binding_request, parse_binding_response};
use meshd_protocol::{PublicKey, paths};
use serde_json::json;
use sqlx::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::both_backends;
use crate::harness::{Backend, Coord, TestDb, error_code, key};

both_backends! {
    stun_answers_on_both_ports => stun_answers_on_both_ports;
    relay_over_tls_delivers_only_to_the_addressee => relay_over_tls_delivers_only_to_the_addressee;
    relay_refuses_bad_credentials_devices_and_plain_requests => relay_refuses_bad_credentials_devices_and_plain_requests;
    relay_closes_a_deleted_nodes_connection => relay_closes_a_deleted_nodes_connection;
    relay_peer_gone_ping_and_replacement => relay_peer_gone_ping_and_replacement;
    relay_drops_a_flood_to_a_slow_receiver_without_stalling_others => relay_drops_a_flood_to_a_slow_receiver_without_stalling_others;
    relay_pings_and_closes_silent_connections => relay_pings_and_closes_silent_connections;
}

/// A frame as the test client reads it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Got {
    Recv { src: PublicKey, datagram: Vec<u8> },
    PeerGone(PublicKey),
    Ping([u8; 8]),
    Pong([u8; 8]),
    Closed,
    Timeout,
}

/// A relay client: the upgraded connection split in two, so a test can stop reading while still sending.
pub(crate) struct RelayConn {
    reader: ReadHalf<reqwest::Upgraded>,
    writer: WriteHalf<reqwest::Upgraded>,
    buf: Vec<u8>,
    /// The key of the server's hello.
    hello: PublicKey,
}

/// An HTTP/1.1-only client for `c` (trusting its certificate when it serves TLS).
fn http1_client(c: &Coord) -> reqwest::Client {
    let mut builder = reqwest::Client::builder().http1_only();
    if let Some(pem) = &c.cert_pem {
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(pem).expect("pem"));
    }
    builder.build().expect("client")
}

async fn relay_request(c: &Coord, credential: &str, upgrade: bool) -> reqwest::Response {
    let mut request = http1_client(c).get(c.url(paths::RELAY)).bearer_auth(credential);
    if upgrade {
        request = request
            .header("Connection", "Upgrade")
            .header("Upgrade", relay::UPGRADE_PROTOCOL);
    }
    request.send().await.expect("send relay request")
}

impl RelayConn {
    pub(crate) async fn connect(c: &Coord, credential: &str) -> Self {
        let response = relay_request(c, credential, true).await;
        assert_eq!(response.status(), 101, "relay upgrade");
        assert_eq!(response.headers()["upgrade"], relay::UPGRADE_PROTOCOL);
        let upgraded = response.upgrade().await.expect("upgraded");
        let (reader, writer) = tokio::io::split(upgraded);
        let mut conn = Self {
            reader,
            writer,
            buf: Vec::new(),
            hello: PublicKey::from_bytes([1; 32]),
        };
        let hello = conn.read_raw(Duration::from_secs(5)).await.expect("server hello");
        match RelayFrame::decode(hello.0, &hello.1) {
            Ok(RelayFrame::ServerHello { key }) => conn.hello = key,
            other => panic!("expected ServerHello, got {other:?}"),
        }
        conn
    }

    async fn write_frame(&mut self, frame: RelayFrame<'_>) {
        let mut out = Vec::new();
        assert!(frame.encode(&mut out));
        self.writer.write_all(&out).await.expect("write frame");
    }

    pub(crate) async fn send(&mut self, dst: &PublicKey, datagram: &[u8]) {
        self.write_frame(RelayFrame::Send { dst: *dst, datagram }).await;
    }

    /// The next raw frame (type, payload); `None` on EOF or timeout (`Err(())` = timeout).
    async fn read_raw(&mut self, within: Duration) -> Result<(u8, Vec<u8>), bool> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(frame) = relay::split_frame(&self.buf).expect("valid frame from the server") {
                let raw = (frame.frame_type, frame.payload.to_vec());
                let used = frame.consumed;
                self.buf.drain(..used);
                return Ok(raw);
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.reader.read(&mut chunk)).await {
                Err(_) => return Err(false),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(true),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    pub(crate) async fn next(&mut self, within: Duration) -> Got {
        match self.read_raw(within).await {
            Err(true) => Got::Closed,
            Err(false) => Got::Timeout,
            Ok((frame_type, payload)) => match RelayFrame::decode(frame_type, &payload).expect("valid frame") {
                RelayFrame::Recv { src, datagram } => Got::Recv {
                    src,
                    datagram: datagram.to_vec(),
                },
                RelayFrame::PeerGone { key } => Got::PeerGone(key),
                RelayFrame::Ping { data } => Got::Ping(data),
                RelayFrame::Pong { data } => Got::Pong(data),
                other => panic!("unexpected frame from the server: {other:?}"),
            },
        }
    }
}

pub(crate) async fn coordinator_info(c: &Coord) -> CoordinatorInfo {
    c.client
        .get(c.url(paths::INFO))
        .send()
        .await
        .expect("info")
        .json()
        .await
        .expect("info body")
}

async fn stun_answers_on_both_ports(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let info = coordinator_info(&c).await;
    assert_eq!(info.stun_ports.len(), 2, "two STUN ports published");
    assert_ne!(info.stun_ports[0], info.stun_ports[1]);
    assert!(info.relay);
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("udp");
    let me = client.local_addr().expect("addr");
    for (i, port) in info.stun_ports.iter().enumerate() {
        let server = std::net::SocketAddr::from(([127, 0, 0, 1], *port));
        // Garbage first: ignored, and the server still answers afterwards.
        client
            .send_to(b"\x00\x01garbage that is no STUN", server)
            .await
            .expect("send");
        let tx = TransactionId([i as u8 + 1; 12]);
        client.send_to(&binding_request(tx), server).await.expect("send");
        let mut buf = [0u8; 256];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("a STUN answer")
            .expect("recv");
        assert_eq!(from, server);
        assert_eq!(
            parse_binding_response(&buf[..n]),
            Ok((tx, me)),
            "own address from port {port}"
        );
    }
    let metrics = c.client.get(c.url("/metrics")).send().await.expect("metrics");
    assert!(
        metrics
            .text()
            .await
            .expect("text")
            .contains("meshd_stun_requests_total")
    );
    c.stop().await;

    // STUN and the relay can be turned off; /api/v1/info says so.
    let db = TestDb::new(&backend).await;
    let c = Coord::start_with(&db, |config| {
        config.stun_ports.clear();
        config.relay = false;
    })
    .await;
    let info = coordinator_info(&c).await;
    assert!(info.stun_ports.is_empty());
    assert!(!info.relay);
    let token = c.token(json!({})).await;
    let a = c.join(&token, &key(1), "a").await;
    let (status, _) = error_code(relay_request(&c, &a.credential, true).await).await;
    assert_eq!(status, 404, "relay off");
    c.stop().await;
}

async fn relay_over_tls_delivers_only_to_the_addressee(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start_tls(&db).await;
    let token = c.token(json!({"reusable": true})).await;
    let (ka, kb, kc) = (key(1), key(2), key(3));
    let a = c.join(&token, &ka, "a").await;
    let b = c.join(&token, &kb, "b").await;
    let eve = c.join(&token, &kc, "eve").await;
    let mut ra = RelayConn::connect(&c, &a.credential).await;
    let mut rb = RelayConn::connect(&c, &b.credential).await;
    let mut re = RelayConn::connect(&c, &eve.credential).await;
    assert_eq!(
        (ra.hello, rb.hello, re.hello),
        (*ka, *kb, *kc),
        "each is registered under its own key"
    );

    for i in 0..50u32 {
        let datagram = format!("a->b {i}").into_bytes();
        ra.send(&kb, &datagram).await;
    }
    for i in 0..50u32 {
        let got = rb.next(Duration::from_secs(5)).await;
        assert_eq!(
            got,
            Got::Recv {
                src: *ka,
                datagram: format!("a->b {i}").into_bytes()
            }
        );
    }
    rb.send(&ka, &[0xAB; 1400]).await;
    assert_eq!(
        ra.next(Duration::from_secs(5)).await,
        Got::Recv {
            src: *kb,
            datagram: vec![0xAB; 1400]
        }
    );
    // The third node saw none of it, and claiming to be b in a Send changes nothing: the source is its own key.
    re.send(&ka, b"from eve").await;
    assert_eq!(
        ra.next(Duration::from_secs(5)).await,
        Got::Recv {
            src: *kc,
            datagram: b"from eve".to_vec()
        }
    );
    assert_eq!(
        re.next(Duration::from_millis(300)).await,
        Got::Timeout,
        "eve receives nothing addressed to others"
    );
    drop((ra, rb, re));
    c.stop().await;
}

async fn relay_refuses_bad_credentials_devices_and_plain_requests(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let token = c.token(json!({})).await;
    let a = c.join(&token, &key(1), "a").await;

    assert_eq!(error_code(relay_request(&c, "garbage", true).await).await.0, 401);
    let mut forged = a.credential.clone();
    let last = forged.pop().expect("non-empty");
    forged.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(
        error_code(relay_request(&c, &forged, true).await).await.0,
        401,
        "wrong secret"
    );
    let (status, code) = error_code(relay_request(&c, &a.credential, false).await).await;
    assert_eq!((status, code.as_str()), (426, "upgrade_required"), "no upgrade headers");

    // A device cannot hold a credential; make the agent's row a device behind the coordinator's back to check that
    // the relay refuses the kind, not just the credential.
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&db.url).await.expect("db");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE nodes SET kind = 'wireguard' WHERE id = {}",
        a.node_id
    )))
    .execute(&mut conn)
    .await
    .expect("update");
    conn.close().await.expect("close");
    let (status, _) = error_code(relay_request(&c, &a.credential, true).await).await;
    assert_eq!(status, 403, "devices cannot use the relay");
    c.stop().await;
}

async fn relay_closes_a_deleted_nodes_connection(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let token = c.token(json!({"reusable": true})).await;
    let (ka, kb) = (key(1), key(2));
    let a = c.join(&token, &ka, "a").await;
    let b = c.join(&token, &kb, "b").await;
    let mut ra = RelayConn::connect(&c, &a.credential).await;
    let mut rb = RelayConn::connect(&c, &b.credential).await;
    ra.send(&kb, b"before").await;
    assert!(matches!(rb.next(Duration::from_secs(5)).await, Got::Recv { .. }));

    let deleted = c
        .admin_send(reqwest::Method::DELETE, &format!("/api/v1/nodes/{}", b.node_id), None)
        .await;
    assert!(deleted.status().is_success(), "delete: {}", deleted.status());
    let started = Instant::now();
    assert_eq!(rb.next(Duration::from_secs(2)).await, Got::Closed, "closed within 2 s");
    eprintln!("deleted node's relay connection closed after {:?}", started.elapsed());
    // Its key has no connection any more: a sender is told so.
    ra.send(&kb, b"after").await;
    assert_eq!(ra.next(Duration::from_secs(5)).await, Got::PeerGone(*kb));
    // And it cannot come back with the old credential.
    assert_eq!(error_code(relay_request(&c, &b.credential, true).await).await.0, 401);
    drop(ra);
    c.stop().await;
}

async fn relay_peer_gone_ping_and_replacement(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let token = c.token(json!({})).await;
    let ka = key(1);
    let a = c.join(&token, &ka, "a").await;
    let mut ra = RelayConn::connect(&c, &a.credential).await;
    let nobody = PublicKey::from_bytes([0x42; 32]);
    for _ in 0..3 {
        ra.send(&nobody, b"lost").await;
    }
    assert_eq!(ra.next(Duration::from_secs(5)).await, Got::PeerGone(nobody));
    assert_eq!(
        ra.next(Duration::from_millis(300)).await,
        Got::Timeout,
        "PeerGone at most once a second per key"
    );
    ra.write_frame(RelayFrame::Ping { data: *b"12345678" }).await;
    assert_eq!(ra.next(Duration::from_secs(5)).await, Got::Pong(*b"12345678"));
    // Unknown frame types are skipped, not fatal.
    ra.write_frame(RelayFrame::Unknown {
        frame_type: 0x7e,
        payload: b"future",
    })
    .await;
    ra.write_frame(RelayFrame::Ping { data: *b"abcdefgh" }).await;
    assert_eq!(ra.next(Duration::from_secs(5)).await, Got::Pong(*b"abcdefgh"));

    // A second connection of the same node replaces the first, which is closed.
    let mut second = RelayConn::connect(&c, &a.credential).await;
    assert_eq!(
        ra.next(Duration::from_secs(2)).await,
        Got::Closed,
        "replaced connection closed"
    );
    second.send(&ka, b"to myself").await;
    assert_eq!(
        second.next(Duration::from_secs(5)).await,
        Got::Recv {
            src: *ka,
            datagram: b"to myself".to_vec()
        }
    );
    // A frame above the maximum length closes the connection.
    second
        .writer
        .write_all(&[0x02, 0xff, 0xff, 0xff, 0xff])
        .await
        .expect("write");
    assert_eq!(
        second.next(Duration::from_secs(2)).await,
        Got::Closed,
        "oversized frame closes"
    );
    c.stop().await;
}

async fn relay_drops_a_flood_to_a_slow_receiver_without_stalling_others(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let token = c.token(json!({"reusable": true})).await;
    let keys: Vec<_> = (1..=4).map(key).collect();
    let mut nodes = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        nodes.push(c.join(&token, k, &format!("n{i}")).await);
    }
    let mut flooder = RelayConn::connect(&c, &nodes[0].credential).await;
    let slow = RelayConn::connect(&c, &nodes[1].credential).await; // never reads
    let mut sender = RelayConn::connect(&c, &nodes[2].credential).await;
    let mut receiver = RelayConn::connect(&c, &nodes[3].credential).await;

    // 40 MB towards a receiver that reads nothing: far more than its queue and the socket buffers hold. The
    // flooder's writes must all complete (the relay drops, it does not push back), within a bounded time.
    let slow_key = *keys[1];
    let flood = tokio::spawn(async move {
        let datagram = [0x5a; 1400];
        let mut batch = Vec::new();
        for _ in 0..64 {
            assert!(
                RelayFrame::Send {
                    dst: slow_key,
                    datagram: &datagram
                }
                .encode(&mut batch)
            );
        }
        for _ in 0..(30_000 / 64) {
            flooder.writer.write_all(&batch).await.expect("flood write");
        }
        flooder
    });
    // Meanwhile another pair exchanges packets normally.
    let started = Instant::now();
    for i in 0..200u32 {
        sender.send(&keys[3], &i.to_be_bytes()).await;
        assert_eq!(
            receiver.next(Duration::from_secs(5)).await,
            Got::Recv {
                src: *keys[2],
                datagram: i.to_be_bytes().to_vec()
            },
            "packet {i} of the other pair"
        );
    }
    eprintln!(
        "other pair: 200 round trips during the flood in {:?}",
        started.elapsed()
    );
    let flooder = tokio::time::timeout(Duration::from_secs(30), flood)
        .await
        .expect("the flood is never blocked by the slow receiver")
        .expect("flood task");
    let metrics = c.metrics_text().await;
    let dropped: f64 = metrics
        .lines()
        .find(|l| l.starts_with("meshd_relay_dropped_packets_total{reason=\"queue_full\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("queue_full drop counter present");
    assert!(dropped > 0.0, "datagrams to the slow receiver were dropped");
    drop((flooder, slow));
    c.stop().await;
}

async fn relay_pings_and_closes_silent_connections(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start_with(&db, |config| {
        config.relay_timers = meshd_coordinator::relay::RelayTimers {
            ping_interval: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(800),
        };
    })
    .await;
    let token = c.token(json!({"reusable": true})).await;
    let a = c.join(&token, &key(1), "a").await;
    let b = c.join(&token, &key(2), "b").await;
    let mut answering = RelayConn::connect(&c, &a.credential).await;
    let mut silent = RelayConn::connect(&c, &b.credential).await;

    // The answering client sees the server's pings and, by answering them, outlives the idle timeout twice over.
    let until = Instant::now() + Duration::from_secs(2);
    let mut pings = 0;
    while Instant::now() < until {
        match answering.next(until.saturating_duration_since(Instant::now())).await {
            Got::Ping(data) => {
                pings += 1;
                answering.write_frame(RelayFrame::Pong { data }).await;
            }
            Got::Timeout => break,
            other => panic!("answering client: unexpected {other:?}"),
        }
    }
    assert!(pings >= 5, "server pings every 200 ms (saw {pings} in 2 s)");
    answering.write_frame(RelayFrame::Ping { data: [7; 8] }).await;
    loop {
        match answering.next(Duration::from_secs(2)).await {
            Got::Ping(_) => {}
            got => {
                assert_eq!(got, Got::Pong([7; 8]), "still open after 2 s");
                break;
            }
        }
    }
    // The silent client (it only read) was closed after the idle timeout.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match silent.next(deadline.saturating_duration_since(Instant::now())).await {
            Got::Ping(_) => {}
            got => {
                assert_eq!(got, Got::Closed, "a silent connection is closed after the idle timeout");
                break;
            }
        }
    }
    c.stop().await;
}

//! The WireGuard gateway for stock devices against a real coordinator: a boringtun `Tunn` plays the stock device (on
//! a UDP socket) and another plays the agent (on a relay connection). Every message type is routed both ways, the
//! device roams to a new port, garbage is dropped without hurting the session, an agent under handshake load gets
//! cookie replies sent for it (never more bytes than came in) that a real WireGuard stack then passes, the admin
//! sees the session, and a deleted device's traffic stops at once.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey as WgPublic, StaticSecret};
use meshd_protocol::PublicKey;
use serde_json::{Value, json};
use tokio::net::UdpSocket;

use crate::both_backends;
use crate::harness::{Backend, Coord, TestDb, TestKey, key};
use crate::relay::{Got, RelayConn, coordinator_info};

both_backends! {
    gateway_routes_a_device_to_an_agent_and_back => gateway_routes_a_device_to_an_agent_and_back;
    gateway_answers_handshake_floods_with_cookies => gateway_answers_handshake_floods_with_cookies;
}

const WAIT: Duration = Duration::from_secs(5);

/// A WireGuard peer; its own handshake limiter is generous (the test floods the gateway, not this peer).
fn tunn(secret: [u8; 32], peer: &PublicKey, index: u32) -> Tunn {
    let secret = StaticSecret::from(secret);
    let limiter = RateLimiter::new(&WgPublic::from(&secret), 100_000);
    Tunn::new(
        secret,
        WgPublic::from(*peer.as_bytes()),
        None,
        None,
        index,
        Some(std::sync::Arc::new(limiter)),
    )
}

/// An IPv4 packet from `src` to `dst` with `payload` (checksums are not checked by boringtun).
fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut packet = vec![0u8; total];
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    packet[8] = 64;
    packet[9] = 17;
    packet[12..16].copy_from_slice(&src);
    packet[16..20].copy_from_slice(&dst);
    packet[20..].copy_from_slice(payload);
    packet
}

struct Device {
    tunn: Tunn,
    socket: UdpSocket,
    gateway: SocketAddr,
    public: PublicKey,
}

impl Device {
    async fn new(c: &Coord, agent: &PublicKey) -> (Self, i64) {
        let secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let public = PublicKey::from_bytes(WgPublic::from(&secret).to_bytes());
        let created: Value = c
            .admin_send(
                reqwest::Method::POST,
                "/api/v1/nodes",
                Some(json!({"name": "laptop", "public_key": public.to_base64(), "preshared_key": false})),
            )
            .await
            .json()
            .await
            .expect("device body");
        let id = created["id"]
            .as_i64()
            .or_else(|| created["node"]["id"].as_i64())
            .expect("device id");
        let port = coordinator_info(c).await.gateway_port.expect("the gateway is on");
        // The gateway learns the new device from the broker, like every node does: give it that moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let device = Self {
            tunn: tunn(secret.to_bytes(), agent, 0xD000_0001),
            socket: UdpSocket::bind("127.0.0.1:0").await.expect("udp"),
            gateway: SocketAddr::from(([127, 0, 0, 1], port)),
            public,
        };
        (device, id)
    }

    async fn send(&self, datagram: &[u8]) {
        self.socket
            .send_to(datagram, self.gateway)
            .await
            .expect("send to gateway");
    }

    async fn recv(&self, within: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        match tokio::time::timeout(within, self.socket.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) => {
                assert_eq!(from, self.gateway, "replies come from the gateway port");
                Some(buf[..n].to_vec())
            }
            _ => None,
        }
    }
}

/// The next datagram the agent gets over the relay (skipping server pings).
async fn agent_recv(conn: &mut RelayConn) -> (PublicKey, Vec<u8>) {
    loop {
        match conn.next(WAIT).await {
            Got::Recv { src, datagram } => return (src, datagram),
            Got::Ping(_) | Got::PeerGone(_) => continue,
            other => panic!("expected a datagram from the gateway, got {other:?}"),
        }
    }
}

async fn agent_silent(conn: &mut RelayConn, within: Duration) -> bool {
    loop {
        match conn.next(within).await {
            Got::Timeout => return true,
            // What the agent sent the deleted device comes back as "no such peer".
            Got::Ping(_) | Got::PeerGone(_) => continue,
            Got::Recv { .. } => return false,
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn join_agent(c: &Coord, agent_key: &TestKey) -> RelayConn {
    let token = c.token(json!({})).await;
    let joined = c.join(&token, agent_key, "gpu-server").await;
    RelayConn::connect(c, &joined.credential).await
}

/// Device -> gateway -> agent handshake and the keepalive that confirms it.
async fn handshake(device: &mut Device, agent: &mut Tunn, conn: &mut RelayConn) {
    let mut buf = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(init) = device.tunn.format_handshake_initiation(&mut buf, true) else {
        panic!("initiation");
    };
    device.send(init).await;
    let (tag, init) = agent_recv(conn).await;
    assert_eq!(
        tag,
        meshd_protocol::relay::GATEWAY_UNKNOWN_DEVICE,
        "the gateway cannot know who initiated"
    );
    let mut out = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(response) = agent.decapsulate(None, &init, &mut out) else {
        panic!("the agent answers the relayed initiation");
    };
    conn.send(&device.public, response).await;
    let response = device.recv(WAIT).await.expect("the response reaches the device");
    let TunnResult::WriteToNetwork(keepalive) = device.tunn.decapsulate(None, &response, &mut buf) else {
        panic!("the device completes the handshake");
    };
    device.send(keepalive).await;
    let (tag, keepalive) = agent_recv(conn).await;
    assert_eq!(tag, device.public, "after the response the gateway knows the device");
    assert!(matches!(
        agent.decapsulate(None, &keepalive, &mut out),
        TunnResult::Done
    ));
}

async fn device_to_agent(device: &mut Device, agent: &mut Tunn, conn: &mut RelayConn, payload: &[u8]) {
    let packet = ipv4([10, 77, 0, 9], [10, 77, 0, 2], payload);
    let mut buf = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(data) = device.tunn.encapsulate(&packet, &mut buf) else {
        panic!("encapsulate");
    };
    device.send(data).await;
    let (_, data) = agent_recv(conn).await;
    let mut out = vec![0u8; 2048];
    match agent.decapsulate(None, &data, &mut out) {
        TunnResult::WriteToTunnelV4(inner, _) => assert_eq!(inner, &packet[..]),
        _ => panic!("the agent decrypts the device's packet"),
    }
}

async fn agent_to_device(device: &mut Device, agent: &mut Tunn, conn: &mut RelayConn, payload: &[u8]) -> bool {
    let packet = ipv4([10, 77, 0, 2], [10, 77, 0, 9], payload);
    let mut buf = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(data) = agent.encapsulate(&packet, &mut buf) else {
        panic!("encapsulate");
    };
    conn.send(&device.public, data).await;
    let Some(data) = device.recv(Duration::from_secs(2)).await else {
        return false;
    };
    let mut out = vec![0u8; 2048];
    match device.tunn.decapsulate(None, &data, &mut out) {
        TunnResult::WriteToTunnelV4(inner, _) => inner == &packet[..],
        _ => false,
    }
}

async fn gateway_routes_a_device_to_an_agent_and_back(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let agent_key = key(1);
    let mut conn = join_agent(&c, &agent_key).await;
    let (mut device, device_id) = Device::new(&c, &agent_key).await;
    let mut agent = tunn(agent_key.secret_bytes(), &device.public, 0x0000_0100);

    handshake(&mut device, &mut agent, &mut conn).await;
    device_to_agent(&mut device, &mut agent, &mut conn, b"hello from the laptop").await;
    assert!(agent_to_device(&mut device, &mut agent, &mut conn, b"hello from the gpu").await);

    // The admin sees the session; without the API key, nothing.
    let view: Value = c.admin_json(reqwest::Method::GET, "/api/v1/gateway").await;
    assert_eq!(view["enabled"], true);
    let sessions = view["sessions"].as_array().expect("sessions");
    assert!(
        sessions
            .iter()
            .any(|s| s["device"] == device_id && s["established"] == true),
        "{view}"
    );
    let anonymous = c.client.get(c.url("/api/v1/gateway")).send().await.expect("get");
    assert_eq!(anonymous.status(), 401);

    // Garbage of every kind: dropped and counted, the session unharmed.
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![4, 0, 0],
        vec![1; 148],
        {
            let mut bad = vec![0u8; 148];
            bad[0] = 1;
            bad
        },
        {
            let mut random_index = vec![0u8; 64];
            random_index[0] = 4;
            random_index[4..8].copy_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
            random_index
        },
        vec![2, 0, 0, 0, 9, 9, 9, 9, 1, 1, 1, 1],
        vec![0xFF; 1400],
    ];
    for datagram in &garbage {
        device.send(datagram).await;
    }
    assert!(
        device.recv(Duration::from_millis(300)).await.is_none(),
        "garbage gets no answer"
    );
    device_to_agent(&mut device, &mut agent, &mut conn, b"still here").await;
    let metrics = c.metrics_text().await;
    assert!(metrics.contains("meshd_gateway_dropped_packets_total"), "{metrics}");

    // Roaming: the device's NAT gives it a new port; replies follow it there.
    device.socket = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
    device_to_agent(&mut device, &mut agent, &mut conn, b"from a new port").await;
    assert!(agent_to_device(&mut device, &mut agent, &mut conn, b"to the new port").await);

    // An agent cannot send into another agent's session.
    let other_key = key(2);
    let mut other = join_agent(&c, &other_key).await;
    let mut intruder = tunn(other_key.secret_bytes(), &device.public, 0x200);
    let mut buf = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(init) = intruder.format_handshake_initiation(&mut buf, true) else {
        panic!("initiation");
    };
    other.send(&device.public, init).await;
    // (Its initiation may reach the device: an agent may start a handshake with any device. Data it cannot fake.)
    let _ = device.recv(Duration::from_millis(300)).await;

    // Deleting the device ends its traffic both ways at once.
    let deleted = Instant::now();
    let response = c
        .admin_send(reqwest::Method::DELETE, &format!("/api/v1/nodes/{device_id}"), None)
        .await;
    assert!(response.status().is_success());
    let mut stopped = false;
    while deleted.elapsed() < Duration::from_secs(2) {
        if !agent_to_device(&mut device, &mut agent, &mut conn, b"are you there").await {
            stopped = true;
            break;
        }
    }
    assert!(stopped, "agent -> deleted device still delivered after 2 s");
    let packet = ipv4([10, 77, 0, 9], [10, 77, 0, 2], b"after deletion");
    let TunnResult::WriteToNetwork(data) = device.tunn.encapsulate(&packet, &mut buf) else {
        panic!("encapsulate");
    };
    device.send(data).await;
    assert!(
        agent_silent(&mut conn, Duration::from_millis(500)).await,
        "deleted device -> agent still delivered"
    );
    c.stop().await;
}

async fn gateway_answers_handshake_floods_with_cookies(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let agent_key = key(1);
    let mut conn = join_agent(&c, &agent_key).await;
    let (mut device, _) = Device::new(&c, &agent_key).await;

    // A burst of valid initiations (each from a fresh handshake) beyond the per-agent limit.
    let mut buf = vec![0u8; 2048];
    let mut cookies = 0;
    for i in 0..300u32 {
        let secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let mut flooder = tunn(secret.to_bytes(), &agent_key, i);
        let TunnResult::WriteToNetwork(init) = flooder.format_handshake_initiation(&mut buf, true) else {
            panic!("initiation");
        };
        let sent = init.len();
        device.send(init).await;
        while let Some(reply) = device.recv(Duration::from_millis(2)).await {
            assert!(reply.len() <= sent, "no amplification: {} > {sent}", reply.len());
            assert_eq!(reply[0], 3, "only cookie replies come back to initiations");
            cookies += 1;
        }
    }
    while let Some(reply) = device.recv(Duration::from_millis(200)).await {
        assert_eq!(reply[0], 3);
        cookies += 1;
    }
    assert!(cookies > 0, "over the limit the gateway asks for cookies");

    // The real device, under load: its first initiation gets a cookie reply, the retry with the cookie passes.
    let TunnResult::WriteToNetwork(init) = device.tunn.format_handshake_initiation(&mut buf, true) else {
        panic!("initiation");
    };
    device.send(init).await;
    let reply = device.recv(WAIT).await.expect("a cookie reply");
    assert_eq!(reply[0], 3, "under load the answer is a cookie reply");
    let mut out = vec![0u8; 2048];
    assert!(matches!(
        device.tunn.decapsulate(None, &reply, &mut out),
        TunnResult::Done
    ));
    let TunnResult::WriteToNetwork(retry) = device.tunn.format_handshake_initiation(&mut buf, true) else {
        panic!("initiation");
    };
    device.send(retry).await;
    // The agent gets it (skipping what the flood left queued).
    let deadline = Instant::now() + WAIT;
    let mut agent = tunn(agent_key.secret_bytes(), &device.public, 0x100);
    let mut answered = false;
    while Instant::now() < deadline && !answered {
        let (_, datagram) = agent_recv(&mut conn).await;
        answered = matches!(
            agent.decapsulate(None, &datagram, &mut out),
            TunnResult::WriteToNetwork(_)
        );
    }
    assert!(answered, "the initiation carrying the cookie reached the agent");
    let metrics = c.metrics_text().await;
    assert!(metrics.contains("meshd_gateway_cookie_replies_total"), "{metrics}");
    c.stop().await;
}

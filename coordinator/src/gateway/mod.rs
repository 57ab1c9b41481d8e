//! The WireGuard gateway for stock devices: one UDP port that the WireGuard apps (macOS, Windows, iOS, Android,
//! wireguard-go) use as the `Endpoint` of every meshd agent, so a device reaches agents behind any NAT.
//!
//! It forwards WireGuard ciphertext between a device's UDP address and an agent's relay connection and never holds a
//! key that decrypts it: a handshake initiation is routed to the agent whose public key its `mac1` was computed with
//! (`mac1` is keyed by the responder's *public* key; boringtun's `RateLimiter` per agent checks it), everything later
//! by the receiver indexes the handshake taught the pure [`table::Table`]. Towards the agent a datagram becomes a
//! relay `Recv` frame (tagged with the device's key once a session knows it); an agent's `Send` to a device's key
//! comes here from the relay ([`Gateway::on_agent_datagram`]) and leaves this port to the device's latest address.
//!
//! Under attack: everything that is not a well-formed WireGuard message, matches no agent or no session is dropped
//! and counted (`meshd_gateway_dropped_packets_total{reason}`). Handshakes per agent are rate limited: beyond
//! [`HANDSHAKES_PER_AGENT_PER_SECOND`] the gateway answers with a WireGuard cookie reply for the sender's address
//! (64 bytes for a 148-byte initiation) and only forwards initiations that carry a valid cookie (`mac2`), exactly
//! as a WireGuard responder under load does; so nothing unauthenticated ever gets more bytes back than it sent.
//! Finding an initiation's agent costs one keyed BLAKE2s per agent (the `mac1` check); the number of such checks
//! per second is bounded ([`MAC_CHECKS_PER_SECOND`]).
//!
//! Not here: the relay connections themselves ([`crate::relay`]); the exported device configs (`wgconfig`).

pub mod table;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{TunnResult, errors::WireGuardError};
use meshd_protocol::wireguard::{self, Message};
use meshd_protocol::{NodeId, PublicKey};
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use self::table::{DropReason, Route, Table};
use crate::model::NodeKind;
use crate::relay::Relay;
use crate::store::Store;
use crate::telemetry;

/// The port stock WireGuard apps expect (and wg(8) suggests).
pub const DEFAULT_PORT: u16 = 51820;
/// Handshake messages per agent per second before the gateway demands cookies. Well below what an agent accepts
/// itself (100 a second) so that a flood at the gateway never puts the agent under load, where it would refuse
/// relayed handshakes (they carry no address to send a cookie for). 25 a second is plenty: every device makes one
/// handshake per agent every two minutes.
pub const HANDSHAKES_PER_AGENT_PER_SECOND: u64 = 25;
/// `mac1` checks (one per agent tried) per second, in total: caps what a flood of initiations can cost.
pub const MAC_CHECKS_PER_SECOND: u64 = 2_000_000;
/// Largest datagram read: WireGuard never sends more than MTU-sized datagrams; a longer one is cut and refused.
const RECV_BUFFER: usize = 65_536;
/// Pause after a receive error that is not about one peer, so a broken socket cannot spin a core.
const ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Figures since start (the same as the Prometheus metrics, per gateway, for tests and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct GatewayStats {
    pub to_agent_packets: u64,
    pub to_device_packets: u64,
    pub dropped_packets: u64,
    pub cookie_replies: u64,
    pub sessions: u64,
}

/// One session as the admin API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SessionView {
    /// The agent's node id.
    pub agent: NodeId,
    /// The device's node id, once an agent answered its handshake.
    pub device: Option<NodeId>,
    /// Where the device's datagrams come from (its NAT's address), as the gateway last saw it.
    #[schema(value_type = String)]
    pub device_address: SocketAddr,
    pub established: bool,
    /// Seconds since the handshake.
    pub age_seconds: u64,
}

struct Agent {
    key: PublicKey,
    limiter: RateLimiter,
}

/// Who may use the gateway: agents (responders to find by `mac1`) and devices (keys agents may send to).
#[derive(Default)]
struct Members {
    agents: Arc<Vec<Arc<Agent>>>,
    devices: HashSet<PublicKey>,
    by_id: HashMap<NodeId, (PublicKey, NodeKind)>,
}

pub struct Gateway {
    socket: Arc<UdpSocket>,
    table: Mutex<Table>,
    members: RwLock<Members>,
    relay: Arc<Relay>,
    mac_checks: AtomicU64,
    to_agent: AtomicU64,
    to_device: AtomicU64,
    dropped: AtomicU64,
    cookie_replies: AtomicU64,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("socket", &self.socket.local_addr().ok())
            .finish()
    }
}

impl Gateway {
    /// Binds `addr` (port 0: any free port), loads the members from `store`, follows `changes`, and serves until
    /// `shutdown`. Devices' datagrams go to agents through `relay`.
    pub async fn start(
        addr: SocketAddr,
        store: Store,
        changes: broadcast::Receiver<Arc<crate::netmap::ChangeEvent>>,
        relay: Arc<Relay>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let socket = UdpSocket::bind(addr).await.with_context(|| {
            format!(
                "binding the WireGuard gateway port {addr}/udp (choose another with --gateway-port, or turn the \
                 gateway off with --no-gateway)"
            )
        })?;
        let gateway = Arc::new(Self {
            socket: Arc::new(socket),
            table: Mutex::new(Table::new()),
            members: RwLock::new(Members::default()),
            relay,
            mac_checks: AtomicU64::new(0),
            to_agent: AtomicU64::new(0),
            to_device: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            cookie_replies: AtomicU64::new(0),
        });
        gateway.reload(&store).await.context("loading the gateway's members")?;
        tracing::info!(addr = %gateway.local_addr()?, "WireGuard gateway for stock devices listening");
        tokio::spawn(gateway.clone().receive_loop(shutdown.clone()));
        tokio::spawn(gateway.clone().tick_loop(shutdown.clone()));
        tokio::spawn(gateway.clone().follow(store, changes, shutdown));
        Ok(gateway)
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.socket.local_addr().context("reading the gateway socket's address")
    }

    pub fn stats(&self) -> GatewayStats {
        GatewayStats {
            to_agent_packets: self.to_agent.load(Ordering::Relaxed),
            to_device_packets: self.to_device.load(Ordering::Relaxed),
            dropped_packets: self.dropped.load(Ordering::Relaxed),
            cookie_replies: self.cookie_replies.load(Ordering::Relaxed),
            sessions: self.lock_table().len() as u64,
        }
    }

    /// The sessions the gateway knows now, for the admin API.
    pub fn sessions(&self) -> Vec<SessionView> {
        let members = self.read_members();
        let id_of = |key: &PublicKey| members.by_id.iter().find(|(_, (k, _))| k == key).map(|(id, _)| *id);
        let now = Instant::now();
        self.lock_table()
            .sessions()
            .filter_map(|s| {
                Some(SessionView {
                    agent: id_of(&s.agent)?,
                    device: s.device_key.as_ref().and_then(id_of),
                    device_address: s.device_addr,
                    established: s.established,
                    age_seconds: now.saturating_duration_since(s.since).as_secs(),
                })
            })
            .collect()
    }

    /// True when `key` is a device's: the relay hands an agent's `Send` to it here instead of to a connection.
    pub fn serves_device(&self, key: &PublicKey) -> bool {
        self.read_members().devices.contains(key)
    }

    /// A datagram `agent` sent over its relay connection to `device`: routed by the session table to the device's
    /// latest address, or dropped and counted.
    pub fn on_agent_datagram(&self, agent: PublicKey, device: PublicKey, datagram: &[u8]) {
        let message = match wireguard::parse(datagram) {
            Ok(message) => message,
            Err(_) => return self.drop_counted("malformed"),
        };
        let route = self
            .lock_table()
            .route_from_agent(agent, device, message, Instant::now());
        match route {
            Route::ToDevice(addr) => self.send_to_device(datagram, addr),
            Route::Drop(reason) => self.drop_counted(reason.label()),
            Route::ToAgent { .. } => self.drop_counted("malformed"),
        }
    }

    fn send_to_device(&self, datagram: &[u8], addr: SocketAddr) {
        // Never waits: a full socket buffer drops the datagram (WireGuard's transport survives loss).
        match self.socket.try_send_to(datagram, addr) {
            Ok(_) => {
                self.to_device.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(telemetry::GATEWAY_PACKETS, "direction" => "to_device").increment(1);
                metrics::counter!(telemetry::GATEWAY_BYTES, "direction" => "to_device")
                    .increment(datagram.len() as u64);
            }
            Err(e) => {
                tracing::trace!(%addr, error = %e, "gateway send to a device failed");
                self.drop_counted("send_failed");
            }
        }
    }

    fn drop_counted(&self, reason: &'static str) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::GATEWAY_DROPPED, "reason" => reason).increment(1);
    }

    async fn receive_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut buf = vec![0u8; RECV_BUFFER];
        let mut reply = [0u8; wireguard::COOKIE_REPLY_LEN];
        loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => return,
                received = self.socket.recv_from(&mut buf) => received,
            };
            let (len, source) = match received {
                Ok(received) => received,
                // An ICMP error for an earlier send surfaces here on Linux; it concerns one peer, not the socket.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "gateway receive failed");
                    tokio::time::sleep(ERROR_PAUSE).await;
                    continue;
                }
            };
            self.on_device_datagram(&buf[..len], source, &mut reply);
        }
    }

    /// One datagram from a device (or anyone) at `source`.
    fn on_device_datagram(&self, datagram: &[u8], source: SocketAddr, reply: &mut [u8; wireguard::COOKIE_REPLY_LEN]) {
        let message = match wireguard::parse(datagram) {
            Ok(message) => message,
            Err(_) => return self.drop_counted("malformed"),
        };
        let target = match message {
            Message::Initiation { .. } => match self.find_responder(datagram, source, reply) {
                Ok(agent) => Some(agent),
                Err(reason) => return self.drop_counted(reason),
            },
            // A response is checked against the agent its session names (mac1 is keyed by the initiator's key).
            Message::Response { receiver, .. } => {
                let Some(agent) = self.lock_table().agent_for_device_message(receiver, source) else {
                    return self.drop_counted(DropReason::UnknownIndex.label());
                };
                if let Err(reason) = self.check_handshake(&agent, datagram, source, reply) {
                    return self.drop_counted(reason);
                }
                None
            }
            Message::CookieReply { .. } | Message::Data { .. } => None,
        };
        let route = self
            .lock_table()
            .route_from_device(message, source, target, Instant::now());
        match route {
            Route::ToAgent { agent, device } => {
                let tag = device.unwrap_or(meshd_protocol::relay::GATEWAY_UNKNOWN_DEVICE);
                if self.relay.deliver(tag, &agent, datagram) {
                    self.to_agent.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(telemetry::GATEWAY_PACKETS, "direction" => "to_agent").increment(1);
                    metrics::counter!(telemetry::GATEWAY_BYTES, "direction" => "to_agent")
                        .increment(datagram.len() as u64);
                } else {
                    self.drop_counted("agent_not_connected");
                }
            }
            Route::Drop(reason) => self.drop_counted(reason.label()),
            Route::ToDevice(_) => self.drop_counted("malformed"),
        }
    }

    /// The agent an initiation is for: the one whose key its `mac1` verifies with. Under load (per agent) the
    /// initiation must also carry a valid cookie; without one, the sender gets a cookie reply and the initiation is
    /// dropped.
    fn find_responder(
        &self,
        datagram: &[u8],
        source: SocketAddr,
        reply: &mut [u8; wireguard::COOKIE_REPLY_LEN],
    ) -> Result<PublicKey, &'static str> {
        let agents = Arc::clone(&self.read_members().agents);
        let checks = self.mac_checks.fetch_add(agents.len() as u64, Ordering::Relaxed);
        if checks >= MAC_CHECKS_PER_SECOND {
            return Err("mac_check_budget");
        }
        for agent in agents.iter() {
            match agent.limiter.verify_packet(Some(source.ip()), datagram, reply) {
                Ok(_) => return Ok(agent.key),
                Err(TunnResult::Err(WireGuardError::InvalidMac)) => continue,
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    let len = cookie.len();
                    self.send_cookie(&reply[..len], source);
                    return Err("cookie_required");
                }
                Err(_) => return Err("malformed"),
            }
        }
        Err("no_agent_matches_mac1")
    }

    /// Checks a handshake response's `mac1` (and cookie, under load) against `agent`'s key.
    fn check_handshake(
        &self,
        agent: &PublicKey,
        datagram: &[u8],
        source: SocketAddr,
        reply: &mut [u8; wireguard::COOKIE_REPLY_LEN],
    ) -> Result<(), &'static str> {
        let agents = Arc::clone(&self.read_members().agents);
        let Some(agent) = agents.iter().find(|a| a.key == *agent) else {
            return Err("unknown_agent");
        };
        match agent.limiter.verify_packet(Some(source.ip()), datagram, reply) {
            Ok(_) => Ok(()),
            Err(TunnResult::WriteToNetwork(cookie)) => {
                let len = cookie.len();
                self.send_cookie(&reply[..len], source);
                Err("cookie_required")
            }
            Err(TunnResult::Err(WireGuardError::InvalidMac)) => Err("bad_mac"),
            Err(_) => Err("malformed"),
        }
    }

    fn send_cookie(&self, cookie: &[u8], to: SocketAddr) {
        self.cookie_replies.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::GATEWAY_COOKIE_REPLIES).increment(1);
        let _ = self.socket.try_send_to(cookie, to);
    }

    /// Once a second: forget expired sessions, reset the handshake and `mac1` budgets, publish the session gauge.
    async fn tick_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let sessions = {
                let mut table = self.lock_table();
                table.expire(Instant::now());
                table.len()
            };
            metrics::gauge!(telemetry::GATEWAY_SESSIONS).set(sessions as f64);
            self.mac_checks.store(0, Ordering::Relaxed);
            let agents = Arc::clone(&self.read_members().agents);
            for agent in agents.iter() {
                agent.limiter.reset_count();
            }
        }
    }

    /// Follows the broker: a removed device or agent is forgotten at once (its traffic stops within the broker's
    /// latency), a new or re-keyed one is learnt; after a lag everything is reloaded.
    async fn follow(
        self: Arc<Self>,
        store: Store,
        mut changes: broadcast::Receiver<Arc<crate::netmap::ChangeEvent>>,
        shutdown: CancellationToken,
    ) {
        loop {
            let change = tokio::select! {
                () = shutdown.cancelled() => return,
                change = changes.recv() => change,
            };
            let result = match change {
                Ok(change) if !change.node_exists => {
                    self.remove_member(change.node_id);
                    Ok(())
                }
                Ok(change) => self.refresh_member(&store, change.node_id).await,
                Err(broadcast::error::RecvError::Lagged(_)) => self.reload(&store).await,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "the gateway could not load a node change; it retries on the next one");
            }
        }
    }

    async fn reload(&self, store: &Store) -> crate::store::Result<()> {
        let nodes = store.nodes().await?;
        let mut members = Members::default();
        let mut agents = Vec::new();
        for node in nodes {
            members.by_id.insert(node.id, (node.public_key, node.kind));
            match node.kind {
                NodeKind::Meshd => agents.push(new_agent(node.public_key)),
                NodeKind::Wireguard => {
                    members.devices.insert(node.public_key);
                }
            }
        }
        members.agents = Arc::new(agents);
        let gone: Vec<(PublicKey, NodeKind)> = {
            let old = self.read_members();
            old.by_id
                .values()
                .filter(|(key, _)| !members.by_id.values().any(|(k, _)| k == key))
                .copied()
                .collect()
        };
        *self.write_members() = members;
        let mut table = self.lock_table();
        for (key, kind) in gone {
            forget(&mut table, &key, kind);
        }
        Ok(())
    }

    async fn refresh_member(&self, store: &Store, id: NodeId) -> crate::store::Result<()> {
        let Some(node) = store.node(id).await? else {
            self.remove_member(id);
            return Ok(());
        };
        let known = self.read_members().by_id.get(&id).copied();
        if known == Some((node.public_key, node.kind)) {
            return Ok(());
        }
        self.remove_member(id);
        let mut members = self.write_members();
        members.by_id.insert(id, (node.public_key, node.kind));
        match node.kind {
            NodeKind::Meshd => {
                let mut agents: Vec<Arc<Agent>> = members.agents.iter().cloned().collect();
                agents.push(new_agent(node.public_key));
                members.agents = Arc::new(agents);
            }
            NodeKind::Wireguard => {
                members.devices.insert(node.public_key);
            }
        }
        Ok(())
    }

    fn remove_member(&self, id: NodeId) {
        let removed = {
            let mut members = self.write_members();
            let Some((key, kind)) = members.by_id.remove(&id) else {
                return;
            };
            match kind {
                NodeKind::Meshd => {
                    let agents: Vec<Arc<Agent>> = members.agents.iter().filter(|a| a.key != key).cloned().collect();
                    members.agents = Arc::new(agents);
                }
                NodeKind::Wireguard => {
                    members.devices.remove(&key);
                }
            }
            (key, kind)
        };
        forget(&mut self.lock_table(), &removed.0, removed.1);
        tracing::info!(node = id, "the gateway forgot a removed node and its sessions");
    }

    fn lock_table(&self) -> std::sync::MutexGuard<'_, Table> {
        // The table is consistent between calls (each call finishes its updates): keep serving after a panic.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_members(&self) -> std::sync::RwLockReadGuard<'_, Members> {
        self.members.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_members(&self) -> std::sync::RwLockWriteGuard<'_, Members> {
        self.members.write().unwrap_or_else(PoisonError::into_inner)
    }
}

fn new_agent(key: PublicKey) -> Arc<Agent> {
    let public = boringtun::x25519::PublicKey::from(*key.as_bytes());
    Arc::new(Agent {
        key,
        limiter: RateLimiter::new(&public, HANDSHAKES_PER_AGENT_PER_SECOND),
    })
}

fn forget(table: &mut Table, key: &PublicKey, kind: NodeKind) {
    match kind {
        NodeKind::Meshd => table.forget_agent(key),
        NodeKind::Wireguard => table.forget_device(key),
    }
}

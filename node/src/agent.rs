//! The running agent's shared state: the applied network map, the life phase, and the data plane behind the small
//! [`DataPlane`] trait.
//!
//! Owns the one path by which the map changes: [`AgentState::apply`] folds a [`MapMessage`] into the map
//! ([`NetworkMap::apply`]), turns the result into the desired peer list ([`reconcile`]) and hands it to the data
//! plane. The control loop ([`crate::follow`]) writes through it; the control socket ([`crate::ctl`]) only reads.
//! Does no IO of its own, so unit tests drive it with a recording fake.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use meshd_protocol::{MapMessage, NetworkMap, NodeId, PresharedKey, PublicKey};
use tokio::sync::mpsc;

use crate::engine::{Engine, EngineStatus, PeerConfig, RelayDatagram};
use crate::netcheck::Discovery;
use crate::reconcile;
use crate::relay::RelayStatus;
use crate::state::Identity;

/// The answer of a STUN probe: the mapped address, or why there is none.
pub type StunFuture<'a> = Pin<Box<dyn Future<Output = Result<SocketAddr, String>> + Send + 'a>>;

/// The data plane as the control loop and the control socket see it. [`Engine`] is the real one; tests use a fake.
/// The NAT-traversal methods have defaults that describe a data plane without relay or STUN (direct paths only).
pub trait DataPlane: Send + Sync + 'static {
    /// Makes the peer set equal to `peers`, leaving unchanged peers untouched.
    fn reconfigure(&self, peers: Vec<PeerConfig>);
    fn status(&self) -> EngineStatus;
    fn listen_port(&self) -> u16;

    /// The relay channels: datagrams the data plane wants relayed (taken once: `None` on the second call, or when
    /// this data plane has no relay) and where the relay client hands the datagrams it received.
    fn relay_channels(&self) -> Option<(mpsc::Receiver<RelayDatagram>, mpsc::Sender<RelayDatagram>)> {
        None
    }
    /// Whether the relay is connected (called on every change).
    fn set_relay_connected(&self, _connected: bool) {}
    /// Sends a STUN binding request from the WireGuard socket to `server` and waits up to `timeout` for the answer.
    fn stun(&self, _server: SocketAddr, _timeout: Duration) -> StunFuture<'_> {
        Box::pin(async { Err("this data plane cannot send STUN requests".to_string()) })
    }
    /// This node's own candidate endpoints (interfaces + STUN-mapped), for the peers' CallMeMaybe.
    fn set_own_endpoints(&self, _endpoints: Vec<SocketAddr>) {}
}

impl DataPlane for Engine {
    fn reconfigure(&self, peers: Vec<PeerConfig>) {
        Engine::reconfigure(self, peers)
    }
    fn status(&self) -> EngineStatus {
        Engine::status(self)
    }
    fn listen_port(&self) -> u16 {
        Engine::listen_port(self)
    }
    fn relay_channels(&self) -> Option<(mpsc::Receiver<RelayDatagram>, mpsc::Sender<RelayDatagram>)> {
        Some((self.take_relay_outbound()?, self.relay_inbound()))
    }
    fn set_relay_connected(&self, connected: bool) {
        Engine::set_relay_connected(self, connected)
    }
    fn stun(&self, server: SocketAddr, timeout: Duration) -> StunFuture<'_> {
        Box::pin(async move { Engine::stun(self, server, timeout).await.map_err(|e| e.to_string()) })
    }
    fn set_own_endpoints(&self, endpoints: Vec<SocketAddr>) {
        Engine::set_own_endpoints(self, endpoints)
    }
}

/// Where the agent is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Starting: enrolling with a token, or not yet connected to the coordinator since `meshd up`.
    Joining,
    /// Following the coordinator's map stream.
    Running,
    /// The coordinator is away: the mesh runs from the last map while the agent reconnects.
    Degraded,
    /// Shutting down.
    Stopped,
}

/// What the running agent knows, shared with the control socket. Locks are std ones: held for a copy or a swap,
/// never across an await.
pub struct AgentState {
    pub identity: Identity,
    pub interface: String,
    pub dataplane: Arc<dyn DataPlane>,
    /// The relay connection as the relay client ([`crate::relay`]) last saw it.
    pub relay: Arc<RelayStatus>,
    /// What STUN and the interfaces say about this node's own endpoints ([`crate::follow`] writes it).
    pub discovery: Arc<Discovery>,
    /// How mesh names resolve on this host ([`crate::dns`] writes it).
    pub dns: crate::dns::StatusCell,
    map: RwLock<Option<NetworkMap>>,
    /// Preshared keys of the pairs that use one, by peer key (fetched from the coordinator, cached on disk).
    preshared_keys: RwLock<HashMap<PublicKey, PresharedKey>>,
    /// Every applied map (or `None` once removed), for those who follow it (the name service).
    maps: tokio::sync::watch::Sender<Option<NetworkMap>>,
    phase: Mutex<Phase>,
}

impl AgentState {
    pub fn new(identity: Identity, interface: String, dataplane: Arc<dyn DataPlane>) -> Self {
        Self {
            identity,
            interface,
            dataplane,
            relay: Arc::default(),
            discovery: Arc::default(),
            dns: Arc::default(),
            map: RwLock::new(None),
            preshared_keys: RwLock::new(HashMap::new()),
            maps: tokio::sync::watch::Sender::new(None),
            phase: Mutex::new(Phase::Joining),
        }
    }

    pub fn map(&self) -> Option<NetworkMap> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Follows the applied map: the current one at once, then every change (intermediate ones may be skipped).
    pub fn subscribe_map(&self) -> tokio::sync::watch::Receiver<Option<NetworkMap>> {
        self.maps.subscribe()
    }

    pub fn map_version(&self) -> Option<u64> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|m| m.version)
    }

    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        let mut current = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        if *current != phase {
            tracing::info!(from = ?*current, to = ?phase, "agent state");
            *current = phase;
        }
    }

    /// Installs a whole map (the cache at start, or a full map) and configures the data plane for it.
    pub fn install(&self, map: NetworkMap) {
        self.apply(MapMessage::Full { map }).expect("a full map always applies");
    }

    /// Folds one message into the map and, if anything changed, reconfigures the data plane. Returns the new map
    /// when it changed (for the caller to persist).
    pub fn apply(&self, message: MapMessage) -> Result<Option<NetworkMap>, meshd_protocol::netmap::ApplyError> {
        let previous = self.map();
        let mut next = previous.clone();
        NetworkMap::apply(&mut next, message)?;
        if next == previous {
            return Ok(None);
        }
        let next = next.expect("apply leaves a map after success");
        log_changes(previous.as_ref(), &next);
        if next.self_node.ip != self.identity.ip {
            tracing::warn!(
                saved = %self.identity.ip, map = %next.self_node.ip,
                "the coordinator moved this node's address; restart the agent to use it"
            );
        }
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = Some(next.clone());
        self.dataplane
            .reconfigure(reconcile::desired_peers(&next, &self.preshared_keys()));
        self.maps.send_replace(Some(next.clone()));
        Ok(Some(next))
    }

    /// The node was deleted: no peer may stay configured.
    /// The preshared keys known now.
    pub fn preshared_keys(&self) -> HashMap<PublicKey, PresharedKey> {
        self.preshared_keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// True when the current map has a pair whose preshared key is not known yet.
    pub fn needs_preshared_keys(&self) -> bool {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|map| reconcile::missing_preshared_keys(map, &self.preshared_keys()))
    }

    /// Replaces the preshared keys and, when they changed, reconfigures the data plane with them.
    pub fn set_preshared_keys(&self, keys: HashMap<PublicKey, PresharedKey>) {
        {
            let mut current = self.preshared_keys.write().unwrap_or_else(|p| p.into_inner());
            if *current == keys {
                return;
            }
            *current = keys;
        }
        if let Some(map) = self.map() {
            self.dataplane
                .reconfigure(reconcile::desired_peers(&map, &self.preshared_keys()));
        }
    }

    pub(crate) fn clear(&self) {
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.dataplane.reconfigure(Vec::new());
        self.maps.send_replace(None);
    }
}

fn log_changes(previous: Option<&NetworkMap>, next: &NetworkMap) {
    let before: BTreeMap<NodeId, _> = previous
        .map(|m| m.peers.iter().map(|p| (p.id, p)).collect())
        .unwrap_or_default();
    for peer in &next.peers {
        match before.get(&peer.id) {
            None => tracing::info!(peer = %peer.name, ip = %peer.ip, key = ?peer.public_key, "peer added"),
            Some(old) if *old != peer => tracing::debug!(
                peer = %peer.name, endpoints = ?peer.endpoints, online = peer.online, "peer changed"
            ),
            Some(_) => {}
        }
    }
    for (id, old) in &before {
        if next.peer(*id).is_none() {
            tracing::info!(peer = %old.name, ip = %old.ip, "peer removed");
        }
    }
    tracing::debug!(version = next.version, peers = next.peers.len(), "map applied");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineCounters;
    use meshd_protocol::{MapNode, PublicKey};
    use std::net::Ipv4Addr;

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<Vec<PeerConfig>>>,
    }

    impl DataPlane for Recorder {
        fn reconfigure(&self, peers: Vec<PeerConfig>) {
            self.calls.lock().expect("lock").push(peers);
        }
        fn status(&self) -> EngineStatus {
            EngineStatus {
                interface: "t0".into(),
                listen_port: 1,
                peers: vec![],
                counters: EngineCounters::default(),
                ..EngineStatus::default()
            }
        }
        fn listen_port(&self) -> u16 {
            1
        }
    }

    fn node(id: i64) -> MapNode {
        MapNode {
            id,
            name: format!("n{id}"),
            ip: Ipv4Addr::new(10, 77, 0, id as u8),
            public_key: PublicKey::from_bytes([id as u8; 32]),
            endpoints: vec![],
            online: true,
            last_seen: None,
            tags: vec![],
            kind: meshd_protocol::NodeKind::Agent,
            preshared_key: false,
        }
    }

    fn agent() -> (AgentState, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let identity = Identity {
            node_id: 1,
            name: "n1".into(),
            ip: Ipv4Addr::new(10, 77, 0, 1),
            network: "10.77.0.0/16".parse().expect("cidr"),
            coordinator_url: "http://127.0.0.1:1".into(),
            fingerprint: None,
            tags: vec![],
            public_key: PublicKey::from_bytes([1; 32]),
        };
        (AgentState::new(identity, "t0".into(), recorder.clone()), recorder)
    }

    fn names(calls: &[Vec<PeerConfig>], i: usize) -> Vec<String> {
        calls[i].iter().map(|p| p.name.clone()).collect()
    }

    #[test]
    fn map_messages_drive_the_data_plane() {
        let (agent, recorder) = agent();
        let full = NetworkMap {
            version: 3,
            network: "10.77.0.0/16".parse().expect("cidr"),
            self_node: node(1),
            peers: vec![node(2)],
            dns: None,
        };
        assert!(
            agent
                .apply(MapMessage::PeerAdded {
                    version: 4,
                    peer: node(3)
                })
                .is_err(),
            "no base yet"
        );
        assert!(
            agent
                .apply(MapMessage::Full { map: full.clone() })
                .expect("full")
                .is_some()
        );
        assert_eq!(agent.map_version(), Some(3));
        // The same full map again (a reconnect) changes nothing and does not touch the data plane.
        assert!(agent.apply(MapMessage::Full { map: full }).expect("same").is_none());
        let changed = agent
            .apply(MapMessage::PeerAdded {
                version: 4,
                peer: node(3),
            })
            .expect("add");
        assert_eq!(changed.expect("changed").version, 4);
        // A replayed delta is ignored.
        assert!(
            agent
                .apply(MapMessage::PeerRemoved { version: 4, id: 3 })
                .expect("replay")
                .is_none()
        );
        agent
            .apply(MapMessage::PeerRemoved { version: 5, id: 2 })
            .expect("remove");
        let calls = recorder.calls.lock().expect("lock").clone();
        assert_eq!(calls.len(), 3);
        assert_eq!(names(&calls, 0), ["n2"]);
        assert_eq!(names(&calls, 1), ["n2", "n3"]);
        assert_eq!(names(&calls, 2), ["n3"]);

        agent.clear();
        assert!(agent.map().is_none());
        assert!(
            recorder.calls.lock().expect("lock").last().expect("call").is_empty(),
            "removal clears peers"
        );
    }
}

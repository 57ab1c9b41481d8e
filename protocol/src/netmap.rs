//! A node's view of the network and the deltas that keep it current.
//!
//! The coordinator streams [`MapMessage`]s: first a [`MapMessage::Full`], then deltas. Every message carries the
//! version of the coordinator's change log it reflects; versions only grow. A node that reconnects asks for the
//! changes after the last version it applied and gets either those deltas or, when the log no longer reaches back
//! that far, a new full map. [`NetworkMap::apply`] is the one place that folds messages into a map, used by the
//! node agent and by tests alike.

use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::key::PublicKey;

/// Identifier of a node, assigned by the coordinator; never reused.
pub type NodeId = i64;

/// A node as others see it (and as it sees itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MapNode {
    pub id: NodeId,
    /// Unique DNS-safe name.
    pub name: String,
    /// Overlay address.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "10.77.0.5"))]
    pub ip: Ipv4Addr,
    pub public_key: PublicKey,
    /// UDP endpoints the node reported, best first. Empty: unknown (a device that cannot run meshd, or a node that
    /// has not reported yet); peers then wait for it to send first and learn its address from its packets.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub endpoints: Vec<SocketAddr>,
    /// True while the node's map stream is connected to a coordinator.
    pub online: bool,
    /// Unix seconds of the last time the coordinator heard from the node; absent if never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<i64>,
    pub tags: Vec<String>,
    /// What software the node runs, which decides how peers reach it. Absent (an older coordinator or cached map):
    /// [`NodeKind::Device`], so traffic for a node of unknown kind never goes into the relay.
    #[serde(default)]
    pub kind: NodeKind,
    /// True when every pair with this node uses a preshared key (stock devices registered with one); each peer
    /// fetches its own from [`crate::paths::PRESHARED_KEYS`] (keys never travel in the map, which all nodes share).
    /// Absent: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preshared_key: bool,
}

/// What a node runs, as far as reaching it is concerned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    /// Runs the meshd agent (joined with a token, holds a credential): speaks disco and uses the relay.
    Agent,
    /// A plain WireGuard peer registered by an admin (no credential): classic WireGuard only (configured endpoint and
    /// roaming), never disco or the relay.
    #[default]
    Device,
}

/// The full map for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NetworkMap {
    /// Version of the change log this map reflects.
    pub version: u64,
    /// The overlay network (addresses of all nodes lie in it).
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "10.77.0.0/16"))]
    pub network: Ipv4Net,
    /// The node this map is for.
    #[serde(rename = "self")]
    pub self_node: MapNode,
    /// Every peer this node may talk to, sorted by id.
    pub peers: Vec<MapNode>,
    /// How names resolve in this network. Absent: the coordinator predates names (agents then leave name
    /// resolution alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsConfig>,
}

/// The network's naming, carried in every full map. It changes only when the coordinator restarts with another
/// `--dns-domain`, which sends every node a new full map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DnsConfig {
    /// The domain every node's name lives in (`gpu-server` is also `gpu-server.<domain>`); canonical per
    /// [`crate::names::normalize_domain`].
    #[cfg_attr(feature = "openapi", schema(example = "mesh.internal"))]
    pub domain: String,
}

/// One message of the map stream (the `data` of an SSE event named `map`, whose `id` is the version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MapMessage {
    /// Replaces whatever the node had.
    Full { map: NetworkMap },
    /// A new peer.
    PeerAdded { version: u64, peer: MapNode },
    /// A peer's name, endpoints, online state, tags or key changed; carries the whole new peer (one node's worth).
    PeerChanged { version: u64, peer: MapNode },
    /// A peer left or was deleted.
    PeerRemoved { version: u64, id: NodeId },
    /// Something about this node itself changed (name, tags, endpoints as the coordinator sees them).
    SelfChanged { version: u64, node: MapNode },
}

impl MapMessage {
    pub fn version(&self) -> u64 {
        match self {
            Self::Full { map } => map.version,
            Self::PeerAdded { version, .. }
            | Self::PeerChanged { version, .. }
            | Self::PeerRemoved { version, .. }
            | Self::SelfChanged { version, .. } => *version,
        }
    }
}

/// Why a delta could not be applied; the node should reconnect and ask for a full map.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("delta for version {got} does not follow map version {have}")]
    Stale { have: u64, got: u64 },
    #[error("a delta arrived before any full map")]
    NoBase,
}

impl NetworkMap {
    /// Folds one message into `map`. A `Full` replaces it; a delta older than or equal to the current version is
    /// ignored (it was already applied, e.g. replayed after a reconnect); a delta needs a base map.
    pub fn apply(map: &mut Option<NetworkMap>, message: MapMessage) -> Result<(), ApplyError> {
        if let MapMessage::Full { map: full } = message {
            *map = Some(full);
            return Ok(());
        }
        let current = map.as_mut().ok_or(ApplyError::NoBase)?;
        let version = message.version();
        if version <= current.version {
            return Ok(());
        }
        match message {
            MapMessage::Full { .. } => unreachable!("handled above"),
            MapMessage::PeerAdded { peer, .. } | MapMessage::PeerChanged { peer, .. } => {
                if peer.id == current.self_node.id {
                    current.self_node = peer;
                } else {
                    match current.peers.binary_search_by_key(&peer.id, |p| p.id) {
                        Ok(i) => current.peers[i] = peer,
                        Err(i) => current.peers.insert(i, peer),
                    }
                }
            }
            MapMessage::PeerRemoved { id, .. } => current.peers.retain(|p| p.id != id),
            MapMessage::SelfChanged { node, .. } => current.self_node = node,
        }
        current.version = version;
        Ok(())
    }

    pub fn peer(&self, id: NodeId) -> Option<&MapNode> {
        self.peers
            .binary_search_by_key(&id, |p| p.id)
            .ok()
            .map(|i| &self.peers[i])
    }
}

/// Sample nodes and maps for the tests and fuzz targets of both sides (not for production code): node `id` is
/// `10.77.0.<id>` with key `[id; 32]`, an online agent; maps are in `10.77.0.0/16` with domain `mesh.internal`.
#[doc(hidden)]
pub mod fixtures {
    use super::*;

    pub fn node(id: NodeId, name: &str) -> MapNode {
        MapNode {
            id,
            name: name.into(),
            ip: Ipv4Addr::new(10, 77, 0, id as u8),
            public_key: PublicKey::from_bytes([id as u8; 32]),
            endpoints: vec![],
            online: true,
            last_seen: None,
            tags: vec![],
            kind: NodeKind::Agent,
            preshared_key: false,
        }
    }

    /// The map of node 1, `laptop`, with `peers`.
    pub fn map(peers: Vec<MapNode>) -> NetworkMap {
        NetworkMap {
            version: 1,
            network: "10.77.0.0/16".parse().expect("a valid literal network"),
            self_node: node(1, "laptop"),
            peers,
            dns: Some(DnsConfig {
                domain: "mesh.internal".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::node;
    use super::*;

    #[test]
    fn applies_full_then_deltas_and_ignores_replays() {
        let mut map = None;
        assert_eq!(
            NetworkMap::apply(&mut map, MapMessage::PeerRemoved { version: 1, id: 2 }),
            Err(ApplyError::NoBase)
        );
        let full = NetworkMap {
            version: 5,
            network: "10.77.0.0/16".parse().expect("cidr"),
            self_node: node(1, "me"),
            peers: vec![node(3, "c")],
            dns: None,
        };
        NetworkMap::apply(&mut map, MapMessage::Full { map: full }).expect("full");
        NetworkMap::apply(
            &mut map,
            MapMessage::PeerAdded {
                version: 6,
                peer: node(2, "b"),
            },
        )
        .expect("add");
        let m = map.as_ref().expect("map");
        assert_eq!(
            m.peers.iter().map(|p| p.id).collect::<Vec<_>>(),
            vec![2, 3],
            "kept sorted"
        );
        // A replayed older delta is a no-op.
        NetworkMap::apply(&mut map, MapMessage::PeerRemoved { version: 6, id: 2 }).expect("replay");
        assert!(map.as_ref().expect("map").peer(2).is_some());
        let mut renamed = node(2, "bee");
        renamed.online = false;
        NetworkMap::apply(
            &mut map,
            MapMessage::PeerChanged {
                version: 7,
                peer: renamed.clone(),
            },
        )
        .expect("chg");
        NetworkMap::apply(&mut map, MapMessage::PeerRemoved { version: 8, id: 3 }).expect("rm");
        let m = map.expect("map");
        assert_eq!(m.version, 8);
        assert_eq!(m.peers, vec![renamed]);
    }

    #[test]
    fn wire_format_is_tagged_and_self_is_named_self() {
        let msg = MapMessage::PeerRemoved { version: 9, id: 4 };
        assert_eq!(
            serde_json::to_string(&msg).expect("json"),
            r#"{"type":"peer_removed","version":9,"id":4}"#
        );
        let full = NetworkMap {
            version: 1,
            network: "10.77.0.0/16".parse().expect("cidr"),
            self_node: node(1, "me"),
            peers: vec![],
            dns: Some(DnsConfig {
                domain: "mesh.internal".into(),
            }),
        };
        let v = serde_json::to_value(MapMessage::Full { map: full }).expect("json");
        assert_eq!(v["type"], "full");
        assert_eq!(v["map"]["self"]["name"], "me");
        assert_eq!(v["map"]["dns"]["domain"], "mesh.internal");
        // A map from a coordinator without names still parses.
        let mut old = v.clone();
        old["map"].as_object_mut().expect("object").remove("dns");
        let MapMessage::Full { map } = serde_json::from_value(old).expect("old map") else {
            panic!("full")
        };
        assert_eq!(map.dns, None);
    }
}

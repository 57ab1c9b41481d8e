//! The current map of every node, serialized, kept in memory by the broker: a stream's full map is built from it
//! without touching the database.
//!
//! Before this, every stream that opened (or lagged) read and decoded all N node rows and serialized N peers: O(N) work
//! per stream, O(N^2) for N nodes connecting (10^8 rows at 10,000 nodes, minutes of CPU). Now each node is serialized
//! once per change (by the broker, which reads the change anyway) and a full map is one concatenation of the cached
//! JSON fragments. Pure apart from its lock: the broker feeds it, streams read it.

use std::collections::BTreeMap;
use std::sync::RwLock;

use ipnet::Ipv4Net;
use meshd_protocol::{DnsConfig, MapMessage, MapNode, NetworkMap, NodeId};

use crate::model::{ChangeRecord, Node};
use crate::netmap::map_node;

/// What the cache holds for one node.
#[derive(Debug)]
struct Cached {
    node: MapNode,
    /// `serde_json` of `node`.
    json: String,
}

#[derive(Debug, Default)]
struct State {
    /// The version the cache reflects: every change up to it has been applied.
    version: u64,
    nodes: BTreeMap<NodeId, Cached>,
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct MapCache {
    state: RwLock<State>,
}

/// Marker the peers are spliced in at (a JSON key outside any string: quotes inside strings are escaped).
const PEERS_MARKER: &str = "\"peers\":[]";

impl MapCache {
    /// A cache holding `nodes` at `version` (read after the version, so it may already hold later changes, which are
    /// applied again harmlessly: a change carries the node's current state).
    pub fn new(version: u64, nodes: &[Node]) -> Self {
        let nodes = nodes.iter().map(|n| (n.id, cached(map_node(n)))).collect();
        Self {
            state: RwLock::new(State { version, nodes }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies a change (the node's current state, or its removal). Call before broadcasting it.
    pub fn apply(&self, change: &ChangeRecord) {
        let mut state = self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        match &change.node {
            Some(node) => {
                state.nodes.insert(node.id, cached(map_node(node)));
            }
            None => {
                state.nodes.remove(&change.node_id);
            }
        }
        state.version = state.version.max(change.version);
    }

    pub fn version(&self) -> u64 {
        self.read().version
    }

    pub fn len(&self) -> usize {
        self.read().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The JSON of the `full` message for `viewer` and its version, `None` if the viewer does not exist. The viewer
    /// is shown online: it is asking over its own open stream.
    pub fn full_map_json(&self, viewer: NodeId, network: Ipv4Net, dns: &DnsConfig) -> Option<(u64, String)> {
        let state = self.read();
        let mut self_node = state.nodes.get(&viewer)?.node.clone();
        self_node.online = true;
        let version = state.version;
        let skeleton = serde_json::to_string(&MapMessage::Full {
            map: NetworkMap {
                version,
                network,
                self_node,
                peers: Vec::new(),
                dns: Some(dns.clone()),
            },
        })
        .expect("map messages are plain data and always serialize");
        let at = skeleton.rfind(PEERS_MARKER)? + PEERS_MARKER.len() - 1;
        let peers_len: usize = state.nodes.values().map(|c| c.json.len() + 1).sum();
        let mut json = String::with_capacity(skeleton.len() + peers_len);
        json.push_str(&skeleton[..at]);
        let mut first = true;
        for (id, cached) in &state.nodes {
            if *id == viewer {
                continue;
            }
            if !first {
                json.push(',');
            }
            first = false;
            json.push_str(&cached.json);
        }
        json.push_str(&skeleton[at..]);
        Some((version, json))
    }
}

fn cached(node: MapNode) -> Cached {
    let json = serde_json::to_string(&node).expect("a map node is plain data and always serializes");
    Cached { node, json }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ChangeKind, NodeKind};
    use meshd_protocol::PublicKey;

    fn node(id: NodeId) -> Node {
        Node {
            id,
            name: format!("n{id}"),
            ip: std::net::Ipv4Addr::new(10, 77, 0, id as u8 + 1),
            public_key: PublicKey::from_bytes([id as u8; 32]),
            kind: NodeKind::Meshd,
            endpoints: vec!["198.18.0.1:51820".parse().expect("addr")],
            online: false,
            last_seen: Some(5),
            tags: vec!["a\"peers\":[]".into()],
            created_at: 0,
            preshared_key: false,
        }
    }

    #[test]
    fn full_map_equals_the_one_built_from_rows() {
        let net: Ipv4Net = "10.77.0.0/16".parse().expect("cidr");
        let dns = DnsConfig {
            domain: "mesh.internal".into(),
        };
        let nodes = vec![node(1), node(2), node(3)];
        let cache = MapCache::new(9, &nodes);
        let (version, json) = cache.full_map_json(2, net, &dns).expect("viewer exists");
        assert_eq!(version, 9);
        let MapMessage::Full { map } = serde_json::from_str(&json).expect("valid JSON") else {
            panic!("not a full map: {json}");
        };
        let mut expected = crate::netmap::full_map(9, net, Some(dns.clone()), 2, &nodes).expect("viewer exists");
        expected.self_node.online = true;
        assert_eq!(map, expected);
        assert!(cache.full_map_json(4, net, &dns).is_none());

        // Changes: a removal and an update move the version and the content.
        cache.apply(&ChangeRecord {
            version: 10,
            node_id: 3,
            kind: ChangeKind::Removed,
            node: None,
        });
        let mut renamed = node(1);
        renamed.name = "one".into();
        cache.apply(&ChangeRecord {
            version: 11,
            node_id: 1,
            kind: ChangeKind::Changed,
            node: Some(renamed),
        });
        let (version, json) = cache.full_map_json(2, net, &dns).expect("viewer exists");
        let MapMessage::Full { map } = serde_json::from_str(&json).expect("valid JSON") else {
            panic!("not a full map");
        };
        assert_eq!(version, 11);
        assert_eq!(
            map.peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            vec!["one"]
        );

        // A viewer alone in the network gets an empty peer list.
        let alone = MapCache::new(1, &[node(5)]);
        let (_, json) = alone.full_map_json(5, net, &dns).expect("viewer exists");
        assert!(serde_json::from_str::<MapMessage>(&json).is_ok(), "{json}");
    }
}

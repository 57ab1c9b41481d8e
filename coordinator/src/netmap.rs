//! Builds what a node sees: its full map and the deltas for a change. Pure: no IO.
//!
//! Visibility today is "everyone sees everyone" (a policy module can narrow it later: this is the one place that
//! decides). A delta carries the changed node's *current* state, never a diff, so applying one is idempotent and a
//! stream that races a write can only be ahead, never behind: a map read after version V plus every delta above V
//! converges to the truth. A change is serialized once ([`ChangeEvent`]) and the same bytes go to every stream: O(1)
//! work per change per stream, whatever the size of the network.

use std::sync::Arc;

use bytes::Bytes;
use ipnet::Ipv4Net;
use meshd_protocol::{DnsConfig, MapMessage, MapNode, NetworkMap, NodeId};

use crate::model::{ChangeKind, ChangeRecord, Node, NodeKind};

/// The wire form of a node.
pub fn map_node(node: &Node) -> MapNode {
    MapNode {
        id: node.id,
        name: node.name.clone(),
        ip: node.ip,
        public_key: node.public_key,
        endpoints: node.endpoints.clone(),
        online: node.online,
        last_seen: node.last_seen,
        tags: node.tags.clone(),
        kind: match node.kind {
            NodeKind::Meshd => meshd_protocol::NodeKind::Agent,
            NodeKind::Wireguard => meshd_protocol::NodeKind::Device,
        },
        preshared_key: node.preshared_key,
    }
}

/// The full map for `self_id` at `version`, or `None` when that node is not among `nodes`. The reference the map
/// cache's spliced JSON is tested against.
pub fn full_map(
    version: u64,
    network: Ipv4Net,
    dns: Option<DnsConfig>,
    self_id: NodeId,
    nodes: &[Node],
) -> Option<NetworkMap> {
    let self_node = nodes.iter().find(|n| n.id == self_id).map(map_node)?;
    let mut peers: Vec<MapNode> = nodes.iter().filter(|n| n.id != self_id).map(map_node).collect();
    peers.sort_by_key(|p| p.id);
    Some(NetworkMap {
        version,
        network,
        self_node,
        peers,
        dns,
    })
}

/// A change, serialized once for every stream.
#[derive(Debug)]
pub struct ChangeEvent {
    pub version: u64,
    pub node_id: NodeId,
    /// False when the node no longer exists: its own stream must end.
    pub node_exists: bool,
    /// JSON of the message for every other node (`PeerAdded`, `PeerChanged` or `PeerRemoved`).
    pub peer_json: Arc<str>,
    /// JSON of the `SelfChanged` message for the node itself (absent when it was removed).
    pub self_json: Option<Arc<str>>,
    /// `peer_json` as a complete SSE event ([`sse_frame`]), written as is by every stream.
    pub peer_frame: Bytes,
    /// `self_json` as a complete SSE event.
    pub self_frame: Option<Bytes>,
}

impl ChangeEvent {
    pub fn new(change: &ChangeRecord) -> Self {
        let version = change.version;
        let (peer_msg, self_msg) = match &change.node {
            None => (
                MapMessage::PeerRemoved {
                    version,
                    id: change.node_id,
                },
                None,
            ),
            Some(node) => {
                let peer = map_node(node);
                let self_msg = MapMessage::SelfChanged {
                    version,
                    node: peer.clone(),
                };
                let peer_msg = if change.kind == ChangeKind::Added {
                    MapMessage::PeerAdded { version, peer }
                } else {
                    MapMessage::PeerChanged { version, peer }
                };
                (peer_msg, Some(self_msg))
            }
        };
        let peer_json = to_json(&peer_msg);
        let self_json = self_msg.as_ref().map(to_json);
        Self {
            version,
            node_id: change.node_id,
            node_exists: change.node.is_some(),
            peer_frame: sse_frame(version, &peer_json),
            self_frame: self_json.as_deref().map(|json| sse_frame(version, json)),
            peer_json,
            self_json,
        }
    }

    /// The SSE event for the stream of `viewer`, `None` when the viewer itself was removed (its stream ends).
    pub fn frame_for_viewer(&self, viewer: NodeId) -> Option<&Bytes> {
        if viewer == self.node_id {
            self.self_frame.as_ref()
        } else {
            Some(&self.peer_frame)
        }
    }

    /// The bytes for the stream of `viewer`, `None` when the viewer itself was removed (its stream ends).
    pub fn for_viewer(&self, viewer: NodeId) -> Option<&Arc<str>> {
        if viewer == self.node_id {
            self.self_json.as_ref()
        } else {
            Some(&self.peer_json)
        }
    }
}

/// One map-stream event as sent on the wire: `event: map`, the version as its `id`, the JSON message as its `data`
/// (compact JSON holds no newline, so one `data` line).
pub fn sse_frame(version: u64, json: &str) -> Bytes {
    let mut frame = String::with_capacity(json.len() + 40);
    frame.push_str("event: ");
    frame.push_str(meshd_protocol::paths::MAP_EVENT);
    frame.push_str("\nid: ");
    frame.push_str(&version.to_string());
    frame.push_str("\ndata: ");
    frame.push_str(json);
    frame.push_str("\n\n");
    Bytes::from(frame)
}

pub fn to_json(message: &MapMessage) -> Arc<str> {
    serde_json::to_string(message)
        .expect("map messages are plain data and always serialize")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeKind;
    use meshd_protocol::PublicKey;

    fn node(id: NodeId) -> Node {
        Node {
            id,
            name: format!("n{id}"),
            ip: std::net::Ipv4Addr::new(10, 77, 0, id as u8 + 1),
            public_key: PublicKey::from_bytes([id as u8; 32]),
            kind: NodeKind::Meshd,
            endpoints: vec![],
            online: false,
            last_seen: None,
            tags: vec![],
            created_at: 0,
            preshared_key: false,
        }
    }

    #[test]
    fn full_map_separates_self_and_sorts_peers() {
        let net: Ipv4Net = "10.77.0.0/16".parse().expect("cidr");
        let nodes = vec![node(3), node(1), node(2)];
        let map = full_map(7, net, None, 2, &nodes).expect("self present");
        assert_eq!(map.self_node.id, 2);
        assert_eq!(map.peers.iter().map(|p| p.id).collect::<Vec<_>>(), vec![1, 3]);
        assert!(full_map(7, net, None, 9, &nodes).is_none());
    }

    #[test]
    fn map_entry_says_whether_pairs_use_a_preshared_key() {
        let mut device = node(4);
        device.kind = NodeKind::Wireguard;
        device.preshared_key = true;
        let entry = map_node(&device);
        assert!(entry.preshared_key);
        assert_eq!(entry.kind, meshd_protocol::NodeKind::Device);
        assert!(!map_node(&node(5)).preshared_key);
    }

    #[test]
    fn events_pick_the_right_message() {
        let added = ChangeEvent::new(&ChangeRecord {
            version: 5,
            node_id: 1,
            kind: ChangeKind::Added,
            node: Some(node(1)),
        });
        assert!(added.peer_json.contains("\"peer_added\""));
        assert!(added.for_viewer(1).expect("self").contains("\"self_changed\""));
        let changed = ChangeEvent::new(&ChangeRecord {
            version: 6,
            node_id: 1,
            kind: ChangeKind::Online,
            node: Some(node(1)),
        });
        assert!(changed.for_viewer(2).expect("peer").contains("\"peer_changed\""));
        let removed = ChangeEvent::new(&ChangeRecord {
            version: 7,
            node_id: 1,
            kind: ChangeKind::Removed,
            node: None,
        });
        assert_eq!(&*removed.peer_json, r#"{"type":"peer_removed","version":7,"id":1}"#);
        assert!(removed.for_viewer(1).is_none());
        assert!(!removed.node_exists);
    }
}

//! Pure translation of the network map into the data plane's desired peer list.
//!
//! Owns the policy "every peer in the map is a WireGuard peer whose allowed IPs are its overlay /32". Does no IO and
//! keeps no state: the engine's [`crate::engine::Engine::reconfigure`] takes the whole desired list and itself leaves
//! unchanged peers (same public key) untouched, so giving it the full list each time is both simple and safe.

use std::collections::HashMap;

use ipnet::Ipv4Net;
use meshd_protocol::{MapNode, NetworkMap, PresharedKey, PublicKey};

use crate::engine::PeerConfig;

/// Seconds between keepalives to every peer: keeps NAT mappings open (25 s is WireGuard's customary value, below the
/// 30 s UDP timeout of common NATs).
pub const PERSISTENT_KEEPALIVE_SECS: u16 = 25;

/// The peers the engine should have for `map`. The node itself is never a peer; a peer whose key equals ours (a
/// coordinator bug, or a cloned state directory) is skipped rather than configured as a loop. A pair that uses a
/// preshared key (either end's map entry says so) gets it from `preshared_keys`; one not fetched yet is configured
/// without, and its handshakes fail until it arrives (never a pair silently downgraded: the other end insists).
pub fn desired_peers(map: &NetworkMap, preshared_keys: &HashMap<PublicKey, PresharedKey>) -> Vec<PeerConfig> {
    map.peers
        .iter()
        .filter(|peer| peer.id != map.self_node.id && peer.public_key != map.self_node.public_key)
        .map(|peer| {
            let mut config = peer_config(peer);
            if peer.preshared_key || map.self_node.preshared_key {
                config.preshared_key = preshared_keys.get(&peer.public_key).copied();
            }
            config
        })
        .collect()
}

/// True when some pair in `map` needs a preshared key that `preshared_keys` lacks.
pub fn missing_preshared_keys(map: &NetworkMap, preshared_keys: &HashMap<PublicKey, PresharedKey>) -> bool {
    map.peers.iter().any(|peer| {
        peer.id != map.self_node.id
            && (peer.preshared_key || map.self_node.preshared_key)
            && !preshared_keys.contains_key(&peer.public_key)
    })
}

fn peer_config(peer: &MapNode) -> PeerConfig {
    PeerConfig {
        public_key: peer.public_key,
        name: peer.name.clone(),
        allowed_ips: vec![Ipv4Net::new(peer.ip, 32).expect("32 is a valid IPv4 prefix length")],
        endpoints: peer.endpoints.clone(),
        persistent_keepalive: Some(PERSISTENT_KEEPALIVE_SECS),
        kind: peer.kind,
        preshared_key: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_protocol::{MapMessage, PublicKey};
    use std::net::{Ipv4Addr, SocketAddr};

    fn node(id: i64, endpoints: &[&str]) -> MapNode {
        MapNode {
            id,
            name: format!("n{id}"),
            ip: Ipv4Addr::new(10, 77, 0, id as u8),
            public_key: PublicKey::from_bytes([id as u8; 32]),
            endpoints: endpoints
                .iter()
                .map(|e| e.parse::<SocketAddr>().expect("addr"))
                .collect(),
            online: true,
            last_seen: None,
            tags: vec![],
            kind: meshd_protocol::NodeKind::Agent,
            preshared_key: false,
        }
    }

    fn map(peers: Vec<MapNode>) -> NetworkMap {
        NetworkMap {
            version: 1,
            network: "10.77.0.0/16".parse().expect("cidr"),
            self_node: node(1, &[]),
            peers,
            dns: None,
        }
    }

    #[test]
    fn every_peer_becomes_a_slash_32_with_keepalive() {
        let peers = desired_peers(
            &map(vec![node(2, &["198.18.0.2:51820"]), node(3, &[])]),
            &HashMap::new(),
        );
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].public_key, PublicKey::from_bytes([2; 32]));
        assert_eq!(peers[0].name, "n2");
        assert_eq!(
            peers[0].allowed_ips,
            vec!["10.77.0.2/32".parse::<Ipv4Net>().expect("cidr")]
        );
        assert_eq!(
            peers[0].endpoints,
            vec!["198.18.0.2:51820".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(peers[0].persistent_keepalive, Some(25));
        assert!(
            peers[1].endpoints.is_empty(),
            "unknown endpoint: wait for the peer to send first"
        );
    }

    #[test]
    fn pairs_with_a_preshared_key_get_it_once_fetched() {
        let mut device = node(3, &[]);
        device.kind = meshd_protocol::NodeKind::Device;
        device.preshared_key = true;
        let map = map(vec![node(2, &[]), device]);
        let none = HashMap::new();
        assert!(missing_preshared_keys(&map, &none));
        let peers = desired_peers(&map, &none);
        assert_eq!(peers[1].preshared_key, None, "configured without until fetched");
        let psk = PresharedKey::from_bytes([7; 32]);
        let fetched = HashMap::from([(PublicKey::from_bytes([3; 32]), psk)]);
        assert!(!missing_preshared_keys(&map, &fetched));
        let peers = desired_peers(&map, &fetched);
        assert_eq!(peers[0].preshared_key, None, "agent pairs use none");
        assert_eq!(peers[1].preshared_key, Some(psk));
    }

    #[test]
    fn self_and_own_key_are_never_peers() {
        let mut clone = node(9, &[]);
        clone.public_key = PublicKey::from_bytes([1; 32]);
        assert!(desired_peers(&map(vec![node(1, &[]), clone]), &HashMap::new()).is_empty());
        assert!(desired_peers(&map(vec![]), &HashMap::new()).is_empty());
    }

    #[test]
    fn follows_deltas() {
        let mut current = Some(map(vec![node(2, &[])]));
        let moved = node(2, &["198.18.0.9:4000"]);
        NetworkMap::apply(
            &mut current,
            MapMessage::PeerChanged {
                version: 2,
                peer: moved,
            },
        )
        .expect("chg");
        NetworkMap::apply(
            &mut current,
            MapMessage::PeerAdded {
                version: 3,
                peer: node(4, &[]),
            },
        )
        .expect("add");
        let peers = desired_peers(current.as_ref().expect("map"), &HashMap::new());
        assert_eq!(peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["n2", "n4"]);
        assert_eq!(peers[0].endpoints[0].port(), 4000);
        NetworkMap::apply(&mut current, MapMessage::PeerRemoved { version: 4, id: 2 }).expect("rm");
        let peers = desired_peers(current.as_ref().expect("map"), &HashMap::new());
        assert_eq!(peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["n4"]);
    }
}

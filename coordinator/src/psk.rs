//! Preshared keys of node pairs, derived from one coordinator-wide secret. Pure: no IO (the secret is stored by
//! [`crate::ops::psk_secret`] in the settings row `psk_secret`, shared by every replica on one database).
//!
//! A pair's key is HMAC-SHA256(secret, [`LABEL`] || min(a, b) || max(a, b)) of the two public keys, so both ends
//! derive the same key without the coordinator storing one per pair, and a new node needs no write. A pair uses a
//! preshared key when either node asks for one ([`pair_uses_psk`]): stock WireGuard devices are registered with one
//! by default. A preshared key only adds a symmetric secret to the Diffie-Hellman handshake (see
//! [`PresharedKey`]); each node fetches the keys of its own pairs (`GET /api/v1/node/preshared-keys`), and no key is
//! ever in the shared map. The secret never prints (`Debug` is redacted) and never leaves the database and the
//! coordinator's processes; losing it changes every pair's key (devices then need a new config).

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use meshd_protocol::api::PeerPresharedKey;
use meshd_protocol::{PresharedKey, PublicKey};
use sha2::Sha256;

use crate::model::Node;
use crate::secrets;

/// Domain separation: the secret derives nothing else with this label.
pub const LABEL: &[u8] = b"meshd preshared key v1";

/// The stored form of the secret could not be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "the stored preshared-key secret (settings row `psk_secret`) is damaged; delete that row and restart the \
     coordinator (every pair then gets a new preshared key: export the configs of stock WireGuard devices again)"
)]
pub struct DamagedPskSecret;

/// The coordinator-wide secret every pair's preshared key derives from.
#[derive(Clone)]
pub struct PskSecret([u8; 32]);

impl PskSecret {
    /// A fresh random secret, in its stored form (standard base64 of 32 bytes).
    pub fn generate_stored() -> String {
        STANDARD.encode(secrets::random_secret())
    }

    /// The secret from its stored form.
    pub fn from_stored(text: &str) -> Result<Self, DamagedPskSecret> {
        STANDARD
            .decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(Self)
            .ok_or(DamagedPskSecret)
    }

    #[cfg(test)]
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for PskSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PskSecret(<redacted>)")
    }
}

/// The preshared key of the pair `a`, `b` (the same for `b`, `a`).
pub fn pair_key(secret: &PskSecret, a: &PublicKey, b: &PublicKey) -> PresharedKey {
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&secret.0).expect("HMAC takes a key of any length");
    mac.update(LABEL);
    mac.update(low.as_bytes());
    mac.update(high.as_bytes());
    PresharedKey::from_bytes(mac.finalize().into_bytes().into())
}

/// Does the pair of these two nodes use a preshared key? Yes when either asks for one.
pub fn pair_uses_psk(a: &Node, b: &Node) -> bool {
    a.preshared_key || b.preshared_key
}

/// The preshared keys of `caller`'s pairs among `nodes`: one per other node the pair uses one with, by node id.
pub fn keys_for(secret: &PskSecret, caller: &Node, nodes: &[Node]) -> Vec<PeerPresharedKey> {
    nodes
        .iter()
        .filter(|n| n.id != caller.id && pair_uses_psk(caller, n))
        .map(|n| PeerPresharedKey {
            peer: n.public_key,
            preshared_key: pair_key(secret, &caller.public_key, &n.public_key),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeKind;

    fn node(id: i64, preshared_key: bool) -> Node {
        Node {
            id,
            name: format!("n{id}"),
            ip: std::net::Ipv4Addr::new(10, 77, 0, id as u8 + 1),
            public_key: PublicKey::from_bytes([id as u8; 32]),
            kind: if preshared_key {
                NodeKind::Wireguard
            } else {
                NodeKind::Meshd
            },
            endpoints: vec![],
            online: false,
            last_seen: None,
            tags: vec![],
            created_at: 0,
            preshared_key,
        }
    }

    #[test]
    fn both_ends_derive_the_same_key_and_pairs_differ() {
        let secret = PskSecret::from_bytes([9; 32]);
        let (a, b, c) = (
            PublicKey::from_bytes([1; 32]),
            PublicKey::from_bytes([2; 32]),
            PublicKey::from_bytes([3; 32]),
        );
        assert_eq!(pair_key(&secret, &a, &b), pair_key(&secret, &b, &a));
        assert_ne!(pair_key(&secret, &a, &b), pair_key(&secret, &a, &c));
        assert_ne!(pair_key(&secret, &a, &c), pair_key(&secret, &b, &c));
        let other = PskSecret::from_bytes([8; 32]);
        assert_ne!(pair_key(&secret, &a, &b), pair_key(&other, &a, &b));
    }

    #[test]
    fn key_is_hmac_sha256_of_label_and_ordered_keys() {
        let secret = PskSecret::from_bytes([9; 32]);
        let (a, b) = (PublicKey::from_bytes([5; 32]), PublicKey::from_bytes([4; 32]));
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&[9; 32]).expect("key");
        mac.update(b"meshd preshared key v1");
        mac.update(&[4; 32]);
        mac.update(&[5; 32]);
        let expected: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(pair_key(&secret, &a, &b).as_bytes(), &expected);
    }

    #[test]
    fn a_pair_uses_a_key_when_either_node_asks() {
        let secret = PskSecret::from_bytes([9; 32]);
        let nodes = vec![node(1, false), node(2, false), node(3, true), node(4, true)];
        let agent = &nodes[0];
        let keys = keys_for(&secret, agent, &nodes);
        let peers: Vec<_> = keys.iter().map(|k| k.peer).collect();
        assert_eq!(peers, vec![nodes[2].public_key, nodes[3].public_key]);
        // The device side gets every other node, and its key with the agent is the agent's key with it.
        let device = &nodes[2];
        let device_keys = keys_for(&secret, device, &nodes);
        assert_eq!(device_keys.len(), 3);
        let with_agent = device_keys
            .iter()
            .find(|k| k.peer == agent.public_key)
            .expect("agent listed");
        assert_eq!(with_agent.preshared_key, keys[0].preshared_key);
    }

    #[test]
    fn stored_form_round_trips_and_damage_is_reported() {
        let stored = PskSecret::generate_stored();
        let secret = PskSecret::from_stored(&stored).expect("fresh secret");
        assert_eq!(STANDARD.encode(secret.0), stored);
        assert!(PskSecret::from_stored("not base64!").is_err());
        assert!(PskSecret::from_stored(&STANDARD.encode([1u8; 16])).is_err());
        assert!(!format!("{secret:?}").contains(&stored));
    }
}

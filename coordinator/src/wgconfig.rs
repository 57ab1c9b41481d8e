//! Renders a wg-quick configuration for a stock WireGuard device (a phone with the WireGuard app). Pure: no IO.
//!
//! The coordinator never knows a private key: the device generated its own key pair and the admin registered only the
//! public half. So the `PrivateKey` line holds [`PRIVATE_KEY_PLACEHOLDER`]; the user replaces it with the device's own
//! private key (in the WireGuard app: create the tunnel from this file, then paste the key the app generated). Each
//! meshd node becomes a `[Peer]` with its overlay address as `AllowedIPs` and its first reported endpoint (meshd nodes
//! behind NAT that reported none are still listed: they learn the device's address when it sends first, and the
//! keepalive keeps the NAT mapping open).

use std::fmt::Write;

use ipnet::Ipv4Net;

use crate::model::{Node, NodeKind};

/// Stands where the device's private key goes. Not valid base64, so wg-quick refuses the file until it is replaced.
pub const PRIVATE_KEY_PLACEHOLDER: &str = "<paste this device's private key here>";
/// Seconds between keepalives: keeps NAT mappings open (25 s is the value wg(8) recommends).
pub const PERSISTENT_KEEPALIVE: u32 = 25;

/// The wg-quick file for `device`, with one peer per meshd node in `nodes` (other plain WireGuard devices are left
/// out: they have no known endpoint and could not reach each other anyway).
pub fn render(device: &Node, network: Ipv4Net, nodes: &[Node]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# wg-quick config for `{}` ({}) in the meshd network {network}.",
        device.name, device.ip
    );
    let _ = writeln!(
        out,
        "# Replace the PrivateKey placeholder with this device's own private key: the"
    );
    let _ = writeln!(out, "# coordinator only knows the public key {}.", device.public_key);
    let _ = writeln!(out, "[Interface]");
    let _ = writeln!(out, "PrivateKey = {PRIVATE_KEY_PLACEHOLDER}");
    let _ = writeln!(out, "Address = {}/32", device.ip);
    for peer in nodes.iter().filter(|n| n.id != device.id && n.kind == NodeKind::Meshd) {
        let _ = writeln!(out);
        let _ = writeln!(out, "# {} (node {})", peer.name, peer.id);
        let _ = writeln!(out, "[Peer]");
        let _ = writeln!(out, "PublicKey = {}", peer.public_key);
        let _ = writeln!(out, "AllowedIPs = {}/32", peer.ip);
        if let Some(endpoint) = peer.endpoints.first() {
            let _ = writeln!(out, "Endpoint = {endpoint}");
        }
        let _ = writeln!(out, "PersistentKeepalive = {PERSISTENT_KEEPALIVE}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_protocol::PublicKey;

    fn node(id: i64, kind: NodeKind, endpoints: &[&str]) -> Node {
        Node {
            id,
            name: format!("n{id}"),
            ip: std::net::Ipv4Addr::new(10, 77, 0, id as u8 + 1),
            public_key: PublicKey::from_bytes([id as u8; 32]),
            kind,
            endpoints: endpoints.iter().map(|e| e.parse().expect("endpoint")).collect(),
            online: true,
            last_seen: None,
            tags: vec![],
            created_at: 0,
            preshared_key: false,
        }
    }

    #[test]
    fn renders_interface_and_meshd_peers_only() {
        let phone = node(1, NodeKind::Wireguard, &[]);
        let nodes = vec![
            phone.clone(),
            node(2, NodeKind::Meshd, &["198.18.0.2:51820", "198.18.9.9:1"]),
            node(3, NodeKind::Meshd, &[]),
            node(4, NodeKind::Wireguard, &[]),
        ];
        let text = render(&phone, "10.77.0.0/16".parse().expect("cidr"), &nodes);
        assert!(text.contains("Address = 10.77.0.2/32\n"));
        assert!(text.contains(&format!("PrivateKey = {PRIVATE_KEY_PLACEHOLDER}\n")));
        assert_eq!(text.matches("[Peer]").count(), 2);
        assert!(text.contains("AllowedIPs = 10.77.0.3/32\nEndpoint = 198.18.0.2:51820\nPersistentKeepalive = 25\n"));
        assert!(text.contains("AllowedIPs = 10.77.0.4/32\nPersistentKeepalive = 25\n"));
        assert!(!text.contains("10.77.0.5"));
    }
}

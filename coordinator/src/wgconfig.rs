//! Renders a wg-quick configuration for a stock WireGuard device (a phone or laptop with the WireGuard app,
//! wireguard-go). Pure: no IO; everything it needs comes in [`ExportOptions`].
//!
//! The coordinator never knows a device's private key: the device generated its own key pair and the admin registered
//! only the public half. So the `PrivateKey` line holds [`PRIVATE_KEY_PLACEHOLDER`], which the user replaces with the
//! device's own key, unless the caller passes one (`device add --generate-key` makes the pair in the CLI process and
//! stores the private half nowhere).
//!
//! Each meshd agent becomes a `[Peer]` with its overlay address as `AllowedIPs`. Its `Endpoint` is the coordinator's
//! WireGuard gateway when that is on: one public UDP port that forwards to agents over their relay connection, so the
//! file works from anywhere, whatever NAT the agents sit behind. With the gateway off it is the agent's first reported
//! endpoint (agents that reported none are still listed: they learn the device's address when it sends first).
//! `PersistentKeepalive` keeps NAT mappings open; `PresharedKey` is the pair's key ([`crate::psk`]) when the pair uses
//! one. `DNS` names up to [`MAX_DNS_SERVERS`] agents (they answer mesh names on their overlay address) and the mesh
//! domain as a search domain, so `gpu-server` resolves on the device too. Other stock devices are left out: they
//! could not reach each other.

use std::fmt::Write;

use ipnet::Ipv4Net;
use x25519_dalek::StaticSecret;

use crate::model::{Node, NodeKind};
use crate::psk::{self, PskSecret};

/// Stands where the device's private key goes. Not valid base64, so wg-quick refuses the file until it is replaced.
pub const PRIVATE_KEY_PLACEHOLDER: &str = "<paste this device's private key here>";
/// Seconds between keepalives: keeps NAT mappings open (25 s is the value wg(8) recommends).
pub const PERSISTENT_KEEPALIVE: u32 = 25;
/// Agents named as DNS servers: enough that one being offline does not break names, few enough that a client that
/// tries them in turn does not wait long.
pub const MAX_DNS_SERVERS: usize = 3;

/// What the file depends on besides the nodes. No `Debug`: it may hold a private key.
#[derive(Clone, Copy)]
pub struct ExportOptions<'a> {
    /// The overlay network (for the header comment).
    pub network: Ipv4Net,
    /// `host:port` of the coordinator's WireGuard gateway; `None` when it is off.
    pub gateway_endpoint: Option<&'a str>,
    /// The mesh's DNS domain, added as a search domain.
    pub dns_domain: &'a str,
    /// The secret pairs' preshared keys derive from.
    pub psk_secret: &'a PskSecret,
    /// The device's private key when the caller has it (a key pair generated for this export); `None`: the
    /// placeholder.
    pub private_key: Option<&'a StaticSecret>,
}

/// The wg-quick file for `device`, with one peer per meshd agent in `nodes`.
pub fn render(device: &Node, nodes: &[Node], options: &ExportOptions<'_>) -> String {
    let agents: Vec<&Node> = nodes
        .iter()
        .filter(|n| n.id != device.id && n.kind == NodeKind::Meshd)
        .collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# wg-quick config for `{}` ({}) in the meshd network {}.",
        device.name, device.ip, options.network
    );
    match options.private_key {
        Some(_) => {
            let _ = writeln!(
                out,
                "# It holds this device's private key: keep it secret, it is stored nowhere else."
            );
        }
        None => {
            let _ = writeln!(
                out,
                "# Replace the PrivateKey placeholder with this device's own private key: the"
            );
            let _ = writeln!(out, "# coordinator only knows the public key {}.", device.public_key);
        }
    }
    if options.gateway_endpoint.is_none() {
        let _ = writeln!(
            out,
            "# The coordinator's gateway is off: peers behind NAT may be unreachable from this device."
        );
    }
    let _ = writeln!(out, "[Interface]");
    match options.private_key {
        Some(key) => {
            let _ = writeln!(out, "PrivateKey = {}", base64_key(key.to_bytes()));
        }
        None => {
            let _ = writeln!(out, "PrivateKey = {PRIVATE_KEY_PLACEHOLDER}");
        }
    }
    let _ = writeln!(out, "Address = {}/32", device.ip);
    if let Some(dns) = dns_line(&agents, options.dns_domain) {
        let _ = writeln!(out, "DNS = {dns}");
    }
    for peer in agents {
        let _ = writeln!(out);
        let _ = writeln!(out, "# {} (node {})", peer.name, peer.id);
        let _ = writeln!(out, "[Peer]");
        let _ = writeln!(out, "PublicKey = {}", peer.public_key);
        if psk::pair_uses_psk(device, peer) {
            let key = psk::pair_key(options.psk_secret, &device.public_key, &peer.public_key);
            let _ = writeln!(out, "PresharedKey = {}", key.to_base64());
        }
        let _ = writeln!(out, "AllowedIPs = {}/32", peer.ip);
        match (options.gateway_endpoint, peer.endpoints.first()) {
            (Some(gateway), _) => {
                let _ = writeln!(out, "Endpoint = {gateway}");
            }
            (None, Some(endpoint)) => {
                let _ = writeln!(out, "Endpoint = {endpoint}");
            }
            (None, None) => {}
        }
        let _ = writeln!(out, "PersistentKeepalive = {PERSISTENT_KEEPALIVE}");
    }
    out
}

/// `DNS = ` value: the overlay addresses of up to [`MAX_DNS_SERVERS`] agents (online first, then lowest id), then
/// the domain; `None` without agents (nothing would answer).
fn dns_line(agents: &[&Node], domain: &str) -> Option<String> {
    let mut servers: Vec<&Node> = agents.to_vec();
    servers.sort_by_key(|n| (!n.online, n.id));
    servers.truncate(MAX_DNS_SERVERS);
    if servers.is_empty() {
        return None;
    }
    let mut entries: Vec<String> = servers.iter().map(|n| n.ip.to_string()).collect();
    if !domain.is_empty() {
        entries.push(domain.to_string());
    }
    Some(entries.join(", "))
}

fn base64_key(bytes: [u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
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

    fn secret() -> PskSecret {
        PskSecret::from_bytes([7; 32])
    }

    fn options(secret: &PskSecret) -> ExportOptions<'_> {
        ExportOptions {
            network: "10.77.0.0/16".parse().expect("cidr"),
            gateway_endpoint: None,
            dns_domain: "mesh.internal",
            psk_secret: secret,
            private_key: None,
        }
    }

    /// The `[Peer]` section of the node with this id.
    fn peer_section(text: &str, id: i64) -> &str {
        text.split("\n# ")
            .find(|s| s.contains(&format!("(node {id})")))
            .expect("peer section")
    }

    #[test]
    fn renders_interface_and_meshd_peers_only() {
        let secret = secret();
        let phone = node(1, NodeKind::Wireguard, &[]);
        let nodes = vec![
            phone.clone(),
            node(2, NodeKind::Meshd, &["198.18.0.2:51820", "198.18.9.9:1"]),
            node(3, NodeKind::Meshd, &[]),
            node(4, NodeKind::Wireguard, &[]),
        ];
        let text = render(&phone, &nodes, &options(&secret));
        assert!(text.contains("Address = 10.77.0.2/32\n"));
        assert!(text.contains(&format!("PrivateKey = {PRIVATE_KEY_PLACEHOLDER}\n")));
        assert_eq!(text.matches("[Peer]").count(), 2);
        assert!(text.contains("AllowedIPs = 10.77.0.3/32\nEndpoint = 198.18.0.2:51820\nPersistentKeepalive = 25\n"));
        assert!(text.contains("AllowedIPs = 10.77.0.4/32\nPersistentKeepalive = 25\n"));
        assert!(!text.contains("10.77.0.5"));
        assert!(text.contains("# The coordinator's gateway is off"));
        assert!(!text.contains("PresharedKey"), "the device was registered without one");
    }

    #[test]
    fn gateway_is_every_agents_endpoint() {
        let secret = secret();
        let phone = node(1, NodeKind::Wireguard, &[]);
        let nodes = vec![
            phone.clone(),
            node(2, NodeKind::Meshd, &["198.18.0.2:51820"]),
            node(3, NodeKind::Meshd, &[]),
        ];
        let opts = ExportOptions {
            gateway_endpoint: Some("vpn.example.com:51820"),
            ..options(&secret)
        };
        let text = render(&phone, &nodes, &opts);
        assert_eq!(text.matches("Endpoint = vpn.example.com:51820\n").count(), 2);
        assert_eq!(text.matches("Endpoint = ").count(), 2);
        assert!(!text.contains("198.18.0.2"));
        assert!(!text.contains("gateway is off"));
        assert_eq!(text.matches("PersistentKeepalive = 25\n").count(), 2);
    }

    #[test]
    fn preshared_key_is_the_pairs_key() {
        let secret = secret();
        let mut phone = node(1, NodeKind::Wireguard, &[]);
        phone.preshared_key = true;
        let nodes = vec![
            phone.clone(),
            node(2, NodeKind::Meshd, &[]),
            node(3, NodeKind::Meshd, &[]),
        ];
        let text = render(&phone, &nodes, &options(&secret));
        for peer in &nodes[1..] {
            let key = psk::pair_key(&secret, &peer.public_key, &phone.public_key);
            let section = peer_section(&text, peer.id);
            assert!(section.contains(&format!("PresharedKey = {}\n", key.to_base64())));
        }
        assert_eq!(text.matches("PresharedKey = ").count(), 2);
    }

    #[test]
    fn dns_names_three_agents_online_first_then_the_domain() {
        let secret = secret();
        let phone = node(1, NodeKind::Wireguard, &[]);
        let mut nodes = vec![phone.clone()];
        for id in 2..=6 {
            let mut agent = node(id, NodeKind::Meshd, &[]);
            // Online: 4 and 6 only.
            agent.online = id % 2 == 0 && id != 2;
            nodes.push(agent);
        }
        nodes.push(node(7, NodeKind::Wireguard, &[]));
        let text = render(&phone, &nodes, &options(&secret));
        assert!(text.contains("Address = 10.77.0.2/32\nDNS = 10.77.0.5, 10.77.0.7, 10.77.0.3, mesh.internal\n"));

        let alone = render(&phone, std::slice::from_ref(&phone), &options(&secret));
        assert!(!alone.contains("DNS"), "no agent, nothing answers names");
    }

    #[test]
    fn a_given_private_key_replaces_the_placeholder() {
        let secret = secret();
        let private = StaticSecret::from([3u8; 32]);
        let mut phone = node(1, NodeKind::Wireguard, &[]);
        phone.public_key = PublicKey::from_bytes(x25519_dalek::PublicKey::from(&private).to_bytes());
        let opts = ExportOptions {
            private_key: Some(&private),
            ..options(&secret)
        };
        let text = render(&phone, std::slice::from_ref(&phone), &opts);
        assert!(text.contains(&format!("PrivateKey = {}\n", base64_key([3u8; 32]))));
        assert!(!text.contains(PRIVATE_KEY_PLACEHOLDER));
        assert!(text.contains("keep it secret"));
    }
}

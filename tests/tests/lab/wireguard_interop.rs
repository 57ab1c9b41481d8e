//! Scenario 7: standard WireGuard. An admin registers a device by public key, downloads its wg-quick config from
//! the API, and a stock `wireguard-go` + `wg` peer with that config exchanges traffic with meshd nodes.

use std::time::Duration;

use anyhow::{Context, anyhow};
use meshd_lab::wireguard::{WgDevice, generate_keys};
use meshd_lab::{Mesh, scenario};
use serde_json::{Value, json};

#[test]
fn wireguard_go_peer_exchanges_traffic_with_meshd_nodes() {
    scenario("wireguard-interop", &["wg", "wireguard-go"], |lab| {
        let mut mesh = Mesh::start(lab, 3)?;
        let phone = lab.add_host("phone")?;
        let keys = generate_keys(&phone, &lab.subdir("phone-keys")?)?;
        let body = json!({ "name": "phone", "public_key": keys.public_key }).to_string();
        let created: Value = serde_json::from_str(&mesh.coordinator.admin("POST", "/api/v1/nodes", Some(&body))?)
            .context("parsing the registered device")?;
        let id = created["id"]
            .as_i64()
            .or_else(|| created["node"]["id"].as_i64())
            .ok_or_else(|| anyhow!("no id in {created}"))?;
        let config = mesh
            .coordinator
            .admin("GET", &format!("/api/v1/nodes/{id}/wireguard-config"), None)?;
        eprintln!(
            "wireguard-config of the device:\n{}",
            config
                .lines()
                .filter(|l| !l.to_ascii_lowercase().starts_with("privatekey"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let device = WgDevice::start(lab, &phone, &lab.ifname("wg", 9), &config, &keys)?;
        for node in &mut mesh.nodes {
            node.wait_peers(3, Duration::from_secs(10))
                .context("the device never reached the nodes' maps")?;
        }
        for node in &mesh.nodes {
            phone
                .wait_ping(node.ip(), Duration::from_secs(20))
                .with_context(|| format!("wireguard-go -> {}; wg show:\n{}", node.hostname, device.show()))?;
            node.host
                .wait_ping(device.address, Duration::from_secs(10))
                .with_context(|| format!("{} -> wireguard-go; wg show:\n{}", node.hostname, device.show()))?;
        }
        Ok(())
    });
}

//! Scenario 1: a coordinator and three nodes on a routed underlay; every node reaches every other over overlay
//! addresses, and `meshd status --json` describes the peers it talks to.

use std::time::Duration;

use anyhow::{Context, ensure};
use meshd_lab::{Mesh, scenario};

#[test]
fn every_node_reaches_every_other_over_the_overlay() {
    scenario("connectivity", &[], |lab| {
        let mesh = Mesh::start(lab, 3)?;
        mesh.wait_full_mesh(Duration::from_secs(20))?;
        let ips: Vec<_> = mesh.nodes.iter().map(|n| n.ip()).collect();
        let mut unique = ips.clone();
        unique.sort();
        unique.dedup();
        ensure!(unique.len() == ips.len(), "overlay addresses are not unique: {ips:?}");
        // After traffic, each node shows every peer with a handshake and counters.
        for node in &mesh.nodes {
            let status = node.status()?;
            let peers = status["peers"].as_array().context("status has no peers array")?;
            for other in mesh.nodes.iter().filter(|o| o.hostname != node.hostname) {
                let ip = other.ip().to_string();
                let peer = peers
                    .iter()
                    .find(|p| {
                        p["ip"]
                            .as_str()
                            .is_some_and(|s| s.split('/').next() == Some(ip.as_str()))
                    })
                    .with_context(|| {
                        format!("{} does not list {} ({ip}) in {status}", node.hostname, other.hostname)
                    })?;
                ensure!(
                    !peer["last_handshake"].is_null(),
                    "{}: no handshake with {ip} after pings: {peer}",
                    node.hostname
                );
                ensure!(
                    peer["rx_bytes"].as_u64().unwrap_or(0) > 0,
                    "{}: no bytes from {ip}: {peer}",
                    node.hostname
                );
                ensure!(
                    peer["public_key"].is_string() && peer["endpoint"].is_string(),
                    "{}: incomplete peer {peer}",
                    node.hostname
                );
            }
        }
        // Through the agent's own ping command too, by name.
        let out = mesh.nodes[0].ctl(&["ping", &mesh.nodes[1].hostname])?;
        ensure!(!out.trim().is_empty(), "meshd ping printed nothing");
        Ok(())
    });
}

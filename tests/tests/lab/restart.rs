//! Scenario 6: a restarted node keeps its address: after `meshd down` + `meshd up`, and after a crash (SIGKILL) +
//! `meshd up`, it has the same overlay address, the coordinator still has one entry for it, and it reaches its
//! peers again.

use std::time::Duration;

use anyhow::ensure;
use meshd_lab::{Mesh, scenario};

#[test]
fn a_restarted_node_keeps_its_address() {
    scenario("restart", &[], |lab| {
        let mut mesh = Mesh::start(lab, 3)?;
        mesh.wait_full_mesh(Duration::from_secs(20))?;
        let nodes_before = mesh.coordinator.nodes()?.len();
        let peer_ip = mesh.nodes[0].ip();
        let peer_host = mesh.nodes[0].host.clone();
        let node = &mut mesh.nodes[1];
        let original = node.ip();

        node.down()?;
        let after_down_up = node.up(lab)?;
        ensure!(
            after_down_up == original,
            "down/up changed the address: {original} -> {after_down_up}"
        );
        node.host.wait_ping(peer_ip, Duration::from_secs(20))?;
        peer_host.wait_ping(original, Duration::from_secs(20))?;

        node.stop_process();
        // A crash leaves no clean shutdown behind; `up` must cope with whatever state is on disk.
        let after_crash = node.up(lab)?;
        ensure!(
            after_crash == original,
            "restart after a kill changed the address: {original} -> {after_crash}"
        );
        node.host.wait_ping(peer_ip, Duration::from_secs(20))?;
        peer_host.wait_ping(original, Duration::from_secs(20))?;

        let nodes_after = mesh.coordinator.nodes()?;
        ensure!(
            nodes_after.len() == nodes_before,
            "restarts changed the node count: {nodes_before} -> {nodes_after:?}"
        );
        Ok(())
    });
}

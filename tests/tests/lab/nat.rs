//! A node behind a NAT router (masquerade, no port forwarding) joins and exchanges traffic with nodes on the
//! routed underlay: it reaches them (its packets open the NAT mapping) and is reached back (peers follow its
//! authenticated packets to the mapped address: roaming; keepalives keep the mapping open).

use std::time::Duration;

use anyhow::{Context, ensure};
use meshd_lab::{Mesh, scenario};

#[test]
fn a_node_behind_a_nat_reaches_the_mesh_and_is_reached_back() {
    scenario("nat", &[], |lab| {
        let coord = lab.add_host("coord")?;
        let public1 = lab.add_host("node1")?;
        let public2 = lab.add_host("node2")?;
        let (natted, outside) = lab.add_host_behind_nat("node3")?;
        let mesh = Mesh::start_on(lab, coord, vec![public1, public2, natted])?;
        let inside = &mesh.nodes[2];
        for peer in &mesh.nodes[..2] {
            inside
                .host
                .wait_ping(peer.ip(), Duration::from_secs(20))
                .with_context(|| format!("node3 (NAT) -> {}", peer.hostname))?;
            peer.host
                .wait_ping(inside.ip(), Duration::from_secs(20))
                .with_context(|| format!("{} -> node3 (NAT)", peer.hostname))?;
            let status = peer.status()?;
            let entry = status["peers"]
                .as_array()
                .and_then(|peers| {
                    peers
                        .iter()
                        .find(|p| p["ip"].as_str() == Some(&inside.ip().to_string()))
                })
                .with_context(|| format!("{} does not list node3: {status}", peer.hostname))?;
            let endpoint = entry["endpoint"].as_str().unwrap_or("");
            ensure!(
                endpoint.starts_with(&format!("{outside}:")),
                "{} talks to node3 at {endpoint:?}, not via the NAT's {outside}",
                peer.hostname
            );
        }
        Ok(())
    });
}

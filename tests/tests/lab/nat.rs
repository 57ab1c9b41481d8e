//! A node behind a NAT router (masquerade, no port forwarding) joins and exchanges traffic with nodes on the
//! routed underlay: it reaches them (its packets open the NAT mapping) and is reached back (peers learn its
//! mapped address, via STUN or its authenticated packets, and move from the relay to a direct path to it).

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context;
use meshd_lab::path::peer_path;
use meshd_lab::{Mesh, scenario, wait};

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
            // Agents start on the relay and move to direct once a probe is answered: wait for that (bounded).
            let what = format!("{} to reach node3 directly via the NAT's {outside}", peer.hostname);
            let path = wait::until(&what, Duration::from_secs(20), Duration::from_millis(100), || {
                let path = peer_path(peer, inside.ip())?;
                let via_nat = path.is_direct() && path.endpoint.is_some_and(|e| e.ip() == IpAddr::V4(outside));
                Ok(via_nat.then_some(path))
            })?;
            eprintln!("{} -> node3: {path}", peer.hostname);
        }
        Ok(())
    });
}

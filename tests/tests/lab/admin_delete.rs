//! Scenario 4: a node deleted by the admin loses connectivity within 2 s of the DELETE returning, in both
//! directions, while the remaining nodes keep talking.

use std::time::{Duration, Instant};

use anyhow::ensure;
use meshd_lab::{Mesh, scenario};

/// The bound.
const CUTOFF: Duration = Duration::from_secs(2);
/// How long pings are watched after the DELETE.
const WATCH: Duration = Duration::from_secs(4);
/// Reply deadline of each probe ping (probes repeat about every 100-200 ms).
const PROBE_REPLY: Duration = Duration::from_millis(100);

#[test]
fn a_deleted_node_loses_connectivity_within_two_seconds() {
    scenario("admin-delete", &[], |lab| {
        let mesh = Mesh::start(lab, 3)?;
        mesh.wait_full_mesh(Duration::from_secs(20))?;
        let (watcher, bystander, victim) = (&mesh.nodes[0], &mesh.nodes[1], &mesh.nodes[2]);
        victim.host.wait_ping(bystander.ip(), Duration::from_secs(10))?;
        let id = mesh.coordinator.node_id_by_ip(victim.ip())?;
        // Traffic flows right up to the deletion, so the test would see a survivor.
        ensure!(
            watcher.host.ping_once(victim.ip(), Duration::from_secs(1))?,
            "no connectivity before the delete"
        );

        mesh.coordinator.admin("DELETE", &format!("/api/v1/nodes/{id}"), None)?;
        let deleted = Instant::now();
        let mut last_success: Option<(Duration, &str)> = None;
        let mut probes = 0;
        while deleted.elapsed() < WATCH {
            probes += 1;
            if watcher.host.ping_once(victim.ip(), PROBE_REPLY)? {
                last_success = Some((deleted.elapsed(), "peer -> deleted node"));
            }
            if victim.host.ping_once(bystander.ip(), PROBE_REPLY)? {
                last_success = Some((deleted.elapsed(), "deleted node -> peer"));
            }
        }
        eprintln!("after DELETE: {probes} probe rounds; last answered probe: {last_success:?}");
        if let Some((at, direction)) = last_success {
            ensure!(
                at <= CUTOFF,
                "{direction} still answered {at:?} after the DELETE returned (bound {CUTOFF:?})"
            );
        }
        ensure!(
            probes >= 10,
            "only {probes} probe rounds in {WATCH:?}: the measurement is too coarse"
        );

        let nodes = mesh.coordinator.nodes()?;
        ensure!(
            !nodes.iter().any(|n| n["id"].as_i64() == Some(id)),
            "deleted node {id} still listed: {nodes:?}"
        );
        for node in [watcher, bystander] {
            let status = node.status()?;
            let listed = status["peers"].as_array().is_some_and(|peers| {
                peers.iter().any(|p| {
                    p["ip"]
                        .as_str()
                        .is_some_and(|ip| ip.starts_with(&victim.ip().to_string()))
                })
            });
            ensure!(!listed, "{} still lists the deleted node: {status}", node.hostname);
        }
        // The others are undisturbed.
        watcher.host.wait_ping(bystander.ip(), Duration::from_secs(5))?;
        bystander.host.wait_ping(watcher.ip(), Duration::from_secs(5))?;
        Ok(())
    });
}

//! Scenario 5: the coordinator killed mid-session does not break an open SSH session, and a node restarted
//! (`meshd down`, `meshd up`) while the coordinator is down reaches its peers again from its cached map, with the
//! same address. When the coordinator returns, every agent reconnects by itself.

use std::thread;
use std::time::Duration;

use anyhow::ensure;
use meshd_lab::ssh::{SshServer, ticks, wait_ticks};
use meshd_lab::wait;
use meshd_lab::{Mesh, scenario};

#[test]
fn coordinator_outage_keeps_sessions_and_restarts_work_from_cache() {
    scenario("coordinator-outage", &["sshd", "ssh", "ssh-keygen"], |lab| {
        let mut mesh = Mesh::start(lab, 3)?;
        mesh.wait_full_mesh(Duration::from_secs(20))?;
        let (client, server) = (&mesh.nodes[0], &mesh.nodes[1]);
        let sshd = SshServer::start(lab, &server.host, server.ip())?;
        sshd.wait_ready(&client.host, Duration::from_secs(30))?;
        // A line every 200 ms, bounded to 2 minutes.
        let mut session = sshd.spawn_session(
            lab,
            &client.host,
            "ssh-ticker",
            "i=0; while [ $i -lt 600 ]; do echo tick $i; i=$((i+1)); sleep 0.2; done",
        )?;
        wait_ticks(&mut session, 5, Duration::from_secs(20))?;

        mesh.coordinator.kill();
        let at_kill = ticks(&session);
        // Five more seconds of ticks (25 lines) with the coordinator gone.
        wait_ticks(&mut session, at_kill + 25, Duration::from_secs(15))?;
        eprintln!(
            "ssh session kept ticking after the coordinator was killed ({at_kill} -> {})",
            ticks(&session)
        );

        // Restart node3 while the coordinator is down: it comes back from its cache, with its address.
        let client_ip = client.ip();
        let server_ip = server.ip();
        let client_host = client.host.clone();
        let restarted = &mut mesh.nodes[2];
        let before = restarted.ip();
        restarted.down()?;
        // Not instantaneous on purpose: the agent must not depend on a quick restart.
        thread::sleep(Duration::from_secs(1));
        let after = restarted.up(lab)?;
        ensure!(
            before == after,
            "the restarted node changed its address from {before} to {after}"
        );
        restarted.wait_peers(2, Duration::from_secs(20))?;
        restarted.host.wait_ping(client_ip, Duration::from_secs(20))?;
        restarted.host.wait_ping(server_ip, Duration::from_secs(20))?;
        client_host.wait_ping(after, Duration::from_secs(20))?;

        // The ssh session is still alive and printing.
        let now = ticks(&session);
        wait_ticks(&mut session, now + 10, Duration::from_secs(10))?;

        // The coordinator comes back on the same data: every agent reconnects on its own (the reconnect backoff
        // is capped at 30 s) and is online again.
        mesh.coordinator.serve(lab)?;
        wait::until(
            "all three nodes online again after the coordinator restart",
            Duration::from_secs(75),
            Duration::from_millis(500),
            || {
                let nodes = mesh.coordinator.nodes()?;
                let online = nodes.iter().filter(|n| n["online"].as_bool() == Some(true)).count();
                Ok((nodes.len() == 3 && online == 3).then_some(()))
            },
        )?;
        Ok(())
    });
}

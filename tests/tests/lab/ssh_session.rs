//! Scenario 2: an SSH session works across the mesh: Debian's sshd runs in one node's namespace, listening only on
//! its overlay address; a client in another node runs a command there and gets its output.

use std::time::Duration;

use anyhow::ensure;
use meshd_lab::ssh::SshServer;
use meshd_lab::{Mesh, scenario};

#[test]
fn ssh_command_over_the_overlay_returns_its_output() {
    scenario("ssh", &["sshd", "ssh", "ssh-keygen"], |lab| {
        let mesh = Mesh::start(lab, 3)?;
        let (server_node, client_node) = (&mesh.nodes[2], &mesh.nodes[0]);
        client_node.host.wait_ping(server_node.ip(), Duration::from_secs(20))?;
        let sshd = SshServer::start(lab, &server_node.host, server_node.ip())?;
        sshd.wait_ready(&client_node.host, Duration::from_secs(30))?;
        // The command runs on the server node: its namespace has the server's overlay address on its TUN.
        let out = sshd.run(
            &client_node.host,
            &format!("ip -4 -o addr show dev {}", server_node.interface),
            Duration::from_secs(20),
        )?;
        ensure!(out.success(), "ssh failed: {}", out.stderr);
        ensure!(
            out.stdout.contains(&format!("inet {}/", server_node.ip())),
            "the command did not run on {}: {}",
            server_node.hostname,
            out.stdout
        );
        let out = sshd.run(&client_node.host, "echo hello from the mesh", Duration::from_secs(20))?;
        ensure!(
            out.stdout.trim() == "hello from the mesh",
            "unexpected output {:?}",
            out.stdout
        );
        Ok(())
    });
}

//! Scenario: names resolve everywhere. A laptop node runs `ssh root@gpu-server` and
//! `ssh root@gpu-server.mesh.internal` with no address typed; an admin rename makes the new name work and the old
//! one fail within 2 s on every node; a deletion takes the name away within 2 s; the agent's DNS responder answers
//! A and PTR on the overlay, forwards other names of overlay clients to its host's upstream resolver (a fake one on
//! the namespace's loopback) and ignores queries from outside the overlay; `meshd down` leaves
//! the hosts file byte-identical to what it was before the agent ran.
//!
//! Each namespace has its own hosts file (`/etc/netns/NS/hosts`, bind-mounted by `ip netns exec`), so the agents'
//! default (`--dns auto`: no systemd-resolved in a namespace, so the hosts-file block) writes there, and the
//! rename of a bind-mounted file fails: this also runs the in-place fallback.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use meshd_lab::lab::{Host, Lab};
use meshd_lab::mesh::{Coordinator, MeshNode};
use meshd_lab::ssh::SshServer;
use meshd_lab::{scenario, wait};

const UDP_TOOL: &str = env!("CARGO_BIN_EXE_meshd-lab-udp");
/// What the fake upstream resolver answers for every name (a lab address nothing listens on).
const UPSTREAM_ANSWER: &str = "198.18.250.9";

/// The issue's bound for a rename or a deletion to reach every node's resolution.
const BOUND: Duration = Duration::from_secs(2);
const START: Duration = Duration::from_secs(30);

/// Hosts-file content that is not ours and must survive byte for byte: another tool's block and odd spacing (the
/// unit tests cover the rest: CRLF, no trailing newline, blocks in the middle).
const FOREIGN: &str = "# another tool's block\n# BEGIN other-tool\n198.18.250.1\tprinter\n# END other-tool\n\
                       198.18.250.2 nas   # with a comment and odd  spacing\n";

/// Polls `probe` every 50 ms (`wait::until`) until it holds; how long that took from `since`.
fn time_until(
    what: &str,
    since: Instant,
    limit: Duration,
    mut probe: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    wait::until(
        what,
        limit.saturating_sub(since.elapsed()),
        Duration::from_millis(50),
        || Ok(probe()?.then(|| since.elapsed())),
    )
}

fn dig(host: &Host, args: &[&str]) -> Result<String> {
    let mut full = vec!["+time=1", "+tries=1"];
    full.extend_from_slice(args);
    let out = host.run("dig", &full, Duration::from_secs(10))?;
    Ok(out.stdout)
}

fn join(lab: &Lab, token: &str, name: &str, index: usize) -> Result<MeshNode> {
    let host = lab.add_host(name)?;
    // Content of our own before the agent writes: it must come back unchanged after `meshd down`.
    let hosts = host.hosts_file();
    let mut original = std::fs::read_to_string(&hosts).context("reading the namespace's hosts file")?;
    original.push_str(FOREIGN);
    std::fs::write(&hosts, &original)?;
    MeshNode::spawn_join(lab, host, token, name, index)
}

#[test]
fn names_resolve_follow_renames_and_deletions_and_leave_no_trace() {
    scenario("names", &["sshd", "ssh", "ssh-keygen", "dig", "getent"], |lab| {
        let coordinator = Coordinator::start(lab, lab.add_host("coord")?)?;
        let token = coordinator.create_token(true)?;
        let mut nodes = Vec::new();
        for (i, name) in ["gpu-server", "laptop", "intern"].into_iter().enumerate() {
            nodes.push(join(lab, &token, name, i + 1)?);
        }
        let originals: Vec<String> = nodes
            .iter()
            .map(|n| std::fs::read_to_string(n.host.hosts_file()))
            .collect::<Result<_, _>>()?;
        for node in &mut nodes {
            node.wait_joined(START)?;
        }
        for node in &mut nodes {
            node.wait_peers(2, START)?;
        }
        let (gpu, laptop, intern) = (&nodes[0], &nodes[1], &nodes[2]);
        let gpu_ip = gpu.ip();

        // Every node resolves every name, bare and qualified, from its own hosts file.
        for node in &nodes {
            for other in &nodes {
                for name in [other.hostname.clone(), format!("{}.mesh.internal", other.hostname)] {
                    wait::until(
                        &format!("{name} to resolve on {}", node.hostname),
                        START,
                        Duration::from_millis(100),
                        || Ok((node.host.resolve(&name)? == Some(other.ip())).then_some(())),
                    )?;
                }
            }
        }
        // Reverse lookups (what `ssh` and `last` show) give the name.
        let reverse = laptop
            .host
            .run_ok("getent", &["hosts", &gpu_ip.to_string()], Duration::from_secs(5))?;
        ensure!(
            reverse.contains("gpu-server.mesh.internal"),
            "reverse lookup of {gpu_ip}: {reverse}"
        );

        // ssh by name, no address typed anywhere.
        laptop.host.wait_ping(gpu_ip, Duration::from_secs(20))?;
        let sshd = SshServer::start(lab, &gpu.host, gpu_ip)?;
        sshd.wait_ready(&laptop.host, Duration::from_secs(30))?;
        for destination in ["gpu-server", "gpu-server.mesh.internal"] {
            let out = sshd.run_to(
                &laptop.host,
                destination,
                "cat /proc/sys/kernel/hostname; echo via-name",
                Duration::from_secs(20),
            )?;
            ensure!(
                out.success() && out.stdout.contains("via-name"),
                "ssh root@{destination} failed: {} {}",
                out.stdout,
                out.stderr
            );
        }

        // The responder on the overlay: A, PTR, NXDOMAIN, forwarding, and silence for non-overlay sources.
        let a = dig(
            &laptop.host,
            &[&format!("@{gpu_ip}"), "+short", "laptop.mesh.internal", "A"],
        )?;
        ensure!(
            a.trim() == laptop.ip().to_string(),
            "A from gpu-server's responder: {a:?}"
        );
        let ptr = dig(
            &laptop.host,
            &[&format!("@{gpu_ip}"), "+short", "-x", &intern.ip().to_string()],
        )?;
        ensure!(ptr.trim() == "intern.mesh.internal.", "PTR: {ptr:?}");
        let missing = dig(&laptop.host, &[&format!("@{gpu_ip}"), "nobody.mesh.internal"])?;
        ensure!(missing.contains("status: NXDOMAIN"), "unknown name: {missing}");
        // Other names of an overlay client are forwarded to the gpu-server's upstream (the lab's resolv.conf says
        // 127.0.0.1: a fake resolver there answers every A query with UPSTREAM_ANSWER).
        let mut upstream = lab.spawn(
            &gpu.host,
            "dns-upstream",
            UDP_TOOL,
            &["dns-upstream", "127.0.0.1:53", UPSTREAM_ANSWER],
            &[],
        )?;
        wait::until(
            "the fake upstream resolver to listen",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                upstream.ensure_running()?;
                Ok(upstream.log_text().contains("serving DNS").then_some(()))
            },
        )?;
        let outside = dig(&laptop.host, &[&format!("@{gpu_ip}"), "example.com"])?;
        ensure!(
            outside.contains("status: NOERROR") && outside.contains(UPSTREAM_ANSWER),
            "an outside name asked by an overlay client was not forwarded to the upstream: {outside}"
        );
        // Gone again: it answers every name, so the gpu-server's own lookups (getent below) would find it.
        upstream.stop(meshd_lab::process::STOP_GRACE);
        let from_underlay = dig(
            &gpu.host,
            &[
                &format!("@{gpu_ip}"),
                "-b",
                &gpu.host.underlay.to_string(),
                "laptop.mesh.internal",
            ],
        )?;
        ensure!(
            from_underlay.contains("timed out") || from_underlay.contains("no servers could be reached"),
            "a query from a non-overlay source was answered: {from_underlay}"
        );

        // `meshd ping` and `meshd status` speak names too.
        let ping = laptop.ctl(&["ping", "gpu-server.mesh.internal", "-c", "1"])?;
        ensure!(ping.contains(&gpu_ip.to_string()), "meshd ping by FQDN: {ping}");
        let status = laptop.status()?;
        ensure!(status["self"]["fqdn"] == "laptop.mesh.internal", "status: {status}");
        ensure!(
            status["self"]["dns"]["mode"] == "hosts",
            "names via the hosts file in a namespace: {status}"
        );
        ensure!(
            status["peers"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["fqdn"] == "gpu-server.mesh.internal")),
            "peers' FQDNs in the status: {status}"
        );

        // An admin rename: the new name works and the old one fails within 2 s on every other node.
        let gpu_id = coordinator.node_id_by_ip(gpu_ip)?;
        let renamed = coordinator.admin(
            "PATCH",
            &format!("/api/v1/nodes/{gpu_id}"),
            Some(r#"{"name":"gpu-big"}"#),
        )?;
        ensure!(
            renamed.contains("\"fqdn\":\"gpu-big.mesh.internal\""),
            "PATCH answer: {renamed}"
        );
        let renamed_at = Instant::now();
        for node in [laptop, intern] {
            time_until(&format!("rename on {}", node.hostname), renamed_at, BOUND, || {
                Ok(node.host.resolve("gpu-big.mesh.internal")? == Some(gpu_ip)
                    && node.host.resolve("gpu-server")?.is_none())
            })?;
        }
        eprintln!(
            "rename resolved on every node {:.0} ms after the PATCH returned",
            renamed_at.elapsed().as_secs_f64() * 1e3
        );
        let out = sshd.run_to(&laptop.host, "gpu-big", "echo renamed-ok", Duration::from_secs(20))?;
        ensure!(out.stdout.contains("renamed-ok"), "ssh to the new name: {}", out.stderr);
        let a = dig(
            &laptop.host,
            &[&format!("@{}", laptop.ip()), "+short", "gpu-big.mesh.internal"],
        )?;
        ensure!(
            a.trim() == gpu_ip.to_string(),
            "the responder follows the rename: {a:?}"
        );

        // A deletion: the name stops resolving within 2 s.
        let intern_id = coordinator.node_id_by_ip(intern.ip())?;
        coordinator.admin("DELETE", &format!("/api/v1/nodes/{intern_id}"), None)?;
        let deleted_at = Instant::now();
        for node in [gpu, laptop] {
            time_until(&format!("deletion on {}", node.hostname), deleted_at, BOUND, || {
                Ok(node.host.resolve("intern")?.is_none())
            })?;
        }
        eprintln!(
            "deletion resolved on every node {:.0} ms after the DELETE returned",
            deleted_at.elapsed().as_secs_f64() * 1e3
        );
        // The deleted node itself took its block away when it was removed.
        wait::until(
            "the deleted node's hosts block to go",
            START,
            Duration::from_millis(100),
            || Ok((std::fs::read_to_string(intern.host.hosts_file())? == originals[2]).then_some(())),
        )?;

        // `meshd down`: the hosts file is byte-identical to what it was before the agent ran.
        for (node, original) in nodes.iter_mut().zip(&originals).take(2) {
            node.down()?;
            let now = std::fs::read_to_string(node.host.hosts_file())?;
            ensure!(
                now == *original,
                "{}: hosts file after down differs:\n{now}\n--- before:\n{original}",
                node.hostname
            );
        }
        Ok(())
    });
}

//! Issue 4's NAT lab: two agents behind NAT routers (see `meshd_lab::natlab`), the coordinator on the "internet",
//! and the path each agent reports (`meshd status --json`: `peers[].path`, `peers[].endpoint`).
//!
//! A "direct" claim is checked against the NATs themselves: each NAT must hold a UDP mapping between its host and
//! the other NAT that saw traffic both ways (no `[UNREPLIED]` in conntrack), and each agent's endpoint must be the port
//! the other NAT mapped its peer to. So a status that says "direct" while the packets go elsewhere fails.
//!
//! 1. endpoint-independent on both sides: direct within 5 s of both being up (time printed);
//! 2. 1:1 NAT (the GPU server) + endpoint-dependent: direct (time printed);
//! 3. endpoint-independent + endpoint-dependent: connects, status says which path; both endpoint-dependent:
//!    relay; SSH works in each;
//! 4. UDP blocked for one node: relay over TCP, SSH works;
//! 5. UDP blocked, then unblocked: direct within 30 s, an SSH session open across the change survives;
//! 6. the NAT's mappings flushed mid-session (conntrack -F; and a "reboot" that also maps to new ports): a
//!    continuous ping resumes within 10 s (gap printed);
//! 7. 5% loss on the internet router: hole punching still succeeds and SSH works;
//! 8. two nodes behind the same NAT: direct over their private addresses, not through the NAT.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use meshd_lab::lab::{Host, Lab};
use meshd_lab::natlab::{NatKind, NatSite, nat_scenario};
use meshd_lab::path::{self, PairPath, PeerPath, PingProbe};
use meshd_lab::process::Process;
use meshd_lab::ssh::{SshServer, ticks, wait_ticks};
use meshd_lab::{Mesh, MeshNode};

const SSH_TOOLS: &[&str] = &["conntrack", "sshd", "ssh", "ssh-keygen"];
/// Scenario 1's bound.
const DIRECT_EIM: Duration = Duration::from_secs(5);
/// How long a scenario watches for a direct path before it reports what it saw (longer than the bound it checks,
/// so a slow success is measured rather than cut off).
const OBSERVE: Duration = Duration::from_secs(20);
/// Scenario 5's bound.
const UPGRADE: Duration = Duration::from_secs(30);
/// Scenario 6's bound.
const RESUME: Duration = Duration::from_secs(10);

/// Two agents, each behind its own NAT site, and the coordinator on the internet.
struct Pair {
    mesh: Mesh,
    sites: [NatSite; 2],
}

impl Pair {
    fn start(
        lab: &Lab,
        a: NatKind,
        b: NatKind,
        before_start: impl FnOnce(&[NatSite; 2]) -> Result<()>,
    ) -> Result<Self> {
        let coord = lab.add_host("coord")?;
        let sites = [lab.add_nat_site("sa", a)?, lab.add_nat_site("sb", b)?];
        let hosts = vec![sites[0].add_host(lab, "node1")?, sites[1].add_host(lab, "node2")?];
        eprintln!(
            "node1 behind {} ({}), node2 behind {} ({})",
            a.label(),
            sites[0].outside,
            b.label(),
            sites[1].outside
        );
        before_start(&sites)?;
        let mesh = Mesh::start_on(lab, coord, hosts)?;
        Ok(Self { mesh, sites })
    }

    fn a(&self) -> &MeshNode {
        &self.mesh.nodes[0]
    }

    fn b(&self) -> &MeshNode {
        &self.mesh.nodes[1]
    }

    /// Overlay pings both ways.
    fn wait_connected(&self, timeout: Duration) -> Result<()> {
        let (a, b) = (self.a(), self.b());
        a.host
            .wait_ping(b.ip(), timeout)
            .context("node1 -> node2 over the overlay")?;
        b.host
            .wait_ping(a.ip(), timeout)
            .context("node2 -> node1 over the overlay")
    }

    /// Waits until both agents report a direct path to the other's NAT outside address (a "direct" to a private
    /// address behind another NAT cannot carry anything); returns the time it took.
    fn wait_direct(&self, timeout: Duration) -> Result<(Duration, PairPath)> {
        let (oa, ob) = (IpAddr::V4(self.sites[0].outside), IpAddr::V4(self.sites[1].outside));
        let via = |p: &PeerPath, ip| p.is_direct() && p.endpoint.is_some_and(|e| e.ip() == ip);
        path::wait_pair(
            "node1 and node2 to report a direct path through the NATs",
            self.a(),
            self.b(),
            timeout,
            |p| via(&p.a_to_b, ob) && via(&p.b_to_a, oa),
        )
        .map_err(|e| e.context(self.nat_state()))
    }

    /// Both NATs' UDP mappings, for failure messages.
    fn nat_state(&self) -> String {
        self.sites
            .iter()
            .map(|site| match site.udp_mappings() {
                Ok(lines) => format!(
                    "conntrack of NAT {} ({}):\n{}",
                    site.name,
                    site.outside,
                    lines.join("\n")
                ),
                Err(e) => format!("conntrack of NAT {}: {e:#}", site.name),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Checks a reported direct path against both NATs (see the module doc).
    fn verify_direct(&self, pair: &PairPath) -> Result<()> {
        let (a, b) = (self.a(), self.b());
        let (sa, sb) = (&self.sites[0], &self.sites[1]);
        verify_direct_side("node1", a, &pair.a_to_b, sa, sb, b)?;
        verify_direct_side("node2", b, &pair.b_to_a, sb, sa, a)
    }
}

/// `node` (behind `own`) says it sends directly to `peer` (behind `peer_site`): the peer's NAT must hold a
/// two-way mapping of the peer towards `own`'s outside address, and `node`'s endpoint is that mapped address;
/// `own` must hold the matching two-way mapping too.
fn verify_direct_side(
    who: &str,
    node: &MeshNode,
    path: &PeerPath,
    own: &NatSite,
    peer_site: &NatSite,
    peer: &MeshNode,
) -> Result<()> {
    let peer_flows = peer_site.two_way_flows(peer.host.underlay, own.outside)?;
    let own_flows = own.two_way_flows(node.host.underlay, peer_site.outside)?;
    if peer_flows.is_empty() || own_flows.is_empty() {
        bail!(
            "{who} reports {path}, but the NATs hold no two-way UDP flow between {} and {}:\n{}: {:?}\n{}: {:?}",
            own.outside,
            peer_site.outside,
            own.name,
            own.udp_mappings()?,
            peer_site.name,
            peer_site.udp_mappings()?
        );
    }
    let ports: Vec<u16> = peer_flows.iter().map(|(m, _)| m.mapped_port).collect();
    let ok = path.is_direct()
        && path
            .endpoint
            .is_some_and(|e| e.ip() == IpAddr::V4(peer_site.outside) && ports.contains(&e.port()));
    ensure!(
        ok,
        "{who} reports {path}; the peer's NAT maps it to {}:{ports:?}",
        peer_site.outside
    );
    eprintln!(
        "{who}: direct to {} confirmed by both NATs' conntrack ({})",
        path.endpoint.map(|e| e.to_string()).unwrap_or_default(),
        own_flows[0].1
    );
    Ok(())
}

/// SSH from `client` to an sshd on `server`'s overlay address runs a command.
fn ssh_works(lab: &Lab, client: &MeshNode, server: &MeshNode) -> Result<SshServer> {
    let sshd = SshServer::start(lab, &server.host, server.ip())?;
    sshd.wait_ready(&client.host, Duration::from_secs(30))?;
    let out = sshd.run(&client.host, "echo ssh-across-the-nat", Duration::from_secs(20))?;
    ensure!(
        out.stdout.trim() == "ssh-across-the-nat",
        "ssh printed {:?} ({})",
        out.stdout,
        out.stderr.trim()
    );
    Ok(sshd)
}

fn traffic(lab: &Lab, from: &Host, to: &MeshNode) -> Result<Process> {
    path::spawn_traffic(lab, from, to.ip(), Duration::from_secs(120))
}

#[test]
fn nat1_endpoint_independent_both_sides_direct_within_5s() {
    nat_scenario("nat1-eim-eim", &["conntrack"], |lab| {
        let pair = Pair::start(lab, NatKind::EndpointIndependent, NatKind::EndpointIndependent, |_| {
            Ok(())
        })?;
        // Measured from the moment both agents list each other (Mesh::start_on returns then).
        let _traffic = traffic(lab, &pair.a().host, pair.b())?;
        let (elapsed, paths) = pair.wait_direct(OBSERVE)?;
        eprintln!(
            "SCENARIO 1 (EIM + EIM): direct {:.2} s after both were up ({:.2} s after both agents were launched): \
             {paths}",
            elapsed.as_secs_f64(),
            pair.mesh.launched.elapsed().as_secs_f64()
        );
        pair.wait_connected(Duration::from_secs(5))?;
        pair.verify_direct(&path::pair_path(pair.a(), pair.b())?)?;
        ensure!(
            elapsed <= DIRECT_EIM,
            "direct path after {elapsed:?}, the issue asks for {DIRECT_EIM:?}"
        );
        Ok(())
    });
}

#[test]
fn nat2_one_to_one_nat_and_endpoint_dependent_go_direct() {
    nat_scenario("nat2-1to1-edm", &["conntrack"], |lab| {
        let pair = Pair::start(lab, NatKind::OneToOne, NatKind::EndpointDependent, |_| Ok(()))?;
        let _traffic = traffic(lab, &pair.b().host, pair.a())?;
        let (elapsed, paths) = pair.wait_direct(OBSERVE)?;
        eprintln!(
            "SCENARIO 2 (1:1 NAT GPU server + EDM laptop): direct {:.2} s after both were up ({:.2} s after both \
             agents were launched): {paths}",
            elapsed.as_secs_f64(),
            pair.mesh.launched.elapsed().as_secs_f64()
        );
        pair.wait_connected(Duration::from_secs(5))?;
        let paths = path::pair_path(pair.a(), pair.b())?;
        pair.verify_direct(&paths)?;
        // The GPU server is reached at its outside address with its own port (the 1:1 NAT keeps it).
        path::expect_direct_to(
            "node2 -> GPU server",
            &paths.b_to_a,
            pair.sites[0].outside,
            Some(meshd_lab::mesh::NODE_LISTEN_PORT),
        )?;
        Ok(())
    });
}

#[test]
fn nat3_endpoint_independent_and_dependent_connect_and_say_how() {
    nat_scenario("nat3-eim-edm", SSH_TOOLS, |lab| {
        let pair = Pair::start(
            lab,
            NatKind::EndpointIndependent,
            NatKind::EndpointDependent,
            |_| Ok(()),
        )?;
        pair.wait_connected(Duration::from_secs(20))?;
        // Give hole punching a fair chance (a burst takes 3 s, relayed pairs re-probe every 10 s) before reading.
        let _traffic = traffic(lab, &pair.a().host, pair.b())?;
        let settled = pair.wait_direct(Duration::from_secs(15));
        let paths = path::pair_path(pair.a(), pair.b())?;
        for (who, p) in [("node1", &paths.a_to_b), ("node2", &paths.b_to_a)] {
            ensure!(
                p.is_direct() || p.is_relay(),
                "{who} reports path {p} for a connected peer (expected direct or relay)"
            );
        }
        match settled {
            Ok((elapsed, _)) => {
                eprintln!(
                    "SCENARIO 3a (EIM + EDM): direct after {:.2} s ({paths})",
                    elapsed.as_secs_f64()
                );
                pair.verify_direct(&paths)?;
            }
            Err(_) => eprintln!("SCENARIO 3a (EIM + EDM): not direct after 15 s: {paths}"),
        }
        ssh_works(lab, pair.a(), pair.b())?;
        eprintln!(
            "SCENARIO 3a: ssh works; paths now {}",
            path::pair_path(pair.a(), pair.b())?
        );
        Ok(())
    });
}

#[test]
fn nat3_both_endpoint_dependent_use_the_relay() {
    nat_scenario("nat3-edm-edm", SSH_TOOLS, |lab| {
        let pair = Pair::start(lab, NatKind::EndpointDependent, NatKind::EndpointDependent, |_| Ok(()))?;
        pair.wait_connected(Duration::from_secs(20))?;
        let (_, paths) = path::wait_relay(pair.a(), pair.b(), Duration::from_secs(10))?;
        eprintln!("SCENARIO 3b (EDM + EDM): {paths}");
        ssh_works(lab, pair.a(), pair.b())?;
        let paths = path::pair_path(pair.a(), pair.b())?;
        ensure!(
            paths.a_to_b.is_relay() && paths.b_to_a.is_relay(),
            "two endpoint-dependent NATs cannot be punched, yet the path is {paths}"
        );
        Ok(())
    });
}

#[test]
fn nat4_udp_blocked_uses_the_relay_over_tcp() {
    nat_scenario("nat4-udp-blocked", SSH_TOOLS, |lab| {
        let pair = Pair::start(
            lab,
            NatKind::EndpointIndependent,
            NatKind::EndpointIndependent,
            |sites| sites[0].block_udp(),
        )?;
        pair.wait_connected(Duration::from_secs(20))?;
        let (_, paths) = path::wait_relay(pair.a(), pair.b(), Duration::from_secs(10))?;
        eprintln!("SCENARIO 4 (UDP blocked for node1): {paths}");
        ssh_works(lab, pair.a(), pair.b())?;
        ssh_works(lab, pair.b(), pair.a())?;
        let paths = path::pair_path(pair.a(), pair.b())?;
        ensure!(
            paths.a_to_b.is_relay() && paths.b_to_a.is_relay(),
            "UDP is blocked, yet the path is {paths}"
        );
        // The metrics say the same: one relayed peer, and the SSH sessions' bytes went through the relay.
        let metrics = pair.a().ctl(&["status", "--prometheus"])?;
        let sample = |name: &str| -> Result<f64> {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .with_context(|| format!("no {name} in `meshd status --prometheus`:\n{metrics}"))
        };
        ensure!(
            sample("meshd_peers{path=\"relay\"}")? == 1.0 && sample("meshd_peers{path=\"direct\"}")? == 0.0,
            "metrics disagree with the relayed path:\n{metrics}"
        );
        ensure!(
            sample("meshd_relayed_bytes_total")? > 10_000.0,
            "two SSH sessions went through the relay, yet the metrics count few relayed bytes:\n{metrics}"
        );
        Ok(())
    });
}

#[test]
fn nat5_unblocked_udp_upgrades_to_direct_and_the_ssh_session_survives() {
    nat_scenario("nat5-unblock", SSH_TOOLS, |lab| {
        let pair = Pair::start(
            lab,
            NatKind::EndpointIndependent,
            NatKind::EndpointIndependent,
            |sites| sites[0].block_udp(),
        )?;
        pair.wait_connected(Duration::from_secs(20))?;
        let (_, paths) = path::wait_relay(pair.a(), pair.b(), Duration::from_secs(10))?;
        eprintln!("SCENARIO 5: before the unblock: {paths}");
        let sshd = SshServer::start(lab, &pair.b().host, pair.b().ip())?;
        sshd.wait_ready(&pair.a().host, Duration::from_secs(30))?;
        // A line every 200 ms, bounded to 2 minutes.
        let mut session = sshd.spawn_session(
            lab,
            &pair.a().host,
            "ssh-ticker",
            "i=0; while [ $i -lt 600 ]; do echo tick $i; i=$((i+1)); sleep 0.2; done",
        )?;
        wait_ticks(&mut session, 5, Duration::from_secs(20))?;

        pair.sites[0].unblock_udp()?;
        let (elapsed, paths) = pair.wait_direct(UPGRADE)?;
        eprintln!(
            "SCENARIO 5: direct {:.2} s after UDP was unblocked ({paths})",
            elapsed.as_secs_f64()
        );
        pair.verify_direct(&path::pair_path(pair.a(), pair.b())?)?;
        let now = ticks(&session);
        wait_ticks(&mut session, now + 10, Duration::from_secs(10))?;
        eprintln!(
            "SCENARIO 5: the ssh session opened on the relay kept ticking on the direct path ({now} -> {})",
            ticks(&session)
        );
        Ok(())
    });
}

/// Scenario 6 with node1's NAT losing its mappings while node2 pings node1 every 100 ms. `new_ports`: the NAT
/// also comes back mapping UDP to other ports (a router reboot), so the old direct path is dead for good.
fn mapping_loss(lab: &Lab, new_ports: bool) -> Result<()> {
    let label = if new_ports {
        "6b (conntrack -F + new ports)"
    } else {
        "6a (conntrack -F)"
    };
    let pair = Pair::start(lab, NatKind::EndpointIndependent, NatKind::EndpointIndependent, |_| {
        Ok(())
    })?;
    let _traffic = traffic(lab, &pair.a().host, pair.b())?;
    let (_, paths) = pair.wait_direct(OBSERVE)?;
    eprintln!("SCENARIO {label}: before: {paths}");
    let mut probe = PingProbe::start(
        lab,
        &pair.b().host,
        pair.a().ip(),
        Duration::from_millis(100),
        Duration::from_secs(90),
    )?;
    probe.wait_reply_after(probe.started(), Duration::from_secs(5))?;
    std::thread::sleep(Duration::from_secs(2));
    let (sa, sb) = (&pair.sites[0], &pair.sites[1]);
    let towards_peer = |lines: Vec<String>| -> Vec<String> {
        let (inside, peer) = (pair.a().host.underlay.to_string(), sb.outside.to_string());
        lines
            .into_iter()
            .filter(|l| l.contains(&inside) && l.contains(&peer))
            .collect()
    };
    let before = towards_peer(sa.udp_mappings()?);
    let lost_at = probe.now();
    if new_ports {
        sa.reboot_with_new_ports("20000-29999")?;
    } else {
        sa.flush_mappings()?;
    }
    // Watch longer than the bound, so a longer gap is measured, and check replies still come at the end.
    std::thread::sleep(RESUME + Duration::from_secs(2));
    let end = probe.now();
    let replies = probe.replies();
    let gap = path::longest_gap(&replies, lost_at - 0.5, end);
    let after = towards_peer(sa.udp_mappings()?);
    let paths_after = path::pair_path(pair.a(), pair.b())?;
    eprintln!(
        "SCENARIO {label}: longest gap in a 100 ms ping: {gap:.2} s; path {:.0} s later: {paths_after}\n\
         node1's mappings towards node2 before:\n{}\nafter:\n{}",
        end - lost_at,
        before.join("\n"),
        after.join("\n")
    );
    ensure!(
        gap <= RESUME.as_secs_f64(),
        "traffic stopped for {gap:.2} s after the NAT lost its mappings (bound {RESUME:?})"
    );
    ensure!(
        replies.iter().any(|&t| t > end - 1.0),
        "no reply in the last second: traffic did not resume"
    );
    if new_ports {
        // Not one of the bounds: how long until the pair is direct again on the new mapping.
        match pair.wait_direct(Duration::from_secs(30)) {
            Ok((_, paths)) => eprintln!(
                "SCENARIO {label}: direct again {:.1} s after the reboot: {paths}",
                probe.now() - lost_at
            ),
            Err(e) => eprintln!("SCENARIO {label}: not direct again within 30 more s: {e:#}"),
        }
    }
    Ok(())
}

#[test]
fn nat6_lost_nat_mappings_traffic_resumes_within_10s() {
    nat_scenario("nat6-conntrack-flush", &["conntrack"], |lab| mapping_loss(lab, false));
}

#[test]
fn nat6_router_reboot_with_new_ports_traffic_resumes_within_10s() {
    nat_scenario("nat6-new-ports", &["conntrack"], |lab| mapping_loss(lab, true));
}

#[test]
fn nat7_five_percent_loss_hole_punching_and_ssh_still_work() {
    nat_scenario("nat7-loss", SSH_TOOLS, |lab| {
        let pair = Pair::start(lab, NatKind::EndpointIndependent, NatKind::EndpointIndependent, |_| {
            lab.set_router_loss(5.0)
        })?;
        let _traffic = traffic(lab, &pair.a().host, pair.b())?;
        let (elapsed, paths) = pair.wait_direct(OBSERVE)?;
        eprintln!(
            "SCENARIO 7 (5% loss): direct after {:.2} s ({paths})",
            elapsed.as_secs_f64()
        );
        pair.verify_direct(&path::pair_path(pair.a(), pair.b())?)?;
        ssh_works(lab, pair.a(), pair.b())?;
        Ok(())
    });
}

#[test]
fn nat8_same_nat_peers_use_their_private_addresses() {
    nat_scenario("nat8-same-nat", &["conntrack"], |lab| {
        let coord = lab.add_host("coord")?;
        let site = lab.add_nat_site("home", NatKind::EndpointIndependent)?;
        let hosts = vec![site.add_host(lab, "node1")?, site.add_host(lab, "node2")?];
        let (a_private, b_private) = (hosts[0].underlay, hosts[1].underlay);
        let mesh = Mesh::start_on(lab, coord, hosts)?;
        let (a, b) = (&mesh.nodes[0], &mesh.nodes[1]);
        let _traffic = traffic(lab, &a.host, b)?;
        let accept = |p: &PairPath| {
            let local =
                |path: &PeerPath, ip| path.is_direct() && path.endpoint.is_some_and(|e| e.ip() == IpAddr::V4(ip));
            local(&p.a_to_b, b_private) && local(&p.b_to_a, a_private)
        };
        let (elapsed, paths) = path::wait_pair("both to go direct over the LAN", a, b, OBSERVE, accept)?;
        eprintln!(
            "SCENARIO 8 (same NAT): direct over the private addresses after {:.2} s ({paths})",
            elapsed.as_secs_f64()
        );
        path::expect_direct_to(
            "node1",
            &paths.a_to_b,
            b_private,
            Some(meshd_lab::mesh::NODE_LISTEN_PORT),
        )?;
        path::expect_direct_to(
            "node2",
            &paths.b_to_a,
            a_private,
            Some(meshd_lab::mesh::NODE_LISTEN_PORT),
        )?;
        a.host.wait_ping(b.ip(), Duration::from_secs(5))?;
        b.host.wait_ping(a.ip(), Duration::from_secs(5))?;
        // Nothing between them goes through the NAT: no flow from either host towards the NAT's outside address.
        let hairpin: Vec<String> = site
            .udp_mappings()?
            .into_iter()
            .filter(|l| {
                let original_dst = l.split_whitespace().find(|w| w.starts_with("dst="));
                original_dst == Some(format!("dst={}", site.outside).as_str()) && !l.contains("[UNREPLIED]")
            })
            .collect();
        ensure!(hairpin.is_empty(), "traffic hairpins through the NAT: {hairpin:?}");
        Ok(())
    });
}

//! BENCHMARK (ignored by default): relay throughput beside direct throughput in the NAT lab.
//!
//! One mesh, four agents: node1 and node2 behind endpoint-dependent NATs (they can only use the relay), node3 and
//! node4 behind endpoint-independent NATs (direct). `iperf3 -t 5` over the overlay, one pair after the other, on
//! this machine's shared cores: the figures compare the two paths, they are not absolute capacities.
//!
//!   cargo build -p meshd -p meshd-coordinator
//!   cargo test -p meshd-lab --test lab -- nat_bench --ignored --nocapture

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use meshd_lab::lab::Lab;
use meshd_lab::natlab::NatKind;
use meshd_lab::natlab::nat_scenario;
use meshd_lab::{Mesh, MeshNode, path, wait};
use serde_json::Value;

const SECONDS: &str = "5";

/// Mbit/s from `from` to `to` (an iperf3 server on `to`'s overlay address), as received.
fn iperf(lab: &Lab, from: &MeshNode, to: &MeshNode) -> Result<f64> {
    let ip = to.ip().to_string();
    let _server = lab.spawn(&to.host, "iperf3-server", "iperf3", &["-s", "-1", "-B", &ip], &[])?;
    let out = wait::until(
        &format!("iperf3 {} -> {}", from.hostname, to.hostname),
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let out = from
                .host
                .run("iperf3", &["-c", &ip, "-t", SECONDS, "-J"], Duration::from_secs(30))?;
            Ok(out.success().then_some(out.stdout))
        },
    )?;
    let report: Value = serde_json::from_str(&out).context("parsing iperf3 -J")?;
    let bits = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received in {report}"))?;
    Ok(bits / 1e6)
}

#[test]
#[ignore = "benchmark: run with --ignored"]
fn nat_bench_relay_vs_direct_throughput() {
    nat_scenario("nat-bench", &["conntrack", "iperf3"], |lab| {
        let coord = lab.add_host("coord")?;
        let kinds = [
            NatKind::EndpointDependent,
            NatKind::EndpointDependent,
            NatKind::EndpointIndependent,
            NatKind::EndpointIndependent,
        ];
        let mut hosts = Vec::new();
        let mut sites = Vec::new();
        for (i, kind) in kinds.into_iter().enumerate() {
            let site = lab.add_nat_site(&format!("s{}", i + 1), kind)?;
            hosts.push(site.add_host(lab, &format!("node{}", i + 1))?);
            sites.push(site);
        }
        let mesh = Mesh::start_on(lab, coord, hosts)?;
        let n = &mesh.nodes;
        n[0].host.wait_ping(n[1].ip(), Duration::from_secs(20))?;
        n[2].host.wait_ping(n[3].ip(), Duration::from_secs(20))?;
        let (_, relayed) = path::wait_relay(&n[0], &n[1], Duration::from_secs(20))?;
        let (o3, o4) = (IpAddr::V4(sites[2].outside), IpAddr::V4(sites[3].outside));
        let via = |p: &path::PeerPath, ip| p.is_direct() && p.endpoint.is_some_and(|e| e.ip() == ip);
        let (_, direct) = path::wait_pair(
            "node3 and node4 to go direct through their NATs",
            &n[2],
            &n[3],
            Duration::from_secs(20),
            |p| via(&p.a_to_b, o4) && via(&p.b_to_a, o3),
        )?;
        let relay_mbps = iperf(lab, &n[0], &n[1])?;
        let direct_mbps = iperf(lab, &n[2], &n[3])?;
        // The pairs must not have changed path during the runs.
        let relayed_after = path::pair_path(&n[0], &n[1])?;
        let direct_after = path::pair_path(&n[2], &n[3])?;
        eprintln!(
            "BENCHMARK relay vs direct (iperf3 TCP, {SECONDS} s, debug-profile binaries, shared machine):\n  \
             relay  (EDM + EDM; {relayed}): {relay_mbps:.0} Mbit/s\n  \
             direct (EIM + EIM; {direct}): {direct_mbps:.0} Mbit/s"
        );
        ensure!(
            relayed_after.a_to_b.is_relay() && direct_after.a_to_b.is_direct(),
            "paths changed during the runs: relay pair {relayed_after}, direct pair {direct_after}"
        );
        Ok(())
    });
}

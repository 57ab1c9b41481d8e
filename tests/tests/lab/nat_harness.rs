//! The NAT lab's topology itself, checked without the binaries under test: a reflector on the "internet" tells
//! each prober which address and port its NAT mapped it to (`meshd-lab-udp`, this crate's tool).
//!
//! - endpoint-independent (MASQUERADE): one socket is seen with the same mapped port by two server ports, and
//!   unsolicited packets from outside do not get in;
//! - endpoint-dependent (MASQUERADE --random-fully): the two server ports see different mapped ports;
//! - 1:1 NAT: the host is seen as the outside address with its own port, and is reachable from outside;
//! - UDP blocked: no UDP answer while TCP still passes; unblocked: UDP again;
//! - `conntrack -L` shows the mapping and `conntrack -F` removes it;
//! - two hosts behind the same NAT talk over their private addresses.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use meshd_lab::lab::{Host, Lab};
use meshd_lab::natlab::{NatKind, nat_harness_scenario};
use meshd_lab::process::Process;
use meshd_lab::wait;

const TOOL: &str = env!("CARGO_BIN_EXE_meshd-lab-udp");
const PORT_A: u16 = 3478;
const PORT_B: u16 = 3479;
/// The port probers bind, like an agent's WireGuard port.
const CLIENT_PORT: u16 = 51820;

fn serve(lab: &Lab, host: &Host, ports: &[u16]) -> Result<Process> {
    let addrs: Vec<String> = ports.iter().map(|p| format!("0.0.0.0:{p}")).collect();
    let args: Vec<&str> = std::iter::once("serve")
        .chain(addrs.iter().map(String::as_str))
        .collect();
    let mut process = lab.spawn(host, "reflector", TOOL, &args, &[])?;
    wait::until(
        "the reflector to listen",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            process.ensure_running()?;
            let ready = process.log_text().lines().filter(|l| l.starts_with("serving")).count() == ports.len();
            Ok(ready.then_some(()))
        },
    )?;
    Ok(process)
}

/// The answers of `probe` from `from` (UDP from port `bind_port`, or TCP) to `targets`: `Some(observed)` per
/// target that answered.
fn probe(
    from: &Host,
    tcp: bool,
    bind_port: u16,
    targets: &[(Ipv4Addr, u16)],
    timeout_ms: u64,
) -> Result<Vec<Option<String>>> {
    let bind = format!("0.0.0.0:{bind_port}");
    let timeout = timeout_ms.to_string();
    let targets: Vec<String> = targets.iter().map(|(ip, port)| format!("{ip}:{port}")).collect();
    let mut args = vec!["probe", "--bind", &bind, "--timeout-ms", &timeout];
    if tcp {
        args.push("--tcp");
    }
    args.extend(targets.iter().map(String::as_str));
    let out = from.run(
        TOOL,
        &args,
        Duration::from_millis(timeout_ms * 2) + Duration::from_secs(5),
    )?;
    if out.status.code() == Some(2) {
        bail!("meshd-lab-udp probe failed: {}", out.stderr.trim());
    }
    let answers: Vec<Option<String>> = out
        .stdout
        .lines()
        .map(|l| l.split_once(' ').map(|(_, a)| a.to_owned()).filter(|a| a != "timeout"))
        .collect();
    ensure!(answers.len() == targets.len(), "probe printed {:?}", out.stdout);
    Ok(answers)
}

fn mapped_port(observed: &Option<String>, expect_ip: Ipv4Addr) -> Result<u16> {
    let observed = observed.as_deref().context("no answer")?;
    let (ip, port) = observed.rsplit_once(':').context("observed address without port")?;
    ensure!(
        ip == expect_ip.to_string(),
        "seen as {observed}, expected the NAT's {expect_ip}"
    );
    Ok(port.parse()?)
}

#[test]
fn nat_kinds_map_filter_block_and_flush_as_designed() {
    nat_harness_scenario("nat-lab-harness", &["conntrack"], |lab| {
        let internet = lab.add_host("stun")?;
        let eim = lab.add_nat_site("eim", NatKind::EndpointIndependent)?;
        let edm = lab.add_nat_site("edm", NatKind::EndpointDependent)?;
        let one = lab.add_nat_site("gpu", NatKind::OneToOne)?;
        let eim1 = eim.add_host(lab, "eim1")?;
        let eim2 = eim.add_host(lab, "eim2")?;
        let edm1 = edm.add_host(lab, "edm1")?;
        let gpu = one.add_host(lab, "gpu")?;
        let _reflector = serve(lab, &internet, &[PORT_A, PORT_B])?;
        let servers = [(internet.underlay, PORT_A), (internet.underlay, PORT_B)];

        // Endpoint-independent: the same mapping for both destinations, the port kept.
        let answers = probe(&eim1, false, CLIENT_PORT, &servers, 3000)?;
        let (p1, p2) = (
            mapped_port(&answers[0], eim.outside)?,
            mapped_port(&answers[1], eim.outside)?,
        );
        eprintln!("EIM: {CLIENT_PORT} mapped to {p1} and {p2}");
        ensure!(p1 == p2, "endpoint-independent NAT gave two ports {p1} {p2}");
        ensure!(
            p1 == CLIENT_PORT,
            "MASQUERADE did not keep the free port {CLIENT_PORT}: {p1}"
        );
        let mappings = eim.udp_mappings()?;
        eprintln!("conntrack -L on the EIM NAT:\n{}", mappings.join("\n"));
        ensure!(
            mappings
                .iter()
                .any(|l| l.contains(&eim1.underlay.to_string()) && l.contains(&format!("sport={CLIENT_PORT}"))),
            "conntrack -L does not show the mapping of {}: {mappings:?}",
            eim1.underlay
        );

        // Endpoint-dependent: a different random port per destination.
        let answers = probe(&edm1, false, CLIENT_PORT, &servers, 3000)?;
        let (q1, q2) = (
            mapped_port(&answers[0], edm.outside)?,
            mapped_port(&answers[1], edm.outside)?,
        );
        eprintln!("EDM: {CLIENT_PORT} mapped to {q1} and {q2}");
        ensure!(q1 != q2, "--random-fully gave the same port {q1} to two destinations");

        // 1:1 NAT: seen as the outside address with the port kept, and reachable from outside on any port.
        let answers = probe(&gpu, false, CLIENT_PORT, &servers[..1], 3000)?;
        let g = mapped_port(&answers[0], one.outside)?;
        ensure!(g == CLIENT_PORT, "the 1:1 NAT changed the port {CLIENT_PORT} to {g}");
        let _gpu_reflector = serve(lab, &gpu, &[7000])?;
        let answers = probe(&internet, false, 40000, &[(one.outside, 7000)], 3000)?;
        ensure!(
            answers[0].as_deref() == Some(&format!("{}:40000", internet.underlay)),
            "the 1:1 NAT did not forward an unsolicited packet to its host: {answers:?}"
        );
        // ... while the masquerading NATs filter unsolicited packets (no mapping for that source).
        let _eim_reflector = serve(lab, &eim1, &[7000])?;
        let answers = probe(&internet, false, 40001, &[(eim.outside, 7000)], 1000)?;
        ensure!(
            answers[0].is_none(),
            "an unsolicited packet got through the EIM NAT: {answers:?}"
        );

        // UDP blocked: no UDP, TCP still passes; unblocked: UDP again.
        eim.block_udp()?;
        let answers = probe(&eim1, false, 40002, &servers[..1], 1500)?;
        ensure!(answers[0].is_none(), "UDP passed a blocked NAT: {answers:?}");
        let answers = probe(&eim1, true, 0, &servers[..1], 3000)?;
        ensure!(answers[0].is_some(), "TCP does not pass the UDP-blocked NAT");
        eim.unblock_udp()?;
        let answers = probe(&eim1, false, 40003, &servers[..1], 3000)?;
        ensure!(answers[0].is_some(), "UDP still blocked after unblock");

        // conntrack -F forgets the mappings.
        ensure!(!eim.udp_mappings()?.is_empty(), "no mappings before the flush");
        eim.flush_mappings()?;
        let left = eim.udp_mappings()?;
        ensure!(left.is_empty(), "mappings left after conntrack -F: {left:?}");

        // Two hosts behind the same NAT talk over their private addresses.
        let answers = probe(&eim2, false, CLIENT_PORT, &[(eim1.underlay, 7000)], 3000)?;
        ensure!(
            answers[0].as_deref() == Some(&format!("{}:{CLIENT_PORT}", eim2.underlay)),
            "same-NAT hosts do not see each other's private address: {answers:?}"
        );
        // A private segment is not reachable from another site.
        ensure!(
            !edm1.ping_once(eim1.underlay, Duration::from_millis(300))?,
            "one site reaches another site's private address"
        );
        lab.assert_isolated()?;
        Ok(())
    });
}

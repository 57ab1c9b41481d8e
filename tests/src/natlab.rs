//! NAT sites for the NAT-traversal lab: private segments behind NAT router namespaces made with iptables.
//!
//! The lab's router namespace is the "internet" (198.18.k.0/24 segments, the coordinator lives there). A
//! [`NatSite`] is one private segment 198.19.k.0/24 (a bridge in the site's NAT namespace, so several hosts can
//! share it) behind a NAT whose outside address is 198.18.k.2 on the internet. The NAT kinds are the ones the
//! issue names: endpoint-independent mapping (Linux `MASQUERADE`, which keeps the source port when it can, with
//! conntrack's address-and-port-dependent filtering), endpoint-dependent mapping (`MASQUERADE --random-fully`: a
//! fresh random port per destination), and a 1:1 NAT (the "GPU server": every port of the outside address is
//! forwarded to the one inside host, whose own traffic leaves from that address with its port kept).
//!
//! It owns the NAT's rules and their runtime changes (UDP blocked and unblocked, mappings flushed, loss). It never
//! creates or deletes a namespace itself: the [`Lab`] does, and deletes them on drop, also when a scenario fails.
//! Private addresses are not routed on the internet: a host behind one site cannot reach another site's inside.

use std::cell::Cell;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

use crate::cmd;
use crate::env;
use crate::lab::{Host, Lab};
use crate::netns::{self, IP_TIMEOUT, Netns};

/// What the NAT lab needs from the kernel, tried once per test process in a throwaway namespace: a bridge,
/// `MASQUERADE --random-fully`, DNAT/SNAT, `-m statistic` and conntrack. `Err` says what failed.
pub fn kernel_support() -> std::result::Result<(), String> {
    static SUPPORT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    SUPPORT
        .get_or_init(|| {
            let name = format!("mlab-{:x}-kprobe", std::process::id());
            let ns = Netns::create(&name).map_err(|e| format!("creating a namespace: {e:#}"))?;
            let ipt = |args: &[&str]| -> std::result::Result<(), String> {
                cmd::run_ok(ns.command("iptables").args(args), IP_TIMEOUT)
                    .map(drop)
                    .map_err(|e| format!("{e:#}"))
            };
            ns.ip(&["link", "add", BRIDGE, "type", "bridge"])
                .map_err(|e| format!("no bridge support: {e:#}"))?;
            ipt(&[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "lo",
                "-j",
                "MASQUERADE",
                "--random-fully",
            ])?;
            ipt(&[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-d",
                "198.18.0.1",
                "-j",
                "DNAT",
                "--to-destination",
                "198.19.0.1",
            ])?;
            ipt(&[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                "198.19.0.1",
                "-j",
                "SNAT",
                "--to-source",
                "198.18.0.1",
            ])?;
            ipt(&[
                "-A",
                "FORWARD",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.05",
                "-j",
                "DROP",
            ])?;
            cmd::run_ok(ns.command("conntrack").args(["-L"]), IP_TIMEOUT)
                .map(drop)
                .map_err(|e| format!("conntrack -L: {e:#}"))
        })
        .clone()
}

/// [`crate::lab::scenario`] for the NAT lab: when the machine has what the lab needs but the kernel cannot build
/// the NATs, prints `SKIPPED` with the reason (a failure with `MESHD_LAB_REQUIRED=1`).
pub fn nat_scenario(name: &str, tools: &[&str], body: impl FnOnce(&Lab) -> Result<()>) {
    if kernel_ready(name, tools, true) {
        crate::lab::scenario(name, tools, body);
    }
}

/// [`nat_scenario`] for harness checks that need no meshd binaries.
pub fn nat_harness_scenario(name: &str, tools: &[&str], body: impl FnOnce(&Lab) -> Result<()>) {
    if kernel_ready(name, tools, false) {
        crate::lab::harness_scenario(name, tools, body);
    }
}

fn kernel_ready(name: &str, tools: &[&str], needs_binaries: bool) -> bool {
    // Missing tools, root or binaries: the lab's own runner reports those.
    if !env::missing_prerequisites(tools, needs_binaries).is_empty() {
        return true;
    }
    match kernel_support() {
        Ok(()) => true,
        Err(reason) => {
            let message = format!("lab scenario `{name}`: this kernel cannot set up the NAT lab: {reason}");
            if env::lab_required() {
                panic!("{message} ({}=1, so this is a failure)", env::REQUIRED_VAR);
            }
            eprintln!("SKIPPED {message}");
            false
        }
    }
}

/// How the NAT maps the private segment onto its outside address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// `MASQUERADE`: the same mapped port for every destination (kept equal to the inside port when free).
    EndpointIndependent,
    /// `MASQUERADE --random-fully`: a new random mapped port for every destination.
    EndpointDependent,
    /// A 1:1 NAT: the outside address forwards every port to the site's single host (DNAT), and that host's
    /// traffic leaves from the outside address with its source port kept (SNAT).
    OneToOne,
}

impl NatKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::EndpointIndependent => "endpoint-independent (MASQUERADE)",
            Self::EndpointDependent => "endpoint-dependent (MASQUERADE --random-fully)",
            Self::OneToOne => "1:1 NAT (DNAT + SNAT)",
        }
    }
}

/// Name of the filter chain (inside the site's own namespace) where the site's blocking rules live.
const BLOCK_CHAIN: &str = "LAB_BLOCK";
/// The bridge of the private segment inside the NAT namespace.
const BRIDGE: &str = "br0";

/// One private segment behind its NAT router.
#[derive(Debug)]
pub struct NatSite {
    pub name: String,
    pub kind: NatKind,
    /// The NAT router's namespace.
    pub nat_ns: String,
    /// The NAT's address on the internet: peers see the site's hosts as this address.
    pub outside: Ipv4Addr,
    /// The third octet k of the private segment 198.19.k.0/24.
    subnet: u8,
    hosts: Cell<u8>,
}

impl Lab {
    /// A NAT router namespace on the internet (outside 198.18.k.2) in front of an empty private segment
    /// 198.19.k.0/24; add hosts with [`NatSite::add_host`].
    pub fn add_nat_site(&self, name: &str, kind: NatKind) -> Result<NatSite> {
        let k = self.take_subnet()?;
        let nat_ns = self.create_ns(&format!("{name}-nat"))?;
        let outside = self.attach_to_router(&nat_ns, k)?;
        self.with_ns(&nat_ns, |n| {
            n.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
            n.ip(&["addr", "add", &format!("198.19.{k}.1/24"), "dev", BRIDGE])?;
            n.ip(&["link", "set", BRIDGE, "up"])?;
            n.sysctl("net.ipv4.ip_forward", "1")
        })?;
        let site = NatSite {
            name: name.to_owned(),
            kind,
            nat_ns,
            outside,
            subnet: k,
            hosts: Cell::new(0),
        };
        // Like every home router's WAN firewall: unsolicited packets to the router itself are dropped in the
        // filter table, so they never become conntrack entries. Without this, a hole-punching probe that arrives
        // before the inside host's own first packet is accepted locally (and answered with ICMP port unreachable),
        // its entry is confirmed, and it then occupies the mapping MASQUERADE wanted: the host's flow gets
        // remapped to a random port and an endpoint-independent NAT behaves endpoint-dependently for that peer.
        site.iptables(&["-A", "INPUT", "-i", "eth0", "-j", "DROP"])?;
        site.iptables(&["-N", BLOCK_CHAIN])?;
        site.iptables(&["-A", "FORWARD", "-j", BLOCK_CHAIN])?;
        match kind {
            NatKind::EndpointIndependent | NatKind::EndpointDependent => site.masquerade(&[])?,
            // The DNAT/SNAT pair names the inside host: installed by add_host.
            NatKind::OneToOne => {}
        }
        // Byte and packet counters on conntrack entries, so a test can see which flows carried traffic. The key
        // exists once the conntrack module is loaded (the NAT rule above loads it); best effort otherwise.
        if let Err(e) = site.run_in_nat("sysctl", &["-q", "-w", "net.netfilter.nf_conntrack_acct=1"]) {
            eprintln!("NAT site {name}: no conntrack accounting ({e:#})");
        }
        Ok(site)
    }
}

impl NatSite {
    /// The private address of the i-th host (from 1) of this site.
    pub fn inside_address(&self, i: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, self.subnet, 1 + i)
    }

    /// A new host on the private segment (198.19.k.2, .3, ...), its one route 198.18.0.0/15 via the NAT.
    pub fn add_host(&self, lab: &Lab, name: &str) -> Result<Host> {
        let i = self.hosts.get() + 1;
        if self.kind == NatKind::OneToOne && i > 1 {
            bail!("the 1:1 NAT site {} has room for one host only", self.name);
        }
        if i > 100 {
            bail!("NAT site {} is full", self.name);
        }
        self.hosts.set(i);
        let ns = lab.create_ns(name)?;
        let lan_if = format!("lan{i}");
        cmd::run_ok(
            Command::new(env::tool_path("ip")).args([
                "link",
                "add",
                "eth0",
                "netns",
                &ns,
                "type",
                "veth",
                "peer",
                "name",
                &lan_if,
                "netns",
                &self.nat_ns,
            ]),
            IP_TIMEOUT,
        )
        .with_context(|| format!("creating the LAN veth pair of {name} on site {}", self.name))?;
        self.ip(&["link", "set", &lan_if, "master", BRIDGE])?;
        self.ip(&["link", "set", &lan_if, "up"])?;
        let address = self.inside_address(i);
        let k = self.subnet;
        lab.with_ns(&ns, |h| {
            h.ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"])?;
            h.ip(&["link", "set", "eth0", "up"])?;
            h.ip(&["route", "add", "198.18.0.0/15", "via", &format!("198.19.{k}.1")])
        })?;
        if self.kind == NatKind::OneToOne {
            let (inside, outside) = (address.to_string(), self.outside.to_string());
            self.iptables(&[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-i",
                "eth0",
                "-d",
                &outside,
                "-j",
                "DNAT",
                "--to-destination",
                &inside,
            ])?;
            self.iptables(&[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "eth0",
                "-s",
                &inside,
                "-j",
                "SNAT",
                "--to-source",
                &outside,
            ])?;
        }
        Ok(Host {
            name: name.to_owned(),
            ns,
            underlay: address,
        })
    }

    fn ip(&self, args: &[&str]) -> Result<String> {
        cmd::run_ok(
            Command::new(env::tool_path("ip")).args(["-n", &self.nat_ns]).args(args),
            IP_TIMEOUT,
        )
        .with_context(|| format!("in the NAT namespace of site {}", self.name))
    }

    /// Runs `program args...` in the NAT router's namespace; fails on a non-zero exit.
    pub fn run_in_nat(&self, program: &str, args: &[&str]) -> Result<String> {
        cmd::run_ok(netns::exec_in(&self.nat_ns, program).args(args), IP_TIMEOUT)
            .with_context(|| format!("on the NAT router of site {}", self.name))
    }

    fn iptables(&self, args: &[&str]) -> Result<()> {
        self.run_in_nat("iptables", args).map(drop)
    }

    /// Drops every UDP packet the NAT would forward between the segment and the internet, both ways (a network
    /// that only lets TCP through). TCP, and so the coordinator's HTTPS and relay, still passes.
    pub fn block_udp(&self) -> Result<()> {
        self.iptables(&["-F", BLOCK_CHAIN])?;
        self.iptables(&["-A", BLOCK_CHAIN, "-i", BRIDGE, "-o", "eth0", "-p", "udp", "-j", "DROP"])?;
        self.iptables(&["-A", BLOCK_CHAIN, "-i", "eth0", "-o", BRIDGE, "-p", "udp", "-j", "DROP"])
    }

    /// Like [`NatSite::block_udp`], but UDP between the segment and `allowed` (the coordinator: its STUN ports
    /// and the WireGuard gateway) still passes, both ways: a corporate network that lets through only what its
    /// firewall was told about.
    pub fn block_udp_except(&self, allowed: Ipv4Addr) -> Result<()> {
        crate::lab::assert_lab_address(allowed)?;
        let allowed = allowed.to_string();
        self.iptables(&["-F", BLOCK_CHAIN])?;
        self.iptables(&[
            "-A",
            BLOCK_CHAIN,
            "-i",
            BRIDGE,
            "-o",
            "eth0",
            "-p",
            "udp",
            "-d",
            &allowed,
            "-j",
            "RETURN",
        ])?;
        self.iptables(&[
            "-A",
            BLOCK_CHAIN,
            "-i",
            "eth0",
            "-o",
            BRIDGE,
            "-p",
            "udp",
            "-s",
            &allowed,
            "-j",
            "RETURN",
        ])?;
        self.iptables(&["-A", BLOCK_CHAIN, "-i", BRIDGE, "-o", "eth0", "-p", "udp", "-j", "DROP"])?;
        self.iptables(&["-A", BLOCK_CHAIN, "-i", "eth0", "-o", BRIDGE, "-p", "udp", "-j", "DROP"])
    }

    /// Removes what [`NatSite::block_udp`] added.
    pub fn unblock_udp(&self) -> Result<()> {
        self.iptables(&["-F", BLOCK_CHAIN])
    }

    /// Forgets every mapping of the NAT (`conntrack -F`): existing flows get new mappings (possibly new ports) on
    /// their next outgoing packet, and inbound packets of old flows are dropped meanwhile.
    pub fn flush_mappings(&self) -> Result<()> {
        self.run_in_nat("conntrack", &["-F"]).map(drop)
    }

    /// Appends a MASQUERADE rule for traffic leaving to the internet; `matches` go before the target except
    /// `--to-ports`, which is the target's. Endpoint-dependent sites add `--random-fully` (a random port per flow).
    fn masquerade(&self, extra: &[&str]) -> Result<()> {
        let (matches, target_opts) = match extra.iter().position(|a| *a == "--to-ports") {
            Some(i) => extra.split_at(i),
            None => (extra, &[][..]),
        };
        let mut rule = vec!["-t", "nat", "-A", "POSTROUTING", "-o", "eth0"];
        rule.extend(matches);
        rule.extend(["-j", "MASQUERADE"]);
        rule.extend(target_opts);
        if self.kind == NatKind::EndpointDependent {
            rule.push("--random-fully");
        }
        self.iptables(&rule)
    }

    /// A router reboot: the NAT comes back mapping UDP into `ports` (e.g. `"20000-29999"`, so every flow gets a
    /// new outside port) and has forgotten every mapping. Masquerading sites only.
    pub fn reboot_with_new_ports(&self, ports: &str) -> Result<()> {
        if self.kind == NatKind::OneToOne {
            bail!("site {}: a 1:1 NAT keeps its ports", self.name);
        }
        self.iptables(&["-t", "nat", "-F", "POSTROUTING"])?;
        self.masquerade(&["-p", "udp", "--to-ports", ports])?;
        self.masquerade(&[])?;
        self.flush_mappings()
    }

    /// The NAT's UDP conntrack entries (`conntrack -L -p udp`), one per line.
    pub fn udp_mappings(&self) -> Result<Vec<String>> {
        let out = cmd::run(
            netns::exec_in(&self.nat_ns, "conntrack").args(["-L", "-p", "udp"]),
            IP_TIMEOUT,
        )?;
        if !out.success() {
            bail!("conntrack -L on site {} failed: {}", self.name, out.stderr.trim());
        }
        Ok(out
            .stdout
            .lines()
            .filter(|l| l.starts_with("udp"))
            .map(str::to_owned)
            .collect())
    }

    /// The UDP mappings between `inside` (a host of this site) and `remote` (an internet address) that saw
    /// traffic both ways (no `[UNREPLIED]`; conntrack only marks a UDP flow `[ASSURED]` after it has lasted 2 s),
    /// as `(inside port, mapped port)` with the full lines.
    pub fn two_way_flows(&self, inside: Ipv4Addr, remote: Ipv4Addr) -> Result<Vec<(Mapping, String)>> {
        Ok(self
            .udp_mappings()?
            .into_iter()
            .filter(|l| !l.contains("[UNREPLIED]"))
            .filter_map(|l| Mapping::parse(&l, inside, remote).map(|m| (m, l)))
            .collect())
    }
}

/// One NAT mapping read from a conntrack line: the inside host's port and the port it is mapped to outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub inside_port: u16,
    pub mapped_port: u16,
}

impl Mapping {
    /// Parses `udp 17 29 src=A dst=B sport=p dport=q [..] src=C dst=D sport=r dport=s ...` for a flow between
    /// `inside` and `remote`, in either original direction.
    pub fn parse(line: &str, inside: Ipv4Addr, remote: Ipv4Addr) -> Option<Self> {
        let field = |key: &str| -> Vec<&str> {
            line.split_whitespace()
                .filter_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                .collect()
        };
        let (src, dst, sport, dport) = (field("src"), field("dst"), field("sport"), field("dport"));
        if src.len() < 2 || dst.len() < 2 || sport.len() < 2 || dport.len() < 2 {
            return None;
        }
        let (inside, remote) = (inside.to_string(), remote.to_string());
        if src[0] == inside && dst[0] == remote {
            // Outgoing first: the reply comes back to the mapped port.
            Some(Self {
                inside_port: sport[0].parse().ok()?,
                mapped_port: dport[1].parse().ok()?,
            })
        } else if src[0] == remote && src[1] == inside {
            // Incoming first (1:1 NAT / port forward): the original destination port is the mapped one.
            Some(Self {
                inside_port: sport[1].parse().ok()?,
                mapped_port: dport[0].parse().ok()?,
            })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_outgoing_and_incoming_mappings() {
        let inside: Ipv4Addr = "198.19.3.2".parse().expect("ip");
        let remote: Ipv4Addr = "198.18.5.2".parse().expect("ip");
        let out = "udp      17 170 src=198.19.3.2 dst=198.18.5.2 sport=51820 dport=40000 packets=5 bytes=600 \
                   src=198.18.5.2 dst=198.18.3.2 sport=40000 dport=61234 packets=4 bytes=500 [ASSURED] mark=0 use=1";
        assert_eq!(
            Mapping::parse(out, inside, remote),
            Some(Mapping {
                inside_port: 51820,
                mapped_port: 61234
            })
        );
        let incoming = "udp 17 170 src=198.18.5.2 dst=198.18.3.2 sport=40000 dport=51820 \
                        src=198.19.3.2 dst=198.18.5.2 sport=51820 dport=40000 [ASSURED] mark=0 use=1";
        assert_eq!(
            Mapping::parse(incoming, inside, remote),
            Some(Mapping {
                inside_port: 51820,
                mapped_port: 51820
            })
        );
        let other = "udp 17 20 src=198.19.3.3 dst=198.18.5.2 sport=1 dport=2 src=198.18.5.2 dst=198.18.3.2 \
                     sport=2 dport=1 mark=0 use=1";
        assert_eq!(Mapping::parse(other, inside, remote), None);
    }
}

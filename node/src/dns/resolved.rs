//! systemd-resolved integration: the mesh interface gets the agent's resolver as its per-link DNS server, with the
//! network's domain as a search domain (bare names work) and routing domains for the domain and the overlay's
//! reverse zones, so only those queries go to the mesh and no other domain's resolution changes. Never a routing
//! domain `~.` and never the default route: the mesh must not capture the host's DNS.
//!
//! Driven through `resolvectl` (resolved's own client of its D-Bus interface), so the agent links no D-Bus
//! library. Settings belong to the link, so they vanish with the interface when the agent dies; `meshd down`
//! reverts them explicitly. [`commands`] is pure; [`Resolved`] runs them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use ipnet::Ipv4Net;

/// Why resolved is not used on this host (said once in the log, and in `meshd status`).
pub fn unavailable_reason(resolv_conf: &str) -> Option<String> {
    if !uses_stub(resolv_conf) {
        return Some("/etc/resolv.conf does not point at systemd-resolved (127.0.0.53)".into());
    }
    if !same_network_namespace_as_init() {
        // resolved runs in the host's namespace and knows links by index: told about our interface's index from
        // inside another namespace, it would configure some other link of the host.
        return Some("the agent runs in a network namespace of its own; systemd-resolved serves the host's".into());
    }
    if find_resolvectl().is_none() {
        return Some("resolvectl is not installed".into());
    }
    None
}

/// Whether a resolv.conf sends queries to resolved's stub listener.
pub fn uses_stub(resolv_conf: &str) -> bool {
    resolv_conf.lines().any(|line| {
        let mut words = line.split_whitespace();
        words.next() == Some("nameserver") && matches!(words.next(), Some("127.0.0.53" | "127.0.0.54"))
    })
}

fn same_network_namespace_as_init() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/net"),
        std::fs::read_link("/proc/1/ns/net"),
    ) {
        (Ok(own), Ok(init)) => own == init,
        // Cannot tell (no /proc, or PID 1 is not ours to inspect): do not risk configuring another link.
        _ => false,
    }
}

fn find_resolvectl() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join("resolvectl"))
        .find(|p| p.is_file())
}

/// The reverse zones (`77.10.in-addr.arpa`) that cover `network` exactly: one per /8, /16 or /24 boundary, so a
/// /20 is sixteen /24 zones (at most 256; a larger split is covered by the enclosing zone).
pub fn reverse_zones(network: Ipv4Net) -> Vec<String> {
    let prefix = network.prefix_len();
    let zone_len = (prefix.div_ceil(8) * 8).clamp(8, 24);
    let zones: Vec<Ipv4Net> = if zone_len >= prefix {
        network.subnets(zone_len).map(Iterator::collect).unwrap_or_default()
    } else {
        // Longer than a /24: the enclosing /24's zone.
        vec![Ipv4Net::new(network.network(), 24).map_or(network, |n| n.trunc())]
    };
    zones
        .iter()
        .map(|zone| {
            let octets = zone.network().octets();
            let labels: Vec<String> = octets[..usize::from(zone_len / 8)]
                .iter()
                .rev()
                .map(u8::to_string)
                .collect();
            format!("{}.in-addr.arpa", labels.join("."))
        })
        .collect()
}

/// The `resolvectl` argument lists that configure `interface` (pure, for tests and for the log).
pub fn commands(interface: &str, server: Ipv4Addr, domain: &str, network: Ipv4Net) -> Vec<Vec<String>> {
    let mut domains = vec![domain.to_string(), format!("~{domain}")];
    domains.extend(reverse_zones(network).into_iter().map(|zone| format!("~{zone}")));
    let mut domain_cmd = vec!["domain".to_string(), interface.to_string()];
    domain_cmd.extend(domains);
    vec![
        vec!["dns".into(), interface.into(), server.to_string()],
        domain_cmd,
        vec!["default-route".into(), interface.into(), "false".into()],
        vec!["llmnr".into(), interface.into(), "false".into()],
        vec!["mdns".into(), interface.into(), "false".into()],
    ]
}

/// Runs `resolvectl` for one interface.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub resolvectl: PathBuf,
    pub interface: String,
}

impl Resolved {
    /// The host's `resolvectl` (call after [`unavailable_reason`] said none).
    pub fn system(interface: &str) -> Option<Self> {
        Some(Self {
            resolvectl: find_resolvectl()?,
            interface: interface.to_string(),
        })
    }

    /// Points the link's DNS at `server` for `domain` and the reverse zones of `network`.
    pub fn apply(&self, server: Ipv4Addr, domain: &str, network: Ipv4Net) -> Result<(), String> {
        let all = commands(&self.interface, server, domain, network);
        // The first three are what names need; LLMNR and mDNS off is tidiness (no multicast on a mesh link).
        for (i, args) in all.iter().enumerate() {
            match self.run(args) {
                Ok(()) => {}
                Err(e) if i < 3 => return Err(e),
                Err(e) => tracing::debug!("{e}"),
            }
        }
        Ok(())
    }

    /// Drops cached answers, so a rename or a deletion resolves at once.
    pub fn flush_caches(&self) -> Result<(), String> {
        self.run(&["flush-caches".to_string()])
    }

    /// Removes every setting of the link (on `meshd down`).
    pub fn revert(&self) -> Result<(), String> {
        self.run(&["revert".to_string(), self.interface.clone()])
    }

    fn run(&self, args: &[String]) -> Result<(), String> {
        let output = Command::new(&self.resolvectl)
            .args(args)
            .output()
            .map_err(|e| format!("running {}: {e}", self.resolvectl.display()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`resolvectl {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn recognizes_resolveds_stub() {
        assert!(uses_stub(
            "# managed by resolved\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n"
        ));
        assert!(!uses_stub("nameserver 10.255.255.53\n"));
        assert!(!uses_stub("# nameserver 127.0.0.53\nnameserver 1.1.1.1\n"));
    }

    #[test]
    fn reverse_zones_cover_the_overlay_exactly() {
        let zones = |n: &str| reverse_zones(n.parse().expect("cidr"));
        assert_eq!(zones("10.77.0.0/16"), ["77.10.in-addr.arpa"]);
        assert_eq!(zones("10.0.0.0/8"), ["10.in-addr.arpa"]);
        assert_eq!(zones("10.77.5.0/24"), ["5.77.10.in-addr.arpa"]);
        let z20 = zones("10.77.16.0/20");
        assert_eq!(z20.len(), 16);
        assert_eq!(z20[0], "16.77.10.in-addr.arpa");
        assert_eq!(z20[15], "31.77.10.in-addr.arpa");
        assert_eq!(zones("100.64.0.0/10").len(), 64);
        assert_eq!(
            zones("10.77.0.128/25"),
            ["0.77.10.in-addr.arpa"],
            "inside one /24: its zone"
        );
    }

    #[test]
    fn routes_only_the_mesh_domain_and_its_reverse_zone() {
        let cmds = commands(
            "mesh0",
            Ipv4Addr::new(10, 77, 0, 2),
            "mesh.internal",
            "10.77.0.0/16".parse().expect("cidr"),
        );
        let text: Vec<String> = cmds.iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            text,
            [
                "dns mesh0 10.77.0.2",
                "domain mesh0 mesh.internal ~mesh.internal ~77.10.in-addr.arpa",
                "default-route mesh0 false",
                "llmnr mesh0 false",
                "mdns mesh0 false",
            ]
        );
        assert!(!text.iter().any(|c| c.contains("~.")), "never captures every domain");
    }

    /// The real resolved is only ever touched for the agent's own link in the host's namespace, which a test may not
    /// create; so a test here only checks that detection agrees with the host, and says what it could not run.
    #[test]
    fn detection_agrees_with_the_host() {
        let resolv_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        match unavailable_reason(&resolv_conf) {
            Some(reason) => eprintln!(
                "SKIPPED: the real systemd-resolved integration cannot run on this host ({reason}); the commands \
                 are checked against a stand-in resolvectl (runs_resolvectl_and_reverts)"
            ),
            None => {
                let status = Command::new(Resolved::system("lo").expect("resolvectl found").resolvectl)
                    .arg("status")
                    .output()
                    .expect("resolvectl runs");
                assert!(
                    status.status.success(),
                    "resolved detected but `resolvectl status` fails"
                );
            }
        }
    }

    #[test]
    fn runs_resolvectl_and_reverts() {
        // A stand-in resolvectl that records its arguments: what the agent asks of resolved, without touching the
        // host's resolver.
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("calls");
        let fake = dir.path().join("resolvectl");
        std::fs::write(&fake, format!("#!/bin/sh\necho \"$@\" >> {}\n", log.display())).expect("script");
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let resolved = Resolved {
            resolvectl: fake.clone(),
            interface: "mesh0".into(),
        };
        resolved
            .apply(
                Ipv4Addr::new(10, 77, 0, 2),
                "mesh.internal",
                "10.77.0.0/16".parse().expect("cidr"),
            )
            .expect("applied");
        resolved.flush_caches().expect("flushed");
        resolved.revert().expect("reverted");
        let calls = std::fs::read_to_string(&log).expect("log");
        let lines: Vec<&str> = calls.lines().collect();
        assert_eq!(lines[0], "dns mesh0 10.77.0.2");
        assert_eq!(lines[5], "flush-caches");
        assert_eq!(lines[6], "revert mesh0");
        std::fs::write(&fake, "#!/bin/sh\necho 'Failed to set DNS: no such link' >&2\nexit 1\n").expect("script");
        let err = resolved
            .apply(
                Ipv4Addr::new(10, 77, 0, 2),
                "mesh.internal",
                "10.77.0.0/16".parse().expect("cidr"),
            )
            .expect_err("fails");
        assert!(err.contains("no such link"), "{err}");
    }
}

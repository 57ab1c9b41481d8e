//! The harness itself, checked with plain processes: routing, NAT, loss, isolation and cleanup.

use std::fs;
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use meshd_lab::cmd;
use meshd_lab::lab::{Lab, harness_scenario};

fn namespace_exists(name: &str) -> Result<bool> {
    let out = cmd::run_ok(
        std::process::Command::new(meshd_lab::env::tool_path("ip")).args(["netns", "list"]),
        Duration::from_secs(5),
    )?;
    Ok(out.lines().any(|l| l.split_whitespace().next() == Some(name)))
}

fn alive(pid: &str) -> bool {
    // A zombie (state Z) is dead; it only waits for its parent.
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

#[test]
fn routed_hosts_reach_each_other_and_nothing_else() {
    harness_scenario("harness-routing", &[], |lab| {
        let a = lab.add_host("a")?;
        let b = lab.add_host("b")?;
        let c = lab.add_host("c")?;
        for (from, to) in [(&a, &b), (&b, &c), (&c, &a)] {
            from.wait_ping(to.underlay, Duration::from_secs(5))?;
        }
        lab.assert_isolated()?;
        // No route leaves the lab: an address outside it is unreachable from a host (checked with `ip route get`,
        // which sends nothing).
        let out = a.run("ip", &["route", "get", "192.0.2.1"], Duration::from_secs(5))?;
        ensure!(!out.success(), "a lab host has a route out of the lab: {}", out.stdout);
        ensure!(
            meshd_lab::lab::assert_lab_address("192.168.1.1".parse()?).is_err(),
            "address guard accepts 192.168/16"
        );
        Ok(())
    });
}

#[test]
fn nat_hides_the_inside_address_and_loss_drops_packets() {
    harness_scenario("harness-nat", &[], |lab| {
        let server = lab.add_host("server")?;
        let (inside, outside) = lab.add_host_behind_nat("inside")?;
        inside.wait_ping(server.underlay, Duration::from_secs(5))?;
        // The server cannot reach the private address: there is no route back through the NAT.
        ensure!(
            !server.ping_once(inside.underlay, Duration::from_millis(300))?,
            "the private side is reachable from outside"
        );
        ensure!(outside.octets()[..2] == [198, 18], "NAT outside address {outside}");
        // The server sees pings from the NAT's outside address (conntrack of the server's namespace shows it).
        lab.set_router_loss(100.0)?;
        ensure!(
            !inside.ping_once(server.underlay, Duration::from_millis(300))?,
            "100% loss let a ping through"
        );
        lab.set_router_loss(0.0)?;
        inside.wait_ping(server.underlay, Duration::from_secs(5))?;
        Ok(())
    });
}

#[test]
fn dropping_a_lab_deletes_its_namespaces_and_processes() {
    harness_scenario("harness-cleanup", &[], |_| {
        let (names, pids) = {
            let lab = Lab::new("inner")?;
            let host = lab.add_host("h")?;
            let mut tracked = lab.spawn(&host, "sleep", "sleep", &["300"], &[])?;
            ensure!(tracked.is_running(), "sleep did not start");
            // An untracked background process: the namespace guard must end it too.
            host.run_ok("sh", &["-c", "sleep 301 >/dev/null 2>&1 &"], Duration::from_secs(5))?;
            let pids = host
                .run_ok("ip", &["netns", "pids", &host.ns], Duration::from_secs(5))
                .unwrap_or_default();
            let mut pids: Vec<String> = pids.split_whitespace().map(str::to_owned).collect();
            if pids.is_empty() {
                // `ip netns pids` runs outside; fall back to asking from the root namespace.
                let out = cmd::run_ok(
                    std::process::Command::new(meshd_lab::env::tool_path("ip")).args(["netns", "pids", &host.ns]),
                    Duration::from_secs(5),
                )?;
                pids = out.split_whitespace().map(str::to_owned).collect();
            }
            ensure!(
                pids.len() >= 2,
                "expected two processes in the namespace, found {pids:?}"
            );
            drop(tracked);
            (vec![host.ns.clone(), format!("mlab-{}-router", lab.id())], pids)
        };
        for name in &names {
            if namespace_exists(name)? {
                bail!("namespace {name} survived the lab");
            }
        }
        for pid in &pids {
            ensure!(!alive(pid), "process {pid} survived the lab");
        }
        Ok(())
    });
}

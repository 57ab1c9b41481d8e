//! A long session across a rekey: traffic in both directions for more than 120 s (WireGuard's REKEY_AFTER_TIME)
//! keeps flowing. Guards against boringtun issue #495 ("sessions go one-way deaf ~15-30 s after handshake",
//! /work/shared/notes/crates.md).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use meshd_lab::{Mesh, scenario};

/// 5 pings per second for 130 s.
const COUNT: u32 = 650;
const INTERVAL: &str = "0.2";
/// Tolerated loss: a rekey may cost a packet or two, one-way deafness costs most of them.
const MAX_LOST: u32 = 13;

fn received(log: &str) -> Result<u32> {
    let line = log
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .context("no ping summary")?;
    let field = line.split(',').nth(1).context("no received count")?;
    field
        .split_whitespace()
        .next()
        .context("no number")?
        .parse()
        .context("received count")
}

/// The highest icmp_seq answered: after a deafness the tail of the run has no replies.
fn last_seq(log: &str) -> u32 {
    log.lines()
        .filter_map(|l| l.split("icmp_seq=").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn traffic_keeps_flowing_across_a_rekey() {
    scenario("long-session", &[], |lab| {
        let mesh = Mesh::start(lab, 2)?;
        mesh.wait_full_mesh(Duration::from_secs(20))?;
        let (a, b) = (&mesh.nodes[0], &mesh.nodes[1]);
        let count = COUNT.to_string();
        let (a_ip, b_ip) = (a.ip().to_string(), b.ip().to_string());
        let mut forward = lab.spawn(
            &a.host,
            "ping-a-b",
            "ping",
            &["-n", "-i", INTERVAL, "-c", &count, "-W", "1", &b_ip],
            &[],
        )?;
        let mut backward = lab.spawn(
            &b.host,
            "ping-b-a",
            "ping",
            &["-n", "-i", INTERVAL, "-c", &count, "-W", "1", &a_ip],
            &[],
        )?;
        for ping in [&mut forward, &mut backward] {
            ping.wait_exit(Duration::from_secs(180))?;
            let log = ping.log_text();
            let got = received(&log)?;
            let last = last_seq(&log);
            eprintln!("{}: {got}/{COUNT} answered, last icmp_seq {last}", ping.label());
            ensure!(
                got + MAX_LOST >= COUNT,
                "{}: only {got} of {COUNT} pings answered",
                ping.label()
            );
            ensure!(
                last + 5 >= COUNT,
                "{}: replies stopped at icmp_seq {last} of {COUNT}",
                ping.label()
            );
        }
        // The run must have crossed a rekey: the current session is younger than the run.
        for node in &mesh.nodes {
            let status = node.status()?;
            let age = status["peers"][0]["last_handshake"].as_u64();
            eprintln!("{} after the long session: last handshake {age:?} s ago", node.hostname);
            ensure!(
                age.is_some_and(|s| s < 120),
                "{}: no handshake during the run: {status}",
                node.hostname
            );
        }
        Ok(())
    });
}

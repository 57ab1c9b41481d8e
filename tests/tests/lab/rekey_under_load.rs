//! A saturating TCP transfer across a rekey never stalls: `iperf3 -t 185 -i 1` over the overlay (issue 5: "a
//! 3-minute transfer crossing at least one rekey never stalls for a second at zero throughput").
//!
//! WireGuard rekeys a session after REKEY_AFTER_TIME (120 s) and must have done so by REJECT_AFTER_TIME (180 s),
//! when the old keys stop working; 185 s of traffic therefore crosses at least one rekey, with the handshake
//! competing against full data queues. Every one-second interval, on the sender and on the receiver, must carry
//! data, and both agents must report a handshake that completed during the run.
//!
//! Unlike `long_session` (light pings both ways across the first rekey, for boringtun's one-way deafness), this one
//! keeps the tunnel loaded, at [`RATE`]: more than wireguard-go carries at all on the reference machine, while
//! leaving CPU to the lab tests that run beside it in CI.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use meshd_lab::{Mesh, MeshNode, scenario, wait};
use serde_json::Value;

/// Longer than REJECT_AFTER_TIME (180 s): the run cannot finish on its first session's keys.
const SECONDS: u64 = 185;
/// Sending rate cap (iperf3 `-b`), see the module doc.
const RATE: &str = "1G";
/// How often the agents' handshake ages are sampled during the run.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// Seconds since the node's last completed handshake with its one peer.
fn handshake_age(node: &MeshNode) -> Result<Option<u64>> {
    Ok(node.status()?["peers"][0]["last_handshake"].as_u64())
}

/// Bytes per one-second interval of one side of an iperf3 `-J` report. A final fragment of an interval (the
/// receiver's report ends with the few milliseconds after the sender stopped) is left out.
fn interval_bytes(report: &Value) -> Vec<u64> {
    report["intervals"]
        .as_array()
        .map(|intervals| {
            intervals
                .iter()
                .filter(|i| i["sum"]["seconds"].as_f64().unwrap_or(0.0) >= 0.5)
                .map(|i| i["sum"]["bytes"].as_u64().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default()
}

/// Fails if fewer than `SECONDS - 2` intervals were reported or any of them carried no bytes.
fn ensure_no_stall(side: &str, bytes: &[u64]) -> Result<()> {
    ensure!(
        bytes.len() as u64 + 2 >= SECONDS,
        "{side}: only {} one-second intervals reported for a {SECONDS} s run",
        bytes.len()
    );
    let stalls: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i] == 0).collect();
    ensure!(
        stalls.is_empty(),
        "{side}: no data in the one-second intervals starting at {stalls:?} s"
    );
    Ok(())
}

#[test]
fn a_transfer_across_a_rekey_never_stalls() {
    scenario("rekey-load", &["iperf3"], |lab| {
        let mesh = Mesh::start(lab, 2)?;
        mesh.wait_full_mesh(Duration::from_secs(20))?;
        let (client, server) = (&mesh.nodes[0], &mesh.nodes[1]);
        client.host.wait_ping(server.ip(), Duration::from_secs(20))?;
        let server_ip = server.ip().to_string();
        // `-J` on the server too: the client's `--get-server-output` then carries the receiver's intervals as JSON.
        let _server = lab.spawn(
            &server.host,
            "iperf3-server",
            "iperf3",
            &["-s", "-J", "-B", &server_ip],
            &[],
        )?;
        // A short run proves the server listens (a long one must not be retried).
        wait::until(
            "the iperf3 server to answer across the overlay",
            Duration::from_secs(20),
            Duration::from_millis(300),
            || {
                let out = client
                    .host
                    .run("iperf3", &["-c", &server_ip, "-t", "1"], Duration::from_secs(15))?;
                Ok(out.success().then_some(()))
            },
        )?;

        let report_path = lab.dir().join("iperf3-rekey.json");
        let report_arg = report_path.to_string_lossy().into_owned();
        let seconds = SECONDS.to_string();
        let started = Instant::now();
        let mut transfer = lab.spawn(
            &client.host,
            "iperf3-client",
            "iperf3",
            &[
                "-c",
                &server_ip,
                "-t",
                &seconds,
                "-i",
                "1",
                "-b",
                RATE,
                "-J",
                "--get-server-output",
                "--logfile",
                &report_arg,
            ],
            &[],
        )?;
        // While it runs: sample both agents' handshake ages, to see the rekey happen (the age drops).
        let mut last_age = [handshake_age(client)?, handshake_age(server)?];
        let mut rekeys: Vec<(String, u64)> = Vec::new();
        let deadline = started + Duration::from_secs(SECONDS + 30);
        while transfer.is_running() {
            ensure!(
                Instant::now() < deadline,
                "iperf3 did not finish within {SECONDS} s + 30 s"
            );
            std::thread::sleep(SAMPLE_EVERY);
            for (i, node) in [client, server].into_iter().enumerate() {
                let age = handshake_age(node)?;
                if let (Some(before), Some(now)) = (last_age[i], age)
                    && now < before
                {
                    rekeys.push((node.hostname.clone(), started.elapsed().as_secs()));
                }
                last_age[i] = age;
            }
        }
        let elapsed = started.elapsed();
        let status = transfer.wait_exit(Duration::from_secs(5))?;
        let text = std::fs::read_to_string(&report_path).context("reading the iperf3 report")?;
        let report: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing the iperf3 report: {text}"))?;
        ensure!(status.success(), "iperf3 failed ({status}): {}", report["error"]);
        let sent = interval_bytes(&report);
        let received = interval_bytes(&report["server_output_json"]);
        let mbps = report["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6;
        eprintln!(
            "{SECONDS} s transfer: {mbps:.0} Mbit/s received; slowest second sent {} KB, received {} KB; \
             rekeys seen (node, s into the run): {rekeys:?}",
            sent.iter().min().copied().unwrap_or(0) / 1000,
            received.iter().min().copied().unwrap_or(0) / 1000,
        );
        ensure_no_stall("sender", &sent)?;
        ensure_no_stall("receiver", &received)?;
        // The run crossed a rekey: the current session is younger than the run, on both sides.
        for node in [client, server] {
            let age = handshake_age(node)?;
            ensure!(
                age.is_some_and(|s| s + 5 < elapsed.as_secs()),
                "{}: no handshake during the {} s run (last handshake {age:?} s ago)",
                node.hostname,
                elapsed.as_secs()
            );
        }
        Ok(())
    });
}

//! Scenario 3: 100 MB sent across the overlay (over ssh, node1 -> node2) arrives with the same SHA-256.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use meshd_lab::ssh::SshServer;
use meshd_lab::{Mesh, scenario};
use sha2::{Digest, Sha256};

const SIZE: usize = 100 * 1024 * 1024;

/// Writes `SIZE` pseudo-random bytes (xorshift: incompressible enough, and fast) and returns their SHA-256.
fn write_payload(path: &std::path::Path) -> anyhow::Result<String> {
    let mut out = BufWriter::new(File::create(path).context("creating the payload")?);
    let mut hasher = Sha256::new();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id());
    let mut block = vec![0u8; 1 << 16];
    for _ in 0..SIZE / block.len() {
        for chunk in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        hasher.update(&block);
        out.write_all(&block).context("writing the payload")?;
    }
    out.flush().context("flushing the payload")?;
    Ok(hex::encode(hasher.finalize()))
}

#[test]
fn hundred_megabytes_arrive_with_the_same_sha256() {
    scenario("transfer", &["sshd", "ssh", "ssh-keygen"], |lab| {
        let payload = lab.dir().join("payload.bin");
        let expected = write_payload(&payload)?;
        let mesh = Mesh::start(lab, 3)?;
        let (sender, receiver) = (&mesh.nodes[0], &mesh.nodes[1]);
        sender.host.wait_ping(receiver.ip(), Duration::from_secs(20))?;
        let sshd = SshServer::start(lab, &receiver.host, receiver.ip())?;
        sshd.wait_ready(&sender.host, Duration::from_secs(30))?;
        let received = lab.dir().join("received.bin");
        let started = Instant::now();
        let out = sshd.run_with_stdin(
            &sender.host,
            &format!("cat > {} && sha256sum {}", received.display(), received.display()),
            File::open(&payload).context("opening the payload")?,
            Duration::from_secs(300),
        )?;
        let elapsed = started.elapsed();
        ensure!(out.success(), "transfer failed: {}", out.stderr);
        let got = out.stdout.split_whitespace().next().unwrap_or("");
        ensure!(got == expected, "SHA-256 mismatch: sent {expected}, received {got}");
        let size = std::fs::metadata(&received).context("received file")?.len();
        ensure!(size == SIZE as u64, "received {size} bytes of {SIZE}");
        eprintln!(
            "100 MB over the overlay in {:.1} s ({:.0} Mbit/s through ssh)",
            elapsed.as_secs_f64(),
            SIZE as f64 * 8.0 / elapsed.as_secs_f64() / 1e6
        );
        Ok(())
    });
}

//! The coordinator's WireGuard gateway as a stock device and an attacker see it: registering a device with a
//! preshared key and checking the config the coordinator exports for it, and a UDP flood of the gateway port.
//!
//! What is checked of an exported config is the gateway's contract: every peer's `Endpoint` is the gateway,
//! `PersistentKeepalive = 25` (the device keeps its NAT mapping to the gateway open), a `PresharedKey` per peer,
//! and a `DNS =` line. The flood runs `meshd-lab-udp flood` inside an attacker's namespace (never from the test
//! process, which lives in the root namespace); its datagrams come from [`flood_datagram`], pure and tested here.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};

use crate::lab::{Host, Lab, assert_lab_address};
use crate::mesh::Coordinator;
use crate::process::Process;

/// The keepalive the gateway's contract asks of every exported peer (seconds).
pub const GATEWAY_KEEPALIVE: &str = "25";

/// A device registered by public key, with the wg-quick config the coordinator exports for it.
pub struct RegisteredDevice {
    /// The node id (for `DELETE /api/v1/nodes/{id}`).
    pub id: i64,
    pub config: String,
}

/// `POST /api/v1/nodes {"name","public_key","preshared_key": true}`, then `GET /api/v1/nodes/{id}/wireguard-config`.
pub fn register_device(coordinator: &Coordinator, name: &str, public_key: &str) -> Result<RegisteredDevice> {
    let body = json!({ "name": name, "public_key": public_key, "preshared_key": true }).to_string();
    let text = coordinator.admin("POST", "/api/v1/nodes", Some(&body))?;
    let created: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing the registered device: {text}"))?;
    let id = created["id"]
        .as_i64()
        .or_else(|| created["node"]["id"].as_i64())
        .ok_or_else(|| anyhow!("no id in the answer to registering device {name}: {created}"))?;
    let config = coordinator.admin("GET", &format!("/api/v1/nodes/{id}/wireguard-config"), None)?;
    Ok(RegisteredDevice { id, config })
}

/// A wg-quick config with the secrets' values replaced, fit for a log.
pub fn redact(config: &str) -> String {
    config
        .lines()
        .map(|line| match line.split_once('=') {
            Some((key, _)) if matches!(key.trim().to_ascii_lowercase().as_str(), "privatekey" | "presharedkey") => {
                format!("{} = <redacted>", key.trim())
            }
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One `[Peer]` of an exported config.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExportedPeer {
    pub public_key: String,
    pub endpoint: Option<String>,
    pub preshared_key: Option<String>,
    pub keepalive: Option<String>,
    pub allowed_ips: Vec<String>,
}

/// What the gateway's contract needs from an exported config.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExportedConfig {
    /// Values of the `DNS =` line (addresses and search domains), empty without one.
    pub dns: Vec<String>,
    pub peers: Vec<ExportedPeer>,
}

impl ExportedConfig {
    /// Parses a wg-quick config (keys are case-insensitive, as wg-quick reads them).
    pub fn parse(config: &str) -> Self {
        let mut parsed = Self::default();
        let mut in_peer = false;
        for line in config.lines().map(str::trim) {
            if line.eq_ignore_ascii_case("[peer]") {
                parsed.peers.push(ExportedPeer::default());
                in_peer = true;
                continue;
            }
            if line.starts_with('[') {
                in_peer = false;
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let (key, value) = (key.trim().to_ascii_lowercase(), value.trim().to_owned());
            let list = || value.split(',').map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
            match (in_peer, parsed.peers.last_mut(), key.as_str()) {
                (false, _, "dns") => parsed.dns.extend(list()),
                (true, Some(peer), "publickey") => peer.public_key = value,
                (true, Some(peer), "endpoint") => peer.endpoint = Some(value),
                (true, Some(peer), "presharedkey") => peer.preshared_key = Some(value),
                (true, Some(peer), "persistentkeepalive") => peer.keepalive = Some(value),
                (true, Some(peer), "allowedips") => peer.allowed_ips.extend(list()),
                _ => {}
            }
        }
        parsed
    }

    /// Checks the gateway's contract: at least one peer; each with `Endpoint = gateway`, a `PresharedKey` (32
    /// bytes in base64), `PersistentKeepalive = 25`; a `DNS =` line. The error lists every violation.
    pub fn check_gateway_contract(&self, gateway: SocketAddr) -> Result<()> {
        let mut problems = Vec::new();
        if self.peers.is_empty() {
            problems.push("no [Peer] section".to_owned());
        }
        if self.dns.is_empty() {
            problems.push("no `DNS =` line".to_owned());
        }
        for peer in &self.peers {
            let who = format!("peer {}", peer.public_key);
            match peer.endpoint.as_deref().map(str::parse::<SocketAddr>) {
                Some(Ok(endpoint)) if endpoint == gateway => {}
                Some(_) => problems.push(format!(
                    "{who}: Endpoint {:?}, expected the gateway {gateway}",
                    peer.endpoint
                )),
                None => problems.push(format!("{who}: no Endpoint (expected the gateway {gateway})")),
            }
            match peer.preshared_key.as_deref() {
                Some(key) if key.len() == 44 && key.ends_with('=') => {}
                Some(_) => problems.push(format!("{who}: PresharedKey is not 32 bytes of base64")),
                None => problems.push(format!("{who}: no PresharedKey (the device was registered with one)")),
            }
            if peer.keepalive.as_deref() != Some(GATEWAY_KEEPALIVE) {
                problems.push(format!(
                    "{who}: PersistentKeepalive {:?}, expected {GATEWAY_KEEPALIVE}",
                    peer.keepalive
                ));
            }
        }
        ensure!(
            problems.is_empty(),
            "the exported config breaks the gateway contract:\n- {}",
            problems.join("\n- ")
        );
        Ok(())
    }
}

/// The kinds of datagram a flood mixes, one after the other.
pub const FLOOD_KINDS: [&str; 7] = [
    "wrong-length handshake types",
    "data with a random receiver index",
    "garbage type byte",
    "type-1 initiation of the right length, random bytes",
    "type-2 response of the right length, random bytes",
    "type-3 cookie reply of the right length, random bytes",
    "replayed captured initiation",
];

/// xorshift64: fast, seeded, good enough for garbage.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `low..=high`.
    pub fn range(&mut self, low: usize, high: usize) -> usize {
        low + (self.next_u64() % (high - low + 1) as u64) as usize
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// The `n`-th datagram of a flood: kind `n % 7` of [`FLOOD_KINDS`] (a replay only when `replay` is given; else
/// the next kind). WireGuard message sizes: initiation 148, response 92, cookie reply 64, data at least 32.
pub fn flood_datagram(n: u64, rng: &mut XorShift, replay: Option<&[u8]>) -> Vec<u8> {
    let mut kind = (n % FLOOD_KINDS.len() as u64) as usize;
    if kind == 6 && replay.is_none() {
        kind = 3;
    }
    let random = |rng: &mut XorShift, len: usize| {
        let mut buf = vec![0u8; len];
        rng.fill(&mut buf);
        buf
    };
    let typed = |rng: &mut XorShift, kind: u8, len: usize| {
        let mut buf = random(rng, len);
        buf[0] = kind;
        buf[1..4].fill(0);
        buf
    };
    match kind {
        0 => {
            let message = rng.range(1, 4) as u8;
            let mut len = rng.range(4, 1500);
            if [148, 92, 64].contains(&len) {
                len += 1;
            }
            typed(rng, message, len)
        }
        1 => {
            let len = 32 + rng.range(0, 1200) / 16 * 16;
            typed(rng, 4, len)
        }
        2 => {
            let len = rng.range(1, 1500);
            let mut buf = random(rng, len);
            buf[0] = if rng.next_u64().is_multiple_of(2) {
                0
            } else {
                rng.range(5, 255) as u8
            };
            buf
        }
        3 => typed(rng, 1, 148),
        4 => typed(rng, 2, 92),
        5 => typed(rng, 3, 64),
        _ => replay.map(<[u8]>::to_vec).unwrap_or_default(),
    }
}

/// A running `meshd-lab-udp flood` in an attacker's namespace, stopped by PID on drop.
pub struct Flood {
    process: Process,
}

impl Flood {
    /// Floods `target` from `from` for `duration` at about `rate` datagrams per second (`tool` is the path of the
    /// `meshd-lab-udp` binary: `env!("CARGO_BIN_EXE_meshd-lab-udp")` in the test). `replay` is a captured
    /// handshake initiation to mix in.
    pub fn start(
        lab: &Lab,
        from: &Host,
        tool: &Path,
        target: SocketAddrV4,
        duration: Duration,
        rate: u32,
        replay: Option<&[u8]>,
    ) -> Result<Self> {
        assert_lab_address(*target.ip())?;
        let (target, ms, rate) = (target.to_string(), duration.as_millis().to_string(), rate.to_string());
        let replay = replay.map(hex::encode);
        let mut args = vec!["flood", "--target", &target, "--duration-ms", &ms, "--rate", &rate];
        if let Some(replay) = &replay {
            args.extend(["--replay-hex", replay]);
        }
        let process = lab.spawn(from, "flood", &tool.to_string_lossy(), &args, &[])?;
        Ok(Self { process })
    }

    /// Waits for the flood to finish; returns its summary line (`sent N datagrams ...`).
    pub fn wait_done(mut self, timeout: Duration) -> Result<String> {
        let status = self.process.wait_exit(timeout)?;
        let log = self.process.log_text();
        if !status.success() {
            bail!("the flood failed ({status}): {log}");
        }
        log.lines()
            .rfind(|l| l.starts_with("sent "))
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("the flood printed no summary: {log}"))
    }

    pub fn ensure_running(&mut self) -> Result<()> {
        self.process.ensure_running()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXphYmNkZWY=";

    fn config(endpoint: &str, psk: bool, keepalive: &str, dns: bool) -> String {
        let mut text = String::from("[Interface]\nPrivateKey = <PRIVATE KEY>\nAddress = 10.77.0.3/32\n");
        if dns {
            text.push_str("DNS = 10.77.0.2, mesh.internal\n");
        }
        for n in 0..2 {
            text.push_str(&format!(
                "\n[Peer]\nPublicKey = peer{n}\nAllowedIPs = 10.77.0.{}/32\nEndpoint = {endpoint}\n",
                n + 2
            ));
            if psk {
                text.push_str(&format!("PresharedKey = {KEY}\n"));
            }
            text.push_str(&format!("PersistentKeepalive = {keepalive}\n"));
        }
        text
    }

    #[test]
    fn accepts_the_contract_and_names_every_violation() {
        let gateway: SocketAddr = "198.18.1.2:51820".parse().expect("addr");
        let good = ExportedConfig::parse(&config("198.18.1.2:51820", true, "25", true));
        assert_eq!(good.dns, ["10.77.0.2", "mesh.internal"]);
        assert_eq!(good.peers.len(), 2);
        assert_eq!(good.peers[1].allowed_ips, ["10.77.0.3/32"]);
        good.check_gateway_contract(gateway).expect("the contract holds");
        let bad = ExportedConfig::parse(&config("198.18.5.2:51820", false, "0", false));
        let message = format!("{:#}", bad.check_gateway_contract(gateway).expect_err("violations"));
        for needle in ["no `DNS =` line", "Endpoint", "no PresharedKey", "PersistentKeepalive"] {
            assert!(message.contains(needle), "{needle} missing in: {message}");
        }
        assert!(
            ExportedConfig::parse("[Interface]\n")
                .check_gateway_contract(gateway)
                .is_err()
        );
    }

    #[test]
    fn redaction_hides_both_secrets() {
        let text = redact("[Interface]\nPrivateKey = secret1\n[Peer]\npresharedkey=secret2\nPublicKey = pub\n");
        assert!(!text.contains("secret1") && !text.contains("secret2"), "{text}");
        assert!(text.contains("PublicKey = pub"));
    }

    #[test]
    fn the_flood_mixes_every_kind_with_the_right_shapes() {
        let mut rng = XorShift::new(7);
        let replay = vec![1u8; 148];
        let batch: Vec<Vec<u8>> = (0..700).map(|n| flood_datagram(n, &mut rng, Some(&replay))).collect();
        for (n, d) in batch.iter().enumerate() {
            match n % 7 {
                0 => assert!((1..=4).contains(&d[0]) && ![148, 92, 64].contains(&d.len()), "{n}"),
                1 => assert!(d[0] == 4 && d.len() >= 32 && d.len() % 16 == 0, "{n}"),
                2 => assert!(d[0] == 0 || d[0] >= 5, "{n}"),
                3 => assert!(d[0] == 1 && d.len() == 148, "{n}"),
                4 => assert!(d[0] == 2 && d.len() == 92, "{n}"),
                5 => assert!(d[0] == 3 && d.len() == 64, "{n}"),
                _ => assert_eq!(d, &replay),
            }
        }
        // Receiver indexes vary (the gateway cannot look them up once and be done).
        let indexes: std::collections::HashSet<&[u8]> = batch.iter().skip(1).step_by(7).map(|d| &d[4..8]).collect();
        assert!(indexes.len() > 90, "{} distinct receiver indexes", indexes.len());
        assert_eq!(
            flood_datagram(6, &mut rng, None)[0],
            1,
            "no replay: an initiation instead"
        );
    }
}

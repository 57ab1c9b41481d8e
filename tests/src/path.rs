//! The path between two agents as `meshd status --json` reports it (`peers[].path`, `peers[].endpoint`), bounded
//! waits on it, and traffic probes that measure what a user would notice (a continuous ping and its longest gap).
//!
//! It reads status and runs pings only; it changes nothing in the topology (that is [`crate::natlab`]'s job).

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::lab::{Host, Lab, assert_lab_address};
use crate::mesh::MeshNode;
use crate::process::Process;
use crate::wait;

/// What one agent says about its path to one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPath {
    /// `"direct"`, `"relay"` or whatever else the agent printed (`"none"`...).
    pub path: String,
    /// The direct address in use (or the last known one), if any.
    pub endpoint: Option<SocketAddr>,
}

impl PeerPath {
    pub fn is_direct(&self) -> bool {
        self.path == "direct"
    }

    pub fn is_relay(&self) -> bool {
        self.path == "relay"
    }

    /// A stock WireGuard device reached through the coordinator's WireGuard gateway.
    pub fn is_gateway(&self) -> bool {
        self.path == "gateway"
    }
}

impl fmt::Display for PeerPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.endpoint {
            Some(endpoint) => write!(f, "{} {endpoint}", self.path),
            None => f.write_str(&self.path),
        }
    }
}

/// The status entry of the peer with overlay address `peer_ip` in `status`.
pub fn peer_entry(status: &Value, peer_ip: Ipv4Addr) -> Result<&Value> {
    let ip = peer_ip.to_string();
    status["peers"]
        .as_array()
        .and_then(|peers| {
            peers.iter().find(|p| {
                p["ip"]
                    .as_str()
                    .is_some_and(|s| s.split('/').next() == Some(ip.as_str()))
            })
        })
        .ok_or_else(|| anyhow!("no peer {ip} in status {status}"))
}

/// `node`'s path to the peer with overlay address `peer_ip`.
pub fn peer_path(node: &MeshNode, peer_ip: Ipv4Addr) -> Result<PeerPath> {
    let status = node.status()?;
    let entry = peer_entry(&status, peer_ip)?;
    let path = entry["path"]
        .as_str()
        .ok_or_else(|| anyhow!("{}: peer {peer_ip} has no path field: {entry}", node.hostname))?
        .to_owned();
    let endpoint = match entry["endpoint"].as_str() {
        Some(text) => Some(
            text.parse()
                .with_context(|| format!("{}: endpoint {text:?} of peer {peer_ip}", node.hostname))?,
        ),
        None => None,
    };
    Ok(PeerPath { path, endpoint })
}

/// Both directions of a pair at one moment.
#[derive(Debug, Clone)]
pub struct PairPath {
    /// What `a` says about `b`.
    pub a_to_b: PeerPath,
    /// What `b` says about `a`.
    pub b_to_a: PeerPath,
}

impl fmt::Display for PairPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a->b: {}; b->a: {}", self.a_to_b, self.b_to_a)
    }
}

pub fn pair_path(a: &MeshNode, b: &MeshNode) -> Result<PairPath> {
    Ok(PairPath {
        a_to_b: peer_path(a, b.ip())?,
        b_to_a: peer_path(b, a.ip())?,
    })
}

/// Polls both agents every 100 ms until `accept` holds for the pair; returns how long that took and the paths.
/// The error names the last paths seen, so a failure says "still relay" rather than only "timed out".
pub fn wait_pair(
    what: &str,
    a: &MeshNode,
    b: &MeshNode,
    timeout: Duration,
    accept: impl Fn(&PairPath) -> bool,
) -> Result<(Duration, PairPath)> {
    let started = Instant::now();
    let mut last: Option<PairPath> = None;
    let result = wait::until(what, timeout, Duration::from_millis(100), || {
        let pair = pair_path(a, b)?;
        let done = accept(&pair);
        last = Some(pair.clone());
        Ok(done.then_some(pair))
    });
    match result {
        Ok(pair) => Ok((started.elapsed(), pair)),
        Err(e) => Err(match last {
            Some(pair) => e.context(format!("last paths seen: {pair}")),
            None => e,
        }),
    }
}

/// Waits until both sides report `"direct"`; returns the time it took.
pub fn wait_direct(a: &MeshNode, b: &MeshNode, timeout: Duration) -> Result<(Duration, PairPath)> {
    wait_pair(
        &format!("{} and {} to report a direct path", a.hostname, b.hostname),
        a,
        b,
        timeout,
        |p| p.a_to_b.is_direct() && p.b_to_a.is_direct(),
    )
}

/// Waits until both sides report `"relay"`.
pub fn wait_relay(a: &MeshNode, b: &MeshNode, timeout: Duration) -> Result<(Duration, PairPath)> {
    wait_pair(
        &format!("{} and {} to report the relay path", a.hostname, b.hostname),
        a,
        b,
        timeout,
        |p| p.a_to_b.is_relay() && p.b_to_a.is_relay(),
    )
}

/// Fails unless `path` is direct to an endpoint on `ip` (any port when `port` is None).
pub fn expect_direct_to(who: &str, path: &PeerPath, ip: Ipv4Addr, port: Option<u16>) -> Result<()> {
    if !path.is_direct() {
        bail!("{who}: path is {path}, expected direct to {ip}");
    }
    match path.endpoint {
        Some(SocketAddr::V4(e)) if *e.ip() == ip && port.is_none_or(|p| p == e.port()) => Ok(()),
        other => bail!(
            "{who}: direct to {other:?}, expected {ip}:{}",
            port.map_or("*".to_owned(), |p| p.to_string())
        ),
    }
}

/// A background `ping` keeping traffic on a pair (what a user's session does), bounded to `duration`.
pub fn spawn_traffic(lab: &Lab, from: &Host, to: Ipv4Addr, duration: Duration) -> Result<Process> {
    assert_lab_address(to)?;
    let deadline = duration.as_secs().max(1).to_string();
    lab.spawn(
        from,
        "ping-traffic",
        "ping",
        &["-n", "-q", "-i", "0.2", "-W", "1", "-w", &deadline, &to.to_string()],
        &[],
    )
}

/// A continuous ping (every `interval`) with timestamped replies; measures the longest time without a reply.
pub struct PingProbe {
    process: Process,
    started_unix: f64,
}

/// When replies arrived, from a `ping -D` log: the `[unix.seconds]` stamps of `bytes from` lines.
pub fn reply_times(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect()
}

/// The longest interval without a reply between `from` and `to` (unix seconds), counting the edges: silence
/// before the first reply after `from`, and silence from the last reply until `to`.
pub fn longest_gap(times: &[f64], from: f64, to: f64) -> f64 {
    let mut previous = from;
    let mut longest = 0.0f64;
    for &t in times.iter().filter(|&&t| t >= from && t <= to) {
        longest = longest.max(t - previous);
        previous = t;
    }
    longest.max(to - previous)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl PingProbe {
    /// Starts `ping -D -i interval -w max_duration to` on `from`.
    pub fn start(lab: &Lab, from: &Host, to: Ipv4Addr, interval: Duration, max_duration: Duration) -> Result<Self> {
        assert_lab_address(to)?;
        let interval = format!("{:.3}", interval.as_secs_f64());
        let deadline = max_duration.as_secs().max(1).to_string();
        let process = lab.spawn(
            from,
            "ping-probe",
            "ping",
            &["-n", "-D", "-i", &interval, "-W", "1", "-w", &deadline, &to.to_string()],
            &[],
        )?;
        Ok(Self {
            process,
            started_unix: unix_now(),
        })
    }

    /// Unix time now (to mark an event the gap is measured around).
    pub fn now(&self) -> f64 {
        unix_now()
    }

    pub fn started(&self) -> f64 {
        self.started_unix
    }

    /// The reply timestamps so far.
    pub fn replies(&self) -> Vec<f64> {
        reply_times(&self.process.log_text())
    }

    /// Waits until a reply arrives after unix time `after`; fails after `timeout`.
    pub fn wait_reply_after(&mut self, after: f64, timeout: Duration) -> Result<f64> {
        wait::until(
            "the ping probe to get a reply",
            timeout,
            Duration::from_millis(50),
            || {
                self.process.ensure_running()?;
                Ok(self.replies().into_iter().find(|&t| t > after))
            },
        )
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_count_edges_and_ignore_outside_replies() {
        let log = "PING 10.77.0.2 (10.77.0.2) 56(84) bytes of data.\n\
                   [100.0] 64 bytes from 10.77.0.2: icmp_seq=1 ttl=64 time=0.5 ms\n\
                   [100.1] 64 bytes from 10.77.0.2: icmp_seq=2 ttl=64 time=0.5 ms\n\
                   [100.2] no answer yet for icmp_seq=3\n\
                   [103.5] 64 bytes from 10.77.0.2: icmp_seq=35 ttl=64 time=0.5 ms\n";
        let times = reply_times(log);
        assert_eq!(times, vec![100.0, 100.1, 103.5]);
        assert!((longest_gap(&times, 100.0, 103.6) - 3.4).abs() < 1e-9);
        // Silence until the end counts.
        assert!((longest_gap(&times, 100.0, 110.0) - 6.5).abs() < 1e-9);
        assert!((longest_gap(&[], 1.0, 2.0) - 1.0).abs() < 1e-9);
    }
}

//! `meshd netcheck`: what the network between this node and the coordinator allows.
//!
//! Owns: finding the coordinator's STUN servers (the host of the coordinator URL x `stun_ports` from
//! `GET /api/v1/info`), probing them (through the running agent's WireGuard socket, or from a fresh socket when no
//! agent runs: [`standalone_probes`]), and turning the answers into a [`NetcheckReport`]: UDP reachable, the mapped
//! address, and whether the NAT maps endpoint-independently (the same mapped ip:port seen from both STUN ports) or
//! endpoint-dependently ([`classify`]). The relay's state comes from [`crate::relay::RelayStatus`].
//! Must not: decide paths (the engine does) or report endpoints (the control loop does).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use meshd_protocol::stun::{self, TransactionId};
use serde::{Deserialize, Serialize};

use crate::control::{ControlClient, ControlError};
use crate::relay::RelaySnapshot;

/// Milliseconds with microsecond precision (JSON without float noise).
fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// How long a STUN server has to answer (design section 7: "any STUN answer within 3 s").
pub const STUN_TIMEOUT: Duration = Duration::from_secs(3);
/// When a standalone probe resends its request (UDP may lose one), counted from the first send.
const RESEND_AT: [Duration; 2] = [Duration::from_millis(500), Duration::from_millis(1500)];

/// How the NAT in front of this node maps its UDP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mapping {
    /// Both STUN ports saw the same public ip:port: peers can reach the mapped address (hole punching works).
    EndpointIndependent,
    /// Each destination got another public port: peers can only learn it from our packets (or use the relay).
    EndpointDependent,
    /// Fewer than two answers: cannot tell.
    Unknown,
}

impl std::fmt::Display for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::EndpointIndependent => "endpoint-independent",
            Self::EndpointDependent => "endpoint-dependent",
            Self::Unknown => "unknown",
        })
    }
}

/// Whose socket the check used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckSource {
    /// The running agent's WireGuard socket: exactly the mapping peers see.
    Agent,
    /// No agent runs: a fresh UDP socket (its mapping may differ from the agent's; no relay check).
    Standalone,
}

/// One STUN server's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StunProbe {
    pub server: SocketAddr,
    /// The public address the server saw; null when it did not answer.
    pub mapped: Option<SocketAddr>,
    pub rtt_ms: Option<f64>,
    /// Why there is no answer.
    pub error: Option<String>,
}

/// `meshd netcheck --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetcheckReport {
    pub source: CheckSource,
    /// Any STUN server answered.
    pub udp_reachable: bool,
    /// The mapped address of the first answer.
    pub mapped: Option<SocketAddr>,
    pub mapping: Mapping,
    pub probes: Vec<StunProbe>,
    /// The relay connection of the running agent; null in a standalone check.
    pub relay: Option<RelaySnapshot>,
    /// Anything that limited the check (STUN off on the coordinator, coordinator unreachable...).
    pub notes: Vec<String>,
}

impl NetcheckReport {
    pub fn new(source: CheckSource, probes: Vec<StunProbe>, relay: Option<RelaySnapshot>, notes: Vec<String>) -> Self {
        let mapped = probes.iter().find_map(|p| p.mapped);
        Self {
            source,
            udp_reachable: mapped.is_some(),
            mapped,
            mapping: classify(&probes),
            probes,
            relay,
            notes,
        }
    }

    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        match self.source {
            CheckSource::Agent => out.push_str("checked through the running agent (its WireGuard socket)\n"),
            CheckSource::Standalone => out.push_str(
                "the agent is not running: standalone check from a fresh UDP socket (the agent's own mapping may differ; relay not checked)\n",
            ),
        }
        out.push_str(&format!(
            "UDP:      {}\n",
            if self.udp_reachable {
                "reachable"
            } else {
                "blocked or no STUN answer"
            }
        ));
        out.push_str(&format!(
            "mapped:   {}\n",
            self.mapped.map_or_else(|| "-".to_string(), |m| m.to_string())
        ));
        out.push_str(&format!("mapping:  {}\n", self.mapping));
        for probe in &self.probes {
            match (probe.mapped, probe.rtt_ms) {
                (Some(mapped), Some(ms)) => {
                    out.push_str(&format!("  stun {} -> {mapped} ({ms:.1} ms)\n", probe.server))
                }
                (Some(mapped), None) => out.push_str(&format!("  stun {} -> {mapped}\n", probe.server)),
                _ => out.push_str(&format!(
                    "  stun {}: {}\n",
                    probe.server,
                    probe.error.as_deref().unwrap_or("no answer")
                )),
            }
        }
        match &self.relay {
            Some(relay) if relay.connected => out.push_str(&format!(
                "relay:    connected{}\n",
                relay
                    .latency_ms
                    .map_or_else(String::new, |ms| format!(", latency {ms:.1} ms"))
            )),
            Some(relay) => out.push_str(&format!(
                "relay:    not connected{}\n",
                relay
                    .last_error
                    .as_deref()
                    .map_or_else(String::new, |e| format!(" ({e})"))
            )),
            None => out.push_str("relay:    not checked\n"),
        }
        for note in &self.notes {
            out.push_str(&format!("note: {note}\n"));
        }
        out
    }
}

/// What the agent's discovery loop ([`crate::follow`]) last learned, read by `meshd netcheck` and `status`.
#[derive(Debug, Default)]
pub struct Discovery {
    state: std::sync::Mutex<DiscoveryState>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct DiscoveryState {
    /// The coordinator's STUN servers (empty: not known yet, or STUN off).
    pub servers: Vec<SocketAddr>,
    /// The answers of the last STUN round.
    pub probes: Vec<StunProbe>,
    /// The endpoint set last handed to the data plane and reported.
    pub endpoints: Vec<SocketAddr>,
    /// Why STUN is not running, if it is not.
    pub note: Option<String>,
}

impl Discovery {
    pub fn get(&self) -> DiscoveryState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn update(&self, change: impl FnOnce(&mut DiscoveryState)) {
        change(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Endpoint-independent when at least two servers answered and all saw the same ip:port; dependent when they saw
/// different ones; unknown with fewer than two answers.
pub fn classify(probes: &[StunProbe]) -> Mapping {
    let mut answers = probes.iter().filter_map(|p| p.mapped);
    let Some(first) = answers.next() else {
        return Mapping::Unknown;
    };
    let mut seen_two = false;
    for other in answers {
        seen_two = true;
        if other != first {
            return Mapping::EndpointDependent;
        }
    }
    if seen_two {
        Mapping::EndpointIndependent
    } else {
        Mapping::Unknown
    }
}

/// Why the STUN servers are not known.
#[derive(Debug, thiserror::Error)]
pub enum ServersError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(
        "the coordinator does not run STUN (no stun_ports in {}); ask the admin to enable it",
        meshd_protocol::paths::INFO
    )]
    StunOff,
    #[error("cannot resolve the coordinator's host {host}: {detail}")]
    Resolve { host: String, detail: String },
}

/// The coordinator's STUN servers: its host (from `client`'s URL) with every port `GET /api/v1/info` names.
pub async fn stun_servers(client: &ControlClient) -> Result<Vec<SocketAddr>, ServersError> {
    let info = client.info().await?;
    if info.stun_ports.is_empty() {
        return Err(ServersError::StunOff);
    }
    let ip = resolve_host(client.base_url()).await?;
    Ok(info.stun_ports.iter().map(|port| SocketAddr::new(ip, *port)).collect())
}

/// The address of the host in `url`, IPv4 preferred (candidates and the lab are IPv4).
async fn resolve_host(url: &str) -> Result<IpAddr, ServersError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| ServersError::Resolve {
        host: url.to_string(),
        detail: e.to_string(),
    })?;
    let Some(host) = parsed.host_str() else {
        return Err(ServersError::Resolve {
            host: url.to_string(),
            detail: "the URL has no host".into(),
        });
    };
    if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Ok(ip);
    }
    let found: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
        .await
        .map_err(|e| ServersError::Resolve {
            host: host.to_string(),
            detail: e.to_string(),
        })?
        .collect();
    found
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| found.first())
        .map(SocketAddr::ip)
        .ok_or_else(|| ServersError::Resolve {
            host: host.to_string(),
            detail: "no address".into(),
        })
}

/// Probes every server at once with `probe` (the agent's [`crate::agent::DataPlane::stun`]) and times the answers.
pub async fn probe_all<F, Fut>(servers: &[SocketAddr], probe: F) -> Vec<StunProbe>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = Result<SocketAddr, String>>,
{
    let probes = servers.iter().map(|server| {
        let started = Instant::now();
        let answer = probe(*server);
        async move {
            let result = answer.await;
            let rtt_ms = Some(millis(started.elapsed()));
            match result {
                Ok(mapped) => StunProbe {
                    server: *server,
                    mapped: Some(mapped),
                    rtt_ms,
                    error: None,
                },
                Err(error) => StunProbe {
                    server: *server,
                    mapped: None,
                    rtt_ms: None,
                    error: Some(error),
                },
            }
        }
    });
    futures::future::join_all(probes).await
}

/// Probes every server from one fresh UDP socket (so the answers compare like the agent's would), resending a
/// request that got no answer at [`RESEND_AT`], until all answered or `timeout` passed.
pub async fn standalone_probes(servers: &[SocketAddr], timeout: Duration) -> std::io::Result<Vec<StunProbe>> {
    let bind: SocketAddr = if servers.iter().all(SocketAddr::is_ipv4) {
        "0.0.0.0:0".parse().expect("literal address")
    } else {
        "[::]:0".parse().expect("literal address")
    };
    let socket = tokio::net::UdpSocket::bind(bind).await?;
    let requests: Vec<(SocketAddr, TransactionId)> = servers
        .iter()
        .map(|server| (*server, TransactionId(rand::random())))
        .collect();
    let started = Instant::now();
    let mut answers: HashMap<SocketAddr, (SocketAddr, Duration)> = HashMap::new();
    let mut errors: HashMap<SocketAddr, String> = HashMap::new();
    let mut resends = RESEND_AT.iter().peekable();
    for (server, tx) in &requests {
        if let Err(e) = socket.send_to(&stun::binding_request(*tx), server).await {
            errors.insert(*server, format!("cannot send: {e}"));
        }
    }
    let mut buf = [0u8; 1500];
    while answers.len() + errors.len() < requests.len() {
        let elapsed = started.elapsed();
        if elapsed >= timeout {
            break;
        }
        let wake = resends.peek().map_or(timeout, |at| (**at).min(timeout));
        let wait = wake.saturating_sub(elapsed).max(Duration::from_millis(1));
        match tokio::time::timeout(wait, socket.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) => {
                if let Ok((tx, mapped)) = stun::parse_binding_response(&buf[..n])
                    && let Some((server, _)) = requests.iter().find(|(server, id)| *id == tx && *server == from)
                {
                    answers.entry(*server).or_insert((mapped, started.elapsed()));
                }
            }
            Ok(Err(e)) => {
                // ICMP port unreachable surfaces here on Linux: nothing answers on that port.
                tracing::debug!("STUN receive: {e}");
            }
            Err(_) => {
                if resends.peek().is_some_and(|at| started.elapsed() >= **at) {
                    resends.next();
                    for (server, tx) in &requests {
                        if !answers.contains_key(server) && !errors.contains_key(server) {
                            let _ = socket.send_to(&stun::binding_request(*tx), server).await;
                        }
                    }
                }
            }
        }
    }
    Ok(requests
        .iter()
        .map(|(server, _)| match (answers.get(server), errors.get(server)) {
            (Some((mapped, rtt)), _) => StunProbe {
                server: *server,
                mapped: Some(*mapped),
                rtt_ms: Some(millis(*rtt)),
                error: None,
            },
            (None, error) => StunProbe {
                server: *server,
                mapped: None,
                rtt_ms: None,
                error: Some(
                    error
                        .cloned()
                        .unwrap_or_else(|| format!("no answer within {timeout:?}")),
                ),
            },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(server: &str, mapped: Option<&str>) -> StunProbe {
        StunProbe {
            server: server.parse().expect("addr"),
            mapped: mapped.map(|m| m.parse().expect("addr")),
            rtt_ms: mapped.map(|_| 1.0),
            error: mapped.is_none().then(|| "no answer".into()),
        }
    }

    #[test]
    fn classifies_the_mapping_from_two_stun_ports() {
        let same = [
            probe("198.18.0.1:3478", Some("198.18.9.9:40000")),
            probe("198.18.0.1:3479", Some("198.18.9.9:40000")),
        ];
        assert_eq!(classify(&same), Mapping::EndpointIndependent);
        let different = [
            probe("198.18.0.1:3478", Some("198.18.9.9:40000")),
            probe("198.18.0.1:3479", Some("198.18.9.9:40001")),
        ];
        assert_eq!(classify(&different), Mapping::EndpointDependent);
        let one = [
            probe("198.18.0.1:3478", Some("198.18.9.9:40000")),
            probe("198.18.0.1:3479", None),
        ];
        assert_eq!(classify(&one), Mapping::Unknown);
        assert_eq!(classify(&[]), Mapping::Unknown);
        let report = NetcheckReport::new(CheckSource::Standalone, one.to_vec(), None, vec![]);
        assert!(report.udp_reachable);
        assert_eq!(report.mapped, Some("198.18.9.9:40000".parse().expect("addr")));
        let text = report.to_text();
        assert!(text.contains("standalone") && text.contains("unknown"), "{text}");
        let none = NetcheckReport::new(CheckSource::Agent, vec![probe("198.18.0.1:3478", None)], None, vec![]);
        assert!(!none.udp_reachable);
        assert_eq!(serde_json::to_value(&none).expect("json")["mapping"], "unknown");
    }

    #[tokio::test]
    async fn standalone_probes_talk_stun_and_time_out() {
        // A tiny STUN server on 127.0.0.1 answering with the source it sees; a second port that never answers.
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let server_addr = server.local_addr().expect("addr");
        let silent_addr = silent.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            let mut out = [0u8; stun::MAX_BINDING_RESPONSE_LEN];
            while let Ok((n, from)) = server.recv_from(&mut buf).await {
                if let Ok(tx) = stun::parse_binding_request(&buf[..n]) {
                    let len = stun::write_binding_response(tx, from, &mut out);
                    let _ = server.send_to(&out[..len], from).await;
                }
            }
        });
        let probes = standalone_probes(&[server_addr, silent_addr], Duration::from_millis(700))
            .await
            .expect("probe");
        assert_eq!(probes.len(), 2);
        let mapped = probes[0].mapped.expect("the server answers");
        assert_eq!(mapped.ip(), server_addr.ip());
        assert!(probes[1].mapped.is_none() && probes[1].error.is_some());
        assert_eq!(classify(&probes), Mapping::Unknown);
        drop(silent);
    }
}

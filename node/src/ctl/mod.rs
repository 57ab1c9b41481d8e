//! The local control socket `<state-dir>/meshd.sock`: how `meshd status`, `ping`, `netcheck` and `down` talk to the
//! running agent.
//!
//! Owns the socket's life (single instance per state directory through `meshd.lock`, stale socket cleanup, mode 0600
//! for root or 0660 for `--control-group`), its line protocol (one JSON request per connection, one or more JSON
//! reply lines: [`Request`], [`Reply`]), the server side (status built from the map and the engine's counters,
//! ping, down) and the client side used by the CLI. Everything derives from the state directory, so agents in
//! different network namespaces on one machine never meet.
//!
//! # Layout
//! - this module: the line protocol ([`Request`], [`Reply`] and the status/ping bodies) and [`CtlError`];
//! - [`socket`]: the state directory lock and the socket file (mode, group, stale cleanup);
//! - [`server`]: the agent side (status merged from the map and the engine, ping, down);
//! - [`client`]: the CLI side.

pub mod client;
pub mod server;
pub mod socket;

use std::io;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::agent::Phase;
use crate::netcheck::NetcheckReport;
use crate::relay::RelaySnapshot;

pub use client::CtlClient;
pub use server::{serve, status_report};
pub use socket::{StateLock, bind, lock_state_dir, lock_state_dir_within, remove_socket};

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("meshd is not running for state dir {dir}; start it with `sudo meshd up`")]
    NotRunning { dir: String },
    #[error(
        "permission denied on {path}: run with sudo, or start the agent with --control-group GROUP and join that group"
    )]
    PermissionDenied { path: String },
    #[error(
        "another meshd agent is already running for state dir {dir} (stop it with `sudo meshd down`, or use another --state-dir)"
    )]
    AlreadyRunning { dir: String },
    #[error("unknown group {0:?} for --control-group (see /etc/group)")]
    UnknownGroup(String),
    #[error("control socket {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("the agent did not answer in time on {path}")]
    Timeout { path: String },
    #[error("unexpected answer from the agent: {0}")]
    Protocol(String),
    #[error("{0}")]
    Agent(String),
}

/// One request per connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Ping {
        target: String,
        count: u16,
        timeout_secs: u16,
    },
    Down,
    /// `meshd netcheck`: STUN through the agent's WireGuard socket, and the relay's state.
    Netcheck,
}

/// A reply line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    // Boxed: a status is far larger than the other replies (clippy::large_enum_variant).
    Status(Box<StatusReport>),
    /// Printed once before the echoes: whom we ping.
    PingStart {
        name: String,
        ip: Ipv4Addr,
    },
    PingReply(PingReply),
    PingDone(PingSummary),
    Stopping,
    Netcheck(NetcheckReport),
    Error(String),
}

/// `meshd status --json`: exactly `{"self": ..., "peers": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    #[serde(rename = "self")]
    pub self_node: SelfStatus,
    pub peers: Vec<PeerReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelfStatus {
    pub name: String,
    /// The name in the network's domain (`laptop.mesh.internal`); null from a coordinator without names.
    #[serde(default)]
    pub fqdn: Option<String>,
    pub ip: Ipv4Addr,
    pub public_key: String,
    pub node_id: i64,
    pub network: String,
    pub interface: String,
    pub listen_port: u16,
    /// `running`, or `degraded` while the coordinator is away.
    pub state: Phase,
    pub coordinator: String,
    /// Version of the applied map; null before the first one.
    pub map_version: Option<u64>,
    pub tags: Vec<String>,
    /// The engine's drop counters (malformed datagrams, spoofed sources, ...), as the engine names them.
    pub counters: serde_json::Value,
    /// The relay connection (null from an older agent).
    #[serde(default)]
    pub relay: Option<RelaySnapshot>,
    /// This node's own endpoints as last reported (local candidates and the STUN-mapped address).
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub totals: PathTotals,
    /// How mesh names resolve on this host (null from an older agent).
    #[serde(default)]
    pub dns: Option<crate::dns::DnsStatus>,
}

/// How the peers are reached, summed over all peers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathTotals {
    pub direct_peers: usize,
    pub relayed_peers: usize,
    /// Bytes sent and received through the relay, all peers.
    pub relayed_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerReport {
    pub name: String,
    /// The name in the network's domain; null from a coordinator without names.
    #[serde(default)]
    pub fqdn: Option<String>,
    pub ip: Ipv4Addr,
    pub public_key: String,
    /// Where packets go now (learned or reported); null if unknown.
    pub endpoint: Option<String>,
    /// `direct`, `relay` or `none` (the engine's path for this peer).
    pub path: String,
    /// Round trip of the last probe answered on the direct path (the engine's last pong); null if none.
    #[serde(default)]
    pub latency_ms: Option<f64>,
    #[serde(default)]
    pub relay_rx_bytes: u64,
    #[serde(default)]
    pub relay_tx_bytes: u64,
    /// Seconds since the last completed handshake; null if never.
    pub last_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Whether the coordinator sees the peer connected.
    pub online: bool,
    pub id: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PingReply {
    pub seq: u16,
    /// Round trip in milliseconds; null when no reply came in time.
    pub rtt_ms: Option<f64>,
    pub path: String,
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PingSummary {
    pub sent: u16,
    pub received: u16,
}

fn io_err(path: &Path, source: io::Error) -> CtlError {
    CtlError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A status report with one direct and one relayed peer, for the formatting tests.
#[cfg(test)]
pub(crate) fn sample_status() -> StatusReport {
    use meshd_protocol::PublicKey;

    use crate::daemon::Phase;

    let key = PublicKey::from_bytes([5; 32]).to_base64();
    StatusReport {
        self_node: SelfStatus {
            name: "laptop".into(),
            fqdn: Some("laptop.mesh.internal".into()),
            ip: "10.77.0.2".parse().expect("ip"),
            public_key: key.clone(),
            node_id: 2,
            network: "10.77.0.0/16".into(),
            interface: "mesh0".into(),
            listen_port: 51820,
            state: Phase::Degraded,
            coordinator: "https://198.18.0.1:8443".into(),
            map_version: Some(7),
            tags: vec![],
            counters: serde_json::json!({}),
            relay: Some(crate::relay::RelaySnapshot {
                connected: true,
                latency_ms: Some(12.0),
                last_error: None,
                dropped_inbound: 0,
            }),
            endpoints: vec!["198.18.1.2:51820".into()],
            totals: crate::ctl::PathTotals {
                direct_peers: 1,
                relayed_peers: 1,
                relayed_bytes: 3 * 1024,
            },
            dns: Some(crate::dns::DnsStatus {
                mode: "hosts".into(),
                domain: Some("mesh.internal".into()),
                resolver: Some("10.77.0.2:53".into()),
                hosts_file: Some("/etc/hosts".into()),
                names: 3,
                answered: 5,
                ignored: 1,
                note: None,
                error: None,
            }),
        },
        peers: vec![
            PeerReport {
                name: "gpu".into(),
                fqdn: Some("gpu.mesh.internal".into()),
                ip: "10.77.0.3".parse().expect("ip"),
                public_key: key.clone(),
                endpoint: Some("198.18.2.2:51820".into()),
                path: "direct".into(),
                latency_ms: Some(0.42),
                relay_rx_bytes: 0,
                relay_tx_bytes: 0,
                last_handshake: Some(12),
                rx_bytes: 2048,
                tx_bytes: 0,
                online: true,
                id: 3,
            },
            PeerReport {
                name: "laptop2".into(),
                fqdn: Some("laptop2.mesh.internal".into()),
                ip: "10.77.0.4".parse().expect("ip"),
                public_key: key,
                endpoint: Some("198.18.3.3:51820".into()),
                path: "relay".into(),
                latency_ms: None,
                relay_rx_bytes: 1024,
                relay_tx_bytes: 2048,
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                online: true,
                id: 4,
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_of_requests_and_replies() {
        let json = serde_json::to_string(&Request::Ping {
            target: "gpu".into(),
            count: 2,
            timeout_secs: 1,
        })
        .expect("json");
        assert_eq!(json, r#"{"cmd":"ping","target":"gpu","count":2,"timeout_secs":1}"#);
        assert_eq!(
            serde_json::to_string(&Request::Status).expect("json"),
            r#"{"cmd":"status"}"#
        );
        assert_eq!(serde_json::to_string(&Reply::Stopping).expect("json"), r#""stopping""#);
        let error: Reply = serde_json::from_str(r#"{"error":"boom"}"#).expect("parse");
        assert!(matches!(error, Reply::Error(m) if m == "boom"));
    }
}

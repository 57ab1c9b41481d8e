//! Domain types shared by the store, the pure modules and the HTTP layer (no IO, no SQL, no HTTP).

use std::net::{Ipv4Addr, SocketAddr};

use meshd_protocol::{NodeId, PublicKey};

/// What kind of device a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// Runs the meshd agent: joined with a token, holds a credential, streams its map, reports endpoints.
    Meshd,
    /// A stock WireGuard device (a phone with the WireGuard app) registered by an admin by its public key. It has no
    /// credential and never calls the API; it gets a wg-quick config instead.
    Wireguard,
}

impl NodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Meshd => "meshd",
            Self::Wireguard => "wireguard",
        }
    }

    pub fn parse(s: &str) -> Self {
        if s == "wireguard" { Self::Wireguard } else { Self::Meshd }
    }
}

/// A node as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: NodeId,
    pub name: String,
    pub ip: Ipv4Addr,
    pub public_key: PublicKey,
    pub kind: NodeKind,
    pub endpoints: Vec<SocketAddr>,
    /// True while at least one map stream of the node is connected.
    pub online: bool,
    pub last_seen: Option<i64>,
    pub tags: Vec<String>,
    pub created_at: i64,
    /// Every pair with this node mixes a preshared key into its handshake (see [`crate::psk`]); set at registration
    /// of a stock WireGuard device (default on), false for agents.
    pub preshared_key: bool,
}

/// What happened to a node, as recorded in the change log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Changed,
    Endpoints,
    Online,
    Offline,
    Removed,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "added",
            Self::Changed => "changed",
            Self::Endpoints => "endpoints",
            Self::Online => "online",
            Self::Offline => "offline",
            Self::Removed => "removed",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "added" => Self::Added,
            "endpoints" => Self::Endpoints,
            "online" => Self::Online,
            "offline" => Self::Offline,
            "removed" => Self::Removed,
            _ => Self::Changed,
        }
    }
}

/// One row of the change log joined with the node's *current* state (`None`: the node no longer exists).
#[derive(Debug, Clone)]
pub struct ChangeRecord {
    pub version: u64,
    pub node_id: NodeId,
    pub kind: ChangeKind,
    pub node: Option<Node>,
}

/// Current unix time in seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

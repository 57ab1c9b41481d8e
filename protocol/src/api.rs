//! Bodies of the node-facing HTTP API, and the error body every route uses.
//!
//! Admin-only bodies live in the coordinator (nodes never send them); what both sides exchange lives here.

use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::key::PublicKey;
use crate::netmap::NodeId;

pub use crate::proof::{JOIN_PROOF_LEN, join_proof, verify_join_proof};

/// `GET /api/v1/info` (unauthenticated): what a node needs before it joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CoordinatorInfo {
    /// [`crate::PROTOCOL_VERSION`] of the coordinator.
    pub protocol_version: u32,
    /// The coordinator's static X25519 join key; a joining node proves possession of its own private key with a
    /// Diffie-Hellman against it (see [`crate::proof`]). The same for every replica on one database.
    pub join_key: PublicKey,
    /// UDP ports on the coordinator's host (the host of the URL in the token) that answer STUN binding requests
    /// (see [`crate::stun`]). Two ports let a node tell an endpoint-independent NAT mapping from an
    /// endpoint-dependent one. Empty (or absent, from an older coordinator): STUN is off.
    #[serde(default)]
    pub stun_ports: Vec<u16>,
    /// True when the coordinator serves the relay ([`crate::paths::RELAY`]). Absent: false.
    #[serde(default)]
    pub relay: bool,
    /// UDP port of the WireGuard gateway for stock devices on the coordinator's host; absent when it is off. The
    /// gateway forwards a device's WireGuard datagrams to agents over their relay connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_port: Option<u16>,
}

/// `GET /api/v1/node/preshared-keys`: the preshared key of every pair the calling node is part of.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PresharedKeys {
    pub keys: Vec<PeerPresharedKey>,
}

/// The preshared key the caller shares with `peer`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PeerPresharedKey {
    pub peer: PublicKey,
    pub preshared_key: crate::PresharedKey,
}

/// `POST /api/v1/join`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JoinRequest {
    /// The whole token string as printed by `meshd-coordinator token create`.
    pub token: String,
    /// The node's WireGuard public key; the private key stays on the node.
    pub public_key: PublicKey,
    /// Wanted name; the coordinator makes it DNS-safe and unique (`laptop`, `laptop-2`, ...).
    pub hostname: String,
    /// Proof of possession of the private key of `public_key`: standard base64 of [`join_proof`] computed with
    /// `X25519(node private key, CoordinatorInfo::join_key)` over this request's token id, public key and hostname.
    /// Required: absent (empty) or wrong is refused with `proof_invalid`.
    #[serde(default)]
    pub proof: String,
}

/// Answer to a successful join. Joining again with the same public key returns the same node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JoinResponse {
    pub node_id: NodeId,
    /// The node's overlay address, stable for the node's lifetime.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "10.77.0.5"))]
    pub ip: Ipv4Addr,
    /// The node's unique DNS-safe name.
    pub name: String,
    /// The overlay network, e.g. `10.77.0.0/16`.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "10.77.0.0/16"))]
    pub network: Ipv4Net,
    /// Bearer credential for every later node call; shown once, stored hashed by the coordinator.
    pub credential: String,
    /// Tags inherited from the token.
    pub tags: Vec<String>,
    /// [`crate::PROTOCOL_VERSION`] of the coordinator.
    pub protocol_version: u32,
}

/// `PUT /api/v1/node/endpoints`: where this node's WireGuard socket can be reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EndpointReport {
    /// Candidate UDP endpoints, best first; at most [`MAX_ENDPOINTS`]. An empty list clears them.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>, example = json!(["198.18.1.2:51820"])))]
    pub endpoints: Vec<SocketAddr>,
}

/// Most endpoints a node may report (more is a 400).
pub const MAX_ENDPOINTS: usize = 16;

/// The body of every error response: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `token_expired`; see [`error_codes`].
    pub code: String,
    /// Human-readable explanation that says what to do next.
    pub message: String,
}

/// Error codes that clients act on. The coordinator may send others; clients treat unknown codes as generic failures.
pub mod error_codes {
    pub const BAD_REQUEST: &str = "bad_request";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const NOT_FOUND: &str = "not_found";
    pub const CONFLICT: &str = "conflict";
    pub const TOKEN_INVALID: &str = "token_invalid";
    pub const TOKEN_EXPIRED: &str = "token_expired";
    pub const TOKEN_REVOKED: &str = "token_revoked";
    pub const TOKEN_USED_UP: &str = "token_used_up";
    /// A join without a valid proof of possession of the private key (a node bug or a forged request).
    pub const PROOF_INVALID: &str = "proof_invalid";
    pub const NETWORK_FULL: &str = "network_full";
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    pub const INTERNAL: &str = "internal";
    /// The coordinator cannot write to its database right now (disk full, read-only, database server away): retry
    /// later; the operator finds the cause in the coordinator's log and `/readyz`.
    pub const UNAVAILABLE: &str = "unavailable";
}

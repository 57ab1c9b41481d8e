//! The only vocabulary the coordinator and the node agent share.
//!
//! # Layout
//! - [`key`]: typed WireGuard public keys that print short and parse strictly.
//! - [`token`]: the join token, one opaque string with everything a node needs to enrol.
//! - [`api`]: request and response bodies of the node-facing HTTP API and the error body of every route.
//! - [`proof`]: the join proof, how a joining node proves possession of its private key (X25519 + HMAC).
//! - [`disco`]: the authenticated path probes agents exchange on the WireGuard socket (ping, pong, call-me-maybe).
//! - [`netmap`]: a node's view of the network and the deltas that keep it current.
//! - [`names`]: what a node name and the network's DNS domain may be (both sides enforce the same rules).
//! - [`dns`]: the name table built from a map and the answer to a DNS query about it (the agent's responder).
//! - [`stun`]: STUN binding requests and responses (RFC 8489), how a node learns its NAT-mapped address.
//! - [`relay`]: the frames of the relay connection (`GET /api/v1/relay` upgraded to `meshd-relay`).
//! - [`wireguard`]: WireGuard message types and session indexes as a forwarder sees them (the device gateway).
//!
//! Invariants: this crate does no IO and pulls in no runtime, database or web framework (the optional
//! `openapi` feature only adds schema derives). Fields document what *absent* means. A change that
//! breaks old nodes bumps [`PROTOCOL_VERSION`].

pub mod api;
pub mod disco;
pub mod dns;
pub mod key;
pub mod names;
pub mod netmap;
pub mod proof;
pub mod relay;
pub mod stun;
pub mod token;
pub mod wireguard;

pub use key::{KeyError, PresharedKey, PublicKey};
pub use netmap::{DnsConfig, MapMessage, MapNode, NetworkMap, NodeId, NodeKind};
pub use token::{CertFingerprint, JoinToken, TokenError};

/// Version of the node <-> coordinator protocol. History:
/// - 1 (2026-11): join (with a proof of possession of the private key, `GET /api/v1/info`), SSE network map with
///   versioned deltas, endpoint reports.
///   2026-12, compatible additions: the full map's `dns` (network domain); absent from older coordinators.
pub const PROTOCOL_VERSION: u32 = 1;

/// HTTP paths of the node-facing API, so both sides name them once.
pub mod paths {
    /// `GET` (unauthenticated): protocol version and the coordinator's join key ([`crate::api::CoordinatorInfo`]).
    pub const INFO: &str = "/api/v1/info";
    /// `POST`: enrol with a join token ([`crate::api::JoinRequest`] -> [`crate::api::JoinResponse`]).
    pub const JOIN: &str = "/api/v1/join";
    /// `GET`: the node's network map as Server-Sent Events; `?since=V` or `Last-Event-ID: V` resumes.
    pub const MAP: &str = "/api/v1/map";
    /// `PUT`: the node reports the UDP endpoints it can be reached at ([`crate::api::EndpointReport`]).
    pub const ENDPOINTS: &str = "/api/v1/node/endpoints";
    /// `DELETE`: the node leaves the network; its credential stops working.
    pub const NODE_SELF: &str = "/api/v1/node";
    /// `GET` with `Upgrade: meshd-relay` (HTTP/1.1, node credential): the relay connection, frames per
    /// [`crate::relay`]. `101` on success, `401` bad credential, `403` a device.
    pub const RELAY: &str = "/api/v1/relay";
    /// `GET` (node credential): the preshared keys of the pairs this node is part of
    /// ([`crate::api::PresharedKeys`]); a peer whose map entry has `preshared_key` needs one.
    pub const PRESHARED_KEYS: &str = "/api/v1/node/preshared-keys";
    /// Name of the SSE event that carries a [`crate::MapMessage`].
    pub const MAP_EVENT: &str = "map";
}

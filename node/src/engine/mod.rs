//! The data plane: one TUN device, one UDP socket, one `boringtun::noise::Tunn` per peer.
//!
//! Owns: moving packets between the TUN device and the UDP socket, WireGuard handshakes and timers, dispatching
//! incoming datagrams to peers by receiver index, roaming, per-peer counters. Knows nothing of HTTP, the coordinator or
//! the network map: it is configured declaratively through [`Engine::reconfigure`] with the full desired peer list.
//!
//! INTERFACE CONTRACT (shared by `daemon.rs`/`ctl.rs`): the signatures below are what the rest of the agent calls.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ipnet::Ipv4Net;
use meshd_protocol::PublicKey;
use x25519_dalek::StaticSecret;

/// Everything needed to bring the data plane up. Fixed for the engine's lifetime.
pub struct EngineConfig {
    /// TUN interface name, e.g. `mesh0`.
    pub interface: String,
    /// TUN MTU (default 1420: 1500 minus IPv4/UDP/WireGuard overhead, like wg-quick).
    pub mtu: u16,
    /// UDP port to listen on; 0 picks a free one.
    pub listen_port: u16,
    /// This node's WireGuard private key. Never leaves the process.
    pub private_key: StaticSecret,
    /// This node's overlay address.
    pub address: Ipv4Addr,
    /// The overlay network: routed into the TUN device.
    pub network: Ipv4Net,
}

/// One peer as the engine should have it. Identity is the public key: a reconfigure that keeps a key keeps that
/// peer's sessions, counters and learned (roamed) endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    /// Display name (for status and logs only).
    pub name: String,
    /// Inner source addresses this peer may send from, and destinations routed to it (its overlay /32).
    pub allowed_ips: Vec<Ipv4Net>,
    /// Candidate endpoints reported by the coordinator, best first. Empty: wait for the peer to send first.
    pub endpoints: Vec<SocketAddr>,
    /// Persistent keepalive interval, to keep NAT mappings open.
    pub persistent_keepalive: Option<u16>,
}

/// Counters and state of one peer, for `meshd status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    pub name: String,
    /// The endpoint packets currently go to (roamed or configured); None if unknown.
    pub endpoint: Option<SocketAddr>,
    /// "direct" (the relay comes in a later issue).
    pub path: &'static str,
    /// Time since the last completed handshake; None if never.
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Engine-wide counters of things dropped instead of crashing.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineCounters {
    pub malformed_datagrams: u64,
    pub unknown_peer_datagrams: u64,
    pub malformed_tun_packets: u64,
    pub no_route_packets: u64,
    pub spoofed_source_packets: u64,
    pub cookie_replies_sent: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineStatus {
    pub interface: String,
    pub listen_port: u16,
    pub peers: Vec<PeerStatus>,
    pub counters: EngineCounters,
}

/// Why the engine could not start; messages say what to do next.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot create TUN interface {name}: {source} (run as root or with CAP_NET_ADMIN, check that /dev/net/tun exists, and that no other process uses {name})")]
    OpenTun { name: String, source: std::io::Error },
    #[error("cannot bind UDP port {port}: {source} (is another meshd or WireGuard using it? pick one with --listen-port)")]
    BindUdp { port: u16, source: std::io::Error },
}

/// A running data plane. Dropping it (or [`Engine::shutdown`]) removes the TUN device.
pub struct Engine {
    _private: (),
}

impl Engine {
    /// Creates the TUN device (address, MTU, route for `network`), binds the UDP socket and starts the packet tasks.
    pub async fn start(config: EngineConfig) -> Result<Engine, EngineError> {
        let _ = config;
        todo!("engine helper")
    }

    /// Makes the peer set equal to `peers`: adds new ones, removes missing ones (their traffic stops at once), and
    /// updates endpoints/allowed IPs of kept ones without touching their sessions.
    pub fn reconfigure(&self, peers: Vec<PeerConfig>) {
        let _ = peers;
        todo!("engine helper")
    }

    /// The bound UDP port (useful when `listen_port` was 0).
    pub fn listen_port(&self) -> u16 {
        todo!("engine helper")
    }

    pub fn status(&self) -> EngineStatus {
        todo!("engine helper")
    }

    /// Stops the packet tasks and removes the TUN device.
    pub async fn shutdown(self) {
        todo!("engine helper")
    }
}

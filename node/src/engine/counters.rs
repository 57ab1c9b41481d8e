//! Engine-wide drop counters: every packet the engine refuses is counted here instead of crashing or logging per
//! packet.
//!
//! The inbound counters add up: every datagram the engine reads (UDP or relay) counts once in `received_datagrams`
//! and, if it is dropped, once under the reason it was dropped for (`malformed_datagrams`, `bad_mac_datagrams`,
//! `rejected_datagrams`, `unknown_peer_datagrams`, `rejected_disco`, `cookie_replies_sent`, `spoofed_source_packets`).
//! Datagrams the kernel dropped before the engine could read them (the socket's receive buffer was full: a flood
//! outrunning the inbound thread) are not seen by the engine at all; `socket_overflow_datagrams` reads the kernel's
//! count for the socket, so a flood's total is `received_datagrams + socket_overflow_datagrams`.
//!
//! Owns: the atomic counters and their snapshot ([`super::EngineCounters`]). Relaxed atomics: they are statistics,
//! nothing is ordered by them, and incrementing one must cost the packet path nothing but the add.

use std::sync::atomic::{AtomicU64, Ordering};

use super::EngineCounters;

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) received_datagrams: AtomicU64,
    pub(crate) malformed_datagrams: AtomicU64,
    pub(crate) bad_mac_datagrams: AtomicU64,
    pub(crate) rejected_datagrams: AtomicU64,
    pub(crate) unknown_peer_datagrams: AtomicU64,
    pub(crate) malformed_tun_packets: AtomicU64,
    pub(crate) non_ipv4_tun_packets: AtomicU64,
    pub(crate) no_route_packets: AtomicU64,
    pub(crate) no_endpoint_packets: AtomicU64,
    pub(crate) spoofed_source_packets: AtomicU64,
    pub(crate) cookie_replies_sent: AtomicU64,
    pub(crate) udp_send_errors: AtomicU64,
    pub(crate) tun_write_errors: AtomicU64,
    pub(crate) relay_tx_bytes: AtomicU64,
    pub(crate) relay_rx_bytes: AtomicU64,
    pub(crate) relay_dropped_datagrams: AtomicU64,
    pub(crate) rejected_disco: AtomicU64,
}

/// Adds one to a counter.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// The counters now; `socket_overflow` is the kernel's drop count of the UDP socket (read by the caller).
    pub(crate) fn snapshot(&self, socket_overflow: u64) -> EngineCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EngineCounters {
            received_datagrams: get(&self.received_datagrams),
            socket_overflow_datagrams: socket_overflow,
            malformed_datagrams: get(&self.malformed_datagrams),
            bad_mac_datagrams: get(&self.bad_mac_datagrams),
            rejected_datagrams: get(&self.rejected_datagrams),
            unknown_peer_datagrams: get(&self.unknown_peer_datagrams),
            malformed_tun_packets: get(&self.malformed_tun_packets),
            non_ipv4_tun_packets: get(&self.non_ipv4_tun_packets),
            no_route_packets: get(&self.no_route_packets),
            no_endpoint_packets: get(&self.no_endpoint_packets),
            spoofed_source_packets: get(&self.spoofed_source_packets),
            cookie_replies_sent: get(&self.cookie_replies_sent),
            udp_send_errors: get(&self.udp_send_errors),
            tun_write_errors: get(&self.tun_write_errors),
            relay_tx_bytes: get(&self.relay_tx_bytes),
            relay_rx_bytes: get(&self.relay_rx_bytes),
            relay_dropped_datagrams: get(&self.relay_dropped_datagrams),
            rejected_disco: get(&self.rejected_disco),
        }
    }
}

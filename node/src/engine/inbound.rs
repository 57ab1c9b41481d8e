//! The inbound task: UDP -> rate limiter -> dispatch to a peer -> decrypt -> inner source check -> TUN.
//!
//! Owns: everything that happens to a datagram from the network. Untrusted input: every step drops and counts,
//! nothing panics or stops the loop. The shared rate limiter sees the sender's address first, so a handshake flood
//! is answered with cookie replies (cheap) instead of DH work that would starve live tunnels. Dispatch is by receiver
//! index or, for initiations, by the static key inside (see `dispatch`), never by trying peers. One task: its
//! buffers are reused; per datagram it takes only the dispatched peer's mutex, never across an `.await`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::TunnResult;
use boringtun::noise::errors::WireGuardError;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::counters::{Counters, bump};
use super::dispatch::{MSG_COOKIE_REPLY, MSG_DATA, message_type, peer_for};
use super::peers::{Peer, PeerTable};
use super::tun::TunWriteBatch;
use super::udp::{RecvBatch, SendBatch};

/// Handshake answers, cookies and flushed queues per send batch (they are rare next to data).
const REPLY_SLOTS: usize = 64;

/// Consecutive receive errors after which the task backs off briefly instead of spinning.
const RECEIVE_ERROR_BACKOFF_AFTER: u32 = 100;

/// Smallest buffer boringtun may write a reply into (a handshake initiation is 148 bytes).
const MIN_REPLY_BUFFER: usize = 148;

struct Inbound {
    shared: Arc<Shared>,
    replies: SendBatch,
    to_tun: TunWriteBatch,
    max_segments: usize,
    /// Where the rate limiter writes a cookie reply; reused so no datagram pays for zeroing a buffer.
    cookie: [u8; MIN_REPLY_BUFFER],
}

pub(crate) async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut recv = RecvBatch::new();
    let mut receive_errors = 0u32;
    let mut inbound = Inbound {
        replies: SendBatch::new(REPLY_SLOTS, shared.datagram_slot),
        to_tun: TunWriteBatch::new(shared.offload),
        max_segments: 1,
        cookie: [0; MIN_REPLY_BUFFER],
        shared,
    };
    loop {
        let received = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            received = inbound.shared.udp.recv(&mut recv) => received,
        };
        let slots = match received {
            Ok(slots) => {
                receive_errors = 0;
                slots
            }
            Err(e) => {
                // ICMP errors surface here as ECONNREFUSED and the like: not fatal for a UDP server socket. Only a
                // long streak means the socket itself is broken; then back off instead of spinning.
                tracing::trace!(error = %e, "udp receive failed");
                receive_errors += 1;
                if receive_errors >= RECEIVE_ERROR_BACKOFF_AFTER {
                    tracing::error!(error = %e, "receiving from the UDP socket keeps failing");
                    receive_errors = 0;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        let table = inbound.shared.table.load_full();
        inbound.max_segments = inbound.shared.udp.max_gso_segments();
        let now = Instant::now();
        for slot in 0..slots {
            let (source, datagrams) = recv.slot(slot);
            for datagram in datagrams {
                inbound.handle(&table, datagram, source, now).await;
            }
        }
        inbound.flush_tun().await;
        inbound.flush_replies().await;
    }
}

impl Inbound {
    async fn flush_tun(&mut self) {
        if let Err(e) = self.to_tun.flush(&self.shared.tun).await {
            tracing::trace!(error = %e, "tun write failed");
            bump(&self.shared.counters.tun_write_errors);
        }
    }

    async fn flush_replies(&mut self) {
        if !self.replies.is_empty() {
            self.shared.send_batch(&mut self.replies).await;
        }
    }

    async fn handle(&mut self, table: &PeerTable, datagram: &[u8], source: SocketAddr, now: Instant) {
        if self.to_tun.is_full() {
            self.flush_tun().await;
        }
        if self.replies.needs_flush() {
            self.flush_replies().await;
        }
        let verified = self
            .shared
            .rate_limiter
            .verify_packet(Some(source.ip()), datagram, &mut self.cookie);
        let counters = &self.shared.counters;
        let packet = match verified {
            Ok(packet) => packet,
            Err(TunnResult::WriteToNetwork(reply)) => {
                bump(&counters.cookie_replies_sent);
                self.replies.push_copy(reply, source, self.max_segments);
                return;
            }
            Err(TunnResult::Err(WireGuardError::InvalidPacket)) => return bump(&counters.malformed_datagrams),
            Err(_) => return bump(&counters.rejected_datagrams),
        };
        let Some(peer) = peer_for(table, &packet, &self.shared.private_key, &self.shared.public_key) else {
            return bump(&self.shared.counters.unknown_peer_datagrams);
        };
        let mut sinks = Sinks {
            to_tun: &mut self.to_tun,
            replies: &mut self.replies,
            counters: &self.shared.counters,
            max_segments: self.max_segments,
        };
        if sinks.decapsulate(table, peer, datagram, source, now) {
            self.flush_queue(peer, now).await;
        }
    }

    /// Repeats `decapsulate(None, &[])` until Done, sending what the Tunn had queued while it had no session.
    async fn flush_queue(&mut self, peer: &Peer, now: Instant) {
        loop {
            if self.replies.needs_flush() {
                self.flush_replies().await;
            }
            let mut state = peer.lock();
            let mut sent_any = false;
            while !self.replies.needs_flush() {
                let TunnResult::WriteToNetwork(datagram) = state.tunn.decapsulate(None, &[], self.replies.tail())
                else {
                    return;
                };
                let len = datagram.len();
                match state.destination_for(datagram) {
                    Some(endpoint) => {
                        state.note_sent(len, now);
                        self.replies.commit(len, endpoint, self.max_segments);
                    }
                    None => bump(&self.shared.counters.no_endpoint_packets),
                }
                sent_any = true;
            }
            drop(state);
            if !sent_any {
                return;
            }
        }
    }
}

/// Where decrypted packets and replies go: the inbound task's batches, borrowed for one datagram. Kept apart from
/// the task (which owns the sockets) so the per-datagram decisions can be tested with two `Tunn`s in memory.
struct Sinks<'a> {
    to_tun: &'a mut TunWriteBatch,
    replies: &'a mut SendBatch,
    counters: &'a Counters,
    max_segments: usize,
}

impl Sinks<'_> {
    /// Decrypts one datagram for `peer`. Returns true when boringtun answered on the network, which means packets
    /// queued during the handshake may now be sent.
    fn decapsulate(
        &mut self,
        table: &PeerTable,
        peer: &Peer,
        datagram: &[u8],
        source: SocketAddr,
        now: Instant,
    ) -> bool {
        let counters = self.counters;
        let mut state = peer.lock();
        let slot = self.to_tun.slot(datagram.len().max(MIN_REPLY_BUFFER));
        match state.tunn.decapsulate(Some(source.ip()), datagram, slot) {
            TunnResult::WriteToTunnelV4(packet, inner_source) => {
                let len = packet.len();
                state.note_authenticated(datagram.len(), source);
                drop(state);
                if table.allows_source(peer, inner_source) {
                    self.to_tun.commit(len);
                } else {
                    tracing::trace!(peer = ?peer.public_key, %inner_source, "inner source not allowed");
                    bump(&counters.spoofed_source_packets);
                }
                false
            }
            TunnResult::WriteToTunnelV6(..) => {
                // Authenticated, but the overlay is IPv4 only: no IPv6 source is ever in a peer's allowed IPs.
                state.note_authenticated(datagram.len(), source);
                bump(&counters.spoofed_source_packets);
                false
            }
            TunnResult::WriteToNetwork(reply) => {
                if message_type(reply) == MSG_COOKIE_REPLY {
                    // The limiter inside decapsulate went under load between our check and its own.
                    bump(&counters.cookie_replies_sent);
                    self.replies.push_copy(reply, source, self.max_segments);
                    return false;
                }
                // A handshake answer (or the keepalive that completes one): authenticated, answer where it came from.
                let len = reply.len();
                self.replies.push_copy(reply, source, self.max_segments);
                state.note_authenticated(datagram.len(), source);
                state.note_sent(len, now);
                true
            }
            TunnResult::Done => {
                // A keepalive (authenticated data with no payload) or a cookie reply taken in.
                if message_type(datagram) == MSG_DATA {
                    state.note_authenticated(datagram.len(), source);
                }
                false
            }
            TunnResult::Err(e) => {
                tracing::trace!(peer = ?peer.public_key, error = ?e, "decapsulate failed");
                bump(&counters.rejected_datagrams);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use boringtun::noise::Tunn;
    use boringtun::noise::rate_limiter::RateLimiter;
    use boringtun::x25519;
    use meshd_protocol::PublicKey;

    use super::super::PeerConfig;
    use super::super::peers::{TunnFactory, build_table};
    use super::*;

    fn ipv4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 60];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&60u16.to_be_bytes());
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    fn encapsulate(tunn: &mut Tunn, packet: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; 2048];
        match tunn.encapsulate(packet, &mut buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("expected a datagram, got {other:?}"),
        }
    }

    /// Our side of the engine's inbound path against a remote `Tunn`, all in memory: handshake, data, roaming,
    /// the inner source check and tampered datagrams.
    #[test]
    fn inbound_decisions_against_a_real_remote() {
        let me = x25519::StaticSecret::random();
        let me_public = x25519::PublicKey::from(&me);
        let remote = x25519::StaticSecret::random();
        let remote_public = x25519::PublicKey::from(&remote);
        let other_public = x25519::PublicKey::from(&x25519::StaticSecret::random());
        let limiter = Arc::new(RateLimiter::new(&me_public, 100));
        let mut next_index = 1;
        let mut factory = TunnFactory {
            private_key: &me,
            public_key: PublicKey::from_bytes(*me_public.as_bytes()),
            rate_limiter: &limiter,
            next_index: &mut next_index,
        };
        let config = |key: &x25519::PublicKey, ip: &str| PeerConfig {
            public_key: PublicKey::from_bytes(*key.as_bytes()),
            name: ip.to_string(),
            allowed_ips: vec![ip.parse().expect("net")],
            endpoints: vec![],
            persistent_keepalive: None,
        };
        let (table, _) = build_table(
            &PeerTable::default(),
            vec![
                config(&remote_public, "10.77.0.2/32"),
                config(&other_public, "10.77.0.3/32"),
            ],
            &mut factory,
        );
        let peer = table
            .by_key(&PublicKey::from_bytes(*remote_public.as_bytes()))
            .expect("remote peer");
        let mut remote_tunn = Tunn::new(remote, me_public, None, None, 9, None);

        let counters = Counters::default();
        let mut to_tun = TunWriteBatch::new(false);
        let mut replies = SendBatch::new(8, 1500);
        let now = Instant::now();
        let home: SocketAddr = "198.18.0.2:51820".parse().expect("addr");
        let roamed: SocketAddr = "198.18.0.3:40000".parse().expect("addr");
        let mut sinks = Sinks {
            to_tun: &mut to_tun,
            replies: &mut replies,
            counters: &counters,
            max_segments: 64,
        };

        // The remote has a packet for us: it initiates; we answer to where the initiation came from.
        let first = ipv4([10, 77, 0, 2], [10, 77, 0, 1]);
        let init = encapsulate(&mut remote_tunn, &first);
        assert!(
            sinks.decapsulate(&table, peer, &init, home, now),
            "a response was produced"
        );
        assert_eq!(
            peer.lock().endpoint.current(),
            Some(home),
            "the initiation taught us the endpoint"
        );
        let sent = sinks.replies.take_datagrams();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0, home);

        // The remote completes the handshake; its keepalive and the queued packet reach our TUN batch.
        let mut buf = vec![0u8; 2048];
        let keepalive = match remote_tunn.decapsulate(None, &sent[0].1, &mut buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("expected a keepalive, got {other:?}"),
        };
        let queued = match remote_tunn.decapsulate(None, &[], &mut buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("expected the queued packet, got {other:?}"),
        };
        assert!(!sinks.decapsulate(&table, peer, &keepalive, home, now));
        assert!(!sinks.decapsulate(&table, peer, &queued, home, now));
        assert_eq!(sinks.to_tun.pending(), vec![&first[..]]);

        // Roaming: an authenticated packet from a new address moves the endpoint.
        let second = ipv4([10, 77, 0, 2], [10, 77, 0, 1]);
        let datagram = encapsulate(&mut remote_tunn, &second);
        sinks.decapsulate(&table, peer, &datagram, roamed, now);
        assert_eq!(peer.lock().endpoint.current(), Some(roamed));
        assert_eq!(sinks.to_tun.pending().len(), 2);

        // The remote claims another peer's address as inner source: dropped and counted, endpoint kept.
        let spoofed = encapsulate(&mut remote_tunn, &ipv4([10, 77, 0, 3], [10, 77, 0, 1]));
        sinks.decapsulate(&table, peer, &spoofed, roamed, now);
        assert_eq!(counters.snapshot().spoofed_source_packets, 1);
        assert_eq!(sinks.to_tun.pending().len(), 2);

        // A tampered datagram is rejected and does not move the endpoint.
        let mut tampered = encapsulate(&mut remote_tunn, &ipv4([10, 77, 0, 2], [10, 77, 0, 1]));
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        sinks.decapsulate(&table, peer, &tampered, "198.18.0.66:1".parse().expect("addr"), now);
        assert_eq!(counters.snapshot().rejected_datagrams, 1);
        assert_eq!(peer.lock().endpoint.current(), Some(roamed));
        assert_eq!(sinks.to_tun.pending().len(), 2);
        let state = peer.lock();
        assert!(state.rx_bytes > 0 && state.tx_bytes > 0);
    }
}

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
use super::counters::bump;
use super::dispatch::{MSG_COOKIE_REPLY, MSG_DATA, message_type, peer_for};
use super::peers::{Peer, PeerTable};
use super::tun::TunWriteBatch;
use super::udp::{RecvBatch, SendBatch};

/// Handshake answers, cookies and flushed queues per send batch (they are rare next to data).
const REPLY_SLOTS: usize = 64;

/// Smallest buffer boringtun may write a reply into (a handshake initiation is 148 bytes).
const MIN_REPLY_BUFFER: usize = 148;

struct Inbound {
    shared: Arc<Shared>,
    replies: SendBatch,
    to_tun: TunWriteBatch,
    max_segments: usize,
}

pub(crate) async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut recv = RecvBatch::new();
    let mut inbound = Inbound {
        replies: SendBatch::new(REPLY_SLOTS, shared.datagram_slot),
        to_tun: TunWriteBatch::new(shared.offload),
        max_segments: 1,
        shared,
    };
    loop {
        let received = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            received = inbound.shared.udp.recv(&mut recv) => received,
        };
        let slots = match received {
            Ok(slots) => slots,
            Err(e) => {
                // ICMP errors surface here as ECONNREFUSED and the like: not fatal for a UDP server socket.
                tracing::trace!(error = %e, "udp receive failed");
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
        if self.replies.is_empty() {
            return;
        }
        let failures = self.replies.flush(&self.shared.udp).await;
        if failures > 0 {
            self.shared
                .counters
                .udp_send_errors
                .fetch_add(failures, std::sync::atomic::Ordering::Relaxed);
        }
    }

    async fn handle(&mut self, table: &PeerTable, datagram: &[u8], source: SocketAddr, now: Instant) {
        if self.to_tun.is_full() {
            self.flush_tun().await;
        }
        if self.replies.needs_flush() {
            self.flush_replies().await;
        }
        let mut cookie = [0u8; MIN_REPLY_BUFFER];
        let verified = self
            .shared
            .rate_limiter
            .verify_packet(Some(source.ip()), datagram, &mut cookie);
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
        if self.decapsulate(table, peer, datagram, source, now) {
            self.flush_queue(peer, now).await;
        }
    }

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
        let counters = &self.shared.counters;
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

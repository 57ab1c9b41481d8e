//! The inbound tasks: UDP (and the relay) -> classify -> rate limiter -> dispatch to a peer -> decrypt -> inner source
//! check -> TUN.
//!
//! Owns: everything that happens to a datagram from the network. One socket carries three protocols, told apart by
//! their first bytes: disco (magic `MESHD!`: pings are answered with pongs, pongs confirm paths, see `path`), STUN
//! binding responses (handed to the waiting `Engine::stun` call), else WireGuard. The `relayed` task runs datagrams
//! from the relay client through the same per-datagram code with the relay as origin, so handshake answers to a
//! relayed initiation go back over the relay. Untrusted input: every step drops and counts,
//! nothing panics or stops the loop. The shared rate limiter sees the sender's address first, so a handshake flood
//! is answered with cookie replies (cheap) instead of DH work that would starve live tunnels. Dispatch is by receiver
//! index or, for initiations, by the static key inside (see `dispatch`), never by trying peers. One task on its own
//! thread and runtime (which alone waits for the socket): its buffers are reused; per datagram it takes only the
//! dispatched peer's mutex. Everything after the receive is synchronous (TUN writes and UDP sends do not wait).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, TryLockError};
use std::time::Instant;

use boringtun::noise::TunnResult;
use boringtun::noise::errors::WireGuardError;
use meshd_protocol::PublicKey;
use meshd_protocol::disco::{self, DiscoMessage};
use meshd_protocol::stun;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::counters::{Counters, bump};
use super::dispatch::{MSG_COOKIE_REPLY, MSG_DATA, message_type, peer_for};
use super::peers::{Destination, Origin, Peer, PeerTable};
use super::tun::TunWriteBatch;
use super::udp::{RECV_BATCH, RecvBatch, SendBatch};
use super::{RelayDatagram, Shared, relay_send};

/// Relayed datagrams handled per wakeup of the `relayed` task before its batches are flushed.
const RELAY_BATCH: usize = 64;

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

impl Inbound {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            replies: SendBatch::new(REPLY_SLOTS, shared.datagram_slot),
            to_tun: TunWriteBatch::new(shared.offload),
            max_segments: 1,
            cookie: [0; MIN_REPLY_BUFFER],
            shared,
        }
    }
}

/// The `relayed` task: datagrams the relay client received go through the same per-datagram code as UDP ones.
pub(crate) async fn run_relayed(
    shared: Arc<Shared>,
    mut from_relay: mpsc::Receiver<RelayDatagram>,
    cancel: CancellationToken,
) {
    let mut inbound = Inbound::new(shared);
    let mut batch = Vec::with_capacity(RELAY_BATCH);
    loop {
        let received = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            received = from_relay.recv_many(&mut batch, RELAY_BATCH) => received,
        };
        if received == 0 {
            // Every sender is gone: only happens while the engine shuts down.
            break;
        }
        let table = inbound.shared.table.load_full();
        inbound.max_segments = inbound.shared.udp.max_gso_segments();
        let now = Instant::now();
        for relayed in batch.drain(..) {
            inbound
                .shared
                .counters
                .relay_rx_bytes
                .fetch_add(relayed.datagram.len() as u64, Ordering::Relaxed);
            tracing::trace!(peer = ?relayed.peer, len = relayed.datagram.len(), "datagram from the relay");
            inbound.handle(&table, &relayed.datagram, Origin::Relay(relayed.peer), now);
        }
        inbound.flush_tun();
        inbound.flush_replies();
    }
}

/// The UDP inbound worker: the per-datagram state and the receive buffers. Shared (behind a mutex) by the inbound
/// thread, which takes it when the socket becomes readable, and the outbound thread, which right after sending a few
/// packets at rest keeps polling the socket through it for a moment (see `outbound::await_answer`): the answer then
/// finds a running thread instead of waking a sleeping one.
pub(crate) struct InboundWorker {
    inbound: Inbound,
    recv: RecvBatch,
}

impl InboundWorker {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            inbound: Inbound::new(shared),
            recv: RecvBatch::new(),
        }
    }

    /// Receives what the socket holds now (without waiting) and handles it; returns how many receive slots were
    /// filled (`WouldBlock` when nothing was queued).
    pub(crate) fn receive(&mut self) -> std::io::Result<usize> {
        let Self { inbound, recv } = self;
        let slots = inbound.shared.udp.try_recv(recv)?;
        let table = inbound.shared.table.load();
        inbound.max_segments = inbound.shared.udp.max_gso_segments();
        let now = Instant::now();
        for slot in 0..slots {
            let (source, datagrams) = recv.slot(slot);
            for datagram in datagrams {
                inbound.handle(&table, datagram, Origin::Udp(source), now);
            }
        }
        let wrote_to_tun = inbound.to_tun.has_pending();
        inbound.flush_tun();
        inbound.flush_replies();
        if wrote_to_tun {
            inbound.send_answers();
        }
        Ok(slots)
    }
}

/// The inbound loop; runs on the inbound thread's runtime (the socket's readiness is registered with it).
pub(crate) async fn run(shared: Arc<Shared>, worker: Arc<Mutex<InboundWorker>>, cancel: CancellationToken) {
    let udp = match shared.udp.reader() {
        Ok(udp) => udp,
        Err(e) => {
            tracing::error!(error = %e, "cannot wait for the UDP socket: no packets will reach this node");
            return;
        }
    };
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    let mut receive_errors = 0u32;
    loop {
        let ready = tokio::select! {
            biased;
            () = &mut cancelled => break,
            ready = udp.readable() => ready,
        };
        let mut ready = match ready {
            Ok(ready) => ready,
            Err(e) => {
                tracing::error!(error = %e, "cannot wait for the UDP socket: no packets will reach this node");
                return;
            }
        };
        let received = worker.lock().unwrap_or_else(PoisonError::into_inner).receive();
        match received {
            Ok(slots) => {
                receive_errors = 0;
                // `recvmmsg` on a non-blocking socket stops early only when the queue is empty: skip the receive
                // that would fail with EAGAIN and wait for the kernel's next readiness event (edge-triggered: a
                // datagram that arrived after this read has queued one already).
                if slots < RECV_BATCH {
                    ready.clear_ready();
                }
            }
            // The outbound thread took what woke us (see `InboundWorker`).
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => ready.clear_ready(),
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
            }
        }
    }
}

impl Inbound {
    /// Right after a TUN write, sends what the kernel answered within that write (an ICMP echo reply, TCP ACKs are
    /// queued on the device by the time the write returns), instead of leaving it to a wake-up of the outbound
    /// thread: one thread hand-over less per round trip. Never waits: if the outbound thread holds its worker (it is
    /// busy, so the answers go out with its next read anyway), this does nothing.
    fn send_answers(&self) {
        let mut outbound = match self.shared.outbound.try_lock() {
            Ok(outbound) => outbound,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        if let Err(e) = outbound.drain(&self.shared) {
            tracing::trace!(error = %e, "tun read after a write failed");
            bump(&self.shared.counters.malformed_tun_packets);
        }
    }

    fn flush_tun(&mut self) {
        if let Err(e) = self.to_tun.flush(&self.shared.tun) {
            tracing::trace!(error = %e, "tun write failed");
            bump(&self.shared.counters.tun_write_errors);
        }
    }

    fn flush_replies(&mut self) {
        if !self.replies.is_empty() {
            self.shared.send_batch(&mut self.replies);
        }
    }

    fn sinks(&mut self) -> Sinks<'_> {
        Sinks {
            to_tun: &mut self.to_tun,
            replies: &mut self.replies,
            counters: &self.shared.counters,
            max_segments: self.max_segments,
            relay_out: &self.shared.relay_out,
            our_public: PublicKey::from_bytes(*self.shared.public_key.as_bytes()),
        }
    }

    fn handle(&mut self, table: &PeerTable, datagram: &[u8], origin: Origin, now: Instant) {
        bump(&self.shared.counters.received_datagrams);
        if self.to_tun.is_full() {
            self.flush_tun();
        }
        if self.replies.needs_flush() {
            self.flush_replies();
        }
        // Classification: a WireGuard message starts with 1..4 (the disco magic with 'M'), so data pays one compare.
        if datagram.first() == Some(&disco::MAGIC[0]) && disco::is_disco(datagram) {
            return self.sinks().disco(table, datagram, origin, now);
        }
        if matches!(origin, Origin::Udp(_)) && stun::is_stun(datagram) && self.shared.take_stun_response(datagram) {
            return;
        }
        let verified = self
            .shared
            .rate_limiter
            .verify_packet(origin.ip(), datagram, &mut self.cookie);
        let counters = &self.shared.counters;
        let packet = match verified {
            Ok(packet) => packet,
            Err(TunnResult::WriteToNetwork(reply)) => {
                bump(&counters.cookie_replies_sent);
                match origin {
                    Origin::Udp(source) => self.replies.push_copy(reply, source, self.max_segments),
                    Origin::Relay(key) => {
                        relay_send(&self.shared.relay_out, counters, key, reply);
                    }
                }
                return;
            }
            Err(TunnResult::Err(WireGuardError::InvalidPacket)) => return bump(&counters.malformed_datagrams),
            Err(TunnResult::Err(WireGuardError::InvalidMac)) => return bump(&counters.bad_mac_datagrams),
            Err(_) => return bump(&counters.rejected_datagrams),
        };
        let Some(peer) = peer_for(table, &packet, &self.shared.private_key, &self.shared.public_key) else {
            return bump(&self.shared.counters.unknown_peer_datagrams);
        };
        if self.sinks().decapsulate(table, peer, datagram, origin, now) {
            self.flush_queue(peer, now);
        }
    }

    /// Repeats `decapsulate(None, &[])` until Done, sending what the Tunn had queued while it had no session.
    fn flush_queue(&mut self, peer: &Peer, now: Instant) {
        loop {
            if self.replies.needs_flush() {
                self.flush_replies();
            }
            let relay_connected = self.shared.relay_connected();
            let mut state = peer.lock();
            let mut sent_any = false;
            while !self.replies.needs_flush() {
                let TunnResult::WriteToNetwork(datagram) = state.tunn.decapsulate(None, &[], self.replies.tail())
                else {
                    return;
                };
                let len = datagram.len();
                match state.destination_for(datagram, now, relay_connected) {
                    Destination::Udp(endpoint) => {
                        state.note_sent(len, now);
                        self.replies.commit(len, endpoint, self.max_segments);
                    }
                    Destination::Relay => {
                        if self.shared.send_relay(peer.public_key, &self.replies.tail()[..len]) {
                            state.note_sent_relayed(len, now);
                        }
                    }
                    Destination::Unknown => bump(&self.shared.counters.no_endpoint_packets),
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

/// Sends a reply where a datagram came from: UDP to its source, or back over the relay to `peer`. True if sent.
fn send_reply(sinks: SinkParts<'_>, reply: &[u8], origin: Origin, peer: PublicKey) -> bool {
    match origin {
        Origin::Udp(source) => {
            sinks.replies.push_copy(reply, source, sinks.max_segments);
            true
        }
        Origin::Relay(_) => relay_send(sinks.relay_out, sinks.counters, peer, reply),
    }
}

/// The reply half of [`Sinks`], borrowed apart from the TUN batch (which may hold the datagram being answered).
struct SinkParts<'a> {
    replies: &'a mut SendBatch,
    relay_out: &'a mpsc::Sender<RelayDatagram>,
    counters: &'a Counters,
    max_segments: usize,
}

/// Where decrypted packets and replies go: the inbound task's batches, borrowed for one datagram. Kept apart from
/// the task (which owns the sockets) so the per-datagram decisions can be tested with two `Tunn`s in memory.
struct Sinks<'a> {
    to_tun: &'a mut TunWriteBatch,
    replies: &'a mut SendBatch,
    counters: &'a Counters,
    max_segments: usize,
    relay_out: &'a mpsc::Sender<RelayDatagram>,
    our_public: PublicKey,
}

impl Sinks<'_> {
    /// An authenticated disco message: a ping (over UDP) is answered with a pong to its source and makes the source a
    /// candidate; a pong confirms a path; a CallMeMaybe (over the relay) starts a burst. Device peers, unknown keys,
    /// failed authentication and a relay tag that is not the sender are dropped and counted.
    fn disco(&mut self, table: &PeerTable, datagram: &[u8], origin: Origin, now: Instant) {
        let Some(sender) = disco::peek_sender(datagram) else {
            return bump(&self.counters.rejected_disco);
        };
        let Some(peer) = table.by_key(&sender) else {
            return bump(&self.counters.rejected_disco);
        };
        if matches!(origin, Origin::Relay(tag) if tag != sender) {
            return bump(&self.counters.rejected_disco);
        }
        let mut state = peer.lock();
        let Some(agent) = state.agent.as_mut() else {
            return bump(&self.counters.rejected_disco);
        };
        let message = match agent.disco.open(datagram, &self.our_public) {
            Ok(message) => message,
            Err(e) => {
                tracing::trace!(peer = ?sender, error = %e, "disco rejected");
                return bump(&self.counters.rejected_disco);
            }
        };
        tracing::trace!(peer = ?sender, ?origin, ?message, "disco");
        match (message, origin) {
            (DiscoMessage::Ping { tx }, Origin::Udp(source)) => {
                if agent.path.on_ping(source, now) {
                    tracing::debug!(peer = ?sender, %source, "peer-reflexive candidate");
                }
                let pong = DiscoMessage::Pong { tx, observed: source };
                match agent
                    .disco
                    .seal_into(&pong, &self.our_public, &sender, rand::random(), self.replies.tail())
                {
                    Ok(len) => self.replies.commit(len, source, self.max_segments),
                    Err(e) => tracing::debug!(error = %e, "cannot seal a pong"),
                }
            }
            (DiscoMessage::Pong { tx, .. }, Origin::Udp(source)) => {
                if let Some(change) = agent.path.on_pong(tx, source, now) {
                    tracing::debug!(peer = ?sender, addr = %change.addr, rtt = ?change.rtt, "better direct path");
                }
            }
            (DiscoMessage::CallMeMaybe { endpoints }, Origin::Relay(_)) => {
                tracing::debug!(peer = ?sender, ?endpoints, "call-me-maybe");
                agent.path.on_call_me_maybe(&endpoints, now);
            }
            // Pings and pongs probe UDP paths only; a CallMeMaybe must come through the relay (which authenticated
            // the sender's connection): anything else is ignored.
            _ => {}
        }
    }

    /// Decrypts one datagram for `peer`. Returns true when boringtun answered on the network, which means packets
    /// queued during the handshake may now be sent.
    fn decapsulate(&mut self, table: &PeerTable, peer: &Peer, datagram: &[u8], origin: Origin, now: Instant) -> bool {
        let counters = self.counters;
        let mut state = peer.lock();
        let slot = self.to_tun.slot(datagram.len().max(MIN_REPLY_BUFFER));
        match state.tunn.decapsulate(origin.ip(), datagram, slot) {
            TunnResult::WriteToTunnelV4(packet, inner_source) => {
                let len = packet.len();
                state.note_authenticated(datagram.len(), origin, now);
                state.note_traffic(now);
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
                state.note_authenticated(datagram.len(), origin, now);
                bump(&counters.spoofed_source_packets);
                false
            }
            TunnResult::WriteToNetwork(reply) => {
                if message_type(reply) == MSG_COOKIE_REPLY {
                    // The limiter inside decapsulate went under load between our check and its own.
                    bump(&counters.cookie_replies_sent);
                    send_reply(
                        SinkParts {
                            replies: self.replies,
                            relay_out: self.relay_out,
                            counters,
                            max_segments: self.max_segments,
                        },
                        reply,
                        origin,
                        peer.public_key,
                    );
                    return false;
                }
                // A handshake answer (or the keepalive that completes one): authenticated, answer where it came from
                // (a relayed initiation is answered over the relay).
                let len = reply.len();
                let parts = SinkParts {
                    replies: self.replies,
                    relay_out: self.relay_out,
                    counters,
                    max_segments: self.max_segments,
                };
                if send_reply(parts, reply, origin, peer.public_key) {
                    if matches!(origin, Origin::Relay(_)) {
                        state.note_sent_relayed(len, now);
                    } else {
                        state.note_sent(len, now);
                    }
                }
                state.note_authenticated(datagram.len(), origin, now);
                true
            }
            TunnResult::Done => {
                // A keepalive (authenticated data with no payload) or a cookie reply taken in.
                if message_type(datagram) == MSG_DATA {
                    state.note_authenticated(datagram.len(), origin, now);
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
    use std::net::SocketAddr;
    use std::sync::Arc;

    use boringtun::noise::Tunn;
    use boringtun::noise::rate_limiter::RateLimiter;
    use boringtun::x25519;
    use meshd_protocol::NodeKind;
    use meshd_protocol::disco::TxId;

    use super::super::PeerConfig;
    use super::super::path::{PollOutput, Route};
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
            kind: NodeKind::Device,
            preshared_key: None,
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
        let (relay_out, _relay_rx) = mpsc::channel(8);
        let now = Instant::now();
        let home: SocketAddr = "198.18.0.2:51820".parse().expect("addr");
        let roamed: SocketAddr = "198.18.0.3:40000".parse().expect("addr");
        let mut sinks = Sinks {
            to_tun: &mut to_tun,
            replies: &mut replies,
            counters: &counters,
            max_segments: 64,
            relay_out: &relay_out,
            our_public: PublicKey::from_bytes(*me_public.as_bytes()),
        };
        let home_origin = Origin::Udp(home);
        let roamed_origin = Origin::Udp(roamed);

        // The remote has a packet for us: it initiates; we answer to where the initiation came from.
        let first = ipv4([10, 77, 0, 2], [10, 77, 0, 1]);
        let init = encapsulate(&mut remote_tunn, &first);
        assert!(
            sinks.decapsulate(&table, peer, &init, home_origin, now),
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
        assert!(!sinks.decapsulate(&table, peer, &keepalive, home_origin, now));
        assert!(!sinks.decapsulate(&table, peer, &queued, home_origin, now));
        assert_eq!(sinks.to_tun.pending(), vec![&first[..]]);

        // Roaming: an authenticated packet from a new address moves the endpoint.
        let second = ipv4([10, 77, 0, 2], [10, 77, 0, 1]);
        let datagram = encapsulate(&mut remote_tunn, &second);
        sinks.decapsulate(&table, peer, &datagram, roamed_origin, now);
        assert_eq!(peer.lock().endpoint.current(), Some(roamed));
        assert_eq!(sinks.to_tun.pending().len(), 2);

        // The remote claims another peer's address as inner source: dropped and counted, endpoint kept.
        let spoofed = encapsulate(&mut remote_tunn, &ipv4([10, 77, 0, 3], [10, 77, 0, 1]));
        sinks.decapsulate(&table, peer, &spoofed, roamed_origin, now);
        assert_eq!(counters.snapshot(0).spoofed_source_packets, 1);
        assert_eq!(sinks.to_tun.pending().len(), 2);

        // A tampered datagram is rejected and does not move the endpoint.
        let mut tampered = encapsulate(&mut remote_tunn, &ipv4([10, 77, 0, 2], [10, 77, 0, 1]));
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let stranger = Origin::Udp("198.18.0.66:1".parse().expect("addr"));
        sinks.decapsulate(&table, peer, &tampered, stranger, now);
        assert_eq!(counters.snapshot(0).rejected_datagrams, 1);
        assert_eq!(peer.lock().endpoint.current(), Some(roamed));
        assert_eq!(sinks.to_tun.pending().len(), 2);
        let state = peer.lock();
        assert!(state.rx_bytes > 0 && state.tx_bytes > 0);
    }

    struct Node {
        key: PublicKey,
        table: PeerTable,
    }

    /// A node whose peer table holds `peers` (key, kind, allowed /32, map endpoints).
    fn node(secret: x25519::StaticSecret, peers: &[(PublicKey, NodeKind, &str, Vec<SocketAddr>)]) -> Node {
        let public = x25519::PublicKey::from(&secret);
        let key = PublicKey::from_bytes(*public.as_bytes());
        let limiter = Arc::new(RateLimiter::new(&public, 100));
        let mut next_index = 1;
        let mut factory = TunnFactory {
            private_key: &secret,
            public_key: key,
            rate_limiter: &limiter,
            next_index: &mut next_index,
        };
        let configs = peers
            .iter()
            .map(|(peer, kind, ip, endpoints)| PeerConfig {
                public_key: *peer,
                name: ip.to_string(),
                allowed_ips: vec![ip.parse().expect("net")],
                endpoints: endpoints.clone(),
                persistent_keepalive: None,
                kind: *kind,
                preshared_key: None,
            })
            .collect();
        let (table, _) = build_table(&PeerTable::default(), configs, &mut factory);
        Node { key, table }
    }

    fn new_secret() -> (x25519::StaticSecret, PublicKey) {
        let secret = x25519::StaticSecret::random();
        let key = PublicKey::from_bytes(*x25519::PublicKey::from(&secret).as_bytes());
        (secret, key)
    }

    /// Batches for one side of an in-memory exchange.
    struct Side {
        counters: Counters,
        to_tun: TunWriteBatch,
        replies: SendBatch,
        relay_out: mpsc::Sender<RelayDatagram>,
        relay_rx: mpsc::Receiver<RelayDatagram>,
    }

    impl Side {
        fn new() -> Self {
            let (relay_out, relay_rx) = mpsc::channel(16);
            Self {
                counters: Counters::default(),
                to_tun: TunWriteBatch::new(false),
                replies: SendBatch::new(16, 1500),
                relay_out,
                relay_rx,
            }
        }

        fn sinks(&mut self, key: PublicKey) -> Sinks<'_> {
            Sinks {
                to_tun: &mut self.to_tun,
                replies: &mut self.replies,
                counters: &self.counters,
                max_segments: 64,
                relay_out: &self.relay_out,
                our_public: key,
            }
        }
    }

    /// What the timer task does for one agent peer: poll its path and seal the pings it asks for.
    fn pings_from(node: &Node, peer: &PublicKey, now: Instant, relay: bool) -> (Vec<(SocketAddr, Vec<u8>)>, bool) {
        let entry = node.table.by_key(peer).expect("peer");
        let mut state = entry.lock();
        let agent = state.agent.as_mut().expect("agent peer");
        let mut out = PollOutput::default();
        agent.path.poll(now, relay, &mut out);
        let mut sealed = Vec::new();
        for &to in &out.pings {
            let tx = TxId(rand::random());
            let datagram = agent
                .disco
                .seal(&DiscoMessage::Ping { tx }, &node.key, peer, rand::random());
            agent.path.ping_sent(tx, to, now);
            sealed.push((to, datagram));
        }
        (sealed, out.call_me_maybe)
    }

    fn route(node: &Node, peer: &PublicKey, now: Instant, relay: bool) -> Route {
        let entry = node.table.by_key(peer).expect("peer");
        let state = entry.lock();
        state.agent.as_ref().expect("agent").path.route(now, relay)
    }

    /// Two agents' disco in memory: A pings B's map endpoint, B answers with a pong to the ping's source and learns
    /// A's address (peer-reflexive); A's pong confirms the direct path, which then wins over the relay. Forged,
    /// reflected, tampered and misrouted disco is rejected.
    #[test]
    fn disco_ping_pong_between_two_agents_confirms_a_direct_path() {
        let (a_secret, a_key) = new_secret();
        let (b_secret, b_key) = new_secret();
        let (_, device_key) = new_secret();
        let a_addr: SocketAddr = "198.18.1.10:40001".parse().expect("addr");
        let b_addr: SocketAddr = "198.18.2.20:51820".parse().expect("addr");
        let a = node(
            a_secret,
            &[
                (b_key, NodeKind::Agent, "10.77.0.2/32", vec![b_addr]),
                (device_key, NodeKind::Device, "10.77.0.9/32", vec![]),
            ],
        );
        let b = node(b_secret, &[(a_key, NodeKind::Agent, "10.77.0.1/32", vec![])]);
        let (mut side_a, mut side_b) = (Side::new(), Side::new());
        let t0 = Instant::now();
        assert_eq!(
            route(&a, &b_key, t0, true),
            Route::Relay,
            "unconfirmed: the relay first"
        );

        let (pings, call_me_maybe) = pings_from(&a, &b_key, t0, true);
        assert!(
            call_me_maybe,
            "a new peer's first burst asks for a call back over the relay"
        );
        let (to, ping) = pings.into_iter().next().expect("a ping to B's map endpoint");
        assert_eq!(to, b_addr);

        // B receives the ping from A's NAT-mapped address.
        side_b.sinks(b.key).disco(&b.table, &ping, Origin::Udp(a_addr), t0);
        let pongs = side_b.replies.take_datagrams();
        assert_eq!(pongs.len(), 1);
        assert_eq!(pongs[0].0, a_addr, "the pong goes back to the ping's source");
        let (b_pings, _) = pings_from(&b, &a_key, t0, true);
        assert!(
            b_pings.iter().any(|(to, _)| *to == a_addr),
            "B learned A's address from the ping and probes it"
        );

        // A receives the pong from B's address: the direct path is confirmed and beats the relay.
        let t1 = t0 + std::time::Duration::from_millis(3);
        side_a
            .sinks(a.key)
            .disco(&a.table, &pongs[0].1, Origin::Udp(b_addr), t1);
        assert_eq!(route(&a, &b_key, t1, true), Route::Direct(b_addr));
        {
            let entry = a.table.by_key(&b_key).expect("b");
            let state = entry.lock();
            assert_eq!(state.agent.as_ref().expect("agent").path.latency(), Some(t1 - t0));
        }
        assert_eq!(side_a.counters.snapshot(0).rejected_disco, 0);

        // The same pong replayed from another address does not confirm that address.
        let elsewhere: SocketAddr = "198.18.9.9:9".parse().expect("addr");
        side_a
            .sinks(a.key)
            .disco(&a.table, &pongs[0].1, Origin::Udp(elsewhere), t1);
        assert_eq!(route(&a, &b_key, t1, true), Route::Direct(b_addr));

        // A's own ping reflected back to A: the sender is A itself, not a peer.
        side_a.sinks(a.key).disco(&a.table, &ping, Origin::Udp(b_addr), t1);
        assert_eq!(side_a.counters.snapshot(0).rejected_disco, 1);
        // Tampered.
        let mut tampered = pongs[0].1.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 0x80;
        side_a.sinks(a.key).disco(&a.table, &tampered, Origin::Udp(b_addr), t1);
        assert_eq!(side_a.counters.snapshot(0).rejected_disco, 2);
        // A relay datagram whose tag is not its sender.
        side_a
            .sinks(a.key)
            .disco(&a.table, &pongs[0].1, Origin::Relay(device_key), t1);
        assert_eq!(side_a.counters.snapshot(0).rejected_disco, 3);
        // Disco claiming to come from a device peer (devices never speak disco).
        let forged = meshd_protocol::disco::DiscoKey::from_shared_secret([0; 32]).seal(
            &DiscoMessage::Ping { tx: TxId([1; 12]) },
            &device_key,
            &a.key,
            [0; 24],
        );
        side_a.sinks(a.key).disco(&a.table, &forged, Origin::Udp(elsewhere), t1);
        assert_eq!(side_a.counters.snapshot(0).rejected_disco, 4);
        assert!(side_a.replies.is_empty(), "nothing rejected is answered");
    }

    /// A CallMeMaybe counts only through the relay, and makes the receiver ping its endpoints at once.
    #[test]
    fn call_me_maybe_over_the_relay_starts_a_burst_to_its_endpoints() {
        let (a_secret, a_key) = new_secret();
        let (b_secret, b_key) = new_secret();
        let a = node(a_secret, &[(b_key, NodeKind::Agent, "10.77.0.2/32", vec![])]);
        let b = node(b_secret, &[(a_key, NodeKind::Agent, "10.77.0.1/32", vec![])]);
        let t0 = Instant::now();
        // Both first bursts have no candidates to ping.
        let _ = pings_from(&a, &b_key, t0, true);
        let _ = pings_from(&b, &a_key, t0, true);
        let a_endpoint: SocketAddr = "198.18.1.10:40001".parse().expect("addr");
        let call = {
            let entry = a.table.by_key(&b_key).expect("b");
            let state = entry.lock();
            state.agent.as_ref().expect("agent").disco.seal(
                &DiscoMessage::CallMeMaybe {
                    endpoints: vec![a_endpoint],
                },
                &a.key,
                &b_key,
                [7; 24],
            )
        };
        let mut side_b = Side::new();
        let t1 = t0 + std::time::Duration::from_millis(100);
        // Over UDP it is ignored.
        side_b.sinks(b.key).disco(&b.table, &call, Origin::Udp(a_endpoint), t1);
        assert!(pings_from(&b, &a_key, t1, true).0.is_empty());
        // Over the relay, tagged with A's key: B pings A's endpoint now.
        side_b.sinks(b.key).disco(&b.table, &call, Origin::Relay(a_key), t1);
        let (pings, call_back) = pings_from(&b, &a_key, t1, true);
        assert_eq!(pings.iter().map(|p| p.0).collect::<Vec<_>>(), vec![a_endpoint]);
        assert!(!call_back, "no CallMeMaybe echo");
        assert!(side_b.relay_rx.try_recv().is_err());
    }

    /// A handshake that arrives through the relay is answered through the relay (tagged with the peer's key), and
    /// relayed data reaches the TUN without making a direct path.
    #[test]
    fn relayed_handshake_is_answered_over_the_relay() {
        let (me_secret, me_key) = new_secret();
        let (remote_secret, remote_key) = new_secret();
        let me_public = x25519::PublicKey::from(&me_secret);
        let me = node(me_secret, &[(remote_key, NodeKind::Agent, "10.77.0.2/32", vec![])]);
        let mut remote_tunn = Tunn::new(remote_secret, me_public, None, None, 5, None);
        let peer = me.table.by_key(&remote_key).expect("remote");
        let mut side = Side::new();
        let now = Instant::now();

        let first = ipv4([10, 77, 0, 2], [10, 77, 0, 1]);
        let init = encapsulate(&mut remote_tunn, &first);
        assert!(
            side.sinks(me_key)
                .decapsulate(&me.table, peer, &init, Origin::Relay(remote_key), now)
        );
        assert!(side.replies.is_empty(), "no UDP answer to a relayed initiation");
        let response = side.relay_rx.try_recv().expect("the response went to the relay");
        assert_eq!(response.peer, remote_key);
        assert_eq!(response.datagram.len(), 92);
        assert_eq!(side.counters.snapshot(0).relay_tx_bytes, 92);

        let mut buf = vec![0u8; 2048];
        let keepalive = match remote_tunn.decapsulate(None, &response.datagram, &mut buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("expected a keepalive, got {other:?}"),
        };
        let queued = match remote_tunn.decapsulate(None, &[], &mut buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("expected the queued packet, got {other:?}"),
        };
        for datagram in [&keepalive, &queued] {
            side.sinks(me_key)
                .decapsulate(&me.table, peer, datagram, Origin::Relay(remote_key), now);
        }
        assert_eq!(side.to_tun.pending(), vec![&first[..]]);
        let state = peer.lock();
        assert!(state.relay_rx_bytes > 0 && state.relay_tx_bytes == 92);
        assert_eq!(
            state.agent.as_ref().expect("agent").path.route(now, true),
            Route::Relay,
            "relayed WireGuard does not make a direct path"
        );
    }
}

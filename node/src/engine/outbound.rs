//! The outbound task: TUN device -> encrypt -> UDP.
//!
//! Owns: reading batches from the device, routing each packet by destination overlay address, encrypting it with its
//! peer's `Tunn`, and sending the batch with GSO. One task on its own thread and runtime (which alone waits for the
//! device), so its buffers are reused without locking; per packet it takes only the destination peer's mutex, for one
//! `encapsulate`. The peer table is loaded once per batch. Where the datagram goes is the peer's send rule
//! (`PeerState::destination_for`): UDP into the batch, or (agent peers without a trusted direct path) a copy to the
//! relay client's queue.

use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::TunnResult;
use tokio_util::sync::CancellationToken;

use super::counters::bump;
use super::dispatch::{TunDrop, tun_destination};
use super::peers::{Destination, PeerTable};
use super::tun::{MAX_IP_PACKET, TUN_BATCH, TUN_OFFSET, TunReader};
use super::udp::SendBatch;
use super::{DATA_OVERHEAD, Shared};

/// Consecutive read errors after which the task backs off briefly instead of spinning (device gone or broken).
const READ_ERROR_BACKOFF_AFTER: u32 = 100;

/// The outbound loop; runs on the outbound thread's runtime (the device's readiness is registered with it).
pub(crate) async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let tun = match TunReader::new(&shared.tun) {
        Ok(tun) => tun,
        Err(e) => {
            tracing::error!(error = %e, "cannot wait for the TUN device: no packets will leave this node");
            return;
        }
    };
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    // With offload the device hands us up to 64 KiB at once in `original`, split into MTU-sized `bufs`.
    let mut original = vec![0u8; TUN_OFFSET + MAX_IP_PACKET];
    let mut bufs: Vec<Vec<u8>> = (0..TUN_BATCH)
        .map(|_| vec![0u8; TUN_OFFSET + shared.max_packet])
        .collect();
    let mut sizes = vec![0usize; TUN_BATCH];
    let mut batch = SendBatch::new(TUN_BATCH, shared.datagram_slot);
    let mut read_errors = 0u32;
    loop {
        let received = tokio::select! {
            biased;
            () = &mut cancelled => break,
            received = tun.recv_multiple(&mut original, &mut bufs, &mut sizes, TUN_OFFSET) => received,
        };
        let count = match received {
            Ok(count) => {
                read_errors = 0;
                count
            }
            Err(e) => {
                // With offload, a super-packet that cannot be split is an error for that read only.
                bump(&shared.counters.malformed_tun_packets);
                read_errors += 1;
                if read_errors >= READ_ERROR_BACKOFF_AFTER {
                    tracing::error!(error = %e, "reading from the TUN device keeps failing");
                    read_errors = 0;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        let table = shared.table.load_full();
        let now = Instant::now();
        let max_segments = shared.udp.max_gso_segments();
        // Encrypt this read, then drain whatever else the device already holds (without waiting) before sending:
        // without TSO every read is one packet, and draining lets them leave as one GSO send instead of one
        // syscall each. Bounded so one busy flow cannot hold the batch (and its latency) open for long.
        let mut count = count;
        let mut packets = 0;
        loop {
            for (buf, &size) in bufs.iter().zip(&sizes).take(count) {
                if batch.needs_flush() {
                    shared.send_batch(&mut batch);
                }
                let Some(packet) = buf.get(TUN_OFFSET..TUN_OFFSET + size) else {
                    bump(&shared.counters.malformed_tun_packets);
                    continue;
                };
                encapsulate_one(&shared, &table, packet, &mut batch, now, max_segments);
            }
            packets += count;
            if packets >= TUN_BATCH {
                break;
            }
            count = match tun.try_recv_multiple(&mut original, &mut bufs, &mut sizes, TUN_OFFSET) {
                Ok(count) => count,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    bump(&shared.counters.malformed_tun_packets);
                    break;
                }
            };
        }
        shared.send_batch(&mut batch);
    }
}

fn encapsulate_one(
    shared: &Shared,
    table: &PeerTable,
    packet: &[u8],
    batch: &mut SendBatch,
    now: Instant,
    max_segments: usize,
) {
    let destination = match tun_destination(packet) {
        Ok(destination) => destination,
        Err(TunDrop::NotIpv4) => return bump(&shared.counters.non_ipv4_tun_packets),
        Err(TunDrop::Malformed) => return bump(&shared.counters.malformed_tun_packets),
    };
    // boringtun panics if the output buffer is smaller than the packet plus its overhead.
    if packet.len() + DATA_OVERHEAD > shared.datagram_slot {
        return bump(&shared.counters.malformed_tun_packets);
    }
    let Some(peer) = table.route(destination) else {
        return bump(&shared.counters.no_route_packets);
    };
    let mut state = peer.lock();
    state.note_traffic(now);
    match state.tunn.encapsulate(packet, batch.tail()) {
        TunnResult::WriteToNetwork(datagram) => {
            let len = datagram.len();
            match state.destination_for(datagram, now, shared.relay_connected()) {
                Destination::Udp(endpoint) => {
                    state.note_sent(len, now);
                    drop(state);
                    batch.commit(len, endpoint, max_segments);
                }
                // The fallback path: one copy into the relay queue (the direct path above stays copy-free).
                Destination::Relay => {
                    if shared.send_relay(peer.public_key, &batch.tail()[..len]) {
                        state.note_sent_relayed(len, now);
                    }
                }
                Destination::Unknown => bump(&shared.counters.no_endpoint_packets),
            }
        }
        // Queued inside the Tunn until the handshake completes.
        TunnResult::Done => {}
        TunnResult::Err(e) => tracing::trace!(peer = ?peer.public_key, error = ?e, "encapsulate failed"),
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
    }
}

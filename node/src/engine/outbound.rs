//! The outbound thread: TUN device -> encrypt -> UDP.
//!
//! Owns: reading batches from the device, routing each packet by destination overlay address, encrypting it with its
//! peer's `Tunn`, and sending the batch with GSO. One thread with its own runtime waits for the device; its buffers
//! ([`Outbound`]) are reused, and also serve the inbound thread's drain right after a TUN write (see there); per
//! packet it takes only the destination peer's mutex, for one `encapsulate`. The peer table is loaded once per batch. Where the datagram goes is the peer's send rule
//! (`PeerState::destination_for`): UDP into the batch, or (agent peers without a trusted direct path) a copy to the
//! relay client's queue.

use std::sync::{Arc, Mutex, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;
use tokio_util::sync::CancellationToken;

use super::counters::bump;
use super::dispatch::{TunDrop, tun_destination};
use super::inbound::InboundWorker;
use super::peers::{Destination, PeerTable};
use super::tun::{MAX_IP_PACKET, TUN_BATCH, TUN_OFFSET, TunReader};
use super::udp::SendBatch;
use super::{DATA_OVERHEAD, Shared};

/// Consecutive read errors after which the thread backs off briefly instead of spinning (device gone or broken).
const READ_ERROR_BACKOFF_AFTER: u32 = 100;

/// The outbound worker: its buffers, and draining the device through them. It sits behind a mutex in `Shared`:
/// the outbound thread takes it when the device becomes readable, and the inbound thread takes it (`try_lock`, never
/// waiting) right after it wrote packets to the device, because the kernel answers many of them within that very
/// write (an ICMP echo reply, a TCP ACK): sending the answer on the spot saves the wake-up of the outbound thread, a
/// whole thread hand-over on the round trip. The mutex also keeps the two from reading the device at once, so
/// packets leave in the order the device gave them.
pub(crate) struct Outbound {
    /// With offload the device hands us up to 64 KiB at once here, split into MTU-sized `bufs`.
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    batch: SendBatch,
}

/// What a [`Outbound::drain`] left behind.
pub(crate) enum Drained {
    /// The device said `WouldBlock` after this many packets: nothing is queued any more.
    Empty(usize),
    /// The batch filled up; the device may hold more.
    Full,
}

impl Outbound {
    pub(crate) fn new(max_packet: usize, datagram_slot: usize) -> Self {
        Self {
            original: vec![0u8; TUN_OFFSET + MAX_IP_PACKET],
            bufs: (0..TUN_BATCH).map(|_| vec![0u8; TUN_OFFSET + max_packet]).collect(),
            sizes: vec![0usize; TUN_BATCH],
            batch: SendBatch::new(TUN_BATCH, datagram_slot),
        }
    }

    /// Reads what the device holds now, without waiting, encrypts it and sends it. Reads until the device is empty or
    /// [`TUN_BATCH`] packets were read: without TSO every read is one packet, and draining lets them leave as one GSO
    /// send instead of one syscall each; the bound keeps one busy flow from holding the batch (and its latency) open.
    /// An error is a failed read (with offload: a super-packet that cannot be split); what was read before it is sent.
    pub(crate) fn drain(&mut self, shared: &Shared) -> std::io::Result<Drained> {
        let Self {
            original,
            bufs,
            sizes,
            batch,
        } = self;
        let table = shared.table.load();
        let now = Instant::now();
        let max_segments = shared.udp.max_gso_segments();
        let mut packets = 0;
        let result = loop {
            let count = match shared.tun.recv_multiple(original, bufs, sizes, TUN_OFFSET) {
                Ok(count) => count,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(Drained::Empty(packets)),
                Err(e) => break Err(e),
            };
            for (buf, &size) in bufs.iter().zip(sizes.iter()).take(count) {
                if batch.needs_flush() {
                    shared.send_batch(batch);
                }
                let Some(packet) = buf.get(TUN_OFFSET..TUN_OFFSET + size) else {
                    bump(&shared.counters.malformed_tun_packets);
                    continue;
                };
                encapsulate_one(shared, &table, packet, batch, now, max_segments);
            }
            packets += count;
            if packets >= TUN_BATCH {
                break Ok(Drained::Full);
            }
        };
        shared.send_batch(batch);
        result
    }
}

/// A send of at most this many packets is traffic at rest (a ping, a request), whose answer is worth waiting for
/// (see [`AnswerWait`]); a longer one is a stream, whose acknowledgements the inbound thread handles.
const AT_REST_PACKETS: usize = 4;

/// How long the outbound thread polls for an answer after a send at rest. A wake-up of a sleeping thread costs
/// 40-150 us on a virtual machine whose idle CPUs halt (measured with `perf sched timehist`: most of a 0.3 ms tunnel
/// round trip was such wake-ups), while a datagram's way through the peer's engine and back takes 0.1-0.25 ms.
const ANSWER_WAIT: Duration = Duration::from_micros(300);

/// After a wait that saw no answer (one-way traffic), no new wait for this long: polling then costs at most
/// `ANSWER_WAIT` per `ANSWER_BACKOFF` (3% of a core), and an idle agent nothing.
const ANSWER_BACKOFF: Duration = Duration::from_millis(10);

/// The outbound thread's brief poll for an answer after a send at rest: it keeps running and receives through the
/// inbound worker (never waiting for it: if the inbound thread holds it, that thread is awake and handles the
/// answer), yielding the CPU between polls so that any other runnable thread (the peer's engine in a lab, the
/// application) goes first. Ends at the first datagram received or after [`ANSWER_WAIT`].
#[derive(Default)]
struct AnswerWait {
    /// When the last wait that saw no answer ended.
    fruitless: Option<Instant>,
}

impl AnswerWait {
    fn wait(&mut self, inbound: &Mutex<InboundWorker>) {
        let start = Instant::now();
        if self
            .fruitless
            .is_some_and(|at| start.duration_since(at) < ANSWER_BACKOFF)
        {
            return;
        }
        loop {
            let received = match inbound.try_lock() {
                Ok(mut worker) => worker.receive(),
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner().receive(),
                Err(TryLockError::WouldBlock) => return,
            };
            match received {
                Ok(slots) if slots > 0 => return,
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => return,
                _ => {}
            }
            if start.elapsed() >= ANSWER_WAIT {
                self.fruitless = Some(Instant::now());
                return;
            }
            std::thread::yield_now();
        }
    }
}

/// The outbound loop; runs on the outbound thread's runtime (the device's readiness is registered with it).
pub(crate) async fn run(shared: Arc<Shared>, inbound: Arc<Mutex<InboundWorker>>, cancel: CancellationToken) {
    let tun = match TunReader::new(&shared.tun) {
        Ok(tun) => tun,
        Err(e) => {
            tracing::error!(error = %e, "cannot wait for the TUN device: no packets will leave this node");
            return;
        }
    };
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    let mut read_errors = 0u32;
    let mut answers = AnswerWait::default();
    loop {
        let ready = tokio::select! {
            biased;
            () = &mut cancelled => break,
            ready = tun.readable() => ready,
        };
        let mut ready = match ready {
            Ok(ready) => ready,
            Err(e) => {
                tracing::error!(error = %e, "cannot wait for the TUN device: no packets will leave this node");
                return;
            }
        };
        let drained = shared
            .outbound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(&shared);
        match drained {
            Ok(Drained::Empty(packets)) => {
                read_errors = 0;
                // Sleep until the kernel queues more (the inbound thread may have emptied the device before us).
                ready.clear_ready();
                if (1..=AT_REST_PACKETS).contains(&packets) {
                    answers.wait(&inbound);
                }
            }
            Ok(Drained::Full) => read_errors = 0,
            Err(e) => {
                bump(&shared.counters.malformed_tun_packets);
                read_errors += 1;
                if read_errors >= READ_ERROR_BACKOFF_AFTER {
                    tracing::error!(error = %e, "reading from the TUN device keeps failing");
                    read_errors = 0;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
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

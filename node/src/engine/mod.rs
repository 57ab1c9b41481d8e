//! The data plane: one TUN device, one UDP socket, one `boringtun::noise::Tunn` per peer, and the path each peer's
//! datagrams take (direct UDP or the coordinator's relay).
//!
//! Owns: moving packets between the TUN device and the UDP socket (or the relay client's queues), WireGuard handshakes
//! and timers, dispatching incoming datagrams to peers by receiver index, path selection (classic roaming for device
//! peers; disco probes for agent peers, see `path`), STUN requests on the WireGuard socket, per-peer counters. Knows
//! nothing of HTTP, the coordinator or the network map: it is configured declaratively through [`Engine::reconfigure`]
//! with the full desired peer list, and the relay client talks to it only through the two [`RelayDatagram`] queues
//! ([`Engine::take_relay_outbound`], [`Engine::relay_inbound`]) and [`Engine::set_relay_connected`].
//!
//! INTERFACE CONTRACT (shared by `agent.rs`/`daemon.rs`/`ctl`/`relay.rs`/`netcheck.rs`): the signatures below are what
//! the rest of the agent calls (design section 5).
//!
//! # Layout
//! - `peers`: the immutable peer table (routes, index and key maps) and building the next one on reconfigure; each
//!   peer's state says where its datagrams go (`PeerState::destination_for`).
//! - `endpoint`: a device peer's address (roaming, candidate rotation). Pure.
//! - `path`: an agent peer's path: candidates, probe bursts, pongs, RTT, trust, heartbeats, hysteresis, LAN bonus and
//!   the send rule (trusted direct address, else relay, else best known address). Pure, driven by an explicit clock.
//! - `dispatch`: per-packet decisions (TUN header checks, receiver-index / static-key dispatch). Pure.
//! - `outbound`: task TUN -> encrypt -> UDP (or relay queue). `inbound`: task UDP -> classify (disco / STUN /
//!   WireGuard) -> decrypt -> TUN, and the `relayed` task that runs relay datagrams through the same code.
//!   `timers`: task for WireGuard timers, persistent keepalive, the rate limiter's clock, and disco probes
//!   (bursts, heartbeats, CallMeMaybe over the relay, path-change log lines).
//! - `tun`, `udp`: the two devices and their batch buffers (TUN offload, recvmmsg + GRO, GSO sends).
//! - `counters`: what was dropped and why, relayed bytes.
//!
//! # Concurrency
//! Outbound and inbound (UDP) each run on a dedicated thread with its own single-threaded tokio runtime; the timer
//! task and the `relayed` task run on the caller's runtime. Each owns its buffers (nothing is allocated per packet on
//! the direct path). They share an `Arc<Shared>`: the peer table behind an `ArcSwap` (loaded once per batch; a
//! reconfigure builds a new table and swaps it in, so the packet path takes no global lock), atomic counters and flags
//! (relay connected), and one `Mutex<PeerState>` per peer, held for one encrypt/decrypt (or one disco message)
//! because boringtun's `Tunn` takes `&mut self`. Outbound and inbound run in parallel on different peers, and on the
//! same peer they alternate per packet. The relay queues are bounded and written with `try_send`: a slow relay drops
//! (counted), never blocks.
//!
//! Why threads of their own: a packet's way through the engine is then one wakeup of the thread that waits for it,
//! straight out of `epoll_wait`, with no hand-over between the workers of a shared runtime. Each thread registers only
//! the descriptor it reads, for readability only (outbound: the TUN device; inbound: the UDP socket), so the other
//! direction's traffic never wakes it; writes are non-blocking syscalls made directly. Each direction's buffers live
//! in a worker behind a mutex (`outbound::Outbound`, `inbound::InboundWorker`), which lets a round trip skip
//! wake-ups: after a TUN write the inbound thread sends the kernel's answer itself (`try_lock` of the outbound
//! worker), and after a send at rest the outbound thread polls the socket for up to 300 us (`try_lock` of the inbound
//! worker, yielding between polls; 10 ms backoff after a fruitless poll, so idle costs nothing). In the netns
//! benchmark (2026-11-29, medians of 3) this took the round trip at rest through two engines from 0.283 ms (tasks on
//! the shared runtime) to 0.249 ms (plain veth: 0.047 ms), and one TCP stream from 5.1 to 5.9 Gbit/s. What remains is
//! the wake-up of a sleeping thread (40-150 us each on the benchmark VM, `perf sched timehist`), which only polling
//! while idle would remove.
//!
//! # The path of a packet
//! Out: the kernel routes 10.77.0.0/16 into the TUN device -> `outbound` reads a batch (with TSO offload, one read is
//! a 64 KiB super-packet that tun-rs splits into MTU-sized segments; without, it drains up to 128 ready packets) ->
//! per packet: IPv4 header check, destination -> peer (/32 map, then longer prefixes), lock that peer, `encapsulate`
//! straight into the send batch -> the peer's send rule: UDP (one `sendmsg` per run of equal-sized datagrams to one
//! endpoint, UDP GSO) or a copy into the relay queue.
//! In: `inbound` `recvmmsg`s up to 32 buffers, each possibly a GRO train of datagrams of one sender -> per datagram:
//! disco (magic `MESHD!`) is opened with the sender's precomputed key and handled (ping -> pong, pong -> path
//! confirmed); a STUN binding response goes to the waiting [`Engine::stun`]; WireGuard: the shared rate limiter checks
//! it with the sender's address (cookie reply when under load) -> peer by receiver index (or, for an initiation, by
//! the static key inside) -> lock, `decapsulate` into the TUN batch -> a device peer roams to the source; for an agent
//! the source only becomes a candidate -> inner source must route back to that peer -> the batch is written with
//! `send_multiple` (tun-rs coalesces TCP/UDP segments into super-packets: GRO).
//! Handshake answers go back where the datagram came from (UDP source, or the relay); packets boringtun queued during
//! the handshake are flushed right after (`decapsulate(None, &[])` until Done), by the send rule.

mod counters;
mod dispatch;
mod endpoint;
mod inbound;
mod outbound;
mod path;
mod peers;
mod readiness;
mod timers;
mod tun;
mod udp;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519;
use ipnet::Ipv4Net;
pub use meshd_protocol::NodeKind;
use meshd_protocol::stun::{self, TransactionId};
use meshd_protocol::{PresharedKey, PublicKey};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use x25519_dalek::StaticSecret;

use self::counters::Counters;
use self::path::Route;
use self::peers::{PeerTable, TunnFactory, build_table};

/// WireGuard's per-packet overhead (16 B header + 16 B tag, no padding in boringtun).
const DATA_OVERHEAD: usize = 32;

/// Handshake messages per second the shared rate limiter accepts before it demands cookies. boringtun's own device
/// uses 100; every handshake message passes the limiter twice here (our check before dispatch, then the one inside
/// `decapsulate`), hence 200.
const HANDSHAKE_RATE_LIMIT: u64 = 200;

/// How long [`Engine::shutdown`] waits for each packet task before aborting it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Datagrams waiting between the engine and the relay client, each way. When full, the engine drops (counted)
/// rather than wait: the relay is a fallback path and must never stall the packet tasks.
const RELAY_QUEUE: usize = 1024;

/// A STUN request is sent again this often until it is answered or the caller's timeout passes (UDP loses packets).
const STUN_RETRANSMIT: Duration = Duration::from_millis(500);

/// Most own endpoints sent in a CallMeMaybe (the disco format's limit).
const MAX_OWN_ENDPOINTS: usize = meshd_protocol::disco::MAX_CALL_ME_MAYBE_ENDPOINTS;

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
    /// Agent: disco path selection and the relay. Device: classic WireGuard (endpoint + roaming), or through the
    /// coordinator's device gateway (over the relay) when that is where it answers from or it has no endpoint.
    pub kind: NodeKind,
    /// Mixed into the pair's handshakes (WireGuard's optional symmetric key); both ends must have the same.
    pub preshared_key: Option<PresharedKey>,
}

/// Counters and state of one peer, for `meshd status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    pub name: String,
    /// The direct address packets currently go to (confirmed by disco, roamed or configured); None when they go
    /// over the relay or nowhere yet.
    pub endpoint: Option<SocketAddr>,
    /// "direct" (UDP to `endpoint`), "relay" (through the coordinator's relay), "gateway" (a stock device, through the
    /// coordinator's device gateway) or "none" (no path known yet).
    pub path: &'static str,
    /// RTT of the last disco pong on the direct path (agent peers).
    pub latency_ms: Option<f64>,
    /// Time since the last completed handshake; None if never.
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// The part of rx/tx that went through the relay.
    pub relay_rx_bytes: u64,
    pub relay_tx_bytes: u64,
}

/// Engine-wide counters of things dropped instead of crashing.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineCounters {
    /// Datagrams the engine read (UDP and relay). Each one that is dropped is also counted once under its reason
    /// below, so `received_datagrams` = delivered + the drop counters.
    pub received_datagrams: u64,
    /// Datagrams the kernel dropped because the socket's receive buffer was full (a flood faster than the inbound
    /// thread): never read by the engine, so not in `received_datagrams`.
    pub socket_overflow_datagrams: u64,
    /// Datagrams that are neither WireGuard, disco nor an awaited STUN answer (wrong type or size): garbage.
    pub malformed_datagrams: u64,
    /// Handshake messages whose MAC1 does not match our public key: garbage shaped like a handshake, or a sender
    /// that has the wrong key for this node.
    pub bad_mac_datagrams: u64,
    /// WireGuard messages that failed inside the session (decryption, replay, unknown session, handshake
    /// authentication).
    pub rejected_datagrams: u64,
    /// Messages for a receiver index or static key we have no peer for.
    pub unknown_peer_datagrams: u64,
    pub malformed_tun_packets: u64,
    /// IPv6 and other non-IPv4 packets from the TUN (the kernel's link-local chatter): the overlay is IPv4.
    pub non_ipv4_tun_packets: u64,
    pub no_route_packets: u64,
    /// Packets for a peer whose endpoint is not known yet (it has to send first).
    pub no_endpoint_packets: u64,
    /// Decrypted packets whose inner source is not in the sending peer's allowed IPs.
    pub spoofed_source_packets: u64,
    pub cookie_replies_sent: u64,
    pub udp_send_errors: u64,
    pub tun_write_errors: u64,
    /// Bytes of WireGuard and disco datagrams sent to / received from the relay.
    pub relay_tx_bytes: u64,
    pub relay_rx_bytes: u64,
    /// Datagrams dropped because the relay queue was full or the relay client is gone.
    pub relay_dropped_datagrams: u64,
    /// Disco datagrams that failed authentication or came from an unknown or non-agent key.
    pub rejected_disco: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineStatus {
    pub interface: String,
    pub listen_port: u16,
    pub peers: Vec<PeerStatus>,
    pub counters: EngineCounters,
    /// The relay client reports a live relay connection.
    pub relay_connected: bool,
    /// Peers whose packets go over UDP / over the relay right now.
    pub direct_peers: usize,
    pub relayed_peers: usize,
}

/// A datagram to or from the relay: WireGuard or disco bytes for/from `peer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayDatagram {
    pub peer: PublicKey,
    pub datagram: bytes::Bytes,
}

/// Why [`Engine::stun`] has no mapped address.
#[derive(Debug, thiserror::Error)]
pub enum StunProbeError {
    #[error("no STUN answer from {server} within {timeout:?} (UDP blocked, or the server does not answer STUN)")]
    Timeout { server: SocketAddr, timeout: Duration },
    #[error("cannot send a STUN request to {server}: {source}")]
    Send { server: SocketAddr, source: std::io::Error },
}

/// Why the engine could not start; messages say what to do next.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot create TUN interface {name}: {source} ({})", tun_hint(source, name))]
    OpenTun { name: String, source: std::io::Error },
    #[error(
        "cannot bind UDP port {port}: {source} (is another meshd or WireGuard using it? pick one with --listen-port)"
    )]
    BindUdp { port: u16, source: std::io::Error },
    #[error(
        "cannot start the packet threads: {0} (the system is out of threads or file descriptors: check ulimit -n/-u)"
    )]
    PacketThreads(std::io::Error),
}

/// Tuning that the agent normally leaves alone (benchmarks and troubleshooting flip it).
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// TUN TSO/GRO offload (virtio-net header): large batches between the kernel and the engine. On by default; if
    /// the kernel refuses it the device is created without.
    pub tun_offload: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self { tun_offload: true }
    }
}

/// State shared by the engine handle and its packet tasks.
pub(crate) struct Shared {
    table: ArcSwap<PeerTable>,
    counters: Counters,
    rate_limiter: Arc<RateLimiter>,
    private_key: x25519::StaticSecret,
    public_key: x25519::PublicKey,
    udp: udp::Udp,
    tun: tun_rs::SyncDevice,
    /// The outbound worker's buffers: the outbound thread's, lent to the inbound thread after a TUN write (see
    /// `outbound::Outbound`).
    outbound: Mutex<outbound::Outbound>,
    /// The TUN device carries virtio headers (TSO/GRO offload on).
    offload: bool,
    /// Room for one outgoing datagram: a full packet plus overhead, and at least a handshake initiation.
    datagram_slot: usize,
    /// Serialises reconfigures; holds the next peer index to hand out.
    next_index: Mutex<u32>,
    /// Datagrams for the relay client (taken once by [`Engine::take_relay_outbound`]).
    relay_out: mpsc::Sender<RelayDatagram>,
    relay_out_rx: Mutex<Option<mpsc::Receiver<RelayDatagram>>>,
    /// Where the relay client puts what it received; the `relayed` task reads it.
    relay_in: mpsc::Sender<RelayDatagram>,
    relay_connected: AtomicBool,
    /// Our own endpoints for CallMeMaybe and the /24s of our interfaces (the LAN bonus); `own_generation` counts
    /// changes so the timer task starts bursts on a network change.
    own: Mutex<OwnEndpoints>,
    own_generation: AtomicU64,
    /// STUN requests in flight from [`Engine::stun`], answered by the inbound task.
    stun_waiters: Mutex<HashMap<TransactionId, oneshot::Sender<SocketAddr>>>,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct OwnEndpoints {
    pub(crate) endpoints: Vec<SocketAddr>,
    pub(crate) lan_prefixes: Vec<[u8; 3]>,
}

impl Shared {
    /// Sends a batch of datagrams; failed sends are counted, never fatal (the packet path drops and goes on).
    pub(crate) fn send_batch(&self, batch: &mut udp::SendBatch) {
        let failures = batch.flush(&self.udp);
        if failures > 0 {
            self.counters.udp_send_errors.fetch_add(failures, Ordering::Relaxed);
        }
    }

    pub(crate) fn relay_connected(&self) -> bool {
        self.relay_connected.load(Ordering::Relaxed)
    }

    /// Hands a datagram to the relay client (a copy: the relay is the fallback path). Never waits: a full queue or
    /// an absent relay client drops it (counted). True if queued.
    pub(crate) fn send_relay(&self, peer: PublicKey, datagram: &[u8]) -> bool {
        relay_send(&self.relay_out, &self.counters, peer, datagram)
    }

    /// A STUN binding response arrived on the WireGuard socket: hand it to the waiting [`Engine::stun`] call.
    /// False if nobody waits for it (then it is not STUN we asked for).
    pub(crate) fn take_stun_response(&self, datagram: &[u8]) -> bool {
        let Ok((tx, mapped)) = stun::parse_binding_response(datagram) else {
            return false;
        };
        let waiter = self
            .stun_waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&tx);
        match waiter {
            Some(waiter) => {
                let _ = waiter.send(udp::canonical(mapped));
                true
            }
            None => false,
        }
    }

    pub(crate) fn own_endpoints(&self) -> OwnEndpoints {
        self.own.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// [`Shared::send_relay`] on borrowed parts (the inbound sinks hold these apart from the rest of `Shared`).
pub(crate) fn relay_send(
    out: &mpsc::Sender<RelayDatagram>,
    counters: &Counters,
    peer: PublicKey,
    datagram: &[u8],
) -> bool {
    let queued = out
        .try_send(RelayDatagram {
            peer,
            datagram: bytes::Bytes::copy_from_slice(datagram),
        })
        .is_ok();
    if queued {
        counters
            .relay_tx_bytes
            .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        tracing::trace!(peer = ?peer, len = datagram.len(), "datagram to the relay");
    } else {
        counters::bump(&counters.relay_dropped_datagrams);
    }
    queued
}

/// What to do about a TUN creation error, by errno.
fn tun_hint(error: &std::io::Error, name: &str) -> String {
    match error.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => "run as root or give the agent CAP_NET_ADMIN".to_string(),
        Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => {
            "/dev/net/tun is missing: load the tun module (modprobe tun), or in a container pass --device /dev/net/tun"
                .to_string()
        }
        Some(libc::EBUSY) => format!(
            "interface {name} is in use by another process (another meshd or VPN?): stop it or pick another --interface"
        ),
        _ => format!(
            "run as root or with CAP_NET_ADMIN, check that /dev/net/tun exists, and that no other process uses {name}"
        ),
    }
}

/// A packet loop running on a thread of its own (see "Concurrency" above).
struct PacketThread {
    name: &'static str,
    /// Closed when the thread has finished (its sender is dropped on the way out, also on a panic).
    done: oneshot::Receiver<()>,
}

impl PacketThread {
    /// Starts `run` on a new thread with its own single-threaded runtime. The runtime is built here so that a
    /// failure is reported to the caller.
    fn spawn<F, Fut>(name: &'static str, run: F) -> Result<PacketThread, EngineError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(EngineError::PacketThreads)?;
        let (done_tx, done) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _done = done_tx;
                runtime.block_on(run());
            })
            .map_err(EngineError::PacketThreads)?;
        Ok(PacketThread { name, done })
    }
}

/// A running data plane. Dropping it (or [`Engine::shutdown`]) removes the TUN device.
pub struct Engine {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    threads: Vec<PacketThread>,
    interface: String,
}

impl Engine {
    /// Creates the TUN device (address, MTU, route for `network`), binds the UDP socket and starts the packet tasks.
    pub async fn start(config: EngineConfig) -> Result<Engine, EngineError> {
        Self::start_with(config, EngineOptions::default()).await
    }

    /// [`Engine::start`] with explicit [`EngineOptions`].
    pub async fn start_with(config: EngineConfig, options: EngineOptions) -> Result<Engine, EngineError> {
        // The socket first: a port in use is the likelier error and leaves no device behind.
        let udp = udp::bind(config.listen_port)?;
        let (device, offload) = match tun::open(&config, options.tun_offload) {
            Ok(device) => (device, options.tun_offload),
            // Only an offload refusal is worth a retry; no permission or a busy name fails the same way again.
            Err(EngineError::OpenTun { source, .. })
                if options.tun_offload
                    && !matches!(
                        source.raw_os_error(),
                        Some(libc::EPERM | libc::EACCES | libc::EBUSY | libc::ENOENT)
                    ) =>
            {
                tracing::warn!(error = %source, "TUN offload unavailable, retrying without (lower throughput)");
                (tun::open(&config, false)?, false)
            }
            Err(e) => return Err(e),
        };
        let public_key = x25519::PublicKey::from(&config.private_key);
        let max_packet = usize::from(config.mtu).max(1280);
        let datagram_slot = (max_packet + DATA_OVERHEAD).max(148);
        let (relay_out, relay_out_rx) = mpsc::channel(RELAY_QUEUE);
        let (relay_in, relay_in_rx) = mpsc::channel(RELAY_QUEUE);
        let shared = Arc::new(Shared {
            table: ArcSwap::from_pointee(PeerTable::default()),
            counters: Counters::default(),
            rate_limiter: Arc::new(RateLimiter::new(&public_key, HANDSHAKE_RATE_LIMIT)),
            private_key: config.private_key,
            public_key,
            udp,
            tun: device,
            outbound: Mutex::new(outbound::Outbound::new(max_packet, datagram_slot)),
            offload,
            datagram_slot,
            // A random start, like wireguard-go's random indices: the numbers on the wire say nothing about how
            // many peers there are or in which order they came.
            next_index: Mutex::new(rand::random::<u32>() & 0x00FF_FFFF),
            relay_out,
            relay_out_rx: Mutex::new(Some(relay_out_rx)),
            relay_in,
            relay_connected: AtomicBool::new(false),
            own: Mutex::new(OwnEndpoints::default()),
            own_generation: AtomicU64::new(0),
            stun_waiters: Mutex::new(HashMap::new()),
        });
        let cancel = CancellationToken::new();
        let inbound_worker = Arc::new(Mutex::new(inbound::InboundWorker::new(Arc::clone(&shared))));
        let outbound = {
            let (shared, worker, cancel) = (Arc::clone(&shared), Arc::clone(&inbound_worker), cancel.clone());
            PacketThread::spawn("meshd-outbound", move || outbound::run(shared, worker, cancel))?
        };
        let inbound = {
            let (shared, cancel) = (Arc::clone(&shared), cancel.clone());
            let worker = inbound_worker;
            PacketThread::spawn("meshd-inbound", move || inbound::run(shared, worker, cancel))
        };
        let threads = match inbound {
            Ok(inbound) => vec![outbound, inbound],
            Err(e) => {
                // Stop the outbound thread: nothing may keep the device after a failed start.
                cancel.cancel();
                return Err(e);
            }
        };
        let tasks = vec![
            tokio::spawn(timers::run(Arc::clone(&shared), cancel.clone())),
            tokio::spawn(inbound::run_relayed(Arc::clone(&shared), relay_in_rx, cancel.clone())),
        ];
        tracing::info!(
            interface = %config.interface,
            address = %config.address,
            network = %config.network,
            listen_port = shared.udp.port(),
            mtu = config.mtu,
            tun_offload = offload,
            udp_gso_segments = shared.udp.max_gso_segments(),
            public_key = ?PublicKey::from_bytes(*public_key.as_bytes()),
            "data plane up"
        );
        Ok(Engine {
            shared,
            cancel,
            tasks,
            threads,
            interface: config.interface,
        })
    }

    /// Makes the peer set equal to `peers`: adds new ones, removes missing ones (their traffic stops at once), and
    /// updates endpoints/allowed IPs of kept ones without touching their sessions.
    pub fn reconfigure(&self, peers: Vec<PeerConfig>) {
        let mut next_index = self.shared.next_index.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.shared.table.load_full();
        let mut factory = TunnFactory {
            private_key: &self.shared.private_key,
            public_key: PublicKey::from_bytes(*self.shared.public_key.as_bytes()),
            rate_limiter: &self.shared.rate_limiter,
            next_index: &mut next_index,
        };
        let (table, changes) = build_table(&old, peers, &mut factory);
        self.shared.table.store(Arc::new(table));
        for key in &changes.added {
            tracing::info!(peer = ?key, "peer added");
        }
        for key in &changes.removed {
            tracing::info!(peer = ?key, "peer removed");
        }
        for key in &changes.updated {
            tracing::debug!(peer = ?key, "peer updated");
        }
    }

    /// The bound UDP port (useful when `listen_port` was 0).
    pub fn listen_port(&self) -> u16 {
        self.shared.udp.port()
    }

    /// Whether the TUN device runs with TSO/GRO offload.
    pub fn tun_offload(&self) -> bool {
        self.shared.offload
    }

    pub fn status(&self) -> EngineStatus {
        let table = self.shared.table.load();
        let now = Instant::now();
        let relay_connected = self.shared.relay_connected();
        let peers: Vec<PeerStatus> = table
            .peers()
            .iter()
            .map(|peer| {
                let state = peer.lock();
                let (path, latency_ms) = match &state.agent {
                    Some(agent) => (
                        match agent.path.route(now, relay_connected) {
                            Route::Direct(_) => "direct",
                            Route::Relay => "relay",
                            Route::Nowhere => "none",
                        },
                        agent.path.latency().map(|rtt| rtt.as_secs_f64() * 1000.0),
                    ),
                    None => (
                        if state.endpoint.uses_gateway() {
                            if relay_connected { "gateway" } else { "none" }
                        } else {
                            "direct"
                        },
                        None,
                    ),
                };
                PeerStatus {
                    public_key: peer.public_key,
                    name: state.name.clone(),
                    endpoint: state.direct_endpoint(now, relay_connected),
                    path,
                    latency_ms,
                    last_handshake: state.tunn.time_since_last_handshake(),
                    rx_bytes: state.rx_bytes,
                    tx_bytes: state.tx_bytes,
                    relay_rx_bytes: state.relay_rx_bytes,
                    relay_tx_bytes: state.relay_tx_bytes,
                }
            })
            .collect();
        EngineStatus {
            interface: self.interface.clone(),
            listen_port: self.listen_port(),
            direct_peers: peers.iter().filter(|p| p.path == "direct").count(),
            relayed_peers: peers.iter().filter(|p| p.path == "relay").count(),
            peers,
            counters: self.shared.counters.snapshot(self.shared.udp.kernel_drops()),
            relay_connected,
        }
    }

    /// Datagrams the engine wants relayed. Taken once by the relay client (None on the second call).
    pub fn take_relay_outbound(&self) -> Option<mpsc::Receiver<RelayDatagram>> {
        self.shared
            .relay_out_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Where the relay client hands the datagrams it received (WireGuard or disco, tagged with the sender's key).
    pub fn relay_inbound(&self) -> mpsc::Sender<RelayDatagram> {
        self.shared.relay_in.clone()
    }

    /// The relay client reports whether it is connected. Without a relay, agent peers behave as before: direct only
    /// (best known address, else candidate rotation).
    pub fn set_relay_connected(&self, connected: bool) {
        if self.shared.relay_connected.swap(connected, Ordering::Relaxed) != connected {
            tracing::info!(connected, "relay connection changed");
        }
    }

    /// Sends a STUN binding request from the WireGuard socket (so the answer shows the NAT mapping WireGuard uses) and
    /// waits for the answer, re-sending every 500 ms. The answer is taken off the socket by the inbound task.
    pub async fn stun(&self, server: SocketAddr, timeout: Duration) -> Result<SocketAddr, StunProbeError> {
        let tx = TransactionId(rand::random());
        let (answer_tx, mut answer) = oneshot::channel();
        let waiters = || self.shared.stun_waiters.lock().unwrap_or_else(PoisonError::into_inner);
        waiters().insert(tx, answer_tx);
        let request = stun::binding_request(tx);
        let deadline = tokio::time::Instant::now() + timeout;
        let result = loop {
            if let Err(source) = self.shared.udp.send(server, &request, None) {
                break Err(StunProbeError::Send { server, source });
            }
            let wait = (tokio::time::Instant::now() + STUN_RETRANSMIT).min(deadline);
            match tokio::time::timeout_at(wait, &mut answer).await {
                Ok(Ok(mapped)) => break Ok(mapped),
                Ok(Err(_)) => break Err(StunProbeError::Timeout { server, timeout }),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    break Err(StunProbeError::Timeout { server, timeout });
                }
                Err(_) => {}
            }
        };
        waiters().remove(&tx);
        result
    }

    /// This node's own candidate endpoints (interfaces + STUN-mapped), sent to agent peers in CallMeMaybe. A change
    /// (a network change) starts a probe burst to every agent peer.
    pub fn set_own_endpoints(&self, mut endpoints: Vec<SocketAddr>) {
        endpoints.sort();
        endpoints.dedup();
        endpoints.truncate(MAX_OWN_ENDPOINTS);
        // The /24s of addresses that are our own interfaces' (not the STUN-mapped one): same-LAN peers get a bonus.
        let local: Vec<Ipv4Addr> = crate::endpoints::local_addresses()
            .map(|addrs| addrs.into_iter().map(|a| a.address).collect())
            .unwrap_or_default();
        let mut lan_prefixes: Vec<[u8; 3]> = endpoints
            .iter()
            .filter_map(|e| match e.ip() {
                std::net::IpAddr::V4(v4) if local.contains(&v4) => {
                    let o = v4.octets();
                    Some([o[0], o[1], o[2]])
                }
                _ => None,
            })
            .collect();
        lan_prefixes.sort();
        lan_prefixes.dedup();
        let mut own = self.shared.own.lock().unwrap_or_else(PoisonError::into_inner);
        if own.endpoints == endpoints && own.lan_prefixes == lan_prefixes {
            return;
        }
        tracing::info!(?endpoints, "own endpoints changed");
        *own = OwnEndpoints {
            endpoints,
            lan_prefixes,
        };
        self.shared.own_generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Stops the packet threads and tasks and removes the TUN device.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        for thread in std::mem::take(&mut self.threads) {
            // A thread cannot be aborted; its loop checks the cancellation between batches, so this is quick.
            if tokio::time::timeout(SHUTDOWN_GRACE, thread.done).await.is_err() {
                tracing::warn!(thread = thread.name, "packet thread did not stop in time");
            }
        }
        for task in std::mem::take(&mut self.tasks) {
            let abort = task.abort_handle();
            if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
                abort.abort();
            }
        }
        tracing::info!(interface = %self.interface, "data plane down");
        // Dropping `self` drops the last `Arc<Shared>`: the TUN fd closes (the kernel removes the device) and the UDP
        // port is freed before this returns.
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Tasks see the cancellation and drop their references; the device goes when the last one does.
        self.cancel.cancel();
    }
}

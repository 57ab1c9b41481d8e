//! The relay: forwards opaque datagrams (WireGuard or disco) between meshd agents that have no direct path, over
//! their HTTPS connection to the coordinator (upgraded to `meshd-relay`, frames in [`meshd_protocol::relay`]).
//!
//! Owns the registry of connections (keyed by the authenticated node's public key) and each connection's reader and
//! writer. Rules:
//! - a connection is registered only under the key its credential authenticated, so a node receives only what is
//!   addressed to it; a new connection for the same key replaces (and closes) the old one;
//! - `Send` to a key without a connection is dropped and answered with `PeerGone` (at most once a second per key);
//! - every connection has a bounded queue ([`QUEUE_FRAMES`]); when it is full the datagram is dropped and counted,
//!   so a slow receiver never blocks its senders or anyone else;
//! - a node deleted (or whose credential was replaced) loses its connection as soon as the broker reports the change;
//! - the server pings every [`PING_INTERVAL`]; a connection silent for [`IDLE_TIMEOUT`] is closed.
//!
//! The relay never holds a key that decrypts what it forwards. Each forwarded datagram is copied once into a `Bytes`
//! (the relay is the fallback path; the direct path allocates nothing). Not here: HTTP auth and the upgrade
//! ([`crate::http::relay`]). Known limit: a connection lives in one coordinator process; with several replicas both
//! nodes of a pair must reach the same one.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use meshd_protocol::relay::{self, RelayFrame};
use meshd_protocol::{NodeId, PublicKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::store::Store;
use crate::telemetry;

/// Frames queued for one receiver before further datagrams to it are dropped.
pub const QUEUE_FRAMES: usize = 512;
/// The server pings each connection this often (keeps NAT and proxy state alive, detects dead peers).
pub const PING_INTERVAL: Duration = Duration::from_secs(30);
/// A connection from which nothing was read for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often the server pings and how long a silent connection lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayTimers {
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
}

impl Default for RelayTimers {
    fn default() -> Self {
        Self {
            ping_interval: PING_INTERVAL,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// At most one `PeerGone` per destination key per connection in this interval.
const PEER_GONE_INTERVAL: Duration = Duration::from_secs(1);
/// Read buffer: room for two maximum frames, so a partial frame can always be completed after compaction.
const READ_BUFFER: usize = 2 * (relay::FRAME_HEADER_LEN + relay::MAX_FRAME_PAYLOAD);
/// A writer stops adding queued frames to one write once it holds this many bytes.
const WRITE_BATCH: usize = 64 * 1024;
/// Entries of the per-connection `PeerGone` limiter kept before old ones are swept.
const PEER_GONE_MEMORY: usize = 1024;

/// What the writer of a connection sends.
#[derive(Debug)]
enum Outbound {
    Recv { src: PublicKey, datagram: Bytes },
    PeerGone(PublicKey),
    Pong([u8; relay::PING_LEN]),
}

/// Who a connection is, as authenticated by the HTTP layer.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    pub node_id: NodeId,
    pub key: PublicKey,
    /// SHA-256 of the credential presented, to notice it being replaced.
    pub secret_hash: [u8; 32],
}

struct Registration {
    conn_id: u64,
    identity: Identity,
    queue: mpsc::Sender<Outbound>,
    close: CancellationToken,
}

/// Totals since start (the same figures as the Prometheus metrics, per relay instance, for tests and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub packets: u64,
    pub bytes: u64,
    pub dropped_no_peer: u64,
    pub dropped_queue_full: u64,
}

/// The registry of relay connections of this process.
pub struct Relay {
    conns: RwLock<HashMap<PublicKey, Registration>>,
    /// The device gateway: an agent's `Send` to a device's key goes there (devices have no relay connection).
    gateway: OnceLock<Weak<crate::gateway::Gateway>>,
    next_conn: AtomicU64,
    store: Store,
    timers: RelayTimers,
    shutdown: CancellationToken,
    packets: AtomicU64,
    bytes: AtomicU64,
    dropped_no_peer: AtomicU64,
    dropped_queue_full: AtomicU64,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("connections", &self.connections())
            .finish()
    }
}

/// Why a datagram was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Undelivered {
    NoPeer,
    QueueFull,
}

impl Relay {
    /// A relay whose connections end with `shutdown`; it watches `broker` to close the connections of nodes deleted
    /// or re-keyed, re-checking credentials in `store`.
    pub fn start(store: Store, broker: &Broker, timers: RelayTimers, shutdown: CancellationToken) -> Arc<Self> {
        let relay = Arc::new(Self {
            conns: RwLock::new(HashMap::new()),
            gateway: OnceLock::new(),
            next_conn: AtomicU64::new(1),
            store,
            timers,
            shutdown,
            packets: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            dropped_no_peer: AtomicU64::new(0),
            dropped_queue_full: AtomicU64::new(0),
        });
        tokio::spawn(watch_changes(relay.clone(), broker.subscribe()));
        relay
    }

    /// Hands agents' datagrams for devices to `gateway` from now on.
    pub fn attach_gateway(&self, gateway: &Arc<crate::gateway::Gateway>) {
        let _ = self.gateway.set(Arc::downgrade(gateway));
    }

    /// Queues `datagram` from the gateway (tagged `src`) for the connection of agent `dst`; false when it has none
    /// or its queue is full.
    pub fn deliver(&self, src: PublicKey, dst: &PublicKey, datagram: &[u8]) -> bool {
        self.forward(src, dst, datagram).is_ok()
    }

    fn gateway_for(&self, dst: &PublicKey) -> Option<Arc<crate::gateway::Gateway>> {
        let gateway = self.gateway.get()?.upgrade()?;
        gateway.serves_device(dst).then_some(gateway)
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.read_conns().len()
    }

    pub fn stats(&self) -> RelayStats {
        RelayStats {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            dropped_no_peer: self.dropped_no_peer.load(Ordering::Relaxed),
            dropped_queue_full: self.dropped_queue_full.load(Ordering::Relaxed),
        }
    }

    /// Serves one upgraded connection until it ends, is replaced, its node is removed, or shutdown.
    pub async fn serve<IO>(self: Arc<Self>, io: IO, identity: Identity)
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (queue, outbound) = mpsc::channel(QUEUE_FRAMES);
        let close = self.shutdown.child_token();
        let conn_id = self.register(identity, queue.clone(), close.clone());
        let gauge = metrics::gauge!(telemetry::RELAY_CONNECTIONS);
        gauge.increment(1.0);
        tracing::info!(node = identity.node_id, key = ?identity.key, "relay connection opened");
        // A deletion committed between the HTTP auth and the registration above produced no change we could see.
        if !self.credential_valid(&identity).await {
            close.cancel();
        }
        let (reader, writer) = tokio::io::split(io);
        let reason = tokio::select! {
            () = close.cancelled() => "closed by the coordinator (replaced, node removed, or shutdown)",
            reason = write_loop(writer, outbound, identity.key, self.timers.ping_interval) => reason,
            reason = self.read_loop(reader, &identity, &queue) => reason,
        };
        self.unregister(identity.key, conn_id);
        gauge.decrement(1.0);
        tracing::info!(node = identity.node_id, key = ?identity.key, reason, "relay connection closed");
    }

    /// Closes the connections of `node_id` (deleted by an admin, or its credential replaced).
    pub fn close_node(&self, node_id: NodeId) {
        for registration in self.read_conns().values() {
            if registration.identity.node_id == node_id {
                registration.close.cancel();
            }
        }
    }

    fn read_conns(&self) -> std::sync::RwLockReadGuard<'_, HashMap<PublicKey, Registration>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts/removes): keep serving.
        self.conns.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_conns(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<PublicKey, Registration>> {
        self.conns.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn register(&self, identity: Identity, queue: mpsc::Sender<Outbound>, close: CancellationToken) -> u64 {
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let registration = Registration {
            conn_id,
            identity,
            queue,
            close,
        };
        if let Some(old) = self.write_conns().insert(identity.key, registration) {
            tracing::info!(
                node = identity.node_id,
                "a new relay connection replaces the node's previous one"
            );
            old.close.cancel();
        }
        conn_id
    }

    fn unregister(&self, key: PublicKey, conn_id: u64) {
        if let Entry::Occupied(entry) = self.write_conns().entry(key)
            && entry.get().conn_id == conn_id
        {
            entry.remove();
        }
    }

    /// Queues `datagram` from `src` for the connection of `dst`, never waiting.
    fn forward(&self, src: PublicKey, dst: &PublicKey, datagram: &[u8]) -> Result<(), Undelivered> {
        let conns = self.read_conns();
        let Some(target) = conns.get(dst) else {
            self.dropped_no_peer.fetch_add(1, Ordering::Relaxed);
            return Err(Undelivered::NoPeer);
        };
        let len = datagram.len() as u64;
        let outbound = Outbound::Recv {
            src,
            datagram: Bytes::copy_from_slice(datagram),
        };
        match target.queue.try_send(outbound) {
            Ok(()) => {
                self.packets.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            // Closed: the receiver is going away and unregisters itself in a moment; same as absent.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.dropped_no_peer.fetch_add(1, Ordering::Relaxed);
                Err(Undelivered::NoPeer)
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                Err(Undelivered::QueueFull)
            }
        }
    }

    /// Reads frames until the peer closes, errs, idles out or breaks the protocol; returns why it stopped.
    async fn read_loop<R: AsyncRead>(
        &self,
        reader: R,
        identity: &Identity,
        own_queue: &mpsc::Sender<Outbound>,
    ) -> &'static str {
        tokio::pin!(reader);
        let packets = metrics::counter!(telemetry::RELAY_PACKETS);
        let bytes = metrics::counter!(telemetry::RELAY_BYTES);
        let no_peer = metrics::counter!(telemetry::RELAY_DROPPED, "reason" => "no_peer");
        let queue_full = metrics::counter!(telemetry::RELAY_DROPPED, "reason" => "queue_full");
        let mut peer_gone_sent: HashMap<PublicKey, Instant> = HashMap::new();
        let mut buf = vec![0u8; READ_BUFFER];
        let (mut start, mut end) = (0usize, 0usize);
        loop {
            // Decode every complete frame in the buffer.
            loop {
                let frame = match relay::split_frame(&buf[start..end]) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(_) => return "frame longer than the maximum",
                };
                start += frame.consumed;
                match frame.decode() {
                    Ok(RelayFrame::Send { dst, datagram }) if let Some(gateway) = self.gateway_for(&dst) => {
                        gateway.on_agent_datagram(identity.key, dst, datagram);
                    }
                    Ok(RelayFrame::Send { dst, datagram }) => match self.forward(identity.key, &dst, datagram) {
                        Ok(()) => {
                            packets.increment(1);
                            bytes.increment(datagram.len() as u64);
                        }
                        Err(Undelivered::QueueFull) => queue_full.increment(1),
                        Err(Undelivered::NoPeer) => {
                            no_peer.increment(1);
                            let now = Instant::now();
                            let due = peer_gone_sent
                                .get(&dst)
                                .is_none_or(|last| now.duration_since(*last) >= PEER_GONE_INTERVAL);
                            if due {
                                if peer_gone_sent.len() >= PEER_GONE_MEMORY {
                                    peer_gone_sent.retain(|_, last| now.duration_since(*last) < PEER_GONE_INTERVAL);
                                }
                                peer_gone_sent.insert(dst, now);
                                let _ = own_queue.try_send(Outbound::PeerGone(dst));
                            }
                        }
                    },
                    Ok(RelayFrame::Ping { data }) => {
                        // Best effort: a full queue means the client is not reading; its idle timer decides.
                        let _ = own_queue.try_send(Outbound::Pong(data));
                    }
                    // Pongs only prove liveness (the read itself did); unknown types are skipped.
                    Ok(RelayFrame::Pong { .. } | RelayFrame::Unknown { .. }) => {}
                    Ok(RelayFrame::ServerHello { .. } | RelayFrame::Recv { .. } | RelayFrame::PeerGone { .. }) => {
                        return "client sent a server-only frame";
                    }
                    Err(e) => {
                        tracing::debug!(node = identity.node_id, error = %e, "malformed relay frame");
                        return "malformed frame";
                    }
                }
            }
            // Make room: move a partial frame to the front when the tail cannot hold a maximum frame.
            if start == end {
                (start, end) = (0, 0);
            } else if buf.len() - start < relay::FRAME_HEADER_LEN + relay::MAX_FRAME_PAYLOAD {
                buf.copy_within(start..end, 0);
                (start, end) = (0, end - start);
            }
            let read = tokio::time::timeout(self.timers.idle_timeout, reader.as_mut().read(&mut buf[end..])).await;
            match read {
                Err(_) => return "idle timeout",
                Ok(Ok(0)) => return "closed by the client",
                Ok(Ok(n)) => end += n,
                Ok(Err(_)) => return "read error",
            }
        }
    }

    async fn credential_valid(&self, identity: &Identity) -> bool {
        match self.store.node_credential_hash(identity.node_id).await {
            Ok(Some(Some(hash))) => crate::secrets::hash_matches(&identity.secret_hash, &hash),
            Ok(_) => false,
            // A database hiccup is no reason to cut a working connection; the next change re-checks.
            Err(e) => {
                tracing::warn!(error = %e, "could not re-check a relay connection's credential");
                true
            }
        }
    }

    /// Re-checks the credentials of `node_ids` (all connections when `None`) and closes the invalid ones.
    async fn recheck(&self, node_ids: Option<&[NodeId]>) {
        let identities: Vec<Identity> = self
            .read_conns()
            .values()
            .map(|r| r.identity)
            .filter(|i| node_ids.is_none_or(|ids| ids.contains(&i.node_id)))
            .collect();
        for identity in identities {
            if !self.credential_valid(&identity).await {
                self.close_node(identity.node_id);
            }
        }
    }
}

/// Follows the broker: a removed node's connection closes at once; a change about a connected node re-checks its
/// credential (a re-join elsewhere replaces it); after a lag, everything is re-checked.
async fn watch_changes(relay: Arc<Relay>, mut changes: broadcast::Receiver<Arc<crate::netmap::ChangeEvent>>) {
    loop {
        let change = tokio::select! {
            () = relay.shutdown.cancelled() => return,
            change = changes.recv() => change,
        };
        match change {
            Ok(change) if !change.node_exists => relay.close_node(change.node_id),
            Ok(change) => {
                let connected = relay
                    .read_conns()
                    .values()
                    .any(|r| r.identity.node_id == change.node_id);
                if connected {
                    relay.recheck(Some(&[change.node_id])).await;
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => relay.recheck(None).await,
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Writes the hello, then queued frames (batched into one write per wakeup) and a ping every `ping_interval`.
async fn write_loop<W: AsyncWrite>(
    writer: W,
    mut outbound: mpsc::Receiver<Outbound>,
    key: PublicKey,
    ping_interval: Duration,
) -> &'static str {
    tokio::pin!(writer);
    let mut out = Vec::with_capacity(WRITE_BATCH + relay::FRAME_HEADER_LEN + relay::MAX_FRAME_PAYLOAD);
    RelayFrame::ServerHello { key }.encode(&mut out);
    if writer.write_all(&out).await.is_err() || writer.flush().await.is_err() {
        return "write error";
    }
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_interval, ping_interval);
    let mut pings_sent: u64 = 0;
    loop {
        out.clear();
        tokio::select! {
            item = outbound.recv() => {
                let Some(item) = item else { return "queue closed" };
                encode(&item, &mut out);
                while out.len() < WRITE_BATCH {
                    match outbound.try_recv() {
                        Ok(item) => encode(&item, &mut out),
                        Err(_) => break,
                    }
                }
            }
            _ = ping.tick() => {
                pings_sent += 1;
                RelayFrame::Ping { data: pings_sent.to_be_bytes() }.encode(&mut out);
            }
        }
        if writer.write_all(&out).await.is_err() || writer.flush().await.is_err() {
            return "write error";
        }
    }
}

fn encode(item: &Outbound, out: &mut Vec<u8>) {
    let frame = match item {
        Outbound::Recv { src, datagram } => RelayFrame::Recv {
            src: *src,
            datagram: datagram.as_ref(),
        },
        Outbound::PeerGone(key) => RelayFrame::PeerGone { key: *key },
        Outbound::Pong(data) => RelayFrame::Pong { data: *data },
    };
    // Cannot fail: the datagram came out of a frame of at most the same size.
    frame.encode(out);
}

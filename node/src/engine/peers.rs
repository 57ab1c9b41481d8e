//! The peer table: who the peers are, which overlay addresses route to whom, which receiver index belongs to whom.
//!
//! Owns: the immutable [`PeerTable`] and building the next one from a desired peer list ([`build_table`]), keeping the
//! `Arc<Peer>` (and so the `Tunn`, its sessions, counters and roamed endpoint) of every peer whose key is kept.
//!
//! Concurrency: a table is never mutated after it is built. The engine publishes it through an `ArcSwap`, so the
//! packet tasks read it without a global lock and a reconfigure is one pointer swap (a removed peer is out of every
//! lookup from that instant). The only lock on the packet path is the per-peer `Mutex<PeerState>`: boringtun's `Tunn`
//! takes `&mut self` for every packet. It is a std mutex because it is held for one encrypt/decrypt and never across
//! an `.await`.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use boringtun::noise::Tunn;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519;
use ipnet::Ipv4Net;
use meshd_protocol::disco::DiscoKey;
use meshd_protocol::{NodeKind, PresharedKey, PublicKey};

use super::PeerConfig;
use super::dispatch::{MSG_HANDSHAKE_INIT, message_type};
use super::endpoint::EndpointState;
use super::path::{PathState, Route};

/// Peer indices must fit in 24 bits: boringtun shifts them left by 8 for the session counter.
const MAX_PEER_INDEX: u32 = (1 << 24) - 1;

/// One peer. Shared (`Arc`) between successive tables for as long as its public key stays configured.
pub(crate) struct Peer {
    pub(crate) public_key: PublicKey,
    /// Our local index for this peer (< 2^24), the high 24 bits of every receiver index the peer sends us.
    pub(crate) index: u32,
    state: Mutex<PeerState>,
}

/// Everything about a peer that changes per packet; guarded by the peer's mutex.
pub(crate) struct PeerState {
    pub(crate) tunn: Tunn,
    /// Device peers: classic WireGuard endpoint (roaming + candidate rotation). Unused for agents.
    pub(crate) endpoint: EndpointState,
    /// Agent peers: disco path selection and the pair's disco key. None for devices.
    pub(crate) agent: Option<Box<AgentPath>>,
    pub(crate) name: String,
    /// The preshared key the `Tunn` was made with (a change needs a new `Tunn`).
    pub(crate) preshared_key: Option<PresharedKey>,
    /// Our own persistent keepalive (boringtun's cannot be changed on a live `Tunn`, ours follows reconfigure).
    pub(crate) keepalive: Option<Duration>,
    /// Bytes on the wire (encrypted datagrams), like `wg show` transfer.
    pub(crate) rx_bytes: u64,
    pub(crate) tx_bytes: u64,
    /// The part of rx/tx that went through the relay.
    pub(crate) relay_rx_bytes: u64,
    pub(crate) relay_tx_bytes: u64,
    /// When we last sent this peer anything; the persistent keepalive counts from here.
    pub(crate) last_sent: Instant,
    /// Whether a session was up at the last timer tick (for up/down log lines only).
    pub(crate) was_connected: bool,
}

/// What an agent peer has that a device peer has not.
pub(crate) struct AgentPath {
    pub(crate) path: PathState,
    /// The `Shared::own_generation` this path last heard about (our own endpoints changing starts a burst).
    pub(crate) own_generation: u64,
    /// Precomputed from X25519(our static secret, the peer's static key): never derived per packet.
    pub(crate) disco: DiscoKey,
}

/// Where a datagram for a peer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Destination {
    Udp(SocketAddr),
    Relay,
    /// Nowhere known yet: drop and count.
    Unknown,
}

/// Where a datagram for a peer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Udp(SocketAddr),
    /// Through the relay, tagged by the relay with the sender's key.
    Relay(PublicKey),
}

impl Origin {
    /// The address for the rate limiter (None for the relay: its datagrams have no address of their own).
    pub(crate) fn ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Origin::Udp(addr) => Some(addr.ip()),
            Origin::Relay(_) => None,
        }
    }
}

impl Peer {
    /// Locks the peer's state. A poisoned lock (a panic inside boringtun) is taken over rather than propagated: the
    /// packet path must keep running for the other peers, and the `Tunn` is still memory-safe.
    pub(crate) fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl PeerState {
    /// Where a datagram the `Tunn` produced for this peer goes, noting handshake initiations so unanswered ones rotate
    /// the candidate endpoint. Device peers: their endpoint. Agent peers: the send rule of [`PathState`].
    pub(crate) fn destination_for(&mut self, datagram: &[u8], now: Instant, relay_connected: bool) -> Destination {
        let initiation = message_type(datagram) == MSG_HANDSHAKE_INIT;
        if let Some(agent) = self.agent.as_mut() {
            let route = if initiation {
                agent.path.route_initiation(now, relay_connected)
            } else {
                agent.path.route(now, relay_connected)
            };
            return match route {
                Route::Direct(addr) => Destination::Udp(addr),
                Route::Relay => Destination::Relay,
                Route::Nowhere => Destination::Unknown,
            };
        }
        let endpoint = if initiation {
            self.endpoint.on_initiation()
        } else {
            self.endpoint.current()
        };
        if self.endpoint.uses_gateway() {
            // A stock device reached through the coordinator's gateway: the relay carries it there.
            return if relay_connected {
                Destination::Relay
            } else {
                Destination::Unknown
            };
        }
        endpoint.map_or(Destination::Unknown, Destination::Udp)
    }

    /// A datagram of `len` bytes left for this peer.
    pub(crate) fn note_sent(&mut self, len: usize, now: Instant) {
        self.tx_bytes += len as u64;
        self.last_sent = now;
    }

    /// [`PeerState::note_sent`] for a datagram that went to the relay.
    pub(crate) fn note_sent_relayed(&mut self, len: usize, now: Instant) {
        self.note_sent(len, now);
        self.relay_tx_bytes += len as u64;
    }

    /// Data (not a keepalive or handshake) went to or came from the peer: keeps an agent's heartbeats fast.
    pub(crate) fn note_traffic(&mut self, now: Instant) {
        if let Some(agent) = self.agent.as_mut() {
            agent.path.note_traffic(now);
        }
    }

    /// A datagram from `origin` authenticated for this peer: count it. A device peer follows it there (roaming); for
    /// an agent a new UDP source only becomes a candidate (disco decides the path).
    pub(crate) fn note_authenticated(&mut self, len: usize, origin: Origin, now: Instant) {
        self.rx_bytes += len as u64;
        match (origin, self.agent.as_mut()) {
            (Origin::Udp(source), None) => self.endpoint.on_authenticated(source),
            (Origin::Udp(source), Some(agent)) => {
                agent.path.on_authenticated_udp(source, now);
            }
            (Origin::Relay(_), agent) => {
                self.relay_rx_bytes += len as u64;
                if agent.is_none() {
                    self.endpoint.on_authenticated_via_gateway();
                }
            }
        }
    }

    /// The direct address packets go to now (None: over the relay, or unknown).
    pub(crate) fn direct_endpoint(&self, now: Instant, relay_connected: bool) -> Option<SocketAddr> {
        match &self.agent {
            Some(agent) => match agent.path.route(now, relay_connected) {
                Route::Direct(addr) => Some(addr),
                Route::Relay | Route::Nowhere => None,
            },
            None if self.endpoint.uses_gateway() => None,
            None => self.endpoint.current(),
        }
    }
}

/// An immutable snapshot of the configured peers and their routes.
#[derive(Default)]
pub(crate) struct PeerTable {
    /// In configuration order (status lists them this way).
    peers: Vec<Arc<Peer>>,
    by_key: HashMap<PublicKey, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    /// Peers own /32s in the mesh: an exact-match map answers almost every lookup.
    hosts: HashMap<Ipv4Addr, Arc<Peer>>,
    /// Any wider allowed IPs, longest prefix first (a peer routing a subnet).
    nets: Vec<(Ipv4Net, Arc<Peer>)>,
}

impl PeerTable {
    pub(crate) fn peers(&self) -> &[Arc<Peer>] {
        &self.peers
    }

    pub(crate) fn by_key(&self, key: &PublicKey) -> Option<&Arc<Peer>> {
        self.by_key.get(key)
    }

    pub(crate) fn by_local_index(&self, index: u32) -> Option<&Arc<Peer>> {
        self.by_index.get(&index)
    }

    /// The peer whose allowed IPs contain `addr` (longest prefix wins).
    pub(crate) fn route(&self, addr: Ipv4Addr) -> Option<&Arc<Peer>> {
        if let Some(peer) = self.hosts.get(&addr) {
            return Some(peer);
        }
        self.nets
            .iter()
            .find(|(net, _)| net.contains(&addr))
            .map(|(_, peer)| peer)
    }

    /// Cryptokey routing's inner source check: `peer` may send from `source` only if `source` routes back to it.
    pub(crate) fn allows_source(&self, peer: &Peer, source: Ipv4Addr) -> bool {
        self.route(source).is_some_and(|owner| std::ptr::eq(&**owner, peer))
    }
}

/// What a reconfigure changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct TableChanges {
    pub(crate) added: Vec<PublicKey>,
    pub(crate) removed: Vec<PublicKey>,
    pub(crate) updated: Vec<PublicKey>,
}

/// What a new peer's `Tunn` needs: our key and the shared rate limiter.
pub(crate) struct TunnFactory<'a> {
    pub(crate) private_key: &'a x25519::StaticSecret,
    pub(crate) public_key: PublicKey,
    pub(crate) rate_limiter: &'a Arc<RateLimiter>,
    /// Next index to try; advanced past every index handed out so indices are not reused soon after a removal.
    pub(crate) next_index: &'a mut u32,
}

impl TunnFactory<'_> {
    fn allocate_index(&mut self, in_use: &HashSet<u32>) -> u32 {
        loop {
            let candidate = *self.next_index;
            *self.next_index = if candidate >= MAX_PEER_INDEX { 1 } else { candidate + 1 };
            if candidate != 0 && !in_use.contains(&candidate) {
                return candidate;
            }
        }
    }

    fn new_peer(&mut self, config: &PeerConfig, index: u32, now: Instant) -> Arc<Peer> {
        let tunn = Tunn::new(
            self.private_key.clone(),
            x25519::PublicKey::from(*config.public_key.as_bytes()),
            config.preshared_key.map(|psk| *psk.as_bytes()),
            // Persistent keepalive is ours (see PeerState::keepalive), so boringtun's stays off.
            None,
            index,
            Some(Arc::clone(self.rate_limiter)),
        );
        Arc::new(Peer {
            public_key: config.public_key,
            index,
            state: Mutex::new(PeerState {
                tunn,
                endpoint: EndpointState::new(config.endpoints.clone()),
                agent: agent_path(self.private_key, config, now),
                preshared_key: config.preshared_key,
                name: config.name.clone(),
                keepalive: keepalive_duration(config.persistent_keepalive),
                rx_bytes: 0,
                tx_bytes: 0,
                relay_rx_bytes: 0,
                relay_tx_bytes: 0,
                last_sent: now,
                was_connected: false,
            }),
        })
    }
}

/// An agent peer's path state and disco key (one X25519 per peer, here); None for a device.
fn agent_path(private_key: &x25519::StaticSecret, config: &PeerConfig, now: Instant) -> Option<Box<AgentPath>> {
    if config.kind != NodeKind::Agent {
        return None;
    }
    let shared = private_key.diffie_hellman(&x25519::PublicKey::from(*config.public_key.as_bytes()));
    Some(Box::new(AgentPath {
        path: PathState::new(config.endpoints.clone(), now),
        own_generation: 0,
        disco: DiscoKey::from_shared_secret(shared.to_bytes()),
    }))
}

fn keepalive_duration(seconds: Option<u16>) -> Option<Duration> {
    seconds.filter(|s| *s > 0).map(|s| Duration::from_secs(u64::from(s)))
}

/// Builds the table for `desired`, reusing the peers of `old` whose key is kept (their sessions, counters and
/// learned endpoint survive; name, keepalive and candidate endpoints are updated in place). A key listed twice, or
/// our own key, is ignored with a warning.
pub(crate) fn build_table(
    old: &PeerTable,
    desired: Vec<PeerConfig>,
    factory: &mut TunnFactory<'_>,
) -> (PeerTable, TableChanges) {
    let now = Instant::now();
    let mut changes = TableChanges::default();
    let mut seen = HashSet::new();
    let desired: Vec<PeerConfig> = desired
        .into_iter()
        .filter(|p| {
            if p.public_key == factory.public_key {
                tracing::warn!(peer = ?p.public_key, "ignoring a peer with this node's own public key");
                return false;
            }
            if !seen.insert(p.public_key) {
                tracing::warn!(peer = ?p.public_key, "ignoring a duplicate peer entry");
                return false;
            }
            true
        })
        .collect();
    let in_use: HashSet<u32> = desired
        .iter()
        .filter_map(|p| old.by_key(&p.public_key))
        .map(|peer| peer.index)
        .collect();

    let mut table = PeerTable::default();
    for config in &desired {
        // A kept key keeps its peer, unless its preshared key changed: that needs a new `Tunn`.
        let kept = old
            .by_key(&config.public_key)
            .filter(|peer| peer.lock().preshared_key == config.preshared_key);
        let peer = match kept {
            Some(peer) => {
                if update_in_place(peer, config, factory.private_key, now) {
                    changes.updated.push(config.public_key);
                }
                Arc::clone(peer)
            }
            None => {
                let index = factory.allocate_index(&in_use);
                changes.added.push(config.public_key);
                factory.new_peer(config, index, now)
            }
        };
        table.by_key.insert(peer.public_key, Arc::clone(&peer));
        table.by_index.insert(peer.index, Arc::clone(&peer));
        for net in &config.allowed_ips {
            if net.prefix_len() == 32 {
                if let Some(owner) = table.hosts.get(&net.addr()) {
                    tracing::warn!(addr = %net.addr(), owner = ?owner.public_key, peer = ?peer.public_key,
                        "two peers claim the same address; the first keeps it");
                } else {
                    table.hosts.insert(net.addr(), Arc::clone(&peer));
                }
            } else {
                table.nets.push((net.trunc(), Arc::clone(&peer)));
            }
        }
        table.peers.push(peer);
    }
    // Stable sort: among equal prefixes the earlier peer wins, like for /32s.
    table.nets.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
    for peer in old.peers() {
        if !table.by_key.contains_key(&peer.public_key) {
            changes.removed.push(peer.public_key);
        }
    }
    (table, changes)
}

/// Applies the mutable parts of a kept peer's config; true if anything changed.
fn update_in_place(peer: &Peer, config: &PeerConfig, private_key: &x25519::StaticSecret, now: Instant) -> bool {
    let mut state = peer.lock();
    let is_agent = config.kind == NodeKind::Agent;
    if state.agent.is_some() != is_agent {
        state.agent = agent_path(private_key, config, now);
        state.endpoint = EndpointState::new(config.endpoints.clone());
        return true;
    }
    if let Some(agent) = state.agent.as_mut() {
        agent.path.set_map_endpoints(config.endpoints.clone(), now);
    }
    let keepalive = keepalive_duration(config.persistent_keepalive);
    let mut changed = false;
    if state.name != config.name {
        state.name.clone_from(&config.name);
        changed = true;
    }
    if state.keepalive != keepalive {
        state.keepalive = keepalive;
        changed = true;
    }
    let before = state.endpoint.clone();
    state.endpoint.set_candidates(config.endpoints.clone());
    changed |= before.current() != state.endpoint.current();
    changed
}

#[cfg(test)]
mod tests {
    use boringtun::noise::TunnResult;

    use super::super::dispatch::{local_index, peer_for};
    use super::*;

    struct Keys {
        secret: x25519::StaticSecret,
        public: x25519::PublicKey,
    }

    fn keys() -> Keys {
        let secret = x25519::StaticSecret::random();
        let public = x25519::PublicKey::from(&secret);
        Keys { secret, public }
    }

    fn peer_config(public: &x25519::PublicKey, name: &str, allowed: &[&str], endpoints: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: PublicKey::from_bytes(*public.as_bytes()),
            name: name.to_string(),
            allowed_ips: allowed.iter().map(|a| a.parse().expect("test net")).collect(),
            endpoints: endpoints.iter().map(|e| e.parse().expect("test endpoint")).collect(),
            persistent_keepalive: None,
            kind: NodeKind::Device,
            preshared_key: None,
        }
    }

    struct Fixture {
        me: Keys,
        limiter: Arc<RateLimiter>,
        next_index: u32,
    }

    impl Fixture {
        fn new() -> Self {
            let me = keys();
            let limiter = Arc::new(RateLimiter::new(&me.public, 100));
            Self {
                me,
                limiter,
                next_index: 1,
            }
        }

        fn build(&mut self, old: &PeerTable, desired: Vec<PeerConfig>) -> (PeerTable, TableChanges) {
            let mut factory = TunnFactory {
                private_key: &self.me.secret,
                public_key: PublicKey::from_bytes(*self.me.public.as_bytes()),
                rate_limiter: &self.limiter,
                next_index: &mut self.next_index,
            };
            build_table(old, desired, &mut factory)
        }
    }

    #[test]
    fn routes_by_longest_prefix_and_checks_inner_source() {
        let (a, b) = (keys(), keys());
        let mut fx = Fixture::new();
        let (table, changes) = fx.build(
            &PeerTable::default(),
            vec![
                peer_config(&a.public, "a", &["10.77.0.2/32", "10.99.0.0/16"], &[]),
                peer_config(&b.public, "b", &["10.77.0.3/32", "10.99.5.0/24"], &[]),
            ],
        );
        assert_eq!(changes.added.len(), 2);
        let name = |addr: &str| table.route(addr.parse().expect("addr")).map(|p| p.lock().name.clone());
        assert_eq!(name("10.77.0.2").as_deref(), Some("a"));
        assert_eq!(name("10.77.0.3").as_deref(), Some("b"));
        assert_eq!(name("10.99.5.7").as_deref(), Some("b"), "a /24 beats a /16");
        assert_eq!(name("10.99.6.7").as_deref(), Some("a"));
        assert_eq!(name("10.77.0.4"), None);
        let peer_a = table.by_key(&PublicKey::from_bytes(*a.public.as_bytes())).expect("a");
        assert!(table.allows_source(peer_a, "10.77.0.2".parse().expect("addr")));
        assert!(
            !table.allows_source(peer_a, "10.77.0.3".parse().expect("addr")),
            "b's address is not a's"
        );
        assert!(!table.allows_source(peer_a, "10.1.1.1".parse().expect("addr")));
    }

    #[test]
    fn reconfigure_keeps_kept_peers_and_drops_removed_ones() {
        let (a, b, c) = (keys(), keys(), keys());
        let mut fx = Fixture::new();
        let (t1, _) = fx.build(
            &PeerTable::default(),
            vec![
                peer_config(&a.public, "a", &["10.77.0.2/32"], &["198.18.0.2:51820"]),
                peer_config(&b.public, "b", &["10.77.0.3/32"], &[]),
            ],
        );
        let key_a = PublicKey::from_bytes(*a.public.as_bytes());
        let key_b = PublicKey::from_bytes(*b.public.as_bytes());
        let key_c = PublicKey::from_bytes(*c.public.as_bytes());
        let roamed: SocketAddr = "198.18.9.9:1234".parse().expect("addr");
        t1.by_key(&key_a)
            .expect("a")
            .lock()
            .note_authenticated(100, Origin::Udp(roamed), Instant::now());

        let (t2, changes) = fx.build(
            &t1,
            vec![
                peer_config(&a.public, "a-renamed", &["10.77.0.2/32"], &["198.18.0.7:51820"]),
                peer_config(&c.public, "c", &["10.77.0.4/32"], &[]),
            ],
        );
        assert_eq!(
            changes,
            TableChanges {
                added: vec![key_c],
                removed: vec![key_b],
                updated: vec![key_a]
            }
        );
        let a1 = t1.by_key(&key_a).expect("a in t1");
        let a2 = t2.by_key(&key_a).expect("a in t2");
        assert!(Arc::ptr_eq(a1, a2), "a kept peer keeps its Tunn and counters");
        {
            let state = a2.lock();
            assert_eq!(state.rx_bytes, 100);
            assert_eq!(
                state.endpoint.current(),
                Some(roamed),
                "the roamed endpoint survives new candidates"
            );
            assert_eq!(state.name, "a-renamed");
        }
        assert!(t2.by_key(&key_b).is_none());
        assert!(
            t2.route("10.77.0.3".parse().expect("addr")).is_none(),
            "removed peer's address no longer routes"
        );
        assert!(t2.by_local_index(t1.by_key(&key_b).expect("b").index).is_none());
        let c2 = t2.by_key(&key_c).expect("c");
        assert_ne!(c2.index, a2.index);
        assert!(c2.index > 0 && c2.index <= MAX_PEER_INDEX);

        // Identical config: nothing changes.
        let (_, changes) = fx.build(
            &t2,
            vec![
                peer_config(&a.public, "a-renamed", &["10.77.0.2/32"], &["198.18.0.7:51820"]),
                peer_config(&c.public, "c", &["10.77.0.4/32"], &[]),
            ],
        );
        assert_eq!(changes, TableChanges::default());
    }

    #[test]
    fn duplicates_and_own_key_are_ignored() {
        let a = keys();
        let mut fx = Fixture::new();
        let me = Keys {
            secret: fx.me.secret.clone(),
            public: fx.me.public,
        };
        let (table, changes) = fx.build(
            &PeerTable::default(),
            vec![
                peer_config(&a.public, "a", &["10.77.0.2/32"], &[]),
                peer_config(&a.public, "a-again", &["10.77.0.9/32"], &[]),
                peer_config(&me.public, "me", &["10.77.0.1/32"], &[]),
            ],
        );
        assert_eq!(changes.added.len(), 1);
        assert_eq!(table.peers().len(), 1);
        assert!(table.route("10.77.0.9".parse().expect("addr")).is_none());
    }

    #[test]
    fn index_allocation_skips_indices_in_use_and_wraps_below_2_pow_24() {
        let fx = Fixture::new();
        let mut next = MAX_PEER_INDEX;
        let mut factory = TunnFactory {
            private_key: &fx.me.secret,
            public_key: PublicKey::from_bytes(*fx.me.public.as_bytes()),
            rate_limiter: &fx.limiter,
            next_index: &mut next,
        };
        let in_use: HashSet<u32> = [1, 2].into_iter().collect();
        assert_eq!(factory.allocate_index(&in_use), MAX_PEER_INDEX);
        assert_eq!(factory.allocate_index(&in_use), 3);
    }

    /// Two real Tunns back to back: the remote's initiation is dispatched by static key, the response and data by
    /// receiver index, to the right one of two peers.
    #[test]
    fn dispatch_finds_the_peer_by_key_then_by_index() {
        let (remote, other) = (keys(), keys());
        let mut fx = Fixture::new();
        let (table, _) = fx.build(
            &PeerTable::default(),
            vec![
                peer_config(&other.public, "other", &["10.77.0.3/32"], &[]),
                peer_config(&remote.public, "remote", &["10.77.0.2/32"], &[]),
            ],
        );
        let remote_limiter = Arc::new(RateLimiter::new(&remote.public, 100));
        let mut remote_tunn = Tunn::new(
            remote.secret.clone(),
            fx.me.public,
            None,
            None,
            77,
            Some(remote_limiter),
        );

        // Remote initiates (it has a packet for us).
        let mut buf = vec![0u8; 2048];
        let mut packet = vec![0u8; 84];
        packet[0] = 0x45;
        packet[2..4].copy_from_slice(&84u16.to_be_bytes());
        packet[12..16].copy_from_slice(&[10, 77, 0, 2]);
        packet[16..20].copy_from_slice(&[10, 77, 0, 1]);
        let init = match remote_tunn.encapsulate(&packet, &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("expected an initiation, got {other:?}"),
        };
        let parsed = fx
            .limiter
            .verify_packet(None, &init, &mut [0u8; 64])
            .expect("valid mac1");
        let peer = peer_for(&table, &parsed, &fx.me.secret, &fx.me.public).expect("initiation dispatched");
        assert_eq!(peer.lock().name, "remote");

        // We answer through the dispatched peer's Tunn.
        let response = match peer.lock().tunn.decapsulate(None, &init, &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("expected a response, got {other:?}"),
        };
        // The remote completes the handshake, answers with a keepalive, then flushes the queued packet.
        let mut buf2 = vec![0u8; 2048];
        let keepalive = match remote_tunn.decapsulate(None, &response, &mut buf2) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("expected a keepalive, got {other:?}"),
        };
        let data = match remote_tunn.decapsulate(None, &[], &mut buf2) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("expected the queued data packet, got {other:?}"),
        };
        assert!(matches!(
            remote_tunn.decapsulate(None, &[], &mut buf2),
            TunnResult::Done
        ));

        for datagram in [&keepalive, &data] {
            let parsed = fx
                .limiter
                .verify_packet(None, datagram, &mut [0u8; 64])
                .expect("parses");
            let Packet::PacketData(ref d) = parsed else {
                panic!("expected data")
            };
            assert_eq!(local_index(d.receiver_idx), peer.index);
            let target = peer_for(&table, &parsed, &fx.me.secret, &fx.me.public).expect("dispatched by index");
            assert!(Arc::ptr_eq(target, peer));
        }
        match peer.lock().tunn.decapsulate(None, &data, &mut buf) {
            TunnResult::WriteToTunnelV4(p, src) => {
                assert_eq!(p, &packet[..]);
                assert!(table.allows_source(peer, src));
            }
            other => panic!("expected the inner packet, got {other:?}"),
        }
        // A data packet whose index names nobody is not dispatched.
        let mut bogus = data.clone();
        bogus[4..8].copy_from_slice(&0xFFFF_FF00u32.to_le_bytes());
        let parsed = fx.limiter.verify_packet(None, &bogus, &mut [0u8; 64]).expect("parses");
        assert!(peer_for(&table, &parsed, &fx.me.secret, &fx.me.public).is_none());
    }

    use boringtun::noise::Packet;
}

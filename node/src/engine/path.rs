//! Path selection for one agent peer: which direct UDP address (if any) its WireGuard datagrams go to, and when to
//! probe, using disco pings and pongs.
//!
//! Owns: the candidates (map endpoints, CallMeMaybe endpoints, peer-reflexive sources), probe bursts, heartbeats,
//! RTT and trust, the choice of the best direct address (lower RTT, with hysteresis and a LAN bonus) and the send rule
//! (trusted direct address, else the relay, else the best known address). Pure: no IO, no clock, no randomness; the
//! caller passes `now` and sends the pings this module asks for. It lives inside the peer's mutex, beside the `Tunn`.
//! Must not: touch the WireGuard session (a path change never needs a handshake: sessions are keyed by receiver
//! index), or move the path on authenticated WireGuard packets (disco decides; such sources only become candidates).
//!
//! Timing (design section 6):
//! - Burst: ping every candidate that has not answered yet at t = 0, 0.5, 1.5 and 3 s. Started by a new peer, changed
//!   candidates, a CallMeMaybe, our own endpoints changing, trust expiring, and every [`REPROBE_INTERVAL`] while no
//!   direct path is trusted. A burst we start ourselves also asks for a CallMeMaybe to the peer over the relay (at
//!   most one per [`CALL_ME_MAYBE_INTERVAL`]); one started by a received CallMeMaybe does not (no echo).
//! - Heartbeat: ping the best address every [`HEARTBEAT_ACTIVE`] while there was traffic in the last
//!   [`ACTIVE_WINDOW`], else every [`HEARTBEAT_IDLE`]. Trust = 2.5 x the heartbeat interval after each pong from it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use meshd_protocol::disco::TxId;

use super::endpoint::EndpointState;

/// When the pings of a burst leave, from its start.
pub(crate) const BURST_OFFSETS: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(500),
    Duration::from_millis(1500),
    Duration::from_millis(3000),
];
/// A new burst while no direct path is trusted (so a relayed pair upgrades well within 30 s).
pub(crate) const REPROBE_INTERVAL: Duration = Duration::from_secs(10);
/// At most one CallMeMaybe per peer this often.
pub(crate) const CALL_ME_MAYBE_INTERVAL: Duration = Duration::from_secs(2);
pub(crate) const HEARTBEAT_ACTIVE: Duration = Duration::from_secs(2);
pub(crate) const HEARTBEAT_IDLE: Duration = Duration::from_secs(20);
/// Traffic within this window makes a peer active (fast heartbeats, short trust).
pub(crate) const ACTIVE_WINDOW: Duration = Duration::from_secs(45);
/// A pong later than this after its ping does not count (and the ping is forgotten).
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds on per-peer state fed by the network (peer-reflexive candidates, pings in flight).
const MAX_CANDIDATES: usize = 32;
const MAX_PENDING: usize = 64;
/// A new best address must be this much better (score ratio) to replace a trusted one: avoids flapping.
const HYSTERESIS_NUM: u32 = 4;
const HYSTERESIS_DEN: u32 = 5;
/// A non-LAN address's score is its RTT doubled plus this, a LAN address's is its RTT: two nodes behind the same NAT
/// use their local addresses even when the path through the NAT measures about as fast.
const NON_LAN_PENALTY: Duration = Duration::from_millis(1);

/// Trust lasts this many heartbeat intervals after a pong (2.5 x).
fn trust_window(heartbeat: Duration) -> Duration {
    heartbeat * 5 / 2
}

/// Where a peer's next datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Direct(SocketAddr),
    Relay,
    /// No address known and no relay: the datagram is dropped (counted).
    Nowhere,
}

/// Where a candidate came from (status/debugging; map and CallMeMaybe lists are replaced wholesale).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Map,
    CallMeMaybe,
    PeerReflexive,
}

#[derive(Debug, Clone)]
struct Candidate {
    addr: SocketAddr,
    source: Source,
    /// Last pong from it and that pong's RTT.
    pong: Option<(Instant, Duration)>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    tx: TxId,
    to: SocketAddr,
    sent: Instant,
}

/// What [`PathState::poll`] asks the caller to do.
#[derive(Debug, Default)]
pub(crate) struct PollOutput {
    /// Addresses to ping now (the caller picks tx ids and reports them with [`PathState::ping_sent`]).
    pub(crate) pings: Vec<SocketAddr>,
    /// Send the peer a CallMeMaybe with our endpoints over the relay.
    pub(crate) call_me_maybe: bool,
}

/// A change of the best direct address, for the log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BestChange {
    pub(crate) addr: SocketAddr,
    pub(crate) rtt: Duration,
}

#[derive(Debug, Clone)]
pub(crate) struct PathState {
    candidates: Vec<Candidate>,
    pending: Vec<Pending>,
    /// The confirmed best direct address and when trust in it ends.
    best: Option<SocketAddr>,
    trusted_until: Option<Instant>,
    /// Start of the current burst and how many of its steps have been sent.
    burst: Option<(Instant, usize)>,
    /// The current burst asks for a CallMeMaybe (not when a received one started it).
    burst_wants_call_me_maybe: bool,
    last_burst: Option<Instant>,
    last_call_me_maybe: Option<Instant>,
    last_heartbeat: Option<Instant>,
    last_traffic: Option<Instant>,
    /// The route last reported by [`PathState::route_changed`].
    reported: Route,
    /// Without relay and trusted path: classic WireGuard behaviour (learned source, else candidate rotation).
    fallback: EndpointState,
    /// First octets of our own interface /24s: a candidate there is on our LAN.
    lan_prefixes: Vec<[u8; 3]>,
    /// New peer-reflexive candidates to ping at the next poll, burst or not.
    urgent: Vec<SocketAddr>,
}

impl PathState {
    /// A new peer with the coordinator's candidates; a burst starts at the first poll.
    pub(crate) fn new(map_endpoints: Vec<SocketAddr>, now: Instant) -> Self {
        let mut state = Self {
            candidates: Vec::new(),
            pending: Vec::new(),
            best: None,
            trusted_until: None,
            burst: None,
            burst_wants_call_me_maybe: false,
            last_burst: None,
            last_call_me_maybe: None,
            last_heartbeat: None,
            last_traffic: None,
            reported: Route::Nowhere,
            fallback: EndpointState::new(map_endpoints.clone()),
            lan_prefixes: Vec::new(),
            urgent: Vec::new(),
        };
        state.replace_source(Source::Map, &map_endpoints);
        state.start_burst(now, true);
        state
    }

    /// The send rule.
    pub(crate) fn route(&self, now: Instant, relay_connected: bool) -> Route {
        if let Some(best) = self.trusted_best(now) {
            return Route::Direct(best);
        }
        if relay_connected {
            return Route::Relay;
        }
        match self.best.or_else(|| self.fallback.current()) {
            Some(addr) => Route::Direct(addr),
            None => Route::Nowhere,
        }
    }

    /// [`PathState::route`] for a handshake initiation: without a trusted path or relay, unanswered initiations rotate
    /// through the candidates like a device peer's.
    pub(crate) fn route_initiation(&mut self, now: Instant, relay_connected: bool) -> Route {
        let route = self.route(now, relay_connected);
        if matches!(route, Route::Direct(_)) && self.trusted_best(now).is_none() && self.best.is_none() {
            return self.fallback.on_initiation().map_or(Route::Nowhere, Route::Direct);
        }
        route
    }

    /// The best direct address while it is trusted.
    pub(crate) fn trusted_best(&self, now: Instant) -> Option<SocketAddr> {
        self.best
            .filter(|_| self.trusted_until.is_some_and(|until| now < until))
    }

    /// The last pong RTT from the best address.
    pub(crate) fn latency(&self) -> Option<Duration> {
        let best = self.best?;
        self.candidates
            .iter()
            .find(|c| c.addr == best)?
            .pong
            .map(|(_, rtt)| rtt)
    }

    /// The route if it changed since the last call (for an info log line).
    pub(crate) fn route_changed(&mut self, now: Instant, relay_connected: bool) -> Option<Route> {
        let route = self.route(now, relay_connected);
        (route != self.reported).then(|| {
            self.reported = route;
            route
        })
    }

    /// Data went to or came from the peer (per packet: two compares and a store). Resuming after an idle spell makes
    /// the heartbeat due now and caps the idle-length trust, so a path that died while idle is found within seconds.
    pub(crate) fn note_traffic(&mut self, now: Instant) {
        let was_active = self.is_active(now);
        self.last_traffic = Some(now);
        if !was_active {
            self.last_heartbeat = None;
            let cap = now + trust_window(HEARTBEAT_ACTIVE);
            if let Some(until) = self.trusted_until.as_mut() {
                *until = (*until).min(cap);
            }
        }
    }

    fn is_active(&self, now: Instant) -> bool {
        self.last_traffic
            .is_some_and(|t| now.saturating_duration_since(t) < ACTIVE_WINDOW)
    }

    fn heartbeat_interval(&self, now: Instant) -> Duration {
        if self.is_active(now) {
            HEARTBEAT_ACTIVE
        } else {
            HEARTBEAT_IDLE
        }
    }

    /// New endpoints from the coordinator; a change starts a burst.
    pub(crate) fn set_map_endpoints(&mut self, endpoints: Vec<SocketAddr>, now: Instant) {
        self.fallback.set_candidates(endpoints.clone());
        if self.replace_source(Source::Map, &endpoints) {
            self.start_burst(now, true);
        }
    }

    /// The peer asked us to ping these endpoints now (it is pinging us): replace its previous list and burst at once.
    pub(crate) fn on_call_me_maybe(&mut self, endpoints: &[SocketAddr], now: Instant) {
        let usable: Vec<SocketAddr> = endpoints.iter().copied().filter(usable_endpoint).collect();
        self.replace_source(Source::CallMeMaybe, &usable);
        self.start_burst(now, false);
    }

    /// Our own endpoints changed (network change); `lan_prefixes` are our interface /24s.
    pub(crate) fn on_own_endpoints_changed(&mut self, lan_prefixes: &[[u8; 3]], now: Instant) {
        self.lan_prefixes = lan_prefixes.to_vec();
        self.start_burst(now, true);
    }

    /// An authenticated disco ping from `source`. Returns true when `source` is a new (peer-reflexive) candidate; it
    /// is pinged at the next poll (within one engine tick): how the side behind an endpoint-dependent NAT is reached.
    pub(crate) fn on_ping(&mut self, source: SocketAddr, _now: Instant) -> bool {
        self.add_peer_reflexive(source)
    }

    /// An authenticated WireGuard datagram came over UDP from `source`: counts as traffic, feeds the relay-less
    /// fallback (classic roaming) and makes an unknown source a candidate (returns true; pinged at the next poll). It
    /// never moves the chosen path itself.
    pub(crate) fn on_authenticated_udp(&mut self, source: SocketAddr, now: Instant) -> bool {
        self.note_traffic(now);
        self.fallback.on_authenticated(source);
        self.add_peer_reflexive(source)
    }

    fn add_peer_reflexive(&mut self, addr: SocketAddr) -> bool {
        if !usable_endpoint(&addr) || self.candidates.iter().any(|c| c.addr == addr) {
            return false;
        }
        if self.candidates.len() >= MAX_CANDIDATES {
            // Make room by forgetting the oldest peer-reflexive one that is not the best; map and CallMeMaybe
            // candidates stay.
            let Some(i) = self
                .candidates
                .iter()
                .position(|c| c.source == Source::PeerReflexive && Some(c.addr) != self.best)
            else {
                return false;
            };
            self.candidates.remove(i);
        }
        self.candidates.push(Candidate {
            addr,
            source: Source::PeerReflexive,
            pong: None,
        });
        self.urgent.push(addr);
        true
    }

    /// A ping with `tx` left for `to`.
    pub(crate) fn ping_sent(&mut self, tx: TxId, to: SocketAddr, now: Instant) {
        if self.pending.len() >= MAX_PENDING {
            self.pending.remove(0);
        }
        self.pending.push(Pending { tx, to, sent: now });
    }

    /// An authenticated pong from `source`. Confirms the address if it answers a ping we sent there; returns the new
    /// best address when it changed.
    pub(crate) fn on_pong(&mut self, tx: TxId, source: SocketAddr, now: Instant) -> Option<BestChange> {
        let i = self.pending.iter().position(|p| p.tx == tx && p.to == source)?;
        let ping = self.pending.swap_remove(i);
        let rtt = now.saturating_duration_since(ping.sent);
        if rtt > PING_TIMEOUT {
            return None;
        }
        let candidate = match self.candidates.iter_mut().find(|c| c.addr == source) {
            Some(c) => c,
            None => {
                // Pinged, then dropped from the list (new map): still a proven path.
                self.candidates.push(Candidate {
                    addr: source,
                    source: Source::PeerReflexive,
                    pong: None,
                });
                self.candidates.last_mut().expect("just pushed")
            }
        };
        candidate.pong = Some((now, rtt));
        let trust = now + trust_window(self.heartbeat_interval(now));
        if self.best == Some(source) {
            self.trusted_until = Some(trust);
            return None;
        }
        let switch = match self.best {
            None => true,
            Some(_) if self.trusted_best(now).is_none() => true,
            Some(best) => {
                let best_rtt = self.latency().unwrap_or(Duration::MAX);
                self.score(source, rtt) * HYSTERESIS_DEN <= self.score(best, best_rtt) * HYSTERESIS_NUM
            }
        };
        if !switch {
            return None;
        }
        self.best = Some(source);
        self.trusted_until = Some(trust);
        // Just confirmed: the next heartbeat is one interval from now.
        self.last_heartbeat = Some(now);
        Some(BestChange { addr: source, rtt })
    }

    fn score(&self, addr: SocketAddr, rtt: Duration) -> Duration {
        if self.is_lan(addr) {
            rtt
        } else {
            rtt.saturating_mul(2).saturating_add(NON_LAN_PENALTY)
        }
    }

    /// RFC 1918 / link-local / unique-local, or in one of our own interfaces' /24.
    fn is_lan(&self, addr: SocketAddr) -> bool {
        match addr.ip() {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                v4.is_private() || v4.is_link_local() || self.lan_prefixes.contains(&[o[0], o[1], o[2]])
            }
            IpAddr::V6(v6) => {
                let first = v6.segments()[0];
                (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
            }
        }
    }

    /// Timer work: expire trust and pings, run bursts and heartbeats. Called every engine tick (250 ms).
    pub(crate) fn poll(&mut self, now: Instant, relay_connected: bool, out: &mut PollOutput) {
        out.pings.clear();
        out.call_me_maybe = false;
        // Newly learned sources first: the only way to reach a peer behind an endpoint-dependent NAT.
        for addr in self.urgent.drain(..) {
            if self.candidates.iter().any(|c| c.addr == addr) && !out.pings.contains(&addr) {
                out.pings.push(addr);
            }
        }
        self.pending
            .retain(|p| now.saturating_duration_since(p.sent) <= PING_TIMEOUT);
        if self.best.is_some() && self.trusted_until.is_some_and(|until| now >= until) {
            // Trust expired: fall back (relay) and look for a path again.
            self.trusted_until = None;
            self.start_burst(now, true);
        }
        let trusted = self.trusted_best(now).is_some();
        if !trusted
            && self.burst.is_none()
            && self
                .last_burst
                .is_none_or(|t| now.saturating_duration_since(t) >= REPROBE_INTERVAL)
        {
            self.start_burst(now, true);
        }
        if let Some((start, step)) = self.burst {
            if step == 0 && self.burst_wants_call_me_maybe && relay_connected {
                if self
                    .last_call_me_maybe
                    .is_none_or(|t| now.saturating_duration_since(t) >= CALL_ME_MAYBE_INTERVAL)
                {
                    self.last_call_me_maybe = Some(now);
                    out.call_me_maybe = true;
                }
                self.burst_wants_call_me_maybe = false;
            }
            let elapsed = now.saturating_duration_since(start);
            let due = BURST_OFFSETS.iter().filter(|offset| **offset <= elapsed).count();
            if due > step {
                for c in &self.candidates {
                    let answered = c.pong.is_some_and(|(at, _)| at >= start);
                    if !answered && !out.pings.contains(&c.addr) {
                        out.pings.push(c.addr);
                    }
                }
                self.burst = (due < BURST_OFFSETS.len()).then_some((start, due));
            }
        }
        if let Some(best) = self.best
            && self
                .last_heartbeat
                .is_none_or(|t| now.saturating_duration_since(t) >= self.heartbeat_interval(now))
        {
            self.last_heartbeat = Some(now);
            if !out.pings.contains(&best) {
                out.pings.push(best);
            }
        }
    }

    fn start_burst(&mut self, now: Instant, call_me_maybe: bool) {
        self.burst = Some((now, 0));
        self.burst_wants_call_me_maybe = call_me_maybe;
        self.last_burst = Some(now);
    }

    /// Replaces the candidates of one source (keeping what is known about addresses that stay); true if the set
    /// changed.
    fn replace_source(&mut self, source: Source, endpoints: &[SocketAddr]) -> bool {
        let endpoints: Vec<SocketAddr> = endpoints.iter().copied().filter(usable_endpoint).collect();
        let endpoints = endpoints.as_slice();
        let mut before: Vec<SocketAddr> = self
            .candidates
            .iter()
            .filter(|c| c.source == source)
            .map(|c| c.addr)
            .collect();
        let mut after = endpoints.to_vec();
        before.sort();
        after.sort();
        after.dedup();
        if before == after {
            return false;
        }
        self.candidates
            .retain(|c| c.source != source || endpoints.contains(&c.addr));
        for addr in endpoints.iter().take(MAX_CANDIDATES) {
            match self.candidates.iter_mut().find(|c| c.addr == *addr) {
                // Already known from elsewhere (e.g. peer-reflexive): the better-named source wins.
                Some(c) => c.source = source,
                None => self.candidates.push(Candidate {
                    addr: *addr,
                    source,
                    pong: None,
                }),
            }
        }
        true
    }
}

/// An address worth pinging: not unspecified, not port 0, not multicast/broadcast.
fn usable_endpoint(addr: &SocketAddr) -> bool {
    addr.port() != 0
        && !addr.ip().is_unspecified()
        && !addr.ip().is_multicast()
        && addr.ip() != IpAddr::V4(Ipv4Addr::BROADCAST)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Pings everything `poll` asks for with fresh tx ids; returns (tx, to).
    fn poll(path: &mut PathState, now: Instant, relay: bool) -> (Vec<(TxId, SocketAddr)>, bool) {
        let mut out = PollOutput::default();
        path.poll(now, relay, &mut out);
        let mut sent = Vec::new();
        for to in &out.pings {
            let tx = TxId(rand::random());
            path.ping_sent(tx, *to, now);
            sent.push((tx, *to));
        }
        (sent, out.call_me_maybe)
    }

    #[test]
    fn new_peer_starts_on_the_relay_and_bursts_with_a_call_me_maybe() {
        let t0 = Instant::now();
        let a = addr("198.18.1.2:51820");
        let b = addr("192.168.1.2:51820");
        let mut path = PathState::new(vec![a, b], t0);
        assert_eq!(
            path.route(t0, true),
            Route::Relay,
            "the first packet never waits for hole punching"
        );
        assert_eq!(
            path.route(t0, false),
            Route::Direct(a),
            "without relay: the best candidate, like before"
        );
        let (pings, cmm) = poll(&mut path, t0, true);
        assert!(cmm);
        assert_eq!(pings.iter().map(|p| p.1).collect::<Vec<_>>(), vec![a, b]);
        // Nothing more until 0.5 s.
        assert!(poll(&mut path, t0 + ms(250), true).0.is_empty());
        let (pings, cmm) = poll(&mut path, t0 + ms(500), true);
        assert_eq!(pings.len(), 2);
        assert!(!cmm, "one CallMeMaybe per burst");
        // b answers the 0.5 s ping 10 ms later: it becomes the path.
        let (tx, _) = pings.iter().find(|p| p.1 == b).copied().expect("b pinged");
        let change = path.on_pong(tx, b, t0 + ms(510));
        assert_eq!(change, Some(BestChange { addr: b, rtt: ms(10) }));
        assert_eq!(path.route(t0 + ms(510), true), Route::Direct(b));
        assert_eq!(path.latency(), Some(ms(10)));
        // The 1.5 s step pings only the one that has not answered (and no heartbeat is due yet).
        let (pings, _) = poll(&mut path, t0 + ms(1500), true);
        assert_eq!(pings.iter().map(|p| p.1).collect::<Vec<_>>(), vec![a]);
    }

    #[test]
    fn pongs_must_match_tx_and_source_and_arrive_in_time() {
        let t0 = Instant::now();
        let a = addr("198.18.1.2:51820");
        let mut path = PathState::new(vec![a], t0);
        let (pings, _) = poll(&mut path, t0, true);
        let (tx, _) = pings[0];
        assert_eq!(path.on_pong(TxId([0xEE; 12]), a, t0 + ms(5)), None, "unknown tx");
        assert_eq!(path.on_pong(tx, addr("198.18.9.9:1"), t0 + ms(5)), None, "wrong source");
        assert_eq!(path.route(t0 + ms(5), true), Route::Relay);
        assert_eq!(path.on_pong(tx, a, t0 + PING_TIMEOUT + ms(1)), None, "too late");
        assert_eq!(path.route(t0 + ms(5), true), Route::Relay);
    }

    #[test]
    fn trust_expires_without_pongs_then_relay_and_a_new_burst() {
        let t0 = Instant::now();
        let a = addr("198.18.1.2:51820");
        let mut path = PathState::new(vec![a], t0);
        path.note_traffic(t0);
        let (pings, _) = poll(&mut path, t0, true);
        path.on_pong(pings[0].0, a, t0 + ms(1));
        assert_eq!(path.route(t0 + ms(1), true), Route::Direct(a));
        assert_eq!(path.route_changed(t0 + ms(1), true), Some(Route::Direct(a)));
        assert_eq!(path.route_changed(t0 + ms(2), true), None);
        // Active: heartbeats every 2 s; nobody answers any more (the NAT mapping died).
        let mut now = t0 + ms(1);
        let mut heartbeats = 0;
        while path.route(now, true) == Route::Direct(a) {
            path.note_traffic(now);
            let (pings, _) = poll(&mut path, now, true);
            heartbeats += pings.iter().filter(|p| p.1 == a).count();
            now += ms(250);
        }
        let lost_after = now - t0;
        assert!(
            lost_after <= trust_window(HEARTBEAT_ACTIVE) + ms(500),
            "trust 2.5 x 2 s: {lost_after:?}"
        );
        assert!(heartbeats >= 2, "heartbeats went out: {heartbeats}");
        assert_eq!(path.route(now, true), Route::Relay);
        assert_eq!(path.route_changed(now, true), Some(Route::Relay));
        assert_eq!(
            path.route(now, false),
            Route::Direct(a),
            "relay down: last confirmed address"
        );
        // The next poll starts a burst (with a CallMeMaybe); a pong restores the direct path.
        let (pings, cmm) = poll(&mut path, now, true);
        assert!(cmm);
        let (tx, _) = pings.iter().find(|p| p.1 == a).copied().expect("a pinged again");
        path.on_pong(tx, a, now + ms(3));
        assert_eq!(path.route(now + ms(3), true), Route::Direct(a));
    }

    #[test]
    fn idle_peers_heartbeat_slowly_and_resuming_traffic_rechecks_at_once() {
        let t0 = Instant::now();
        let a = addr("198.18.1.2:51820");
        let mut path = PathState::new(vec![a], t0);
        let (pings, _) = poll(&mut path, t0, true);
        path.on_pong(pings[0].0, a, t0 + ms(1));
        // Idle: trust is 50 s; the burst's remaining steps skip the answered candidate; heartbeat at 20 s.
        let mut now = t0 + ms(250);
        let mut heartbeat_times = Vec::new();
        while now < t0 + Duration::from_secs(45) {
            let (pings, _) = poll(&mut path, now, true);
            if pings.iter().any(|p| p.1 == a) {
                heartbeat_times.push(now - t0);
                let tx = pings.iter().find(|p| p.1 == a).expect("a").0;
                path.on_pong(tx, a, now + ms(1));
            }
            now += ms(250);
        }
        assert_eq!(path.route(now, true), Route::Direct(a));
        assert!(
            heartbeat_times.len() <= 3,
            "idle heartbeats are rare: {heartbeat_times:?}"
        );
        // Traffic resumes: a heartbeat is due now and trust is capped at the active window.
        path.note_traffic(now);
        let (pings, _) = poll(&mut path, now, true);
        assert!(pings.iter().any(|p| p.1 == a));
        assert_eq!(
            path.route(now + trust_window(HEARTBEAT_ACTIVE) + ms(1), true),
            Route::Relay
        );
    }

    #[test]
    fn hysteresis_and_lan_bonus_pick_the_best_path() {
        let t0 = Instant::now();
        let public = addr("198.18.1.2:51820");
        let faster = addr("198.18.3.3:4000");
        let lan = addr("10.1.0.5:51820");
        let mut path = PathState::new(vec![public, faster, lan], t0);
        let (pings, _) = poll(&mut path, t0, true);
        let tx = |to: SocketAddr| pings.iter().find(|p| p.1 == to).expect("pinged").0;
        assert!(path.on_pong(tx(public), public, t0 + ms(10)).is_some());
        // 9 ms is not 20% better than 10 ms: keep the current path.
        assert_eq!(path.on_pong(tx(faster), faster, t0 + ms(9)), None);
        assert_eq!(path.route(t0 + ms(10), true), Route::Direct(public));
        // A LAN address at a similar RTT wins (the same-NAT case).
        assert!(path.on_pong(tx(lan), lan, t0 + ms(11)).is_some());
        assert_eq!(path.route(t0 + ms(11), true), Route::Direct(lan));
        // Our own interface /24 counts as LAN too.
        let mut other = PathState::new(vec![addr("198.18.5.7:1")], t0);
        assert!(!other.is_lan(addr("198.18.5.7:1")));
        other.on_own_endpoints_changed(&[[198, 18, 5]], t0);
        assert!(other.is_lan(addr("198.18.5.7:1")));
    }

    #[test]
    fn much_better_path_replaces_a_trusted_one() {
        let t0 = Instant::now();
        let slow = addr("198.18.1.2:51820");
        let fast = addr("198.18.3.3:4000");
        let mut path = PathState::new(vec![slow, fast], t0);
        let (pings, _) = poll(&mut path, t0, true);
        let tx = |to: SocketAddr| pings.iter().find(|p| p.1 == to).expect("pinged").0;
        path.on_pong(tx(slow), slow, t0 + ms(50));
        assert_eq!(
            path.on_pong(tx(fast), fast, t0 + ms(60)),
            None,
            "60 ms is slower than 50 ms"
        );
        let (pings, _) = poll(&mut path, t0 + ms(500), true);
        let tx = pings.iter().find(|p| p.1 == fast).map(|p| p.0);
        assert!(tx.is_none(), "fast answered in this burst: not pinged again");
        // Next burst (trust expiry or reprobe) measures fast at 5 ms: it takes over.
        path.start_burst(t0 + Duration::from_secs(1), false);
        let (pings, _) = poll(&mut path, t0 + Duration::from_secs(1), true);
        let tx = pings.iter().find(|p| p.1 == fast).expect("fast pinged").0;
        assert_eq!(
            path.on_pong(tx, fast, t0 + Duration::from_secs(1) + ms(5)),
            Some(BestChange { addr: fast, rtt: ms(5) })
        );
    }

    #[test]
    fn peer_reflexive_sources_are_learned_and_bounded() {
        let t0 = Instant::now();
        let mut path = PathState::new(vec![], t0);
        assert_eq!(path.route(t0, false), Route::Nowhere);
        let src = addr("198.18.2.9:61234");
        // Let the first (empty) burst run out: the new source is pinged outside any burst.
        for step in 0..20 {
            poll(&mut path, t0 + ms(250 * step), true);
        }
        let t0 = t0 + Duration::from_secs(5);
        assert!(path.on_ping(src, t0), "a new source");
        assert!(!path.on_ping(src, t0), "known: not new twice");
        let (pings, _) = poll(&mut path, t0, true);
        assert_eq!(
            pings.iter().map(|p| p.1).collect::<Vec<_>>(),
            vec![src],
            "pinged at the next poll"
        );
        assert!(poll(&mut path, t0 + ms(250), true).0.is_empty(), "once");
        assert!(path.on_pong(pings[0].0, src, t0 + ms(2)).is_some());
        assert_eq!(path.route(t0 + ms(2), true), Route::Direct(src));
        // An authenticated WireGuard packet from elsewhere makes a candidate but does not move the path.
        let other = addr("198.18.2.9:61235");
        assert!(path.on_authenticated_udp(other, t0 + ms(3)));
        assert_eq!(path.route(t0 + ms(3), true), Route::Direct(src));
        for port in 1..200u16 {
            path.on_ping(SocketAddr::from(([198, 18, 7, 1], port)), t0);
        }
        assert!(path.candidates.len() <= MAX_CANDIDATES);
        assert!(
            path.candidates.iter().any(|c| c.addr == src),
            "the best is never evicted"
        );
        assert!(!path.on_ping(addr("0.0.0.0:5"), t0));
        assert!(!path.on_ping(addr("198.18.0.1:0"), t0));
    }

    #[test]
    fn call_me_maybe_bursts_at_once_without_echoing_and_reprobes_every_10s_on_relay() {
        let t0 = Instant::now();
        let mut path = PathState::new(vec![], t0);
        let (_, cmm) = poll(&mut path, t0, true);
        assert!(cmm, "our own first burst asks the peer to call back");
        let e1 = addr("198.18.4.4:51820");
        path.on_call_me_maybe(&[e1, addr("0.0.0.0:1")], t0 + ms(300));
        let (pings, cmm) = poll(&mut path, t0 + ms(300), true);
        assert_eq!(pings.iter().map(|p| p.1).collect::<Vec<_>>(), vec![e1]);
        assert!(!cmm, "a burst started by a CallMeMaybe does not send one back");
        // No answer: bursts repeat every 10 s while on the relay, each with a CallMeMaybe.
        let mut bursts = 0;
        let mut cmms = 0;
        let mut now = t0 + ms(300);
        while now < t0 + Duration::from_secs(31) {
            now += ms(250);
            let (pings, cmm) = poll(&mut path, now, true);
            if cmm {
                cmms += 1;
            }
            if !pings.is_empty() {
                bursts += 1;
            }
        }
        assert_eq!(cmms, 3, "t = 10, 20, 30 s");
        assert!(bursts >= 3 * BURST_OFFSETS.len());
        // A changed map restarts a burst; an unchanged one does not.
        let burst_before = path.last_burst;
        path.set_map_endpoints(vec![], now);
        assert_eq!(path.last_burst, burst_before);
        path.set_map_endpoints(vec![addr("198.18.8.8:1")], now);
        assert_eq!(path.last_burst, Some(now));
    }

    #[test]
    fn without_relay_initiations_rotate_through_candidates() {
        let t0 = Instant::now();
        let (a, b) = (addr("198.18.1.1:1"), addr("198.18.1.2:2"));
        let mut path = PathState::new(vec![a, b], t0);
        assert_eq!(path.route_initiation(t0, false), Route::Direct(a));
        assert_eq!(path.route_initiation(t0, false), Route::Direct(b));
        assert_eq!(path.route_initiation(t0, true), Route::Relay);
        // Roaming is the relay-less fallback: the authenticated source is used.
        let roamed = addr("198.18.9.9:9");
        path.on_authenticated_udp(roamed, t0);
        assert_eq!(path.route(t0, false), Route::Direct(roamed));
    }
}

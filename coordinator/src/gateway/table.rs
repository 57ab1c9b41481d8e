//! The gateway's routing table: which stock device (a UDP address) and which meshd agent (a public key, reached over
//! its relay connection) each WireGuard session joins. Pure: no IO, no clock of its own (every call takes `now`), no
//! cryptography (the IO shell finds an initiation's agent by its `mac1` and hands it in).
//!
//! A handshake teaches the table a session, from either side:
//! - a device initiates: its initiation (sender index `I_d`, from address `S`) goes to the agent its `mac1` names;
//!   the agent's response (sender `R_n`, receiver `I_d`, sent to the device's key `D` over the relay) binds `R_n` to
//!   the session and `D` to `S`;
//! - an agent initiates (sender `I_n`) to device `D`: it goes to `D`'s last known address; the device's response
//!   (sender `R_d`, receiver `I_n`) completes the session.
//!
//! After that, data and cookie replies are routed by receiver index: indexes the agent chose are looked up for what
//! a device sends, indexes the device chose for what an agent sends. Agents choose indexes from a 24-bit random
//! space (plus an 8-bit session counter), so two agents' indexes can collide here: a device's message to a shared
//! index goes to the session whose device address matches, and a roamed one only when the index is unambiguous.
//!
//! Security rules, enforced here: an agent can only send into sessions it is part of (and only to the device key
//! the session learnt); an unknown index is dropped; nothing a device sends creates state except an initiation,
//! which expires after [`HANDSHAKE_TIMEOUT`] and of which each agent has at most [`MAX_PENDING_PER_AGENT`]: a new
//! one evicts the oldest rather than being refused, so a flood of initiations (valid `mac1`s need only the agent's
//! public key; the IO shell caps them at the cookie limit per second) cannot lock a real device out: its handshake
//! completes in a round trip, long before [`MAX_PENDING_PER_AGENT`] newer initiations push it out.
//! Roaming (a known index arriving from a new address) is taken on trust, as the gateway cannot authenticate: it
//! takes a guess of a live 32-bit index, and yields ciphertext and a broken session until the device's next
//! keepalive moves it back.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshd_protocol::PublicKey;
use meshd_protocol::wireguard::Message;

/// A handshake not completed within this is forgotten (WireGuard retries after 5 s, with a new sender index).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A session is forgotten this long after its handshake: WireGuard refuses its keys after 180 s (REJECT_AFTER_TIME),
/// and rekeys before that with a new handshake, i.e. a new session here.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(200);
/// Handshakes in progress per agent; a new one beyond this evicts the oldest.
pub const MAX_PENDING_PER_AGENT: usize = 256;
/// Sessions in the whole table (about 150 bytes each).
pub const MAX_SESSIONS: usize = 100_000;

/// Where a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// To this agent over its relay connection; `device` is the sending device's key when the session knows it.
    ToAgent {
        agent: PublicKey,
        device: Option<PublicKey>,
    },
    /// To this address from the gateway's UDP socket.
    ToDevice(SocketAddr),
    Drop(DropReason),
}

/// Why a datagram was dropped (a metrics label each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Its receiver index belongs to no session (expired, never existed, or guessed).
    UnknownIndex,
    /// An agent sent into a session it is not part of, or to another device than the session's.
    WrongAgent,
    /// An agent initiated to a device that has not been heard from yet.
    NoDeviceAddress,
    /// The bound on sessions in the whole table was reached.
    TableFull,
    /// An index shared by several sessions arrived from an address none of them has.
    Ambiguous,
    /// An initiation reused the sender index of a live session or of another address's handshake (a replay).
    IndexInUse,
}

impl DropReason {
    pub fn label(self) -> &'static str {
        match self {
            DropReason::UnknownIndex => "unknown_index",
            DropReason::WrongAgent => "wrong_agent",
            DropReason::NoDeviceAddress => "no_device_address",
            DropReason::TableFull => "table_full",
            DropReason::Ambiguous => "ambiguous_index",
            DropReason::IndexInUse => "index_in_use",
        }
    }
}

/// One handshake or session between a device and an agent.
#[derive(Debug, Clone)]
pub struct Session {
    pub agent: PublicKey,
    /// Index the agent chose (what the device sends to).
    agent_index: Option<u32>,
    /// Index the device chose (what the agent sends to).
    device_index: Option<u32>,
    /// The device's key, once the agent answered or started the handshake (an initiation hides it).
    pub device_key: Option<PublicKey>,
    pub device_addr: SocketAddr,
    /// When the handshake started, then when it completed.
    pub since: Instant,
    pub established: bool,
}

type SessionId = u64;

/// Sessions between stock devices and agents, indexed both ways.
#[derive(Debug, Default)]
pub struct Table {
    sessions: HashMap<SessionId, Session>,
    next_id: SessionId,
    by_agent_index: HashMap<u32, Vec<SessionId>>,
    by_device_index: HashMap<u32, SessionId>,
    /// Where each device was last heard from (learnt only from sessions an agent confirmed).
    device_addrs: HashMap<PublicKey, SocketAddr>,
    /// Handshakes in progress per agent, oldest first.
    pending_per_agent: HashMap<PublicKey, VecDeque<SessionId>>,
}

impl Table {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sessions known (pending and established).
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Every session, for the admin API.
    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values()
    }

    /// The agent a device's message to the agent index `receiver` would go to (no state changes), so the caller can
    /// check a response's `mac1` against that agent's key before [`Table::route_from_device`] takes it in.
    pub fn agent_for_device_message(&self, receiver: u32, source: SocketAddr) -> Option<PublicKey> {
        self.session_for_device_message(receiver, source)
            .map(|id| self.sessions[&id].agent)
    }

    /// The last address of `device`, if an agent ever confirmed a session with it.
    pub fn device_addr(&self, device: &PublicKey) -> Option<SocketAddr> {
        self.device_addrs.get(device).copied()
    }

    /// A datagram from a device at `source`. For an initiation, `target` is the agent its `mac1` was made for (the
    /// caller checked it); for other messages it is ignored.
    pub fn route_from_device(
        &mut self,
        message: Message,
        source: SocketAddr,
        target: Option<PublicKey>,
        now: Instant,
    ) -> Route {
        match message {
            Message::Initiation { sender } => {
                let Some(agent) = target else {
                    return Route::Drop(DropReason::UnknownIndex);
                };
                // A sender index already in use stays with its session: a replayed (captured) initiation from
                // elsewhere must not take over a live session or another device's handshake. The same device
                // retrying from the same address replaces its own unanswered attempt.
                if let Some(existing) = self.by_device_index.get(&sender).map(|id| &self.sessions[id])
                    && (existing.established || existing.device_addr != source)
                {
                    return Route::Drop(DropReason::IndexInUse);
                }
                if !self.room_for_pending(agent) {
                    return Route::Drop(DropReason::TableFull);
                }
                let id = self.insert_pending(Session {
                    agent,
                    agent_index: None,
                    device_index: Some(sender),
                    device_key: None,
                    device_addr: source,
                    since: now,
                    established: false,
                });
                if let Some(replaced) = self.by_device_index.insert(sender, id) {
                    self.remove(replaced);
                }
                Route::ToAgent { agent, device: None }
            }
            Message::Response { sender, receiver } => {
                let Some(id) = self.session_for_device_message(receiver, source) else {
                    return self.miss(receiver);
                };
                let session = &self.sessions[&id];
                // Only an agent's pending initiation can be answered, and only once.
                if session.established || session.device_index.is_some() {
                    return Route::Drop(DropReason::UnknownIndex);
                }
                if let Some(replaced) = self.by_device_index.insert(sender, id)
                    && replaced != id
                {
                    self.remove(replaced);
                }
                let session = self.sessions.get_mut(&id).expect("session just found");
                session.device_index = Some(sender);
                session.device_addr = source;
                session.established = true;
                session.since = now;
                let (agent, device) = (session.agent, session.device_key);
                self.settle_pending(agent, id);
                if let Some(device) = device {
                    self.device_addrs.insert(device, source);
                }
                Route::ToAgent { agent, device }
            }
            Message::CookieReply { receiver } | Message::Data { receiver } => {
                let Some(id) = self.session_for_device_message(receiver, source) else {
                    return self.miss(receiver);
                };
                let session = &self.sessions[&id];
                let (agent, device, moved) = (session.agent, session.device_key, session.device_addr != source);
                if moved {
                    self.roam(id, source);
                }
                Route::ToAgent { agent, device }
            }
        }
    }

    /// A datagram `agent` sent (over its relay connection) to the device whose key is `device`.
    pub fn route_from_agent(&mut self, agent: PublicKey, device: PublicKey, message: Message, now: Instant) -> Route {
        match message {
            Message::Initiation { sender } => {
                let Some(addr) = self.device_addrs.get(&device).copied() else {
                    return Route::Drop(DropReason::NoDeviceAddress);
                };
                if !self.room_for_pending(agent) {
                    return Route::Drop(DropReason::TableFull);
                }
                let id = self.insert_pending(Session {
                    agent,
                    agent_index: Some(sender),
                    device_index: None,
                    device_key: Some(device),
                    device_addr: addr,
                    since: now,
                    established: false,
                });
                self.by_agent_index.entry(sender).or_default().push(id);
                Route::ToDevice(addr)
            }
            Message::Response { sender, receiver } => {
                let Some(&id) = self.by_device_index.get(&receiver) else {
                    return Route::Drop(DropReason::UnknownIndex);
                };
                let session = &self.sessions[&id];
                if session.agent != agent {
                    return Route::Drop(DropReason::WrongAgent);
                }
                if session.established || session.agent_index.is_some() {
                    return Route::Drop(DropReason::UnknownIndex);
                }
                let addr = session.device_addr;
                self.by_agent_index.entry(sender).or_default().push(id);
                let session = self.sessions.get_mut(&id).expect("session just found");
                session.agent_index = Some(sender);
                session.device_key = Some(device);
                session.established = true;
                session.since = now;
                self.settle_pending(agent, id);
                self.device_addrs.insert(device, addr);
                Route::ToDevice(addr)
            }
            Message::CookieReply { receiver } | Message::Data { receiver } => {
                let Some(session) = self.by_device_index.get(&receiver).map(|id| &self.sessions[id]) else {
                    return Route::Drop(DropReason::UnknownIndex);
                };
                if session.agent != agent || session.device_key.is_some_and(|key| key != device) {
                    return Route::Drop(DropReason::WrongAgent);
                }
                Route::ToDevice(session.device_addr)
            }
        }
    }

    /// Forgets sessions whose handshake timed out or whose keys WireGuard no longer accepts.
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                let limit = if s.established {
                    SESSION_LIFETIME
                } else {
                    HANDSHAKE_TIMEOUT
                };
                now.saturating_duration_since(s.since) >= limit
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.remove(id);
        }
    }

    /// Forgets everything about `device` (removed by an admin): its address and its sessions.
    pub fn forget_device(&mut self, device: &PublicKey) {
        self.device_addrs.remove(device);
        let ids: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.device_key.as_ref() == Some(device))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.remove(id);
        }
    }

    /// Forgets every session of `agent` (removed, or its key replaced).
    pub fn forget_agent(&mut self, agent: &PublicKey) {
        let ids: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.agent == *agent)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.remove(id);
        }
        self.pending_per_agent.remove(agent);
    }

    /// The session a device's message to the agent index `receiver` belongs to: the one at `source`, else the only
    /// one with that index.
    fn session_for_device_message(&self, receiver: u32, source: SocketAddr) -> Option<SessionId> {
        let ids = self.by_agent_index.get(&receiver)?;
        match ids.as_slice() {
            [id] => Some(*id),
            many => many.iter().copied().find(|id| self.sessions[id].device_addr == source),
        }
    }

    fn miss(&self, receiver: u32) -> Route {
        match self.by_agent_index.get(&receiver) {
            Some(ids) if ids.len() > 1 => Route::Drop(DropReason::Ambiguous),
            _ => Route::Drop(DropReason::UnknownIndex),
        }
    }

    /// The device of session `id` is now at `source`: so are its other sessions (a NAT gave it a new mapping).
    fn roam(&mut self, id: SessionId, source: SocketAddr) {
        let session = self.sessions.get_mut(&id).expect("session exists");
        session.device_addr = source;
        let Some(device) = session.device_key else { return };
        self.device_addrs.insert(device, source);
        for other in self.sessions.values_mut() {
            if other.device_key == Some(device) {
                other.device_addr = source;
            }
        }
    }

    /// Makes room for one more handshake of `agent` (evicting its oldest beyond the bound); false when the whole
    /// table is full.
    fn room_for_pending(&mut self, agent: PublicKey) -> bool {
        let oldest = self
            .pending_per_agent
            .get(&agent)
            .filter(|pending| pending.len() >= MAX_PENDING_PER_AGENT)
            .and_then(|pending| pending.front().copied());
        if let Some(oldest) = oldest {
            self.remove(oldest);
        }
        self.sessions.len() < MAX_SESSIONS
    }

    /// `id` of `agent` is no longer in progress (completed or gone).
    fn settle_pending(&mut self, agent: PublicKey, id: SessionId) {
        if let Entry::Occupied(mut entry) = self.pending_per_agent.entry(agent) {
            entry.get_mut().retain(|pending| *pending != id);
            if entry.get().is_empty() {
                entry.remove();
            }
        }
    }

    fn insert_pending(&mut self, session: Session) -> SessionId {
        self.next_id += 1;
        let id = self.next_id;
        self.pending_per_agent.entry(session.agent).or_default().push_back(id);
        self.sessions.insert(id, session);
        id
    }

    fn remove(&mut self, id: SessionId) {
        let Some(session) = self.sessions.remove(&id) else {
            return;
        };
        if !session.established {
            self.settle_pending(session.agent, id);
        }
        if let Some(index) = session.device_index
            && self.by_device_index.get(&index) == Some(&id)
        {
            self.by_device_index.remove(&index);
        }
        if let Some(index) = session.agent_index
            && let Entry::Occupied(mut entry) = self.by_agent_index.entry(index)
        {
            entry.get_mut().retain(|other| *other != id);
            if entry.get().is_empty() {
                entry.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 18, 1, 2], port))
    }

    const GPU: u8 = 1;
    const LAPTOP: u8 = 9;

    /// A device-initiated session: laptop index 0xD1 at port 1000, gpu index 0x100.
    fn device_session(table: &mut Table, now: Instant) {
        let init = table.route_from_device(Message::Initiation { sender: 0xD1 }, addr(1000), Some(key(GPU)), now);
        assert_eq!(
            init,
            Route::ToAgent {
                agent: key(GPU),
                device: None
            }
        );
        let response = table.route_from_agent(
            key(GPU),
            key(LAPTOP),
            Message::Response {
                sender: 0x100,
                receiver: 0xD1,
            },
            now,
        );
        assert_eq!(response, Route::ToDevice(addr(1000)));
    }

    #[test]
    fn a_device_initiated_session_routes_data_both_ways() {
        let now = Instant::now();
        let mut table = Table::new();
        device_session(&mut table, now);
        assert_eq!(table.device_addr(&key(LAPTOP)), Some(addr(1000)));
        assert_eq!(
            table.route_from_device(Message::Data { receiver: 0x100 }, addr(1000), None, now),
            Route::ToAgent {
                agent: key(GPU),
                device: Some(key(LAPTOP))
            }
        );
        assert_eq!(
            table.route_from_agent(key(GPU), key(LAPTOP), Message::Data { receiver: 0xD1 }, now),
            Route::ToDevice(addr(1000))
        );
        // A cookie reply from the agent to the device's initiation index goes to the device too.
        assert_eq!(
            table.route_from_agent(key(GPU), key(LAPTOP), Message::CookieReply { receiver: 0xD1 }, now),
            Route::ToDevice(addr(1000))
        );
    }

    #[test]
    fn an_agent_initiated_session_needs_a_known_device_address() {
        let now = Instant::now();
        let mut table = Table::new();
        let lonely = table.route_from_agent(key(GPU), key(LAPTOP), Message::Initiation { sender: 0x200 }, now);
        assert_eq!(lonely, Route::Drop(DropReason::NoDeviceAddress));
        device_session(&mut table, now);
        assert_eq!(
            table.route_from_agent(key(GPU), key(LAPTOP), Message::Initiation { sender: 0x201 }, now),
            Route::ToDevice(addr(1000))
        );
        let response = Message::Response {
            sender: 0xD2,
            receiver: 0x201,
        };
        assert_eq!(
            table.route_from_device(response, addr(1000), None, now),
            Route::ToAgent {
                agent: key(GPU),
                device: Some(key(LAPTOP))
            }
        );
        // Answered once only: a replayed response is dropped.
        assert_eq!(
            table.route_from_device(response, addr(1000), None, now),
            Route::Drop(DropReason::UnknownIndex)
        );
        assert_eq!(
            table.route_from_agent(key(GPU), key(LAPTOP), Message::Data { receiver: 0xD2 }, now),
            Route::ToDevice(addr(1000))
        );
        assert_eq!(
            table.route_from_device(Message::CookieReply { receiver: 0x201 }, addr(1000), None, now),
            Route::ToAgent {
                agent: key(GPU),
                device: Some(key(LAPTOP))
            }
        );
    }

    #[test]
    fn agents_only_reach_their_own_sessions() {
        let now = Instant::now();
        let mut table = Table::new();
        device_session(&mut table, now);
        let other = key(2);
        assert_eq!(
            table.route_from_agent(other, key(LAPTOP), Message::Data { receiver: 0xD1 }, now),
            Route::Drop(DropReason::WrongAgent)
        );
        assert_eq!(
            table.route_from_agent(key(GPU), key(7), Message::Data { receiver: 0xD1 }, now),
            Route::Drop(DropReason::WrongAgent)
        );
        assert_eq!(
            table.route_from_agent(key(GPU), key(LAPTOP), Message::Data { receiver: 0xBAD }, now),
            Route::Drop(DropReason::UnknownIndex)
        );
        // A second response for the same initiation (a replay, or another agent) changes nothing.
        let replay = Message::Response {
            sender: 0x300,
            receiver: 0xD1,
        };
        assert_eq!(
            table.route_from_agent(other, key(LAPTOP), replay, now),
            Route::Drop(DropReason::WrongAgent)
        );
        assert_eq!(
            table.route_from_agent(key(GPU), key(LAPTOP), replay, now),
            Route::Drop(DropReason::UnknownIndex)
        );
    }

    #[test]
    fn unknown_indexes_and_untargeted_initiations_are_dropped_without_state() {
        let now = Instant::now();
        let mut table = Table::new();
        for message in [
            Message::Data { receiver: 5 },
            Message::CookieReply { receiver: 5 },
            Message::Response { sender: 1, receiver: 5 },
            Message::Initiation { sender: 5 },
        ] {
            assert_eq!(
                table.route_from_device(message, addr(1), None, now),
                Route::Drop(DropReason::UnknownIndex)
            );
        }
        assert!(table.is_empty());
    }

    #[test]
    fn a_device_that_roams_keeps_its_sessions_and_replies_follow_it() {
        let now = Instant::now();
        let mut table = Table::new();
        device_session(&mut table, now);
        // A second session of the same laptop with another agent.
        table.route_from_device(Message::Initiation { sender: 0xE1 }, addr(1000), Some(key(3)), now);
        table.route_from_agent(
            key(3),
            key(LAPTOP),
            Message::Response {
                sender: 0x100,
                receiver: 0xE1,
            },
            now,
        );
        // Both agents chose index 0x100: the address tells the sessions apart.
        assert_eq!(
            table.route_from_device(Message::Data { receiver: 0x100 }, addr(1000), None, now),
            Route::ToAgent {
                agent: key(GPU),
                device: Some(key(LAPTOP))
            }
        );
        // From a new port the shared index is ambiguous: dropped rather than guessed.
        assert_eq!(
            table.route_from_device(Message::Data { receiver: 0x100 }, addr(2000), None, now),
            Route::Drop(DropReason::Ambiguous)
        );
        // A unique index roams: this session and the laptop's other sessions answer to the new port.
        table.route_from_device(Message::Initiation { sender: 0xF1 }, addr(1000), Some(key(4)), now);
        table.route_from_agent(
            key(4),
            key(LAPTOP),
            Message::Response {
                sender: 0x4400,
                receiver: 0xF1,
            },
            now,
        );
        assert_eq!(
            table.route_from_device(Message::Data { receiver: 0x4400 }, addr(2000), None, now),
            Route::ToAgent {
                agent: key(4),
                device: Some(key(LAPTOP))
            }
        );
        assert_eq!(
            table.route_from_agent(key(GPU), key(LAPTOP), Message::Data { receiver: 0xD1 }, now),
            Route::ToDevice(addr(2000))
        );
        assert_eq!(table.device_addr(&key(LAPTOP)), Some(addr(2000)));
        assert_eq!(
            table.route_from_device(Message::Data { receiver: 0x100 }, addr(2000), None, now),
            Route::ToAgent {
                agent: key(GPU),
                device: Some(key(LAPTOP))
            }
        );
    }

    #[test]
    fn handshakes_expire_after_the_timeout_and_sessions_after_their_lifetime() {
        let start = Instant::now();
        let mut table = Table::new();
        table.route_from_device(Message::Initiation { sender: 0xA }, addr(1), Some(key(GPU)), start);
        device_session(&mut table, start);
        table.expire(start + HANDSHAKE_TIMEOUT - Duration::from_millis(1));
        assert_eq!(table.len(), 2);
        table.expire(start + HANDSHAKE_TIMEOUT);
        assert_eq!(table.len(), 1, "the unanswered initiation is gone");
        assert_eq!(
            table.route_from_agent(
                key(GPU),
                key(LAPTOP),
                Message::Response {
                    sender: 1,
                    receiver: 0xA
                },
                start
            ),
            Route::Drop(DropReason::UnknownIndex)
        );
        table.expire(start + SESSION_LIFETIME - Duration::from_millis(1));
        assert_eq!(
            table.route_from_device(Message::Data { receiver: 0x100 }, addr(1000), None, start),
            Route::ToAgent {
                agent: key(GPU),
                device: Some(key(LAPTOP))
            }
        );
        table.expire(start + SESSION_LIFETIME);
        assert!(table.is_empty());
        assert_eq!(
            table.route_from_device(Message::Data { receiver: 0x100 }, addr(1000), None, start),
            Route::Drop(DropReason::UnknownIndex)
        );
        // The device's address outlives its sessions: the agent can still start a new handshake.
        assert_eq!(table.device_addr(&key(LAPTOP)), Some(addr(1000)));
    }

    #[test]
    fn a_flood_of_initiations_evicts_the_oldest_and_never_locks_a_device_out() {
        let now = Instant::now();
        let mut table = Table::new();
        // The real laptop's initiation, then a flood for the same agent from elsewhere.
        table.route_from_device(Message::Initiation { sender: 0xD1 }, addr(1000), Some(key(GPU)), now);
        for sender in 1000..1000 + MAX_PENDING_PER_AGENT as u32 - 1 {
            let route = table.route_from_device(Message::Initiation { sender }, addr(666), Some(key(GPU)), now);
            assert!(matches!(route, Route::ToAgent { .. }));
        }
        assert_eq!(table.len(), MAX_PENDING_PER_AGENT);
        // The agent answers the laptop within a round trip: still there, it completes.
        let response = Message::Response {
            sender: 0x100,
            receiver: 0xD1,
        };
        assert_eq!(
            table.route_from_agent(key(GPU), key(LAPTOP), response, now),
            Route::ToDevice(addr(1000))
        );
        // More flood: the oldest pending ones go, the established session and other agents stay.
        table.route_from_device(Message::Initiation { sender: 0xE1 }, addr(1000), Some(key(2)), now);
        for sender in 100_000..100_000 + 2 * MAX_PENDING_PER_AGENT as u32 {
            let route = table.route_from_device(Message::Initiation { sender }, addr(666), Some(key(GPU)), now);
            assert!(matches!(route, Route::ToAgent { .. }), "never refused");
        }
        assert_eq!(table.len(), MAX_PENDING_PER_AGENT + 2);
        assert_eq!(
            table.route_from_device(Message::Data { receiver: 0x100 }, addr(1000), None, now),
            Route::ToAgent {
                agent: key(GPU),
                device: Some(key(LAPTOP))
            }
        );
        assert_eq!(
            table.route_from_agent(
                key(2),
                key(LAPTOP),
                Message::Response {
                    sender: 7,
                    receiver: 0xE1
                },
                now
            ),
            Route::ToDevice(addr(1000))
        );
        table.expire(now + HANDSHAKE_TIMEOUT);
        assert_eq!(table.len(), 2, "only the established sessions are left");
        assert!(table.pending_per_agent.is_empty());
    }

    #[test]
    fn forgetting_a_device_or_an_agent_ends_their_sessions() {
        let now = Instant::now();
        let mut table = Table::new();
        device_session(&mut table, now);
        table.forget_device(&key(LAPTOP));
        assert!(table.is_empty());
        assert_eq!(table.device_addr(&key(LAPTOP)), None);
        assert_eq!(
            table.route_from_device(Message::Data { receiver: 0x100 }, addr(1000), None, now),
            Route::Drop(DropReason::UnknownIndex)
        );
        device_session(&mut table, now);
        table.forget_agent(&key(GPU));
        assert!(table.is_empty());
        assert!(table.by_agent_index.is_empty() && table.by_device_index.is_empty());
    }

    #[test]
    fn a_replayed_initiation_cannot_take_over_a_session() {
        let now = Instant::now();
        let mut table = Table::new();
        device_session(&mut table, now);
        // The laptop's captured initiation, replayed from an attacker's address.
        let replay = table.route_from_device(Message::Initiation { sender: 0xD1 }, addr(666), Some(key(GPU)), now);
        assert_eq!(replay, Route::Drop(DropReason::IndexInUse));
        assert_eq!(
            table.route_from_agent(key(GPU), key(LAPTOP), Message::Data { receiver: 0xD1 }, now),
            Route::ToDevice(addr(1000)),
            "replies still go to the laptop"
        );
        // Nor a pending handshake of another address.
        table.route_from_device(Message::Initiation { sender: 0xAA }, addr(1000), Some(key(GPU)), now);
        let steal = table.route_from_device(Message::Initiation { sender: 0xAA }, addr(666), Some(key(GPU)), now);
        assert_eq!(steal, Route::Drop(DropReason::IndexInUse));
    }

    #[test]
    fn a_reused_device_index_replaces_the_old_handshake() {
        let now = Instant::now();
        let mut table = Table::new();
        table.route_from_device(Message::Initiation { sender: 7 }, addr(1), Some(key(GPU)), now);
        table.route_from_device(Message::Initiation { sender: 7 }, addr(1), Some(key(GPU)), now);
        assert_eq!(table.len(), 1);
        assert_eq!(
            table.route_from_agent(key(GPU), key(LAPTOP), Message::Response { sender: 1, receiver: 7 }, now),
            Route::ToDevice(addr(1))
        );
    }
}

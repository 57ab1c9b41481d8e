//! Which UDP address a peer's packets go to: the endpoint it last authenticated from (roaming), else one of the
//! candidates the coordinator reported, rotated while handshakes go unanswered.
//!
//! Owns: that choice only. Pure: no IO, no clock. The caller ([`super::peers::PeerState`]) tells it when a handshake
//! initiation leaves and when an authenticated packet arrives; it lives inside the peer's mutex beside the `Tunn`, so
//! it needs no synchronisation of its own.

use std::net::SocketAddr;

/// After this many consecutive unanswered handshake initiations sent to a learned (roamed) endpoint, fall back to the
/// coordinator's candidates: the peer probably moved without us hearing from it (e.g. its NAT mapping changed). Two
/// initiations are ~10 s (REKEY_TIMEOUT 5 s each); a peer that is merely idle answers the first one.
const LEARNED_ENDPOINT_MAX_MISSES: u32 = 2;

#[derive(Debug, Clone, Default)]
pub(crate) struct EndpointState {
    /// Candidates from the coordinator, best first.
    candidates: Vec<SocketAddr>,
    /// The candidate handshakes currently go to (meaningful while `learned` is None).
    cursor: usize,
    /// The source of the peer's last authenticated packet; wins over the candidates.
    learned: Option<SocketAddr>,
    /// The peer's last authenticated packet came through the coordinator's device gateway (over the relay): a
    /// stock device behind a NAT. Wins over the candidates like `learned` does.
    via_gateway: bool,
    /// Handshake initiations sent since the peer last answered anything.
    unanswered_initiations: u32,
}

impl EndpointState {
    pub(crate) fn new(candidates: Vec<SocketAddr>) -> Self {
        Self {
            candidates,
            ..Self::default()
        }
    }

    /// Where packets for this peer go now; None: unknown, wait for the peer to send first.
    pub(crate) fn current(&self) -> Option<SocketAddr> {
        self.learned.or_else(|| self.candidates.get(self.cursor).copied())
    }

    /// True when packets go through the coordinator's gateway: the peer last answered from there, or there is no
    /// address to send to at all (a stock device registered by key reports none).
    pub(crate) fn uses_gateway(&self) -> bool {
        self.via_gateway || self.current().is_none()
    }

    /// True when the current endpoint was learned from the peer's own packets rather than configured.
    pub(crate) fn is_learned(&self) -> bool {
        self.learned.is_some()
    }

    /// Replaces the coordinator's candidates. The learned endpoint is kept (it is fresher than any report); the cursor
    /// stays on the same address if it is still a candidate so a rotation in progress is not restarted.
    pub(crate) fn set_candidates(&mut self, candidates: Vec<SocketAddr>) {
        if candidates == self.candidates {
            return;
        }
        let at = self.candidates.get(self.cursor).copied();
        self.cursor = at
            .and_then(|addr| candidates.iter().position(|c| *c == addr))
            .unwrap_or(0);
        self.candidates = candidates;
    }

    /// A packet from `source` passed authentication (handshake or data): the peer is there now (WireGuard roaming).
    pub(crate) fn on_authenticated(&mut self, source: SocketAddr) {
        self.learned = Some(source);
        self.via_gateway = false;
        self.unanswered_initiations = 0;
    }

    /// A packet that came through the device gateway passed authentication: answer the same way.
    pub(crate) fn on_authenticated_via_gateway(&mut self) {
        self.via_gateway = true;
        self.unanswered_initiations = 0;
    }

    /// A handshake initiation is about to leave; returns where to send it. If the previous initiation went
    /// unanswered (boringtun only re-sends after REKEY_TIMEOUT), move on to the next candidate first.
    pub(crate) fn on_initiation(&mut self) -> Option<SocketAddr> {
        if self.unanswered_initiations > 0 {
            if self.via_gateway {
                // Unanswered through the gateway: try the candidates (if any) as a classic peer again.
                if self.unanswered_initiations >= LEARNED_ENDPOINT_MAX_MISSES {
                    self.via_gateway = false;
                }
            } else if self.learned.is_some() {
                if self.unanswered_initiations >= LEARNED_ENDPOINT_MAX_MISSES {
                    self.learned = None;
                }
            } else if !self.candidates.is_empty() {
                self.cursor = (self.cursor + 1) % self.candidates.len();
            }
        }
        self.unanswered_initiations = self.unanswered_initiations.saturating_add(1);
        self.current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn no_candidates_means_wait_for_the_peer() {
        let mut e = EndpointState::new(vec![]);
        assert_eq!(e.current(), None);
        assert_eq!(e.on_initiation(), None);
        e.on_authenticated(addr("198.18.0.9:4000"));
        assert_eq!(e.current(), Some(addr("198.18.0.9:4000")));
    }

    #[test]
    fn unanswered_initiations_rotate_candidates() {
        let a = addr("198.18.0.1:1");
        let b = addr("198.18.0.2:2");
        let mut e = EndpointState::new(vec![a, b]);
        assert_eq!(e.current(), Some(a));
        assert_eq!(
            e.on_initiation(),
            Some(a),
            "first initiation goes to the best candidate"
        );
        assert_eq!(e.on_initiation(), Some(b), "a retry after an unanswered one moves on");
        assert_eq!(e.on_initiation(), Some(a), "and wraps around");
    }

    #[test]
    fn learned_endpoint_wins_and_answer_resets_rotation() {
        let a = addr("198.18.0.1:1");
        let b = addr("198.18.0.2:2");
        let roamed = addr("198.18.5.5:5");
        let mut e = EndpointState::new(vec![a, b]);
        e.on_initiation();
        e.on_authenticated(roamed);
        assert_eq!(e.current(), Some(roamed));
        assert!(e.is_learned());
        // A rekey that is answered keeps the learned endpoint.
        assert_eq!(e.on_initiation(), Some(roamed));
        e.on_authenticated(roamed);
        assert_eq!(e.on_initiation(), Some(roamed));
        // Unanswered twice: give up on it and go back to the candidates.
        assert_eq!(e.on_initiation(), Some(roamed));
        assert_eq!(e.on_initiation(), Some(a));
        assert!(!e.is_learned());
    }

    #[test]
    fn new_candidates_keep_cursor_and_learned() {
        let a = addr("198.18.0.1:1");
        let b = addr("198.18.0.2:2");
        let c = addr("198.18.0.3:3");
        let mut e = EndpointState::new(vec![a, b]);
        e.on_initiation();
        e.on_initiation();
        assert_eq!(e.current(), Some(b));
        e.set_candidates(vec![c, b]);
        assert_eq!(e.current(), Some(b), "cursor follows the address");
        e.set_candidates(vec![c]);
        assert_eq!(e.current(), Some(c), "a vanished address restarts at the best");
        let roamed = addr("198.18.7.7:7");
        e.on_authenticated(roamed);
        e.set_candidates(vec![a]);
        assert_eq!(e.current(), Some(roamed));
    }
}

//! The timer task: WireGuard timers for every peer, our persistent keepalive, the rate limiter's clock, and the disco
//! probes of agent peers.
//!
//! Owns: calling `update_timers` on each peer every [`TICK`] and sending what it returns (handshake retries, rekeys,
//! keepalives), sending a persistent keepalive when a peer has heard nothing from us for its interval, resetting the
//! shared rate limiter once per second (boringtun resets only limiters it owns), and logging peers going up and down.
//! For agent peers it also polls the path state (`path`): sends the pings of bursts and heartbeats over UDP, the
//! CallMeMaybe over the relay, tells paths about our own endpoints changing, and logs path changes at info.
//! It locks each peer once per tick, briefly; the packet tasks never wait on it for long.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;
use boringtun::noise::errors::WireGuardError;
use meshd_protocol::PublicKey;
use meshd_protocol::disco::{DiscoMessage, TxId};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::counters::bump;
use super::path::{PollOutput, Route};
use super::peers::{Destination, Peer, PeerState};
use super::udp::SendBatch;

/// Room for one sealed ping (62 B header + 13 B plaintext + 16 B tag) or a handshake initiation (148 B).
const PROBE_BUF: usize = 160;

/// Reusable scratch for one tick's probes.
#[derive(Default)]
struct Probes {
    poll: PollOutput,
    /// Sealed pings waiting to be put into the send batch once the peer's lock is released.
    pings: Vec<(SocketAddr, usize, [u8; PROBE_BUF])>,
}

/// boringtun's timers are meant to be driven about every 250 ms (its own device does so).
const TICK: Duration = Duration::from_millis(250);

/// Datagrams per send batch: at most a few per peer per tick.
const TIMER_SLOTS: usize = 64;

pub(crate) async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut batch = SendBatch::new(TIMER_SLOTS, shared.datagram_slot);
    let mut probes = Probes::default();
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            _ = interval.tick() => {}
        }
        // Checks the elapsed time itself: resets at most once per second.
        shared.rate_limiter.reset_count();
        let table = shared.table.load_full();
        let now = Instant::now();
        let max_segments = shared.udp.max_gso_segments();
        for peer in table.peers() {
            if batch.needs_flush() {
                shared.send_batch(&mut batch);
            }
            tick_peer(&shared, peer, &mut batch, now, max_segments);
            probe_peer(&shared, peer, &mut probes, now);
            for (to, len, buf) in probes.pings.drain(..) {
                if batch.needs_flush() {
                    shared.send_batch(&mut batch);
                }
                batch.push_copy(&buf[..len], to, max_segments);
            }
        }
        shared.send_batch(&mut batch);
    }
}

/// Disco work for one agent peer: own endpoints changed, bursts and heartbeats (sealed into `probes.pings`), the
/// CallMeMaybe (straight to the relay queue), and the path-change log line.
fn probe_peer(shared: &Shared, peer: &Peer, probes: &mut Probes, now: Instant) {
    let mut state = peer.lock();
    let state = &mut *state;
    let Some(agent) = state.agent.as_mut() else {
        return;
    };
    let our_key = PublicKey::from_bytes(*shared.public_key.as_bytes());
    let relay_connected = shared.relay_connected();
    let generation = shared.own_generation.load(Ordering::Relaxed);
    if agent.own_generation != generation {
        agent.own_generation = generation;
        agent
            .path
            .on_own_endpoints_changed(&shared.own_endpoints().lan_prefixes, now);
    }
    agent.path.poll(now, relay_connected, &mut probes.poll);
    for &to in &probes.poll.pings {
        let tx = TxId(rand::random());
        let mut buf = [0u8; PROBE_BUF];
        match agent.disco.seal_into(
            &DiscoMessage::Ping { tx },
            &our_key,
            &peer.public_key,
            rand::random(),
            &mut buf,
        ) {
            Ok(len) => {
                agent.path.ping_sent(tx, to, now);
                tracing::trace!(peer = ?peer.public_key, %to, "disco ping");
                probes.pings.push((to, len, buf));
            }
            Err(e) => tracing::debug!(error = %e, "cannot seal a ping"),
        }
    }
    if probes.poll.call_me_maybe {
        let endpoints = shared.own_endpoints().endpoints;
        let message = DiscoMessage::CallMeMaybe { endpoints };
        let sealed = agent.disco.seal(&message, &our_key, &peer.public_key, rand::random());
        tracing::debug!(peer = ?peer.public_key, "call-me-maybe sent");
        shared.send_relay(peer.public_key, &sealed);
    }
    let Some(route) = agent.path.route_changed(now, relay_connected) else {
        return;
    };
    let name = &state.name;
    match route {
        Route::Direct(addr) => {
            let rtt_ms = agent.path.latency().map(|rtt| rtt.as_secs_f64() * 1000.0);
            tracing::info!(peer = ?peer.public_key, %name, %addr, ?rtt_ms, "peer {name} path direct {addr}");
            // Without a relay, a handshake still waiting on an unanswered candidate would retry only after
            // REKEY_TIMEOUT (5 s): now that disco confirmed an address, initiate there at once. (With a relay the
            // initiation already went through it; a new one would only restart that handshake.)
            let confirmed = agent.path.trusted_best(now) == Some(addr);
            if confirmed && !relay_connected && state.tunn.time_since_last_handshake().is_none() {
                let mut buf = [0u8; PROBE_BUF];
                if let TunnResult::WriteToNetwork(init) = state.tunn.format_handshake_initiation(&mut buf, true) {
                    let len = init.len();
                    state.note_sent(len, now);
                    probes.pings.push((addr, len, buf));
                }
            }
        }
        Route::Relay => tracing::info!(peer = ?peer.public_key, %name, "peer {name} path relay"),
        Route::Nowhere => tracing::info!(peer = ?peer.public_key, %name, "peer {name} has no path"),
    }
}

fn tick_peer(shared: &Shared, peer: &Peer, batch: &mut SendBatch, now: Instant, max_segments: usize) {
    let mut state = peer.lock();
    let relay_connected = shared.relay_connected();
    match state.tunn.update_timers(batch.tail()) {
        TunnResult::WriteToNetwork(datagram) => {
            let len = datagram.len();
            send(shared, peer, &mut state, batch, len, now, max_segments, relay_connected);
        }
        TunnResult::Err(WireGuardError::ConnectionExpired) => {
            // The peer did not answer for REKEY_ATTEMPT_TIME (or keys aged out): it is down, not an engine failure.
            // New traffic or our persistent keepalive starts a fresh handshake.
        }
        _ => {}
    }
    if let Some(interval) = state.keepalive
        && now.duration_since(state.last_sent) >= interval
        && (state.agent.is_some() || state.endpoint.current().is_some())
        && !batch.needs_flush()
    {
        // An empty data packet; without a session boringtun starts a handshake instead (which is what we want for
        // a peer behind NAT that must keep its mapping open).
        if let TunnResult::WriteToNetwork(datagram) = state.tunn.encapsulate(&[], batch.tail()) {
            let len = datagram.len();
            send(shared, peer, &mut state, batch, len, now, max_segments, relay_connected);
        } else {
            // A handshake is in progress: count this interval as done.
            state.last_sent = now;
        }
    }
    let connected = state.tunn.time_since_last_handshake().is_some();
    if connected != state.was_connected {
        state.was_connected = connected;
        if connected {
            tracing::info!(peer = ?peer.public_key, name = %state.name,
                endpoint = ?state.direct_endpoint(now, relay_connected),
                roamed = state.agent.is_none() && state.endpoint.is_learned(), "peer connected");
        } else {
            tracing::info!(peer = ?peer.public_key, name = %state.name, "peer session ended");
        }
    }
}

/// Sends the datagram the Tunn just wrote at the batch's tail where the peer's send rule says (UDP or the relay).
#[allow(clippy::too_many_arguments)]
fn send(
    shared: &Shared,
    peer: &Peer,
    state: &mut PeerState,
    batch: &mut SendBatch,
    len: usize,
    now: Instant,
    max_segments: usize,
    relay_connected: bool,
) {
    match state.destination_for(&batch.tail()[..len], now, relay_connected) {
        Destination::Udp(endpoint) => {
            state.note_sent(len, now);
            batch.commit(len, endpoint, max_segments);
        }
        Destination::Relay => {
            if shared.send_relay(peer.public_key, &batch.tail()[..len]) {
                state.note_sent_relayed(len, now);
            }
        }
        Destination::Unknown => bump(&shared.counters.no_endpoint_packets),
    }
}

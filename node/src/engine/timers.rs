//! The timer task: WireGuard timers for every peer, our persistent keepalive, and the rate limiter's clock.
//!
//! Owns: calling `update_timers` on each peer every [`TICK`] and sending what it returns (handshake retries, rekeys,
//! keepalives), sending a persistent keepalive when a peer has heard nothing from us for its interval, resetting the
//! shared rate limiter once per second (boringtun resets only limiters it owns), and logging peers going up and down.
//! It locks each peer once per tick, briefly; the packet tasks never wait on it for long.

use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;
use boringtun::noise::errors::WireGuardError;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::counters::bump;
use super::peers::{Peer, PeerState};
use super::udp::SendBatch;

/// boringtun's timers are meant to be driven about every 250 ms (its own device does so).
const TICK: Duration = Duration::from_millis(250);

/// Datagrams per send batch: at most a few per peer per tick.
const TIMER_SLOTS: usize = 64;

pub(crate) async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut batch = SendBatch::new(TIMER_SLOTS, shared.datagram_slot);
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
                shared.send_batch(&mut batch).await;
            }
            tick_peer(&shared, peer, &mut batch, now, max_segments);
        }
        shared.send_batch(&mut batch).await;
    }
}

fn tick_peer(shared: &Shared, peer: &Peer, batch: &mut SendBatch, now: Instant, max_segments: usize) {
    let mut state = peer.lock();
    match state.tunn.update_timers(batch.tail()) {
        TunnResult::WriteToNetwork(datagram) => {
            let len = datagram.len();
            send(shared, &mut state, batch, len, now, max_segments);
        }
        TunnResult::Err(WireGuardError::ConnectionExpired) => {
            // The peer did not answer for REKEY_ATTEMPT_TIME (or keys aged out): it is down, not an engine failure.
            // New traffic or our persistent keepalive starts a fresh handshake.
        }
        _ => {}
    }
    if let Some(interval) = state.keepalive
        && now.duration_since(state.last_sent) >= interval
        && state.endpoint.current().is_some()
        && !batch.needs_flush()
    {
        // An empty data packet; without a session boringtun starts a handshake instead (which is what we want for
        // a peer behind NAT that must keep its mapping open).
        if let TunnResult::WriteToNetwork(datagram) = state.tunn.encapsulate(&[], batch.tail()) {
            let len = datagram.len();
            send(shared, &mut state, batch, len, now, max_segments);
        } else {
            // A handshake is in progress: count this interval as done.
            state.last_sent = now;
        }
    }
    let connected = state.tunn.time_since_last_handshake().is_some();
    if connected != state.was_connected {
        state.was_connected = connected;
        if connected {
            tracing::info!(peer = ?peer.public_key, name = %state.name, endpoint = ?state.endpoint.current(),
                roamed = state.endpoint.is_learned(), "peer connected");
        } else {
            tracing::info!(peer = ?peer.public_key, name = %state.name, "peer session ended");
        }
    }
}

/// Sends the datagram the Tunn just wrote at the batch's tail to the peer's endpoint.
fn send(shared: &Shared, state: &mut PeerState, batch: &mut SendBatch, len: usize, now: Instant, max_segments: usize) {
    let endpoint = state.destination_for(&batch.tail()[..len]);
    match endpoint {
        Some(endpoint) => {
            state.note_sent(len, now);
            batch.commit(len, endpoint, max_segments);
        }
        None => bump(&shared.counters.no_endpoint_packets),
    }
}

//! Simulated nodes: real join requests (X25519 key pairs and join proofs, as `meshd join` sends them) and map
//! streams that follow the coordinator the way the agent does (reconnect with backoff, resume with `Last-Event-ID`),
//! counting every byte received and timing the arrival of the change being probed.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures::StreamExt;
use meshd_protocol::api::{JoinResponse, join_proof};
use meshd_protocol::{MapMessage, NodeId, PublicKey};
use rand::Rng;
use serde_json::json;
use tokio::sync::{Notify, mpsc};
use x25519_dalek::StaticSecret;

use crate::sse;

/// A simulated node's key pair, derived from its index (deterministic, so reruns join the same keys).
pub fn key(n: u32) -> (StaticSecret, PublicKey) {
    let mut bytes = [0x5au8; 32];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    let secret = StaticSecret::from(bytes);
    let public = PublicKey::from_bytes(x25519_dalek::PublicKey::from(&secret).to_bytes());
    (secret, public)
}

/// The JSON body of a join, with its proof of possession of the private key.
pub fn join_body(n: u32, hostname: &str, token: &str, token_id: &str, join_key: &PublicKey) -> serde_json::Value {
    let (secret, public) = key(n);
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*join_key.as_bytes()));
    let proof = STANDARD.encode(join_proof(shared.as_bytes(), token_id, &public, hostname));
    json!({"token": token, "public_key": public.to_string(), "hostname": hostname, "proof": proof})
}

/// Sends one join; returns the response and its latency.
pub async fn join(
    client: &reqwest::Client,
    base: &str,
    body: &serde_json::Value,
) -> anyhow::Result<(JoinResponse, Duration)> {
    let started = Instant::now();
    let r = client
        .post(format!("{base}/api/v1/join"))
        .json(body)
        .timeout(Duration::from_secs(60))
        .send()
        .await?;
    let status = r.status();
    if !status.is_success() {
        anyhow::bail!("join: {status}: {}", r.text().await.unwrap_or_default());
    }
    let response: JoinResponse = r.json().await?;
    Ok((response, started.elapsed()))
}

/// The change whose arrival the streams are watching for.
#[derive(Debug, Clone)]
pub enum Probe {
    /// `peer_added` of a node with this name.
    Added(String),
    /// `peer_removed` of this node.
    Removed(NodeId),
    /// `peer_changed` / `self_changed` of this node with an endpoint on this port.
    Endpoint(NodeId, u16),
}

impl Probe {
    fn matches(&self, message: &MapMessage) -> bool {
        match (self, message) {
            (Self::Added(name), MapMessage::PeerAdded { peer, .. }) => peer.name == *name,
            (Self::Removed(id), MapMessage::PeerRemoved { id: removed, .. }) => removed == id,
            (Self::Endpoint(id, port), MapMessage::PeerChanged { peer: node, .. })
            | (Self::Endpoint(id, port), MapMessage::SelfChanged { node, .. }) => {
                node.id == *id && node.endpoints.iter().any(|e| e.port() == *port)
            }
            _ => false,
        }
    }
}

/// One probe arrival on one stream.
#[derive(Debug)]
pub struct Arrival {
    pub at: Instant,
}

/// What every stream shares.
#[derive(Debug)]
pub struct Shared {
    pub client: reqwest::Client,
    pub base: String,
    probe: RwLock<Option<Probe>>,
    arrivals: mpsc::UnboundedSender<Arrival>,
    stopping: AtomicBool,
    stop: Notify,
}

impl Shared {
    pub fn new(client: reqwest::Client, base: String) -> (Arc<Self>, mpsc::UnboundedReceiver<Arrival>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Self {
            client,
            base,
            probe: RwLock::new(None),
            arrivals: tx,
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
        });
        (shared, rx)
    }

    pub fn set_probe(&self, probe: Option<Probe>) {
        *self.probe.write().unwrap_or_else(|p| p.into_inner()) = probe;
    }

    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.notify_waiters();
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// Counters of one stream, read by the scenarios.
#[derive(Debug, Default)]
pub struct StreamState {
    pub connected: AtomicBool,
    /// Successful (200) connections so far.
    pub connects: AtomicU32,
    /// Last version received (sent as `Last-Event-ID` on reconnect).
    pub version: AtomicU64,
    pub bytes: AtomicU64,
    pub events: AtomicU64,
    pub full_maps: AtomicU32,
    /// Nodes in the last full map (self included).
    pub full_nodes: AtomicU64,
    /// Connection attempts that failed (refused, reset, non-200).
    pub failures: AtomicU32,
}

/// Follows one node's map stream until [`Shared::stop`]: reconnects with backoff and resumes from the last version.
pub async fn follow(shared: Arc<Shared>, credential: String, state: Arc<StreamState>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if shared.stopping() {
            return;
        }
        let mut request = shared
            .client
            .get(format!("{}/api/v1/map", shared.base))
            .bearer_auth(&credential);
        let version = state.version.load(Ordering::Acquire);
        if version > 0 {
            request = request.header("Last-Event-ID", version.to_string());
        }
        let response = tokio::select! {
            () = shared.stop.notified() => return,
            r = request.send() => r,
        };
        match response {
            Ok(r) if r.status().is_success() => {
                backoff = Duration::from_millis(100);
                state.connected.store(true, Ordering::Release);
                state.connects.fetch_add(1, Ordering::AcqRel);
                read_events(&shared, r, &state).await;
                state.connected.store(false, Ordering::Release);
            }
            Ok(r) => {
                state.failures.fetch_add(1, Ordering::Relaxed);
                if r.status() == reqwest::StatusCode::UNAUTHORIZED {
                    return; // deleted: nothing to follow
                }
            }
            Err(_) => {
                state.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Jittered exponential backoff (as the agent does), so a restart is not met by one synchronized wave.
        let pause = backoff.mul_f64(rand::thread_rng().gen_range(0.5..1.0));
        backoff = (backoff * 2).min(Duration::from_secs(1));
        tokio::select! {
            () = shared.stop.notified() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

async fn read_events(shared: &Shared, response: reqwest::Response, state: &StreamState) {
    let mut body = response.bytes_stream();
    let mut reader = sse::Reader::default();
    loop {
        let chunk = tokio::select! {
            () = shared.stop.notified() => return,
            chunk = body.next() => chunk,
        };
        let Some(Ok(chunk)) = chunk else { return };
        state.bytes.fetch_add(chunk.len() as u64, Ordering::AcqRel);
        reader.feed(&chunk, |event| on_event(shared, state, event));
    }
}

fn on_event(shared: &Shared, state: &StreamState, event: sse::Event) {
    let at = Instant::now();
    state.events.fetch_add(1, Ordering::Relaxed);
    if let Some(id) = event.id {
        state.version.fetch_max(id, Ordering::AcqRel);
    }
    if let Some(nodes) = event.large_nodes {
        state.full_maps.fetch_add(1, Ordering::Relaxed);
        state.full_nodes.store(nodes, Ordering::Release);
        return;
    }
    let Some(data) = event.data else { return };
    // Deltas are only parsed while a change is being probed: the connect storm alone brings each stream up to N
    // online changes (N^2 / 2 events in all), and parsing them would make the generator the bottleneck.
    let full = data.starts_with(br#"{"type":"full""#);
    let probe = shared.probe.read().unwrap_or_else(|p| p.into_inner());
    if !full && probe.is_none() {
        return;
    }
    let Ok(message) = serde_json::from_slice::<MapMessage>(&data) else {
        return;
    };
    if let MapMessage::Full { map } = &message {
        state.full_maps.fetch_add(1, Ordering::Relaxed);
        state.full_nodes.store(map.peers.len() as u64 + 1, Ordering::Release);
        return;
    }
    if probe.as_ref().is_some_and(|p| p.matches(&message)) {
        let _ = shared.arrivals.send(Arrival { at });
    }
}

//! The agent's life: joining -> running <-> degraded (coordinator away) -> stopped.
//!
//! Owns: `join` (generate the key, enrol, save the identity) and `up` (load it), starting the data plane and applying
//! the cached map before anything else (so the mesh works while the coordinator is down), then the control loop that
//! follows the map stream (each message: [`NetworkMap::apply`] -> [`reconcile`] -> [`DataPlane::reconfigure`] ->
//! cache), the endpoint reporter, signals, and clean shutdown. The control loop talks to the data plane only
//! through the small [`DataPlane`] trait, so tests drive it against the real coordinator with a fake engine and no
//! TUN device. Knows nothing of packets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use meshd_protocol::api::{EndpointReport, JoinRequest};
use meshd_protocol::{JoinToken, MapMessage, NetworkMap, NodeId, PROTOCOL_VERSION};
use tokio_util::sync::CancellationToken;

use crate::cache::MapCache;
use crate::config::RunArgs;
use crate::control::{Backoff, ControlClient, ControlError};
use crate::ctl;
use crate::endpoints;
use crate::engine::{Engine, EngineConfig, EngineError, EngineStatus, PeerConfig};
use crate::keys::{KeyFileError, NodeKey};
use crate::reconcile;
use crate::state::{Identity, StateDir, StateError};

/// A streak of failed reconnects is logged on its first attempt and then every this many attempts (about every
/// five minutes once the backoff is at its cap).
const FAILURE_LOG_EVERY: u32 = 10;

/// How often local addresses are checked for changes (and a failed report retried).
const ENDPOINT_POLL_INTERVAL: Duration = Duration::from_secs(10);

/// The data plane as the control loop and the control socket see it. [`Engine`] is the real one; tests use a fake.
pub trait DataPlane: Send + Sync + 'static {
    /// Makes the peer set equal to `peers`, leaving unchanged peers untouched.
    fn reconfigure(&self, peers: Vec<PeerConfig>);
    fn status(&self) -> EngineStatus;
    fn listen_port(&self) -> u16;
}

impl DataPlane for Engine {
    fn reconfigure(&self, peers: Vec<PeerConfig>) {
        Engine::reconfigure(self, peers)
    }
    fn status(&self) -> EngineStatus {
        Engine::status(self)
    }
    fn listen_port(&self) -> u16 {
        Engine::listen_port(self)
    }
}

/// Where the agent is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Starting: enrolling with a token, or not yet connected to the coordinator since `meshd up`.
    Joining,
    /// Following the coordinator's map stream.
    Running,
    /// The coordinator is away: the mesh runs from the last map while the agent reconnects.
    Degraded,
    /// Shutting down.
    Stopped,
}

/// Why the agent could not run; each says what to do next. `exit_code` maps them for scripts and systemd.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Token(#[from] meshd_protocol::TokenError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Ctl(#[from] ctl::CtlError),
    #[error(
        "this node already joined as {name} ({ip}) with state in {dir}; start it with `sudo meshd up`, or run `sudo meshd leave` before joining again"
    )]
    AlreadyJoined { name: String, ip: String, dir: String },
    #[error(
        "the private key in {dir} does not belong to the saved identity (public key {expected:?}); the state directory is damaged: run `sudo meshd leave --force` and join again"
    )]
    KeyMismatch {
        dir: String,
        expected: meshd_protocol::PublicKey,
    },
    #[error("{0}")]
    Preflight(String),
    #[error(
        "this node was removed from the network by an admin (the coordinator no longer accepts its credential); its peers, cached map and identity were deleted. To join again, get a new token and run `sudo meshd join <token>`"
    )]
    Removed,
}

impl DaemonError {
    /// Exit status for the process: 4 = not joined or removed (restarting will not help), 1 = anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Removed | Self::State(StateError::NotJoined { .. }) => 4,
            _ => 1,
        }
    }
}

/// What the running agent knows, shared with the control socket. Locks are std ones: held for a copy or a swap,
/// never across an await.
pub struct AgentState {
    pub identity: Identity,
    pub interface: String,
    pub dataplane: Arc<dyn DataPlane>,
    map: RwLock<Option<NetworkMap>>,
    phase: Mutex<Phase>,
}

impl AgentState {
    pub fn new(identity: Identity, interface: String, dataplane: Arc<dyn DataPlane>) -> Self {
        Self {
            identity,
            interface,
            dataplane,
            map: RwLock::new(None),
            phase: Mutex::new(Phase::Joining),
        }
    }

    pub fn map(&self) -> Option<NetworkMap> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn map_version(&self) -> Option<u64> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|m| m.version)
    }

    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_phase(&self, phase: Phase) {
        let mut current = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        if *current != phase {
            tracing::info!(from = ?*current, to = ?phase, "agent state");
            *current = phase;
        }
    }

    /// Installs a whole map (the cache at start, or a full map) and configures the data plane for it.
    pub fn install(&self, map: NetworkMap) {
        self.apply(MapMessage::Full { map }).expect("a full map always applies");
    }

    /// Folds one message into the map and, if anything changed, reconfigures the data plane. Returns the new map
    /// when it changed (for the caller to persist).
    pub fn apply(&self, message: MapMessage) -> Result<Option<NetworkMap>, meshd_protocol::netmap::ApplyError> {
        let previous = self.map();
        let mut next = previous.clone();
        NetworkMap::apply(&mut next, message)?;
        if next == previous {
            return Ok(None);
        }
        let next = next.expect("apply leaves a map after success");
        log_changes(previous.as_ref(), &next);
        if next.self_node.ip != self.identity.ip {
            tracing::warn!(
                saved = %self.identity.ip, map = %next.self_node.ip,
                "the coordinator moved this node's address; restart the agent to use it"
            );
        }
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = Some(next.clone());
        self.dataplane.reconfigure(reconcile::desired_peers(&next));
        Ok(Some(next))
    }

    /// The node was deleted: no peer may stay configured.
    fn clear(&self) {
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.dataplane.reconfigure(Vec::new());
    }
}

fn log_changes(previous: Option<&NetworkMap>, next: &NetworkMap) {
    let before: BTreeMap<NodeId, _> = previous
        .map(|m| m.peers.iter().map(|p| (p.id, p)).collect())
        .unwrap_or_default();
    for peer in &next.peers {
        match before.get(&peer.id) {
            None => tracing::info!(peer = %peer.name, ip = %peer.ip, key = ?peer.public_key, "peer added"),
            Some(old) if *old != peer => tracing::debug!(
                peer = %peer.name, endpoints = ?peer.endpoints, online = peer.online, "peer changed"
            ),
            Some(_) => {}
        }
    }
    for (id, old) in &before {
        if next.peer(*id).is_none() {
            tracing::info!(peer = %old.name, ip = %old.ip, "peer removed");
        }
    }
    tracing::debug!(version = next.version, peers = next.peers.len(), "map applied");
}

/// Why the control loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Asked to stop (signal, `meshd down`).
    Shutdown,
    /// The coordinator rejected this node's credential: the admin deleted it. Peers and cache are gone.
    Removed,
}

/// Follows the coordinator: the map stream (reconnecting with backoff, resuming from the last applied version) and
/// endpoint reports. Runs until `shutdown` or until the node is removed.
pub struct ControlLoop {
    pub agent: Arc<AgentState>,
    pub client: ControlClient,
    pub credential: String,
    pub cache: MapCache,
}

impl ControlLoop {
    pub async fn run(self, shutdown: CancellationToken) -> StopReason {
        let removed = CancellationToken::new();
        let reporter = tokio::spawn(report_endpoints(
            self.agent.clone(),
            self.client.clone(),
            self.credential.clone(),
            shutdown.child_token(),
            removed.clone(),
        ));
        let reason = tokio::select! {
            reason = self.follow_map(&removed) => reason,
            () = shutdown.cancelled() => StopReason::Shutdown,
            () = removed.cancelled() => StopReason::Removed,
        };
        reporter.abort();
        // Wait for the abort to land: the reporter holds the agent (and so the data plane) until it is dropped.
        let _ = reporter.await;
        if reason == StopReason::Removed {
            tracing::error!("the coordinator no longer accepts this node's credential: it was removed by an admin");
            self.agent.clear();
            if let Err(e) = self.cache.remove() {
                tracing::warn!("{e}");
            }
        }
        self.agent.set_phase(Phase::Stopped);
        reason
    }

    async fn follow_map(&self, removed: &CancellationToken) -> StopReason {
        let mut backoff = Backoff::new();
        let mut want_full = false;
        // Failures since the last successful connection: the first of a streak is a warning, the rest are
        // repeated only every `FAILURE_LOG_EVERY` attempts so that a long outage does not flood the log.
        let mut failures: u32 = 0;
        loop {
            let since = if want_full { None } else { self.agent.map_version() };
            want_full = false;
            match self.client.open_map(&self.credential, since).await {
                Ok(mut stream) => {
                    // Connected: a resumed stream with nothing missed stays silent until the next change.
                    tracing::debug!(url = %self.client.base_url(), ?since, "map stream open");
                    self.agent.set_phase(Phase::Running);
                    backoff.reset();
                    if failures > 0 {
                        tracing::info!(attempts = failures + 1, "reconnected to the coordinator");
                    }
                    failures = 0;
                    loop {
                        match stream.next().await {
                            None => {
                                tracing::warn!("the coordinator closed the map stream; reconnecting");
                                break;
                            }
                            Some(Ok(message)) => match self.agent.apply(message) {
                                Ok(Some(map)) => {
                                    if let Err(e) = self.cache.store(&map) {
                                        tracing::warn!("{e}");
                                    }
                                }
                                Ok(None) => {}
                                Err(e) => {
                                    tracing::warn!("{e}; asking the coordinator for a full map");
                                    want_full = true;
                                    break;
                                }
                            },
                            Some(Err(ControlError::Unauthorized { .. })) => return StopReason::Removed,
                            Some(Err(e)) => {
                                tracing::warn!("map stream broke: {e}");
                                break;
                            }
                        }
                    }
                }
                Err(ControlError::Unauthorized { .. }) => return StopReason::Removed,
                Err(e) => {
                    failures += 1;
                    if failures % FAILURE_LOG_EVERY == 1 {
                        if e.is_transient() {
                            tracing::warn!(attempt = failures, "{e}; the mesh keeps running from the last map");
                        } else {
                            tracing::error!(attempt = failures, "{e}; the mesh keeps running from the last map");
                        }
                    } else {
                        tracing::debug!(attempt = failures, "{e}");
                    }
                }
            }
            if removed.is_cancelled() {
                return StopReason::Removed;
            }
            self.agent.set_phase(Phase::Degraded);
            let delay = backoff.next_delay();
            tracing::debug!(?delay, "reconnecting to the coordinator");
            tokio::time::sleep(delay).await;
        }
    }
}

/// Reports this host's endpoints at start and whenever they change; retries a failed report on the next poll.
async fn report_endpoints(
    agent: Arc<AgentState>,
    client: ControlClient,
    credential: String,
    shutdown: CancellationToken,
    removed: CancellationToken,
) {
    let mut reported: Option<Vec<SocketAddr>> = None;
    let mut ticker = tokio::time::interval(ENDPOINT_POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let addresses = match endpoints::local_addresses() {
            Ok(addresses) => addresses,
            Err(e) => {
                tracing::warn!("cannot list local addresses: {e}");
                continue;
            }
        };
        let port = agent.dataplane.listen_port();
        let current = endpoints::candidate_endpoints(&addresses, &agent.interface, agent.identity.network, port);
        if reported.as_ref() == Some(&current) {
            continue;
        }
        let report = EndpointReport {
            endpoints: current.clone(),
        };
        match client.report_endpoints(&credential, &report).await {
            Ok(()) => {
                tracing::info!(endpoints = ?current, "reported endpoints");
                reported = Some(current);
            }
            Err(ControlError::Unauthorized { .. }) => {
                removed.cancel();
                return;
            }
            Err(e) => {
                tracing::debug!("endpoint report failed, retrying later: {e}");
                reported = None;
            }
        }
    }
}

/// Capability bit of CAP_NET_ADMIN (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;

/// Checks what creating the TUN device needs, before enrolling (so a join without root wastes no token use).
pub fn preflight() -> Result<(), DaemonError> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err(DaemonError::Preflight(
            "/dev/net/tun does not exist: load the tun module (`sudo modprobe tun`), or in a container pass the device (--device /dev/net/tun)".into(),
        ));
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok());
    if let Some(caps) = effective
        && caps & (1 << CAP_NET_ADMIN) == 0
    {
        return Err(DaemonError::Preflight(
            "creating the mesh interface needs root or CAP_NET_ADMIN: run it with sudo".into(),
        ));
    }
    Ok(())
}

/// Hostname to ask for when `--hostname` is absent.
fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

/// Enrols with `token_text` and saves the identity; does not start anything. Used by `meshd join` and tests.
pub async fn enrol(state: &StateDir, token_text: &str, hostname: Option<String>) -> Result<Identity, DaemonError> {
    let token = JoinToken::parse(token_text)?;
    state.ensure()?;
    if state.has_identity() {
        let (identity, _) = state.load_identity()?;
        return Err(DaemonError::AlreadyJoined {
            name: identity.name,
            ip: identity.ip.to_string(),
            dir: state.root().display().to_string(),
        });
    }
    // A key left by an earlier join that failed half-way is reused: joining again with the same key returns the
    // same node, so a retry never leaves an orphan behind on the coordinator.
    let key = match NodeKey::load(&state.key_path()) {
        Ok(key) => key,
        Err(KeyFileError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            let key = NodeKey::generate();
            key.save(&state.key_path())?;
            key
        }
        Err(e) => return Err(e.into()),
    };
    let client = ControlClient::for_token(&token)?;
    let hostname = hostname.unwrap_or_else(default_hostname);
    tracing::info!(coordinator = %token.coordinator_url, %hostname, key = ?key.public_key(), "joining");
    let request = JoinRequest {
        token: token_text.trim().to_string(),
        public_key: key.public_key(),
        hostname,
    };
    let response = client.join(&request).await?;
    if response.protocol_version != PROTOCOL_VERSION {
        tracing::warn!(
            ours = PROTOCOL_VERSION,
            theirs = response.protocol_version,
            "the coordinator speaks another protocol version; upgrade whichever side is older"
        );
    }
    let identity = Identity::from_join(&response, &token.coordinator_url, token.fingerprint, key.public_key());
    state.save_identity(&identity, &response.credential)?;
    tracing::info!(name = %identity.name, ip = %identity.ip, network = %identity.network, "joined the network");
    Ok(identity)
}

/// `meshd join`: enrol, then run until stopped.
pub async fn join(
    state: StateDir,
    token_text: &str,
    hostname: Option<String>,
    args: RunArgs,
) -> Result<(), DaemonError> {
    // A mistyped token is reported before anything is created.
    JoinToken::parse(token_text)?;
    preflight()?;
    state.ensure()?;
    let lock = ctl::lock_state_dir(&state)?;
    enrol(&state, token_text, hostname).await?;
    run(state, args, lock).await
}

/// `meshd up`: run from the saved identity until stopped.
pub async fn up(state: StateDir, args: RunArgs) -> Result<(), DaemonError> {
    state.load_identity()?;
    preflight()?;
    let lock = ctl::lock_state_dir(&state)?;
    run(state, args, lock).await
}

async fn run(state: StateDir, args: RunArgs, lock: ctl::StateLock) -> Result<(), DaemonError> {
    let (identity, credential) = state.load_identity()?;
    let key = NodeKey::load(&state.key_path())?;
    if key.public_key() != identity.public_key {
        return Err(DaemonError::KeyMismatch {
            dir: state.root().display().to_string(),
            expected: identity.public_key,
        });
    }
    let client = ControlClient::new(&identity.coordinator_url, identity.pinned()?)?;
    let cache = MapCache::new(state.cache_path());
    let cached = match cache.load() {
        Ok(Some(map)) if map.self_node.id == identity.node_id => Some(map),
        Ok(Some(_)) => {
            tracing::warn!("the cached map belongs to another node; ignoring it");
            None
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("{e}");
            None
        }
    };
    let listener = ctl::bind(&state, args.control_group.as_deref(), &lock)?;

    let engine = Arc::new(
        Engine::start(EngineConfig {
            interface: args.interface.clone(),
            mtu: args.mtu,
            listen_port: args.listen_port,
            private_key: key.secret(),
            address: identity.ip,
            network: identity.network,
        })
        .await?,
    );
    tracing::info!(
        interface = %args.interface, ip = %identity.ip, port = engine.listen_port(), name = %identity.name,
        "data plane up"
    );
    let agent = Arc::new(AgentState::new(identity, args.interface.clone(), engine.clone()));
    if let Some(map) = cached {
        tracing::info!(
            version = map.version,
            peers = map.peers.len(),
            "applying the cached map"
        );
        agent.install(map);
    }

    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(stop_on_signal(shutdown.clone()));
    let ctl_server = tokio::spawn(ctl::serve(listener, agent.clone(), shutdown.clone()));
    let reason = ControlLoop {
        agent: agent.clone(),
        client,
        credential,
        cache,
    }
    .run(shutdown.clone())
    .await;
    shutdown.cancel();
    signals.abort();
    let listener = match ctl_server.await {
        Ok(listener) => Some(listener),
        Err(e) => {
            tracing::warn!("control socket task failed: {e}");
            None
        }
    };
    drop(agent);
    match Arc::into_inner(engine) {
        Some(engine) => engine.shutdown().await,
        None => tracing::warn!("the data plane is still referenced; it is removed when the process exits"),
    }
    // Only now does the socket go away: `meshd down` returns once the interface is gone.
    ctl::remove_socket(&state);
    drop(listener);
    drop(lock);
    tracing::info!("stopped");
    match reason {
        StopReason::Shutdown => Ok(()),
        StopReason::Removed => {
            state.forget_membership()?;
            Err(DaemonError::Removed)
        }
    }
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::warn!("cannot listen for signals; stop the agent with `meshd down`");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineCounters;
    use meshd_protocol::{MapNode, PublicKey};
    use std::net::Ipv4Addr;

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<Vec<PeerConfig>>>,
    }

    impl DataPlane for Recorder {
        fn reconfigure(&self, peers: Vec<PeerConfig>) {
            self.calls.lock().expect("lock").push(peers);
        }
        fn status(&self) -> EngineStatus {
            EngineStatus {
                interface: "t0".into(),
                listen_port: 1,
                peers: vec![],
                counters: EngineCounters::default(),
            }
        }
        fn listen_port(&self) -> u16 {
            1
        }
    }

    fn node(id: i64) -> MapNode {
        MapNode {
            id,
            name: format!("n{id}"),
            ip: Ipv4Addr::new(10, 77, 0, id as u8),
            public_key: PublicKey::from_bytes([id as u8; 32]),
            endpoints: vec![],
            online: true,
            last_seen: None,
            tags: vec![],
        }
    }

    fn agent() -> (AgentState, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let identity = Identity {
            node_id: 1,
            name: "n1".into(),
            ip: Ipv4Addr::new(10, 77, 0, 1),
            network: "10.77.0.0/16".parse().expect("cidr"),
            coordinator_url: "http://127.0.0.1:1".into(),
            fingerprint: None,
            tags: vec![],
            public_key: PublicKey::from_bytes([1; 32]),
        };
        (AgentState::new(identity, "t0".into(), recorder.clone()), recorder)
    }

    fn names(calls: &[Vec<PeerConfig>], i: usize) -> Vec<String> {
        calls[i].iter().map(|p| p.name.clone()).collect()
    }

    #[test]
    fn map_messages_drive_the_data_plane() {
        let (agent, recorder) = agent();
        let full = NetworkMap {
            version: 3,
            network: "10.77.0.0/16".parse().expect("cidr"),
            self_node: node(1),
            peers: vec![node(2)],
        };
        assert!(
            agent
                .apply(MapMessage::PeerAdded {
                    version: 4,
                    peer: node(3)
                })
                .is_err(),
            "no base yet"
        );
        assert!(
            agent
                .apply(MapMessage::Full { map: full.clone() })
                .expect("full")
                .is_some()
        );
        assert_eq!(agent.map_version(), Some(3));
        // The same full map again (a reconnect) changes nothing and does not touch the data plane.
        assert!(agent.apply(MapMessage::Full { map: full }).expect("same").is_none());
        let changed = agent
            .apply(MapMessage::PeerAdded {
                version: 4,
                peer: node(3),
            })
            .expect("add");
        assert_eq!(changed.expect("changed").version, 4);
        // A replayed delta is ignored.
        assert!(
            agent
                .apply(MapMessage::PeerRemoved { version: 4, id: 3 })
                .expect("replay")
                .is_none()
        );
        agent
            .apply(MapMessage::PeerRemoved { version: 5, id: 2 })
            .expect("remove");
        let calls = recorder.calls.lock().expect("lock").clone();
        assert_eq!(calls.len(), 3);
        assert_eq!(names(&calls, 0), ["n2"]);
        assert_eq!(names(&calls, 1), ["n2", "n3"]);
        assert_eq!(names(&calls, 2), ["n3"]);

        agent.clear();
        assert!(agent.map().is_none());
        assert!(
            recorder.calls.lock().expect("lock").last().expect("call").is_empty(),
            "removal clears peers"
        );
    }

    #[test]
    fn exit_codes_tell_scripts_when_restarting_cannot_help() {
        assert_eq!(DaemonError::Removed.exit_code(), 4);
        assert_eq!(
            DaemonError::State(StateError::NotJoined { path: "x".into() }).exit_code(),
            4
        );
        assert_eq!(DaemonError::Preflight("x".into()).exit_code(), 1);
    }
}

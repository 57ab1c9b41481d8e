//! The agent's life: joining -> running <-> degraded (coordinator away) -> stopped.
//!
//! Owns: `join` (preflight, generate the key, enrol, save the identity) and `up` (load it), taking the state
//! directory's lock and control socket, starting the data plane and applying the cached map before anything else
//! (so the mesh works while the coordinator is down), then running the [`ControlLoop`], the relay client
//! ([`RelayClient`]) and the control socket until
//! a signal, `meshd down` or removal by an admin, and shutting down cleanly (the engine removes the TUN device).
//! Knows nothing of packets.

use std::sync::Arc;

use meshd_protocol::{JoinToken, PROTOCOL_VERSION};
use tokio_util::sync::CancellationToken;

pub use crate::agent::{AgentState, DataPlane, Phase};
use crate::cache::MapCache;
use crate::config::RunArgs;
use crate::control::{ControlClient, ControlError};
use crate::ctl;
use crate::engine::{Engine, EngineConfig, EngineError};
pub use crate::follow::{ControlLoop, StopReason};
use crate::keys::{KeyFileError, NodeKey};
use crate::relay::RelayClient;
use crate::state::{Identity, StateDir, StateError};

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
    #[error(
        "{source}\nthis node did join as {name} ({ip}); once that is fixed, start it with `sudo meshd up` (no new token needed)"
    )]
    JoinedButNotStarted {
        name: String,
        ip: String,
        source: Box<DaemonError>,
    },
}

impl DaemonError {
    /// Exit status for the process: 4 = not joined or removed (restarting will not help), 1 = anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Removed | Self::State(StateError::NotJoined { .. }) => 4,
            Self::JoinedButNotStarted { source, .. } => source.exit_code(),
            _ => 1,
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
    let response = client.join(token_text, &key, &hostname).await?;
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
    // A mistyped token or name is reported before anything is created. An explicit name is the user's choice, so
    // it is checked as strictly as an admin rename; the machine's own hostname (the default) is made DNS-safe by
    // the coordinator instead.
    JoinToken::parse(token_text)?;
    if let Some(name) = &hostname {
        meshd_protocol::names::validate(name).map_err(|e| DaemonError::Preflight(format!("--hostname: {e}")))?;
    }
    preflight()?;
    state.ensure()?;
    let lock = ctl::lock_state_dir(&state)?;
    let identity = enrol(&state, token_text, hostname).await?;
    run(state, args, lock).await.map_err(|e| match e {
        // Whatever stopped the agent from starting, the enrolment itself is done: say so, and how to go on.
        e @ (DaemonError::Engine(_) | DaemonError::Ctl(_) | DaemonError::Key(_)) => DaemonError::JoinedButNotStarted {
            name: identity.name.clone(),
            ip: identity.ip.to_string(),
            source: Box::new(e),
        },
        other => other,
    })
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
    let relay_client = ControlClient::for_relay(&identity.coordinator_url, identity.pinned()?)?;
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

    let started = Engine::start(EngineConfig {
        interface: args.interface.clone(),
        mtu: args.mtu,
        listen_port: args.listen_port,
        private_key: key.secret(),
        address: identity.ip,
        network: identity.network,
    })
    .await;
    let engine = match started {
        Ok(engine) => Arc::new(engine),
        Err(e) => {
            drop(listener);
            ctl::remove_socket(&state);
            return Err(e.into());
        }
    };
    tracing::info!(
        interface = %args.interface, ip = %identity.ip, port = engine.listen_port(), name = %identity.name,
        "data plane up"
    );
    let agent = Arc::new(AgentState::new(identity, args.interface.clone(), engine.clone()));
    if cached.is_some() {
        agent.set_preshared_keys(cache.load_preshared_keys());
    }
    if let Some(map) = cached {
        tracing::info!(
            version = map.version,
            peers = map.peers.len(),
            "applying the cached map"
        );
        agent.install(map);
    }

    let names = crate::dns::NameService::start(
        crate::dns::DnsSettings {
            mode: args.dns,
            hosts_file: args.hosts_file.clone(),
            interface: args.interface.clone(),
            address: agent.identity.ip,
            port: crate::dns::DNS_PORT,
        },
        agent.subscribe_map(),
        agent.dns.clone(),
    )
    .await;

    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(stop_on_signal(shutdown.clone()));
    let ctl_server = tokio::spawn(ctl::serve(listener, agent.clone(), shutdown.clone()));
    // The relay runs for as long as the agent does; the coordinator being away only means "no relay".
    let relay = tokio::spawn(
        RelayClient {
            client: relay_client,
            credential: credential.clone(),
            own_key: agent.identity.public_key,
            dataplane: agent.dataplane.clone(),
            status: agent.relay.clone(),
        }
        .run(shutdown.clone()),
    );
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
    // Names go first: nothing may resolve to the interface once it is gone.
    names.stop().await;
    if let Err(e) = relay.await {
        tracing::warn!("relay task failed: {e}");
    }
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

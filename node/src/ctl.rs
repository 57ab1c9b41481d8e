//! The local control socket `<state-dir>/meshd.sock`: how `meshd status`, `ping` and `down` talk to the running agent.
//!
//! Owns the socket's life (single instance per state directory through `meshd.lock`, stale socket cleanup, mode 0600
//! for root or 0660 for `--control-group`), its line protocol (one JSON request per connection, one or more JSON
//! reply lines: [`Request`], [`Reply`]), the server side (status built from the map and the engine's counters,
//! ping, down) and the client side used by the CLI. Everything derives from the state directory, so agents in
//! different network namespaces on one machine never meet.

use std::fs::{self, File, TryLockError};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::daemon::{AgentState, Phase};
use crate::ping::Pinger;
use crate::state::StateDir;

/// Longest request line accepted (requests are tiny; this bounds what a confused client can make us buffer).
const MAX_REQUEST_LEN: u64 = 4096;
/// Pause between echo requests, like ping(8).
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// How long a client waits for the agent's answer to `status` and `down`.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `meshd down` waits for the agent to finish shutting down.
const DOWN_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("meshd is not running for state dir {dir}; start it with `sudo meshd up`")]
    NotRunning { dir: String },
    #[error(
        "permission denied on {path}: run with sudo, or start the agent with --control-group GROUP and join that group"
    )]
    PermissionDenied { path: String },
    #[error(
        "another meshd agent is already running for state dir {dir} (stop it with `sudo meshd down`, or use another --state-dir)"
    )]
    AlreadyRunning { dir: String },
    #[error("unknown group {0:?} for --control-group (see /etc/group)")]
    UnknownGroup(String),
    #[error("control socket {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("the agent did not answer in time on {path}")]
    Timeout { path: String },
    #[error("unexpected answer from the agent: {0}")]
    Protocol(String),
    #[error("{0}")]
    Agent(String),
}

/// One request per connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Ping {
        target: String,
        count: u16,
        timeout_secs: u16,
    },
    Down,
}

/// A reply line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Status(StatusReport),
    /// Printed once before the echoes: whom we ping.
    PingStart {
        name: String,
        ip: Ipv4Addr,
    },
    PingReply(PingReply),
    PingDone(PingSummary),
    Stopping,
    Error(String),
}

/// `meshd status --json`: exactly `{"self": ..., "peers": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    #[serde(rename = "self")]
    pub self_node: SelfStatus,
    pub peers: Vec<PeerReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelfStatus {
    pub name: String,
    pub ip: Ipv4Addr,
    pub public_key: String,
    pub node_id: i64,
    pub network: String,
    pub interface: String,
    pub listen_port: u16,
    /// `running`, or `degraded` while the coordinator is away.
    pub state: Phase,
    pub coordinator: String,
    /// Version of the applied map; null before the first one.
    pub map_version: Option<u64>,
    pub tags: Vec<String>,
    /// The engine's drop counters (malformed datagrams, spoofed sources, ...), as the engine names them.
    pub counters: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerReport {
    pub name: String,
    pub ip: Ipv4Addr,
    pub public_key: String,
    /// Where packets go now (learned or reported); null if unknown.
    pub endpoint: Option<String>,
    pub path: String,
    /// Seconds since the last completed handshake; null if never.
    pub last_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Whether the coordinator sees the peer connected.
    pub online: bool,
    pub id: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PingReply {
    pub seq: u16,
    /// Round trip in milliseconds; null when no reply came in time.
    pub rtt_ms: Option<f64>,
    pub path: String,
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PingSummary {
    pub sent: u16,
    pub received: u16,
}

/// Holds `<state-dir>/meshd.lock` for as long as it lives: one agent per state directory.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Takes the state directory's lock, waiting up to `wait` for an agent that is shutting down to release it.
pub async fn lock_state_dir_within(state: &StateDir, wait: Duration) -> Result<StateLock, CtlError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match lock_state_dir(state) {
            Err(CtlError::AlreadyRunning { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// Takes the state directory's lock, or says that another agent holds it.
pub fn lock_state_dir(state: &StateDir) -> Result<StateLock, CtlError> {
    let path = state.lock_path();
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| io_err(&path, source))?;
    match file.try_lock() {
        Ok(()) => Ok(StateLock { _file: file }),
        Err(TryLockError::WouldBlock) => Err(CtlError::AlreadyRunning {
            dir: state.root().display().to_string(),
        }),
        Err(TryLockError::Error(source)) => Err(io_err(&path, source)),
    }
}

/// Binds the control socket. Needs the state lock: whatever socket file exists is then stale and removed. The socket
/// is created under a temporary name, given its final mode (and group), then renamed into place, so it is never
/// usable by others even briefly.
pub fn bind(state: &StateDir, control_group: Option<&str>, _lock: &StateLock) -> Result<UnixListener, CtlError> {
    let path = state.socket_path();
    match fs::remove_file(&path) {
        Ok(()) => tracing::debug!(path = %path.display(), "removed a stale control socket"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(io_err(&path, source)),
    }
    let gid = control_group.map(group_id).transpose()?;
    let tmp = state.root().join(format!(".meshd.sock.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|source| io_err(&tmp, source))?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    let result = (|| {
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(&tmp, None, Some(gid))?;
            // Group members must be able to reach the socket inside the (otherwise private) state directory.
            std::os::unix::fs::chown(state.root(), None, Some(gid))?;
            fs::set_permissions(state.root(), fs::Permissions::from_mode(0o710))?;
        }
        fs::rename(&tmp, &path)
    })();
    if let Err(source) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&path, source));
    }
    Ok(listener)
}

/// Removes the socket file at shutdown.
pub fn remove_socket(state: &StateDir) {
    let _ = fs::remove_file(state.socket_path());
}

fn group_id(name: &str) -> Result<u32, CtlError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let groups = fs::read_to_string("/etc/group").map_err(|source| io_err(Path::new("/etc/group"), source))?;
    groups
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let group = fields.next()?;
            let gid = fields.nth(1)?.parse::<u32>().ok()?;
            (group == name).then_some(gid)
        })
        .next()
        .ok_or_else(|| CtlError::UnknownGroup(name.to_string()))
}

fn io_err(path: &Path, source: io::Error) -> CtlError {
    CtlError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Serves control requests until `shutdown`; then aborts the connections still open (a ping in progress). Returns
/// the listener so that the caller keeps the socket bound until the agent has fully stopped: `meshd down` waits
/// for the socket to go away, and then the interface and the state lock are already released.
pub async fn serve(listener: UnixListener, agent: Arc<AgentState>, shutdown: CancellationToken) -> UnixListener {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(handle(stream, agent.clone(), shutdown.clone()));
                }
                Err(e) => {
                    tracing::warn!("control socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
    listener
}

async fn handle(stream: UnixStream, agent: Arc<AgentState>, shutdown: CancellationToken) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST_LEN);
    if let Err(e) = reader.read_line(&mut line).await {
        tracing::debug!("control request unreadable: {e}");
        return;
    }
    let request = match serde_json::from_str::<Request>(&line) {
        Ok(request) => request,
        Err(e) => {
            let _ = send(&mut write, &Reply::Error(format!("bad request: {e}"))).await;
            return;
        }
    };
    tracing::debug!(?request, "control request");
    let result = match request {
        Request::Status => send(&mut write, &Reply::Status(status_report(&agent))).await,
        Request::Down => {
            tracing::info!("stop requested over the control socket");
            let sent = send(&mut write, &Reply::Stopping).await;
            shutdown.cancel();
            sent
        }
        Request::Ping {
            target,
            count,
            timeout_secs,
        } => {
            ping(
                &mut write,
                &agent,
                &target,
                count.clamp(1, 100),
                timeout_secs.clamp(1, 30),
            )
            .await
        }
    };
    if let Err(e) = result {
        tracing::debug!("control reply failed: {e}");
    }
}

async fn send(write: &mut (impl AsyncWriteExt + Unpin), reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).expect("replies always serialize");
    line.push(b'\n');
    write.write_all(&line).await?;
    write.flush().await
}

/// Merges the map (names, addresses: the coordinator's truth) with the engine's live view (endpoints, counters).
pub fn status_report(agent: &AgentState) -> StatusReport {
    let engine = agent.dataplane.status();
    let map = agent.map();
    let identity = &agent.identity;
    let peers = map
        .as_ref()
        .map(|map| {
            map.peers
                .iter()
                .map(|peer| {
                    let live = engine.peers.iter().find(|p| p.public_key == peer.public_key);
                    PeerReport {
                        name: peer.name.clone(),
                        ip: peer.ip,
                        public_key: peer.public_key.to_base64(),
                        endpoint: live
                            .and_then(|p| p.endpoint)
                            .or_else(|| peer.endpoints.first().copied())
                            .map(|e| e.to_string()),
                        path: live.map_or("direct", |p| p.path).to_string(),
                        last_handshake: live.and_then(|p| p.last_handshake).map(|d| d.as_secs()),
                        rx_bytes: live.map_or(0, |p| p.rx_bytes),
                        tx_bytes: live.map_or(0, |p| p.tx_bytes),
                        online: peer.online,
                        id: peer.id,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let self_node = map.as_ref().map(|m| &m.self_node);
    StatusReport {
        self_node: SelfStatus {
            name: self_node.map_or_else(|| identity.name.clone(), |n| n.name.clone()),
            ip: identity.ip,
            public_key: identity.public_key.to_base64(),
            node_id: identity.node_id,
            network: identity.network.to_string(),
            interface: engine.interface.clone(),
            listen_port: engine.listen_port,
            state: agent.phase(),
            coordinator: identity.coordinator_url.clone(),
            map_version: map.as_ref().map(|m| m.version),
            tags: self_node.map_or_else(|| identity.tags.clone(), |n| n.tags.clone()),
            counters: serde_json::to_value(&engine.counters).unwrap_or_default(),
        },
        peers,
    }
}

async fn ping(
    write: &mut (impl AsyncWriteExt + Unpin),
    agent: &AgentState,
    target: &str,
    count: u16,
    timeout_secs: u16,
) -> io::Result<()> {
    let Some(map) = agent.map() else {
        return send(
            write,
            &Reply::Error("no network map yet: the agent has not heard from the coordinator".into()),
        )
        .await;
    };
    let peer = match target.parse::<Ipv4Addr>() {
        Ok(ip) => map.peers.iter().find(|p| p.ip == ip),
        Err(_) => map.peers.iter().find(|p| p.name.eq_ignore_ascii_case(target)),
    };
    let Some(peer) = peer else {
        let names: Vec<&str> = map.peers.iter().map(|p| p.name.as_str()).collect();
        let message = if target == map.self_node.name || target.parse::<Ipv4Addr>() == Ok(map.self_node.ip) {
            format!("{target} is this node")
        } else {
            format!(
                "no peer named {target:?} (peers: {})",
                if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                }
            )
        };
        return send(write, &Reply::Error(message)).await;
    };
    let (dest, key) = (peer.ip, peer.public_key);
    send(
        write,
        &Reply::PingStart {
            name: peer.name.clone(),
            ip: dest,
        },
    )
    .await?;
    let pinger = match Pinger::new(agent.identity.ip) {
        Ok(pinger) => Arc::new(pinger),
        Err(e) => return send(write, &Reply::Error(format!("cannot ping: {e}"))).await,
    };
    let timeout = Duration::from_secs(u64::from(timeout_secs));
    let mut received = 0;
    for seq in 1..=count {
        let echo = {
            let pinger = pinger.clone();
            tokio::task::spawn_blocking(move || pinger.echo(dest, seq, timeout)).await
        };
        let rtt = match echo {
            Ok(Ok(rtt)) => rtt,
            Ok(Err(e)) => return send(write, &Reply::Error(format!("ping failed: {e}"))).await,
            Err(e) => return send(write, &Reply::Error(format!("ping failed: {e}"))).await,
        };
        received += u16::from(rtt.is_some());
        let live = agent.dataplane.status().peers.into_iter().find(|p| p.public_key == key);
        let reply = PingReply {
            seq,
            rtt_ms: rtt.map(|d| d.as_secs_f64() * 1000.0),
            path: live.as_ref().map_or("direct", |p| p.path).to_string(),
            endpoint: live.and_then(|p| p.endpoint).map(|e: SocketAddr| e.to_string()),
        };
        send(write, &Reply::PingReply(reply)).await?;
        if seq < count {
            tokio::time::sleep(PING_INTERVAL.saturating_sub(rtt.unwrap_or(PING_INTERVAL))).await;
        }
    }
    send(write, &Reply::PingDone(PingSummary { sent: count, received })).await
}

/// The CLI side: one connection to the agent of a state directory.
pub struct CtlClient {
    path: PathBuf,
    dir: String,
}

impl CtlClient {
    pub fn new(state: &StateDir) -> Self {
        Self {
            path: state.socket_path(),
            dir: state.root().display().to_string(),
        }
    }

    async fn connect(&self) -> Result<UnixStream, CtlError> {
        UnixStream::connect(&self.path)
            .await
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                    CtlError::NotRunning { dir: self.dir.clone() }
                }
                io::ErrorKind::PermissionDenied => CtlError::PermissionDenied {
                    path: self.path.display().to_string(),
                },
                _ => io_err(&self.path, source),
            })
    }

    /// Sends `request` and calls `on_reply` for every reply line until the agent closes the connection.
    /// Each line must arrive within `line_timeout`.
    pub async fn call(
        &self,
        request: &Request,
        line_timeout: Duration,
        mut on_reply: impl FnMut(Reply) -> Result<(), CtlError>,
    ) -> Result<(), CtlError> {
        let stream = self.connect().await?;
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(request).expect("requests always serialize");
        line.push(b'\n');
        write
            .write_all(&line)
            .await
            .map_err(|source| io_err(&self.path, source))?;
        let mut lines = BufReader::new(read).lines();
        loop {
            let next = tokio::time::timeout(line_timeout, lines.next_line())
                .await
                .map_err(|_| CtlError::Timeout {
                    path: self.path.display().to_string(),
                })?
                .map_err(|source| io_err(&self.path, source))?;
            let Some(text) = next else { return Ok(()) };
            let reply: Reply = serde_json::from_str(&text).map_err(|e| CtlError::Protocol(e.to_string()))?;
            if let Reply::Error(message) = reply {
                return Err(CtlError::Agent(message));
            }
            on_reply(reply)?;
        }
    }

    pub async fn status(&self) -> Result<StatusReport, CtlError> {
        let mut report = None;
        self.call(&Request::Status, CLIENT_TIMEOUT, |reply| match reply {
            Reply::Status(status) => {
                report = Some(status);
                Ok(())
            }
            other => Err(CtlError::Protocol(format!("{other:?}"))),
        })
        .await?;
        report.ok_or_else(|| CtlError::Protocol("no status in the answer".into()))
    }

    /// Asks the agent to stop and waits until it has (its socket stops answering). `Ok(false)`: it was not running.
    pub async fn down(&self) -> Result<bool, CtlError> {
        match self.call(&Request::Down, CLIENT_TIMEOUT, |_| Ok(())).await {
            Ok(()) => {}
            Err(CtlError::NotRunning { .. }) => return Ok(false),
            Err(e) => return Err(e),
        }
        let deadline = tokio::time::Instant::now() + DOWN_WAIT;
        while tokio::time::Instant::now() < deadline {
            if matches!(self.connect().await, Err(CtlError::NotRunning { .. })) {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(CtlError::Timeout {
            path: self.path.display().to_string(),
        })
    }

    pub fn is_running(&self) -> bool {
        std::os::unix::net::UnixStream::connect(&self.path).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_of_requests_and_replies() {
        let json = serde_json::to_string(&Request::Ping {
            target: "gpu".into(),
            count: 2,
            timeout_secs: 1,
        })
        .expect("json");
        assert_eq!(json, r#"{"cmd":"ping","target":"gpu","count":2,"timeout_secs":1}"#);
        assert_eq!(
            serde_json::to_string(&Request::Status).expect("json"),
            r#"{"cmd":"status"}"#
        );
        assert_eq!(serde_json::to_string(&Reply::Stopping).expect("json"), r#""stopping""#);
        let error: Reply = serde_json::from_str(r#"{"error":"boom"}"#).expect("parse");
        assert!(matches!(error, Reply::Error(m) if m == "boom"));
    }

    #[test]
    fn one_agent_per_state_dir() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(tmp.path());
        let lock = lock_state_dir(&state).expect("first");
        assert!(matches!(lock_state_dir(&state), Err(CtlError::AlreadyRunning { .. })));
        drop(lock);
        lock_state_dir(&state).expect("free again");
    }

    #[tokio::test]
    async fn socket_is_private_and_stale_sockets_are_replaced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(tmp.path());
        let client = CtlClient::new(&state);
        assert!(matches!(client.status().await, Err(CtlError::NotRunning { .. })));
        // A stale socket file (a crashed agent): nobody listens on it.
        drop(std::os::unix::net::UnixListener::bind(state.socket_path()).expect("bind"));
        assert!(matches!(client.status().await, Err(CtlError::NotRunning { .. })));
        let lock = lock_state_dir(&state).expect("lock");
        let _listener = bind(&state, None, &lock).expect("bind replaces the stale socket");
        let mode = fs::metadata(state.socket_path()).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(client.is_running());
    }

    #[test]
    fn finds_groups() {
        assert_eq!(group_id("0").expect("numeric"), 0);
        assert_eq!(group_id("root").expect("root exists"), 0);
        assert!(matches!(
            group_id("no-such-group-meshd"),
            Err(CtlError::UnknownGroup(_))
        ));
    }
}

//! Test infrastructure: a real coordinator process on 127.0.0.1, nodes enrolled through the agent's own code, and a
//! fake data plane that records what the agent asks of it.
//!
//! The coordinator binary is taken from `MESHD_COORDINATOR_BIN`, else from this test's target directory
//! (`cargo test --workspace` builds it). Processes are killed by PID when dropped.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshd_node::agent::StunFuture;
use meshd_node::cache::MapCache;
use meshd_node::control::ControlClient;
use meshd_node::daemon::{self, AgentState, ControlLoop, DataPlane, Phase, StopReason};
use meshd_node::engine::{EngineCounters, EngineStatus, PeerConfig, RelayDatagram};
use meshd_node::relay::{RelayClient, RelayStatus};
use meshd_node::state::{Identity, StateDir};
use meshd_protocol::stun;
use meshd_protocol::{JoinToken, NetworkMap, PublicKey};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The fake listen port the fake engine reports.
pub const FAKE_PORT: u16 = 51820;
/// The interface name the fake agents claim (only used to exclude it from endpoints).
pub const FAKE_INTERFACE: &str = "meshtest0";

fn coordinator_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("MESHD_COORDINATOR_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/it-<hash> -> target/<profile>/meshd-coordinator
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = profile_dir.join("meshd-coordinator");
    // No nested `cargo build` here: cargo may hold the target directory's lock while tests run.
    assert!(
        bin.exists(),
        "meshd-coordinator not found at {}: build it first (`cargo build -p meshd-coordinator`, or run \
         `cargo test --workspace`), or set MESHD_COORDINATOR_BIN",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("addr")
        .port()
}

/// A coordinator process with its own data directory.
pub struct Coordinator {
    bin: PathBuf,
    data: tempfile::TempDir,
    port: u16,
    tls: bool,
    child: Option<Child>,
    /// How many times `serve` was started (each start logs one "coordinator serving" line).
    starts: usize,
    extra: Vec<String>,
    api_key: Option<String>,
}

impl Coordinator {
    /// Starts `serve` on 127.0.0.1 (self-signed TLS, or plain HTTP) and waits until it issues tokens.
    pub fn start(tls: bool) -> Self {
        Self::start_with(tls, &[])
    }

    /// Like [`Coordinator::start`] with more `serve` flags (e.g. `--tls-cert`, `--tls-key`).
    pub fn start_with(tls: bool, extra: &[String]) -> Self {
        let mut coordinator = Self {
            bin: coordinator_bin(),
            data: tempfile::tempdir().expect("tempdir"),
            port: free_port(),
            tls,
            child: None,
            starts: 0,
            extra: extra.to_vec(),
            api_key: None,
        };
        coordinator.spawn();
        coordinator
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.path().join("coordinator.log"))
            .expect("log file");
        let mut command = Command::new(&self.bin);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(self.data.path())
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .env("RUST_LOG", "info,meshd_coordinator=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if !self.tls {
            command.arg("--no-tls");
        }
        if !self.extra.iter().any(|a| a.contains("stun")) {
            // Tests run in parallel: STUN on free ports (published in /api/v1/info), never the fixed defaults.
            command.args(["--stun-port", "0", "--stun-alt-port", "0"]);
        }
        if !self.extra.iter().any(|a| a.contains("gateway") || a.contains("relay")) {
            // Likewise the device gateway's UDP port (51820 by default).
            command.args(["--gateway-port", "0"]);
        }
        command.args(&self.extra);
        self.child = Some(command.spawn().expect("spawn meshd-coordinator"));
        self.starts += 1;
        // Ready once it logs that it serves: by then its migrations ran and its public URL and fingerprint are
        // stored (a CLI command racing the first start's migrations could fail either process).
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.log().matches("coordinator serving").count() < self.starts {
            assert!(
                Instant::now() < deadline,
                "coordinator did not start; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", if self.tls { "https" } else { "http" }, self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("coordinator.log")).unwrap_or_default()
    }

    /// Kills the process (as a crash would), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data directory.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Runs a CLI subcommand against the data directory; returns the last line of stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new(&self.bin)
            .args(args)
            .arg("--data-dir")
            .arg(self.data.path())
            .stdin(Stdio::null())
            .output()
            .expect("run meshd-coordinator");
        let stdout = String::from_utf8_lossy(&output.stdout);
        if output.status.success() {
            Ok(stdout.lines().last().unwrap_or_default().trim().to_string())
        } else {
            Err(format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)))
        }
    }

    /// A new join token (`token create` with `extra` flags). Retries while the server is still starting.
    pub fn token(&self, extra: &[&str]) -> String {
        let mut args = vec!["token", "create"];
        args.extend_from_slice(extra);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.cli(&args) {
                Ok(token) if token.starts_with("meshd1_") => return token,
                Ok(other) => panic!("unexpected token output: {other}"),
                Err(e) if Instant::now() > deadline => panic!("token create failed: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn admin_client(&self, token: &str) -> reqwest::Client {
        let token = JoinToken::parse(token).expect("token");
        let mut builder = reqwest::Client::builder();
        if let Some(fingerprint) = token.fingerprint {
            let verifier = Arc::new(meshd_node::tls::PinnedCertVerifier::new(fingerprint));
            builder = builder.use_preconfigured_tls(meshd_node::tls::pinned_config(verifier).expect("tls"));
        }
        builder.build().expect("client")
    }

    /// Deletes a node through the admin API (`token` only supplies the pinned fingerprint).
    pub async fn delete_node(&mut self, token: &str, node_id: i64) {
        if self.api_key.is_none() {
            self.api_key = Some(self.cli(&["apikey", "create"]).expect("apikey create"));
        }
        let key = self.api_key.clone().expect("set above");
        let response = self
            .admin_client(token)
            .delete(format!("{}/api/v1/nodes/{node_id}", self.url()))
            .bearer_auth(key)
            .send()
            .await
            .expect("admin delete");
        assert!(response.status().is_success(), "delete node: {}", response.status());
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A data plane that records the desired peers, exposes relay channels the test drives, records what the agent
/// tells it (relay up/down, own endpoints) and answers STUN from a real UDP socket of its own (its "WireGuard
/// socket", so every probe shows the same mapping, as the real engine's would).
pub struct FakeEngine {
    peers: Mutex<Vec<PeerConfig>>,
    reconfigures: Mutex<usize>,
    /// The test's end of the outbound relay channel: what it sends here leaves through the relay client.
    pub relay_out: mpsc::Sender<RelayDatagram>,
    relay_out_rx: Mutex<Option<mpsc::Receiver<RelayDatagram>>>,
    relay_in: mpsc::Sender<RelayDatagram>,
    /// What the relay client delivered.
    pub relay_received: tokio::sync::Mutex<mpsc::Receiver<RelayDatagram>>,
    relay_connected: Mutex<Vec<bool>>,
    own_endpoints: Mutex<Vec<SocketAddr>>,
    stun_socket: tokio::sync::Mutex<Option<tokio::net::UdpSocket>>,
}

impl Default for FakeEngine {
    fn default() -> Self {
        let (relay_out, relay_out_rx) = mpsc::channel(64);
        let (relay_in, relay_received) = mpsc::channel(64);
        Self {
            peers: Mutex::default(),
            reconfigures: Mutex::default(),
            relay_out,
            relay_out_rx: Mutex::new(Some(relay_out_rx)),
            relay_in,
            relay_received: tokio::sync::Mutex::new(relay_received),
            relay_connected: Mutex::default(),
            own_endpoints: Mutex::default(),
            stun_socket: tokio::sync::Mutex::new(None),
        }
    }
}

impl FakeEngine {
    /// Every `set_relay_connected` call, in order.
    pub fn relay_connected_calls(&self) -> Vec<bool> {
        self.relay_connected.lock().expect("lock").clone()
    }

    pub fn relay_connected(&self) -> bool {
        self.relay_connected_calls().last().copied().unwrap_or(false)
    }

    pub fn own_endpoints(&self) -> Vec<SocketAddr> {
        self.own_endpoints.lock().expect("lock").clone()
    }

    /// The next datagram the relay delivered, within `within`.
    pub async fn relay_recv(&self, within: Duration) -> Option<RelayDatagram> {
        tokio::time::timeout(within, self.relay_received.lock().await.recv())
            .await
            .ok()
            .flatten()
    }

    async fn stun_probe(&self, server: SocketAddr, timeout: Duration) -> Result<SocketAddr, String> {
        let mut socket = self.stun_socket.lock().await;
        if socket.is_none() {
            *socket = Some(
                tokio::net::UdpSocket::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        let socket = socket.as_ref().expect("bound above");
        let tx = stun::TransactionId(rand::random());
        socket
            .send_to(&stun::binding_request(tx), server)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 1500];
        let answer = async {
            loop {
                let (n, from) = socket.recv_from(&mut buf).await.map_err(|e| e.to_string())?;
                if from != server {
                    continue;
                }
                if let Ok((id, mapped)) = stun::parse_binding_response(&buf[..n])
                    && id == tx
                {
                    return Ok(mapped);
                }
            }
        };
        tokio::time::timeout(timeout, answer)
            .await
            .map_err(|_| "no STUN answer".to_string())?
    }

    pub fn peers(&self) -> Vec<PeerConfig> {
        self.peers.lock().expect("lock").clone()
    }

    pub fn peer(&self, key: &PublicKey) -> Option<PeerConfig> {
        self.peers().into_iter().find(|p| &p.public_key == key)
    }

    pub fn reconfigures(&self) -> usize {
        *self.reconfigures.lock().expect("lock")
    }
}

impl DataPlane for FakeEngine {
    fn reconfigure(&self, peers: Vec<PeerConfig>) {
        *self.peers.lock().expect("lock") = peers;
        *self.reconfigures.lock().expect("lock") += 1;
    }

    fn status(&self) -> EngineStatus {
        EngineStatus {
            interface: FAKE_INTERFACE.into(),
            listen_port: FAKE_PORT,
            peers: Vec::new(),
            counters: EngineCounters::default(),
            ..EngineStatus::default()
        }
    }

    fn listen_port(&self) -> u16 {
        FAKE_PORT
    }

    fn relay_channels(&self) -> Option<(mpsc::Receiver<RelayDatagram>, mpsc::Sender<RelayDatagram>)> {
        let outbound = self.relay_out_rx.lock().expect("lock").take()?;
        Some((outbound, self.relay_in.clone()))
    }

    fn set_relay_connected(&self, connected: bool) {
        self.relay_connected.lock().expect("lock").push(connected);
    }

    fn stun(&self, server: SocketAddr, timeout: Duration) -> StunFuture<'_> {
        Box::pin(self.stun_probe(server, timeout))
    }

    fn set_own_endpoints(&self, endpoints: Vec<SocketAddr>) {
        *self.own_endpoints.lock().expect("lock") = endpoints;
    }
}

/// A node's state directory, enrolled through [`daemon::enrol`].
pub struct Node {
    _dir: tempfile::TempDir,
    pub state: StateDir,
    pub identity: Identity,
    pub credential: String,
}

impl Node {
    pub async fn enrol(token: &str, hostname: &str) -> Result<Self, daemon::DaemonError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path().join("state"));
        daemon::enrol(&state, token, Some(hostname.to_string())).await?;
        let (identity, credential) = state.load_identity().expect("identity saved");
        Ok(Self {
            _dir: dir,
            state,
            identity,
            credential,
        })
    }

    pub fn client(&self) -> ControlClient {
        ControlClient::new(&self.identity.coordinator_url, self.identity.pinned().expect("pin")).expect("client")
    }

    /// A relay client for this node over `engine` (not started).
    pub fn relay_client(&self, engine: Arc<FakeEngine>) -> (RelayClient, Arc<RelayStatus>) {
        let status = Arc::new(RelayStatus::default());
        let client = RelayClient {
            client: ControlClient::for_relay(&self.identity.coordinator_url, self.identity.pinned().expect("pin"))
                .expect("relay client"),
            credential: self.credential.clone(),
            own_key: self.identity.public_key,
            dataplane: engine,
            status: status.clone(),
        };
        (client, status)
    }

    pub fn cache(&self) -> MapCache {
        MapCache::new(self.state.cache_path())
    }

    /// Runs the agent's control loop with a fake engine, first applying the cached map as `meshd up` does.
    pub fn start(&self) -> RunningAgent {
        let engine = Arc::new(FakeEngine::default());
        let agent = Arc::new(AgentState::new(
            self.identity.clone(),
            FAKE_INTERFACE.into(),
            engine.clone(),
        ));
        if let Some(map) = self.cache().load().expect("cache readable") {
            agent.install(map);
        }
        let shutdown = CancellationToken::new();
        let control = ControlLoop {
            agent: agent.clone(),
            client: self.client(),
            credential: self.credential.clone(),
            cache: self.cache(),
        };
        let task = tokio::spawn(control.run(shutdown.clone()));
        RunningAgent {
            agent,
            engine,
            shutdown,
            task,
        }
    }
}

pub struct RunningAgent {
    pub agent: Arc<AgentState>,
    pub engine: Arc<FakeEngine>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<StopReason>,
}

impl RunningAgent {
    pub fn map(&self) -> Option<NetworkMap> {
        self.agent.map()
    }

    pub fn phase(&self) -> Phase {
        self.agent.phase()
    }

    pub async fn stop(self) -> StopReason {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("loop stops")
            .expect("no panic")
    }
}

/// Polls `check` every 20 ms until it holds or `within` passes; returns how long it took.
pub async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if check() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

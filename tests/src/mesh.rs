//! The system under test on lab hosts: a `meshd-coordinator` on one host, `meshd` agents on others.
//!
//! Everything goes through the real command lines a user types (`serve`, `apikey create`, `token create`,
//! `join`, `up`, `down`, `status --json`). The admin API is called with `curl` *inside the coordinator's
//! namespace* (the test process itself lives in the root namespace and must not send there). The coordinator
//! serves HTTPS with its self-signed certificate, as by default; `curl -k` is acceptable for the admin side of a
//! test, while the nodes verify the certificate fingerprint from their token.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::env;
use crate::lab::{Host, Lab};
use crate::process::{Process, STOP_GRACE};
use crate::wait;

/// The coordinator's HTTPS port inside its namespace.
pub const COORDINATOR_PORT: u16 = 8443;
/// The overlay network the lab's coordinator hands out addresses from (checked by the lab's address guard).
pub const OVERLAY_NETWORK: &str = "10.77.0.0/16";
/// Every agent listens on this UDP port in its own namespace.
pub const NODE_LISTEN_PORT: u16 = 51820;
/// Deadline for a CLI call of either binary.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a freshly started process may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The log filter for the binaries under test, unless the caller set `MESHD_LAB_RUST_LOG`.
fn rust_log() -> String {
    std::env::var("MESHD_LAB_RUST_LOG")
        .unwrap_or_else(|_| "info,meshd=debug,meshd_node=debug,meshd_coordinator=debug".to_owned())
}

fn last_line(text: &str) -> Result<String> {
    text.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no output"))
}

/// A running (or deliberately stopped) `meshd-coordinator serve`.
pub struct Coordinator {
    pub host: Host,
    /// `https://<underlay>:8443`
    pub url: String,
    data_dir: PathBuf,
    api_key: String,
    /// Flags added to every `serve` (a scenario's feature switches, such as `--gateway-port`).
    serve_args: Vec<String>,
    process: Option<Process>,
}

impl Coordinator {
    /// Starts `serve` on `host`, waits until `/healthz` answers, and creates an admin API key.
    pub fn start(lab: &Lab, host: Host) -> Result<Self> {
        Self::start_with_args(lab, host, &[])
    }

    /// [`Coordinator::start`] with `serve_args` added to `serve`'s command line (also on restarts).
    pub fn start_with_args(lab: &Lab, host: Host, serve_args: &[&str]) -> Result<Self> {
        let data_dir = lab.subdir(&format!("coordinator-{}", host.name))?;
        let url = format!("https://{}:{COORDINATOR_PORT}", host.underlay);
        let mut coordinator = Self {
            host,
            url,
            data_dir,
            api_key: String::new(),
            serve_args: serve_args.iter().map(|a| (*a).to_owned()).collect(),
            process: None,
        };
        coordinator.serve(lab)?;
        let out = coordinator.cli(&["apikey", "create"])?;
        coordinator.api_key = last_line(&out).context("`apikey create` printed no key")?;
        Ok(coordinator)
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        let bin = env::coordinator_bin();
        let data_dir = self.data_dir.to_string_lossy();
        let mut full = args.to_vec();
        full.extend(["--data-dir", &data_dir]);
        self.host
            .run_ok(&bin.to_string_lossy(), &full, CLI_TIMEOUT)
            .with_context(|| format!("meshd-coordinator {}", args.join(" ")))
    }

    /// Starts `serve` (again) and waits for `/healthz`.
    pub fn serve(&mut self, lab: &Lab) -> Result<()> {
        if self.process.as_mut().is_some_and(Process::is_running) {
            bail!("the coordinator is already running");
        }
        let bin = env::coordinator_bin();
        let data_dir = self.data_dir.to_string_lossy().into_owned();
        let listen = format!("{}:{COORDINATOR_PORT}", self.host.underlay);
        let log = rust_log();
        let mut args = vec![
            "serve",
            "--data-dir",
            &data_dir,
            "--listen",
            &listen,
            "--public-url",
            &self.url,
            "--network",
            OVERLAY_NETWORK,
        ];
        args.extend(self.serve_args.iter().map(String::as_str));
        let process = lab.spawn(
            &self.host,
            "coordinator",
            &bin.to_string_lossy(),
            &args,
            &[("RUST_LOG", &log), ("NO_COLOR", "1")],
        )?;
        self.process = Some(process);
        wait::until(
            "the coordinator to answer /healthz",
            START_TIMEOUT,
            Duration::from_millis(100),
            || {
                if let Some(p) = self.process.as_mut() {
                    p.ensure_running()?;
                }
                Ok(self
                    .request("GET", "/healthz", None)
                    .ok()
                    .filter(|(code, _)| *code == 200)
                    .map(drop))
            },
        )
    }

    /// SIGKILL: the coordinator vanishes as in a crash or a power cut.
    pub fn kill(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.kill();
        }
    }

    /// A join token (`--reusable` if asked) from the CLI.
    pub fn create_token(&self, reusable: bool) -> Result<String> {
        let out = if reusable {
            self.cli(&["token", "create", "--reusable"])?
        } else {
            self.cli(&["token", "create"])?
        };
        last_line(&out).context("`token create` printed no token")
    }

    /// One HTTP request with `curl` inside the coordinator's namespace; returns the status code and body.
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
        let url = format!("{}{path}", self.url);
        let auth = format!("Authorization: Bearer {}", self.api_key);
        let mut args = vec![
            "-sS",
            "-k",
            "--noproxy",
            "*",
            "-m",
            "10",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ];
        if !self.api_key.is_empty() {
            args.extend(["-H", &auth]);
        }
        if let Some(body) = body {
            args.extend(["-H", "Content-Type: application/json", "--data-binary", body]);
        }
        args.push(&url);
        let out = self.host.run_ok("curl", &args, Duration::from_secs(15))?;
        let (text, code) = out
            .rsplit_once('\n')
            .ok_or_else(|| anyhow!("curl printed no status code"))?;
        let code = code
            .trim()
            .parse()
            .with_context(|| format!("curl status code {code:?}"))?;
        Ok((code, text.to_owned()))
    }

    /// An admin API call that must succeed (2xx); returns the body.
    pub fn admin(&self, method: &str, path: &str, body: Option<&str>) -> Result<String> {
        let (code, text) = self.request(method, path, body)?;
        if !(200..300).contains(&code) {
            bail!("{method} {path} returned {code}: {text}");
        }
        Ok(text)
    }

    /// `GET /api/v1/info`, parsed.
    pub fn info(&self) -> Result<Value> {
        let text = self.admin("GET", "/api/v1/info", None)?;
        serde_json::from_str(&text).with_context(|| format!("parsing /api/v1/info: {text}"))
    }

    /// Fails if the coordinator process has exited (with the tail of its log).
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.process.as_mut() {
            Some(p) => p.ensure_running(),
            None => bail!("the coordinator on {} is not started", self.host.name),
        }
    }

    /// `GET /api/v1/nodes`.
    pub fn nodes(&self) -> Result<Vec<Value>> {
        let text = self.admin("GET", "/api/v1/nodes", None)?;
        let value: Value = serde_json::from_str(&text).with_context(|| format!("parsing node list {text}"))?;
        value
            .as_array()
            .cloned()
            .ok_or_else(|| anyhow!("node list is not an array: {text}"))
    }

    /// The id of the node with overlay address `ip`.
    pub fn node_id_by_ip(&self, ip: Ipv4Addr) -> Result<i64> {
        let nodes = self.nodes()?;
        nodes
            .iter()
            .find(|n| n["ip"].as_str() == Some(&ip.to_string()))
            .and_then(|n| n["id"].as_i64())
            .ok_or_else(|| anyhow!("no node with ip {ip} in {nodes:?}"))
    }
}

/// One `meshd` agent on a lab host.
pub struct MeshNode {
    pub host: Host,
    pub hostname: String,
    pub state_dir: PathBuf,
    pub interface: String,
    process: Option<Process>,
    ip: Option<Ipv4Addr>,
}

impl MeshNode {
    /// Starts `meshd join <token>` on `host` (it runs in the foreground until stopped). Call
    /// [`MeshNode::wait_joined`] next.
    pub fn spawn_join(lab: &Lab, host: Host, token: &str, hostname: &str, index: usize) -> Result<Self> {
        let state_dir = lab.subdir(&format!("meshd-{hostname}"))?;
        let mut node = Self {
            hostname: hostname.to_owned(),
            state_dir,
            interface: lab.ifname("ms", index),
            host,
            process: None,
            ip: None,
        };
        let port = NODE_LISTEN_PORT.to_string();
        node.spawn(
            lab,
            "join",
            &[
                "join",
                token,
                "--hostname",
                hostname,
                "--interface",
                &node.interface.clone(),
                "--listen-port",
                &port,
            ],
        )?;
        Ok(node)
    }

    fn spawn(&mut self, lab: &Lab, label: &str, args: &[&str]) -> Result<()> {
        let bin = env::meshd_bin();
        let state_dir = self.state_dir.to_string_lossy().into_owned();
        let mut full = vec!["--state-dir", state_dir.as_str()];
        full.extend(args);
        let log = rust_log();
        let process = lab.spawn(
            &self.host,
            &format!("meshd-{label}"),
            &bin.to_string_lossy(),
            &full,
            &[("RUST_LOG", &log), ("NO_COLOR", "1")],
        )?;
        self.process = Some(process);
        Ok(())
    }

    /// `meshd --state-dir D ARGS...` (status, ping, down, leave) inside the node's namespace.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let bin = env::meshd_bin();
        let state_dir = self.state_dir.to_string_lossy();
        let mut full = vec!["--state-dir", &state_dir];
        full.extend(args);
        self.host
            .run_ok(&bin.to_string_lossy(), &full, CLI_TIMEOUT)
            .with_context(|| format!("meshd {}", args.join(" ")))
    }

    /// `meshd status --json`, parsed.
    pub fn status(&self) -> Result<Value> {
        let text = self.ctl(&["status", "--json"])?;
        serde_json::from_str(&text).with_context(|| format!("parsing `meshd status --json`: {text}"))
    }

    /// Fails if the agent process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.process.as_mut() {
            Some(p) => p.ensure_running(),
            None => bail!("meshd on {} is not started", self.host.name),
        }
    }

    /// Waits until the agent reports its own overlay address; returns it.
    pub fn wait_joined(&mut self, timeout: Duration) -> Result<Ipv4Addr> {
        let what = format!("meshd on {} to report its overlay address", self.host.name);
        let ip = wait::until(&what, timeout, Duration::from_millis(200), || {
            self.ensure_running()?;
            let status = self.status()?;
            let ip = status["self"]["ip"]
                .as_str()
                .ok_or_else(|| anyhow!("no self.ip in {status}"))?;
            Ok(Some(
                Ipv4Addr::from_str(ip.split('/').next().unwrap_or(ip)).with_context(|| format!("self.ip {ip}"))?,
            ))
        })?;
        crate::lab::assert_lab_address(ip)?;
        self.ip = Some(ip);
        Ok(ip)
    }

    /// Waits until `meshd status` lists at least `count` peers.
    pub fn wait_peers(&mut self, count: usize, timeout: Duration) -> Result<Value> {
        let what = format!("meshd on {} to list {count} peers", self.host.name);
        wait::until(&what, timeout, Duration::from_millis(200), || {
            self.ensure_running()?;
            let status = self.status()?;
            let peers = status["peers"].as_array().map_or(0, Vec::len);
            Ok((peers >= count).then_some(status))
        })
    }

    /// The overlay address seen by [`MeshNode::wait_joined`].
    pub fn ip(&self) -> Ipv4Addr {
        self.ip.expect("wait_joined ran before the overlay address is used")
    }

    /// `meshd down`, then waits for the agent process to exit.
    pub fn down(&mut self) -> Result<()> {
        self.ctl(&["down"])?;
        if let Some(p) = self.process.as_mut() {
            let status = p
                .wait_exit(Duration::from_secs(15))
                .context("meshd down did not stop the agent")?;
            if !status.success() {
                bail!(
                    "the agent on {} exited with {status} after `meshd down`",
                    self.host.name
                );
            }
        }
        // The interface must be gone, or the next `up` would find it in use.
        let link = self
            .host
            .run("ip", &["link", "show", &self.interface], Duration::from_secs(5))?;
        if link.success() {
            bail!(
                "interface {} still exists on {} after `meshd down`",
                self.interface,
                self.host.name
            );
        }
        Ok(())
    }

    /// `meshd up` (restart from saved state, no token); waits for it to report its address and returns it.
    pub fn up(&mut self, lab: &Lab) -> Result<Ipv4Addr> {
        if self.process.as_mut().is_some_and(Process::is_running) {
            bail!("meshd on {} is still running", self.host.name);
        }
        let interface = self.interface.clone();
        let port = NODE_LISTEN_PORT.to_string();
        self.spawn(lab, "up", &["up", "--interface", &interface, "--listen-port", &port])?;
        self.wait_joined(START_TIMEOUT)
    }

    /// Stops the agent process (SIGTERM, then SIGKILL) without `meshd down`.
    pub fn stop_process(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.stop(STOP_GRACE);
        }
    }
}

/// A coordinator host and `n` node hosts on the routed underlay, all joined with one reusable token.
pub struct Mesh {
    // Nodes first: dropped before the coordinator, so agents do not spend their last moments reconnecting.
    pub nodes: Vec<MeshNode>,
    pub coordinator: Coordinator,
    pub token: String,
    /// When the last agent had been launched (`meshd join`): what "time to a path" is measured from.
    pub launched: Instant,
}

impl Mesh {
    /// Builds the hosts, starts the coordinator, joins `n` nodes (named node1..noden), and waits until every
    /// node lists every other node as a peer.
    pub fn start(lab: &Lab, n: usize) -> Result<Self> {
        let coord_host = lab.add_host("coord")?;
        let hosts = (1..=n)
            .map(|i| lab.add_host(&format!("node{i}")))
            .collect::<Result<Vec<_>>>()?;
        Self::start_on(lab, coord_host, hosts)
    }

    /// Like [`Mesh::start`] on hosts the caller built (for example some behind a NAT); node `i` (from 1) of
    /// `hosts` joins as `node<i>`.
    pub fn start_on(lab: &Lab, coord_host: Host, hosts: Vec<Host>) -> Result<Self> {
        let started = Instant::now();
        let n = hosts.len();
        let coordinator = Coordinator::start(lab, coord_host)?;
        let token = coordinator.create_token(true)?;
        let mut nodes = Vec::new();
        for (i, host) in hosts.into_iter().enumerate() {
            nodes.push(MeshNode::spawn_join(
                lab,
                host,
                &token,
                &format!("node{}", i + 1),
                i + 1,
            )?);
        }
        let launched = Instant::now();
        for node in &mut nodes {
            node.wait_joined(START_TIMEOUT)?;
        }
        for node in &mut nodes {
            node.wait_peers(n - 1, START_TIMEOUT)?;
        }
        lab.assert_isolated()?;
        eprintln!(
            "mesh of {n} nodes up in {:.1} s (all list each other {:.2} s after the agents were launched): {}",
            started.elapsed().as_secs_f64(),
            launched.elapsed().as_secs_f64(),
            nodes
                .iter()
                .map(|n| format!("{}={}", n.hostname, n.ip()))
                .collect::<Vec<_>>()
                .join(" ")
        );
        Ok(Self {
            nodes,
            coordinator,
            token,
            launched,
        })
    }

    /// Waits until every node answers pings from every other node over the overlay.
    pub fn wait_full_mesh(&self, timeout: Duration) -> Result<()> {
        for from in &self.nodes {
            for to in &self.nodes {
                if from.hostname != to.hostname {
                    from.host
                        .wait_ping(to.ip(), timeout)
                        .with_context(|| format!("{} -> {}", from.hostname, to.hostname))?;
                }
            }
        }
        Ok(())
    }
}

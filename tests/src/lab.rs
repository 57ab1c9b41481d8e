//! The topology of one scenario and the runner that cleans it up and explains failures.
//!
//! A [`Lab`] owns every namespace it creates: one router namespace that forwards between hosts, and per host a
//! namespace on its own /24 of 198.18.0.0/15, joined to the router by a veth pair. Hosts behind a NAT get a
//! private /24 of 198.19.0.0/16 and a NAT namespace that masquerades them onto the routed underlay. Each host has
//! exactly one route besides its connected subnet: 198.18.0.0/15 towards its router; there is never a default
//! route and never a link to the host's root namespace.
//!
//! [`scenario`] runs a test body with a fresh lab: it skips or fails when the machine lacks what the lab needs
//! (see [`crate::env`]), prints the log of every process the scenario started when it fails or panics, and
//! deletes the namespaces in every case.

use std::cell::{Cell, RefCell};
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, Output};
use crate::env;
use crate::netns::{self, Netns};
use crate::process::{Process, tail};
use crate::wait;

/// Labs started by this test process; with the PID it makes every lab's names unique on the machine.
static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Lines of each log printed when a scenario fails (the full logs stay on disk with `MESHD_LAB_KEEP=1`).
const LOG_TAIL_LINES: usize = 300;

/// Checks that `ip` is an underlay (198.18.0.0/15) or overlay (10.77.0.0/16) address of the lab, the only
/// addresses any helper may send to.
pub fn assert_lab_address(ip: Ipv4Addr) -> Result<()> {
    let [a, b, ..] = ip.octets();
    if (a == 198 && (b == 18 || b == 19)) || (a == 10 && b == 77) {
        Ok(())
    } else {
        bail!("refusing to send to {ip}: not a lab address (198.18.0.0/15 underlay, 10.77.0.0/16 overlay)")
    }
}

/// A machine of the lab: a namespace with one address on the underlay.
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name used in logs ("coord", "node1"...).
    pub name: String,
    /// The namespace's name.
    pub ns: String,
    /// The host's own underlay address (a private 198.19.x address for a host behind a NAT).
    pub underlay: Ipv4Addr,
}

impl Host {
    /// The host's `/etc/hosts` as seen from outside its namespace (`/etc/netns/NS/hosts`, see [`netns`]).
    pub fn hosts_file(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.ns).join("hosts")
    }

    /// What `getent hosts NAME` says inside the host (its hosts file, as every program there sees it): the first
    /// address, or `None` when the name does not resolve.
    pub fn resolve(&self, name: &str) -> Result<Option<Ipv4Addr>> {
        let out = self.run("getent", &["ahostsv4", name], Duration::from_secs(10))?;
        if !out.success() {
            return Ok(None);
        }
        Ok(out.stdout.split_whitespace().next().and_then(|a| a.parse().ok()))
    }

    /// A command that runs `program` inside the host's namespace.
    pub fn command(&self, program: &str) -> Command {
        netns::exec_in(&self.ns, program)
    }

    /// Runs `program args...` in the host with a deadline.
    pub fn run(&self, program: &str, args: &[&str], timeout: Duration) -> Result<Output> {
        cmd::run(self.command(program).args(args), timeout).with_context(|| format!("on host {}", self.name))
    }

    /// Like [`Host::run`] but fails on a non-zero exit; returns stdout.
    pub fn run_ok(&self, program: &str, args: &[&str], timeout: Duration) -> Result<String> {
        cmd::run_ok(self.command(program).args(args), timeout).with_context(|| format!("on host {}", self.name))
    }

    /// One ICMP echo to `target` with a reply deadline of `reply_timeout`; true if it was answered.
    pub fn ping_once(&self, target: Ipv4Addr, reply_timeout: Duration) -> Result<bool> {
        assert_lab_address(target)?;
        let wait = format!("{:.3}", reply_timeout.as_secs_f64());
        let out = self.run(
            "ping",
            &["-n", "-q", "-c", "1", "-W", &wait, &target.to_string()],
            reply_timeout * 2 + Duration::from_secs(2),
        )?;
        Ok(out.success())
    }

    /// Polls with pings until `target` answers or `timeout` passes.
    pub fn wait_ping(&self, target: Ipv4Addr, timeout: Duration) -> Result<()> {
        wait::until(
            &format!("{} to answer a ping from {}", target, self.name),
            timeout,
            Duration::from_millis(100),
            || Ok(self.ping_once(target, Duration::from_secs(1))?.then_some(())),
        )
    }
}

/// The namespaces and logs of one scenario. All methods take `&self` so that scenario code can hold hosts and
/// processes while it keeps building.
pub struct Lab {
    name: String,
    id: String,
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    /// In creation order; deleted in reverse.
    namespaces: RefCell<Vec<Netns>>,
    router: RefCell<Option<String>>,
    next_subnet: Cell<u8>,
    next_log: Cell<u32>,
    failed: Cell<bool>,
}

impl Lab {
    /// A new, empty lab. `name` only labels logs.
    pub fn new(name: &str) -> Result<Self> {
        let counter = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        // Short on purpose: interface names derived from it must fit in 15 bytes.
        let id = format!("{:x}{:02x}", std::process::id(), counter % 256);
        let dir = tempfile::Builder::new()
            .prefix(&format!("meshd-lab-{name}-"))
            .tempdir()
            .context("creating the lab's temporary directory")?;
        let dir_path = dir.path().to_path_buf();
        fs::create_dir_all(dir_path.join("logs")).context("creating the log directory")?;
        Ok(Self {
            name: name.to_owned(),
            id,
            dir: Some(dir),
            dir_path,
            namespaces: RefCell::new(Vec::new()),
            router: RefCell::new(None),
            next_subnet: Cell::new(1),
            next_log: Cell::new(1),
            failed: Cell::new(false),
        })
    }

    /// The lab's unique id (hex PID + counter), part of every name it creates.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A unique interface name for this lab (`prefix` + id + `n`), at most 15 bytes.
    pub fn ifname(&self, prefix: &str, n: usize) -> String {
        let name = format!("{prefix}{}{n}", self.id);
        assert!(name.len() <= 15, "interface name {name} too long");
        name
    }

    /// The lab's temporary directory (state dirs, keys, logs).
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// A fresh subdirectory of the lab's directory.
    pub fn subdir(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir_path.join(name);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(path)
    }

    pub(crate) fn create_ns(&self, role: &str) -> Result<String> {
        let name = format!("mlab-{}-{role}", self.id);
        let ns = Netns::create(&name)?;
        self.namespaces.borrow_mut().push(ns);
        Ok(name)
    }

    pub(crate) fn with_ns<T>(&self, name: &str, f: impl FnOnce(&Netns) -> Result<T>) -> Result<T> {
        let namespaces = self.namespaces.borrow();
        let ns = namespaces
            .iter()
            .find(|ns| ns.name() == name)
            .with_context(|| format!("no namespace {name}"))?;
        f(ns)
    }

    /// The router namespace (created on first use), forwarding between all hosts.
    pub fn router(&self) -> Result<String> {
        if let Some(name) = self.router.borrow().as_ref() {
            return Ok(name.clone());
        }
        let name = self.create_ns("router")?;
        self.with_ns(&name, |ns| ns.sysctl("net.ipv4.ip_forward", "1"))?;
        *self.router.borrow_mut() = Some(name.clone());
        Ok(name)
    }

    pub(crate) fn take_subnet(&self) -> Result<u8> {
        let k = self.next_subnet.get();
        if k >= 250 {
            bail!("lab {} has no subnets left", self.name);
        }
        self.next_subnet.set(k + 1);
        Ok(k)
    }

    /// Attaches namespace `ns` to the router on subnet 198.18.k.0/24: `eth0` = 198.18.k.2, router side = .1, and
    /// the one route 198.18.0.0/15 via the router.
    pub(crate) fn attach_to_router(&self, ns: &str, k: u8) -> Result<Ipv4Addr> {
        let router = self.router()?;
        let router_if = format!("h{k}");
        cmd::run_ok(
            Command::new(env::tool_path("ip")).args([
                "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &router_if, "netns", &router,
            ]),
            netns::IP_TIMEOUT,
        )
        .with_context(|| format!("creating the veth pair {ns}:eth0 - {router}:{router_if}"))?;
        let address = Ipv4Addr::new(198, 18, k, 2);
        self.with_ns(&router, |r| {
            r.ip(&["addr", "add", &format!("198.18.{k}.1/24"), "dev", &router_if])?;
            r.ip(&["link", "set", &router_if, "up"])
        })?;
        self.with_ns(ns, |h| {
            h.ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"])?;
            h.ip(&["link", "set", "eth0", "up"])?;
            h.ip(&["route", "add", "198.18.0.0/15", "via", &format!("198.18.{k}.1")])
        })?;
        Ok(address)
    }

    /// A host on its own routed subnet.
    pub fn add_host(&self, name: &str) -> Result<Host> {
        let k = self.take_subnet()?;
        let ns = self.create_ns(name)?;
        let underlay = self.attach_to_router(&ns, k)?;
        Ok(Host {
            name: name.to_owned(),
            ns,
            underlay,
        })
    }

    /// A host behind its own NAT router: the host has 198.19.k.2/24 and reaches the underlay through a NAT
    /// namespace (198.18.k.2 outside) that masquerades its traffic, so peers see it as 198.18.k.2:<mapped port>.
    /// Returns the host and the NAT's outside address.
    pub fn add_host_behind_nat(&self, name: &str) -> Result<(Host, Ipv4Addr)> {
        let k = self.take_subnet()?;
        let nat = self.create_ns(&format!("{name}-nat"))?;
        let outside = self.attach_to_router(&nat, k)?;
        let ns = self.create_ns(name)?;
        cmd::run_ok(
            Command::new(env::tool_path("ip")).args([
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", "lan0", "netns", &nat,
            ]),
            netns::IP_TIMEOUT,
        )
        .with_context(|| format!("creating the LAN veth pair of {name}"))?;
        let address = Ipv4Addr::new(198, 19, k, 2);
        self.with_ns(&nat, |n| {
            n.ip(&["addr", "add", &format!("198.19.{k}.1/24"), "dev", "lan0"])?;
            n.ip(&["link", "set", "lan0", "up"])?;
            n.sysctl("net.ipv4.ip_forward", "1")?;
            // A router's WAN firewall: unsolicited packets to the NAT itself never become conntrack entries
            // (see natlab.rs for why that matters to hole punching).
            cmd::run_ok(
                n.command("iptables").args(["-A", "INPUT", "-i", "eth0", "-j", "DROP"]),
                netns::IP_TIMEOUT,
            )?;
            cmd::run_ok(
                n.command("iptables")
                    .args(["-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"]),
                netns::IP_TIMEOUT,
            )
            .map(drop)
        })?;
        self.with_ns(&ns, |h| {
            h.ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"])?;
            h.ip(&["link", "set", "eth0", "up"])?;
            h.ip(&["route", "add", "198.18.0.0/15", "via", &format!("198.19.{k}.1")])
        })?;
        Ok((
            Host {
                name: name.to_owned(),
                ns,
                underlay: address,
            },
            outside,
        ))
    }

    /// Drops `percent` % of the packets the router forwards, at random, in both directions (`iptables -m
    /// statistic`: this kernel has no netem). Replaces an earlier loss setting; 0 removes it.
    pub fn set_router_loss(&self, percent: f64) -> Result<()> {
        let router = self.router()?;
        self.with_ns(&router, |r| {
            cmd::run_ok(r.command("iptables").args(["-F", "FORWARD"]), netns::IP_TIMEOUT)?;
            if percent > 0.0 {
                let probability = format!("{:.4}", percent / 100.0);
                cmd::run_ok(
                    r.command("iptables").args([
                        "-A",
                        "FORWARD",
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &probability,
                        "-j",
                        "DROP",
                    ]),
                    netns::IP_TIMEOUT,
                )?;
            }
            Ok(())
        })
    }

    /// Starts `program args...` inside `host`, logging to the lab's log directory.
    pub fn spawn(
        &self,
        host: &Host,
        label: &str,
        program: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Process> {
        let n = self.next_log.get();
        self.next_log.set(n + 1);
        let log = self
            .dir_path
            .join("logs")
            .join(format!("{n:02}-{}-{label}.log", host.name));
        let mut command = host.command(program);
        command.args(args);
        for (key, value) in envs {
            command.env(key, value);
        }
        Process::spawn(&format!("{label} on {}", host.name), command, &log)
    }

    /// Fails if any lab namespace has a default route or an IPv4 route outside the lab's ranges.
    pub fn assert_isolated(&self) -> Result<()> {
        for ns in self.namespaces.borrow().iter() {
            let routes = ns.ip(&["-4", "route", "show", "table", "all"])?;
            for line in routes.lines() {
                let first = line.split_whitespace().next().unwrap_or("");
                if matches!(first, "local" | "broadcast" | "multicast" | "") {
                    continue;
                }
                let lab_range = ["198.18.", "198.19.", "10.77."].iter().any(|p| first.starts_with(p));
                if first == "default" || !lab_range {
                    bail!("namespace {} has a non-lab route: {line}", ns.name());
                }
            }
            if !ns.ip(&["-6", "route", "show", "default"])?.trim().is_empty() {
                bail!("namespace {} has an IPv6 default route", ns.name());
            }
        }
        Ok(())
    }

    /// Prints the tail of every log of this lab to stderr (captured by the test harness and shown on failure).
    pub fn dump_logs(&self) {
        let mut logs: Vec<PathBuf> = fs::read_dir(self.dir_path.join("logs"))
            .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        logs.sort();
        eprintln!(
            "===== lab {} ({}): logs of {} processes =====",
            self.name,
            self.id,
            logs.len()
        );
        for log in logs {
            let text = fs::read(&log)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let name = log
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            eprintln!(
                "----- {name} (last {LOG_TAIL_LINES} lines of {}) -----",
                text.lines().count()
            );
            eprintln!("{}", tail(&text, LOG_TAIL_LINES));
        }
        eprintln!("===== end of lab {} logs =====", self.name);
    }

    /// Marks the scenario failed: logs are printed when the lab is dropped.
    pub fn mark_failed(&self) {
        self.failed.set(true);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let failed = self.failed.get() || thread::panicking();
        if failed {
            self.dump_logs();
        }
        let mut namespaces = self.namespaces.borrow_mut();
        while let Some(ns) = namespaces.pop() {
            drop(ns);
        }
        let keep = env_flag("MESHD_LAB_KEEP") || failed && env_flag("MESHD_LAB_KEEP_FAILED");
        if let Some(dir) = self.dir.take().filter(|_| keep) {
            eprintln!("lab {}: files kept in {}", self.name, dir.keep().display());
        }
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// Runs a scenario that uses the meshd binaries and `tools` (beyond [`env::BASE_TOOLS`]) in a fresh lab.
pub fn scenario(name: &str, tools: &[&str], body: impl FnOnce(&Lab) -> Result<()>) {
    run_scenario(name, tools, true, body);
}

/// Runs a scenario that checks the harness itself with plain processes (no meshd binaries needed).
pub fn harness_scenario(name: &str, tools: &[&str], body: impl FnOnce(&Lab) -> Result<()>) {
    run_scenario(name, tools, false, body);
}

fn run_scenario(name: &str, tools: &[&str], needs_binaries: bool, body: impl FnOnce(&Lab) -> Result<()>) {
    let missing = env::missing_prerequisites(tools, needs_binaries);
    if !missing.is_empty() {
        let message = format!("lab scenario `{name}` needs: {}", missing.join("; "));
        if env::lab_required() {
            panic!(
                "{message} ({}=1, so a missing prerequisite is a failure)",
                env::REQUIRED_VAR
            );
        }
        eprintln!("SKIPPED {message}");
        return;
    }
    let started = Instant::now();
    let lab = Lab::new(name).unwrap_or_else(|e| panic!("creating lab {name}: {e:#}"));
    // Isolation is checked after the body too: the binaries under test add routes of their own.
    let result = body(&lab).and_then(|()| lab.assert_isolated());
    match result {
        Ok(()) => eprintln!(
            "lab scenario `{name}` passed in {:.1} s",
            started.elapsed().as_secs_f64()
        ),
        Err(e) => {
            lab.mark_failed();
            drop(lab);
            panic!(
                "lab scenario `{name}` failed after {:.1} s: {e:#}",
                started.elapsed().as_secs_f64()
            );
        }
    }
}

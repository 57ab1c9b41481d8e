//! One network namespace, created by the lab and deleted on drop.
//!
//! The guard only ever deletes the namespace it created itself (its name carries the lab's unique id). Before
//! deleting, it ends whatever still runs inside it: such processes were started by this lab (nothing else enters
//! our namespace), and a namespace with live processes would outlive `ip netns del`.

use std::process::Command;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cmd;
use crate::env::tool_path;

/// Deadline for one `ip` invocation.
pub const IP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add NAME` and loopback up.
    pub fn create(name: &str) -> Result<Self> {
        cmd::run_ok(Command::new(tool_path("ip")).args(["netns", "add", name]), IP_TIMEOUT)
            .with_context(|| format!("creating network namespace {name}"))?;
        let ns = Self { name: name.to_owned() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        cmd::run_ok(
            Command::new(tool_path("ip")).args(["-n", &self.name]).args(args),
            IP_TIMEOUT,
        )
        .with_context(|| format!("in namespace {}", self.name))
    }

    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        exec_in(&self.name, program)
    }

    /// `sysctl -w KEY=VALUE` inside the namespace (per-namespace keys like `net.ipv4.ip_forward`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        cmd::run_ok(
            self.command("sysctl").args(["-q", "-w", &format!("{key}={value}")]),
            IP_TIMEOUT,
        )
        .with_context(|| format!("setting {key}={value} in {}", self.name))?;
        Ok(())
    }

    fn pids(&self) -> Vec<String> {
        cmd::run(
            Command::new(tool_path("ip")).args(["netns", "pids", &self.name]),
            IP_TIMEOUT,
        )
        .map(|out| out.stdout.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
    }
}

/// `ip netns exec NS PROGRAM`: `ip` switches namespace and then execs the program itself, so the child's PID is
/// the program's.
pub fn exec_in(ns: &str, program: &str) -> Command {
    let mut command = Command::new(tool_path("ip"));
    let program = if program.contains('/') {
        program.into()
    } else {
        tool_path(program)
    };
    command.args(["netns", "exec", ns]).arg(program);
    // The binaries under test read MESHD_* settings from the environment; a lab run must not inherit the
    // caller's (MESHD_DATABASE_URL, MESHD_STATE_DIR...). The test sets what it means explicitly.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MESHD_") {
            command.env_remove(key);
        }
    }
    command
}

impl Drop for Netns {
    fn drop(&mut self) {
        for signal in ["-TERM", "-KILL"] {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            let _ = cmd::run(Command::new("kill").arg(signal).args(&pids), IP_TIMEOUT);
            for _ in 0..20 {
                if self.pids().is_empty() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        if let Err(e) = cmd::run_ok(
            Command::new(tool_path("ip")).args(["netns", "del", &self.name]),
            IP_TIMEOUT,
        ) {
            eprintln!("lab cleanup: could not delete namespace {}: {e:#}", self.name);
        }
    }
}

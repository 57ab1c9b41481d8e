//! One network namespace, created by the lab and deleted on drop.
//!
//! Each namespace gets name-resolution files of its own, `/etc/netns/NAME/hosts` and `resolv.conf`, which
//! `ip netns exec` mounts over `/etc`: an agent that writes its names block writes the namespace's file, never the
//! host's. They are removed with the namespace.
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
        // The files first: `ip netns exec` mounts them only if they exist when it runs.
        let etc = etc_dir(name);
        std::fs::create_dir_all(&etc).with_context(|| format!("creating {}", etc.display()))?;
        std::fs::write(etc.join("hosts"), LAB_HOSTS).with_context(|| format!("writing {}/hosts", etc.display()))?;
        std::fs::write(etc.join("resolv.conf"), LAB_RESOLV_CONF)
            .with_context(|| format!("writing {}/resolv.conf", etc.display()))?;
        if let Err(e) = cmd::run_ok(Command::new(tool_path("ip")).args(["netns", "add", name]), IP_TIMEOUT) {
            let _ = std::fs::remove_dir_all(&etc);
            return Err(e).with_context(|| format!("creating network namespace {name}"));
        }
        let ns = Self { name: name.to_owned() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// This namespace's hosts file as the host sees it (`/etc/hosts` inside the namespace).
    pub fn hosts_file(&self) -> std::path::PathBuf {
        etc_dir(&self.name).join("hosts")
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

/// What a lab namespace's `/etc/hosts` holds before any agent writes to it.
pub const LAB_HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";
/// A resolver configuration that resolves nothing outside the namespace: only the loopback, where no server runs,
/// so a lookup that misses the hosts file fails at once instead of leaving the lab.
const LAB_RESOLV_CONF: &str =
    "# meshd lab namespace: no DNS server\nnameserver 127.0.0.1\noptions timeout:1 attempts:1\n";

fn etc_dir(name: &str) -> std::path::PathBuf {
    std::path::Path::new("/etc/netns").join(name)
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
        // Only our own directory (the name is unique to this lab run).
        let _ = std::fs::remove_dir_all(etc_dir(&self.name));
    }
}

//! What the lab needs from the machine, and what happens when it is missing.
//!
//! The lab needs root, `/dev/net/tun`, a few tools and the built binaries. When something is missing a scenario is
//! skipped with a message saying what to install, so `cargo test` as a normal user still passes; with
//! `MESHD_LAB_REQUIRED=1` (set by `.ci/run`) a missing prerequisite fails the scenario instead, so CI can never
//! pass by skipping. This module only looks; it installs nothing.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

/// Set to `1` to turn a missing prerequisite into a failure instead of a skip.
pub const REQUIRED_VAR: &str = "MESHD_LAB_REQUIRED";
/// Overrides for the binaries under test.
pub const MESHD_BIN_VAR: &str = "MESHD_BIN";
pub const COORDINATOR_BIN_VAR: &str = "MESHD_COORDINATOR_BIN";

/// Tools every scenario uses.
pub const BASE_TOOLS: &[&str] = &["ip", "iptables", "ping", "curl", "sysctl"];

/// The Debian package that provides a tool, for the skip message.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "ip" => "iproute2",
        "iptables" => "iptables",
        "ping" => "iputils-ping",
        "curl" => "curl",
        "sysctl" => "procps",
        "sshd" => "openssh-server",
        "ssh" | "ssh-keygen" => "openssh-client",
        "wg" => "wireguard-tools",
        "wireguard-go" => "wireguard-go",
        "conntrack" => "conntrack",
        "iperf3" => "iperf3",
        "tcpdump" => "tcpdump",
        "python3" => "python3",
        "dig" => "dnsutils",
        _ => "?",
    }
}

/// Whether a missing prerequisite must fail the test run.
pub fn lab_required() -> bool {
    env::var(REQUIRED_VAR).is_ok_and(|v| v == "1")
}

/// Full path of a tool, looked up in `PATH` and the sbin directories (which a non-login root shell may lack).
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The path of a tool that [`missing_prerequisites`] has already checked; falls back to the bare name.
pub fn tool_path(name: &str) -> PathBuf {
    tool(name).unwrap_or_else(|| PathBuf::from(name))
}

fn running_as_root() -> bool {
    // /proc/self/status has "Uid:\t<real>\t<effective>\t..."; the effective uid decides.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The target directory of the profile this test executable was built with (`target/<profile>`), where
/// `cargo build` puts the workspace's binaries.
fn profile_dir() -> Option<PathBuf> {
    let exe = env::current_exe().ok()?;
    // target/<profile>/deps/<test-binary>
    let deps = exe.parent()?;
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().map(Path::to_path_buf)
    } else {
        Some(deps.to_path_buf())
    }
}

fn binary(var: &str, name: &str) -> PathBuf {
    if let Some(path) = env::var_os(var) {
        return PathBuf::from(path);
    }
    profile_dir()
        .map(|dir| dir.join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The `meshd` binary under test.
pub fn meshd_bin() -> PathBuf {
    binary(MESHD_BIN_VAR, "meshd")
}

/// The `meshd-coordinator` binary under test.
pub fn coordinator_bin() -> PathBuf {
    binary(COORDINATOR_BIN_VAR, "meshd-coordinator")
}

/// Everything missing for a scenario that uses `tools` (besides [`BASE_TOOLS`]) and, if `needs_binaries`, the
/// meshd binaries. Empty when the lab can run.
pub fn missing_prerequisites(tools: &[&str], needs_binaries: bool) -> Vec<String> {
    let mut missing = Vec::new();
    if !running_as_root() {
        missing.push("root (network namespaces and TUN devices need it; run with sudo)".to_owned());
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun (load the tun module)".to_owned());
    }
    for name in BASE_TOOLS.iter().chain(tools) {
        if tool(name).is_none() {
            missing.push(format!("`{name}` (apt-get install {})", package_of(name)));
        }
    }
    if needs_binaries {
        for bin in [meshd_bin(), coordinator_bin()] {
            if !bin.is_file() {
                missing.push(format!(
                    "{} (build it first: cargo build -p meshd -p meshd-coordinator, or set {MESHD_BIN_VAR} / \
                     {COORDINATOR_BIN_VAR}; scripts/test-all.sh does this)",
                    bin.display()
                ));
            }
        }
    }
    missing
}

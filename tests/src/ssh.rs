//! An OpenSSH server (Debian's openssh-server) inside a node's namespace, and the client side.
//!
//! The server is hermetic: its own host key, `authorized_keys`, `sshd_config` and PID file in the lab's
//! directory, listening only on the node's overlay address, started in the foreground (`sshd -D -e`) so the lab
//! keeps its PID. The one host-wide thing it needs is the privilege-separation directory `/run/sshd`, which
//! Debian's service normally creates; we create it if absent (an empty root-owned directory) and never remove it.

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cmd::{self, Output};
use crate::lab::{Host, Lab, assert_lab_address};
use crate::process::Process;
use crate::wait;

pub struct SshServer {
    pub host: Host,
    pub address: Ipv4Addr,
    client_key: PathBuf,
    // Kept last: dropped after the fields above, which hold no resources.
    _process: Process,
}

fn keygen(host: &Host, path: &Path) -> Result<()> {
    host.run_ok(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "meshd-lab",
            "-f",
            &path.to_string_lossy(),
        ],
        Duration::from_secs(20),
    )
    .map(drop)
}

impl SshServer {
    /// Starts sshd on `host`, listening on `address` (the node's overlay address) port 22, accepting one fresh
    /// client key for root. Does not wait: see [`SshServer::wait_ready`].
    pub fn start(lab: &Lab, host: &Host, address: Ipv4Addr) -> Result<Self> {
        assert_lab_address(address)?;
        let dir = lab.subdir(&format!("ssh-{}", host.name))?;
        let host_key = dir.join("ssh_host_ed25519_key");
        let client_key = dir.join("client_ed25519");
        keygen(host, &host_key)?;
        keygen(host, &client_key)?;
        let authorized = dir.join("authorized_keys");
        fs::copy(client_key.with_extension("pub"), &authorized).context("writing authorized_keys")?;
        fs::set_permissions(&authorized, fs::Permissions::from_mode(0o600)).context("chmod authorized_keys")?;
        let config = dir.join("sshd_config");
        fs::write(
            &config,
            format!(
                "ListenAddress {address}\nPort 22\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\nUsePAM no\n\
                 PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 # The lab directory lives under /tmp (mode 1777), which StrictModes would reject.\nStrictModes no\n\
                 UseDNS no\nLogLevel VERBOSE\nClientAliveInterval 0\n",
                host_key.display(),
                authorized.display(),
                dir.join("sshd.pid").display()
            ),
        )
        .context("writing sshd_config")?;
        if !Path::new("/run/sshd").is_dir() {
            fs::create_dir_all("/run/sshd").context("creating sshd's privilege separation directory /run/sshd")?;
            fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755)).context("chmod /run/sshd")?;
        }
        let sshd = crate::env::tool_path("sshd");
        let process = lab.spawn(
            host,
            "sshd",
            &sshd.to_string_lossy(),
            &["-D", "-e", "-f", &config.to_string_lossy()],
            &[],
        )?;
        Ok(Self {
            host: host.clone(),
            address,
            client_key,
            _process: process,
        })
    }

    /// The arguments of `ssh` for `root@<address> <remote>`.
    fn client_args(&self, remote: &str) -> Vec<String> {
        self.client_args_to(&self.address.to_string(), remote)
    }

    /// The arguments of `ssh` for `root@<destination> <remote>`: the destination as a user types it (a name).
    fn client_args_to(&self, destination: &str, remote: &str) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "-F".into(),
            "/dev/null".into(),
            "-i".into(),
            self.client_key.to_string_lossy().into_owned(),
        ];
        for option in [
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "BatchMode=yes",
            "IdentitiesOnly=yes",
            "ConnectTimeout=5",
            "LogLevel=ERROR",
            // Keepalives every 5 s, but the session is not torn down for lack of answers before 10 minutes: the
            // test, not ssh, decides what counts as broken.
            "ServerAliveInterval=5",
            "ServerAliveCountMax=120",
        ] {
            args.push("-o".into());
            args.push(option.into());
        }
        args.push(format!("root@{destination}"));
        args.push(remote.into());
        args
    }

    /// Runs `remote` over `ssh root@<destination>` from `from`, the destination a name resolved on `from` (the
    /// lab's namespaces resolve only what their own hosts file says, so a name cannot lead outside the lab).
    pub fn run_to(&self, from: &Host, destination: &str, remote: &str, timeout: Duration) -> Result<Output> {
        let mut command = from.command("ssh");
        command.args(self.client_args_to(destination, remote));
        cmd::run(&mut command, timeout)
    }

    /// An `ssh root@<address> <remote>` command to run on `from`.
    pub fn client_command(&self, from: &Host, remote: &str) -> Command {
        let mut command = from.command("ssh");
        command.args(self.client_args(remote));
        command
    }

    /// The `ssh root@<address> <remote>` command line as one shell word list (each argument single-quoted), for a
    /// pipeline run with `sh -c` on a host (`ssh ... 'cat file' | sha256sum`: binary output never enters a String).
    pub fn shell_command(&self, remote: &str) -> String {
        std::iter::once("ssh".to_owned())
            .chain(self.client_args(remote))
            .map(|arg| format!("'{}'", arg.replace('\'', r"'\''")))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs `remote` over ssh from `from`; returns the output (whatever the exit code).
    pub fn run(&self, from: &Host, remote: &str, timeout: Duration) -> Result<Output> {
        cmd::run(&mut self.client_command(from, remote), timeout)
    }

    /// Runs `remote` over ssh from `from` with `stdin` as its input.
    pub fn run_with_stdin(
        &self,
        from: &Host,
        remote: &str,
        stdin: impl Into<Stdio>,
        timeout: Duration,
    ) -> Result<Output> {
        cmd::run_with_stdin(&mut self.client_command(from, remote), stdin, timeout)
    }

    /// Waits until an ssh command from `from` runs and prints what it should.
    pub fn wait_ready(&self, from: &Host, timeout: Duration) -> Result<()> {
        let what = format!(
            "sshd on {} ({}) to accept a session from {}",
            self.host.name, self.address, from.name
        );
        wait::until(&what, timeout, Duration::from_millis(300), || {
            let out = self.run(from, "echo ssh-ok", Duration::from_secs(15))?;
            if out.stdout.trim() == "ssh-ok" {
                Ok(Some(()))
            } else {
                anyhow::bail!("ssh exited {}: {}", out.status, out.stderr.trim())
            }
        })
    }

    /// A long-running ssh session from `from` running `remote`, its output going to the lab's log directory.
    pub fn spawn_session(&self, lab: &Lab, from: &Host, label: &str, remote: &str) -> Result<Process> {
        let args = self.client_args(remote);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.spawn(from, label, "ssh", &args, &[])
    }
}

/// Lines `tick N` a long-running SSH session (a remote loop echoing `tick $i`) has printed so far.
pub fn ticks(session: &Process) -> usize {
    session.log_text().lines().filter(|l| l.starts_with("tick ")).count()
}

/// Waits until `session` has printed at least `at_least` ticks; fails if it exits first.
pub fn wait_ticks(session: &mut Process, at_least: usize, timeout: Duration) -> Result<()> {
    wait::until(
        &format!("the ssh session to print {at_least} ticks"),
        timeout,
        Duration::from_millis(100),
        || {
            session.ensure_running()?;
            Ok((ticks(session) >= at_least).then_some(()))
        },
    )
}

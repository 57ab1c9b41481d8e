//! Long-running processes of a scenario (coordinators, agents, sshd, ssh sessions), each a guard that ends its
//! process on drop.
//!
//! A process is always killed through the PID of a `Child` that has not been reaped yet: until we wait for it the
//! kernel keeps that PID for it, so the signal can never reach an unrelated process. Never kill by name. stdout and
//! stderr go to one log file that the lab prints when a scenario fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::{cmd, wait};

/// How long a process gets to exit after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// A running (or finished, not yet dropped) process.
#[derive(Debug)]
pub struct Process {
    label: String,
    child: Child,
    exit: Option<ExitStatus>,
    log: PathBuf,
}

impl Process {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub fn spawn(label: &str, mut command: Command, log: &Path) -> Result<Self> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let what = cmd::describe(&command);
        command
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().context("cloning log handle")?)
            .stderr(file);
        let child = command.spawn().with_context(|| format!("starting {label}: `{what}`"))?;
        Ok(Self {
            label: label.to_owned(),
            child,
            exit: None,
            log: log.to_path_buf(),
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// What the process printed so far.
    pub fn log_text(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// `None` while running; the exit status once it has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Fails with the tail of the log if the process has exited. The error is a [`wait::Abort`]: a wait that
    /// depends on this process ends at once.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.exit_status() {
            return Err(wait::abort(anyhow!(
                "{} exited unexpectedly ({status}); its log ends with:\n{}",
                self.label,
                tail(&self.log_text(), 30)
            )));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} (pid {}) did not exit within {timeout:?}", self.label, self.pid());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGKILL (a crash, as far as the process is concerned) and reaps it.
    pub fn kill(&mut self) {
        if self.exit_status().is_none() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL. Always reaps the process.
    pub fn stop(&mut self, grace: Duration) {
        if self.exit_status().is_some() {
            return;
        }
        // Not reaped yet, so this PID is still our child.
        let _ = cmd::run(
            Command::new("kill").args(["-TERM", &self.pid().to_string()]),
            Duration::from_secs(2),
        );
        if self.wait_exit(grace).is_err() {
            self.kill();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(STOP_GRACE);
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

//! Running one short command with a deadline and collecting what it printed.
//!
//! Output goes to anonymous temporary files rather than pipes, so a chatty command can never block on a full pipe
//! while we poll for its exit. Long-running processes belong to [`crate::process`], not here.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How often a running command is checked for exit.
const POLL: Duration = Duration::from_millis(5);

/// What a finished command printed and how it exited.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// A short human-readable rendering of a command line, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `cmd` to completion, killing it when `timeout` passes. A non-zero exit is not an error here.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    run_with_stdin(cmd, Stdio::null(), timeout)
}

/// [`run`] with `stdin` (for example an opened file) as the command's standard input.
pub fn run_with_stdin(cmd: &mut Command, stdin: impl Into<Stdio>, timeout: Duration) -> Result<Output> {
    let what = describe(cmd);
    let mut stdout = tempfile::tempfile().context("creating a temporary file for stdout")?;
    let mut stderr = tempfile::tempfile().context("creating a temporary file for stderr")?;
    cmd.stdin(stdin)
        .stdout(stdout.try_clone().context("cloning a file handle")?)
        .stderr(stderr.try_clone().context("cloning a file handle")?);
    let mut child = cmd.spawn().with_context(|| format!("starting `{what}`"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().with_context(|| format!("waiting for `{what}`"))? {
            break status;
        }
        if Instant::now() >= deadline {
            // The child is not reaped yet, so its PID still names it.
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{what}` did not finish within {timeout:?}; output: {}",
                read_all(&mut stderr)
            );
        }
        thread::sleep(POLL);
    };
    Ok(Output {
        status,
        stdout: read_all(&mut stdout),
        stderr: read_all(&mut stderr),
    })
}

/// Runs `cmd` and fails unless it exits 0; returns its stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let what = describe(cmd);
    let out = run(cmd, timeout)?;
    if !out.success() {
        bail!(
            "`{what}` failed ({}): {}{}",
            out.status,
            out.stderr.trim(),
            out.stdout.trim()
        );
    }
    Ok(out.stdout)
}

fn read_all(file: &mut File) -> String {
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(0)).is_ok() {
        let _ = file.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

//! The CLI side of the control socket: one connection per command to the agent of a state directory.
//!
//! Turns "nobody listens" into [`CtlError::NotRunning`] (naming the state directory) and "not allowed" into
//! [`CtlError::PermissionDenied`]; every answer line has a deadline, so a wedged agent cannot hang a script.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{CtlError, Reply, Request, StatusReport, io_err};
use crate::netcheck::NetcheckReport;
use crate::state::StateDir;

/// How long a client waits for the agent's answer to `status` and `down`.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `meshd netcheck` waits: a call to the coordinator (15 s at most) and the STUN probes (3 s).
const NETCHECK_TIMEOUT: Duration = Duration::from_secs(25);
/// How long `meshd down` waits for the agent to finish shutting down.
const DOWN_WAIT: Duration = Duration::from_secs(20);

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
                report = Some(*status);
                Ok(())
            }
            other => Err(CtlError::Protocol(format!("{other:?}"))),
        })
        .await?;
        report.ok_or_else(|| CtlError::Protocol("no status in the answer".into()))
    }

    /// `meshd netcheck` through the agent.
    pub async fn netcheck(&self) -> Result<NetcheckReport, CtlError> {
        let mut report = None;
        self.call(&Request::Netcheck, NETCHECK_TIMEOUT, |reply| match reply {
            Reply::Netcheck(r) => {
                report = Some(r);
                Ok(())
            }
            other => Err(CtlError::Protocol(format!("{other:?}"))),
        })
        .await?;
        report.ok_or_else(|| CtlError::Protocol("no netcheck in the answer".into()))
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

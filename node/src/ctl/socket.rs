//! The state directory's lock and the control socket file.
//!
//! Owns: one agent per state directory (`meshd.lock`, held for the agent's life and released by the kernel when it
//! dies), replacing a stale socket left by a crashed agent, and the socket's mode: 0600 (root only) or 0660 with
//! `--control-group`, set before the socket becomes reachable under its final name.

use std::fs::{self, File, TryLockError};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use tokio::net::UnixListener;

use super::{CtlError, io_err};
use crate::state::StateDir;

/// Holds `<state-dir>/meshd.lock` for as long as it lives: one agent per state directory.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Takes the state directory's lock, waiting up to `wait` for an agent that is shutting down to release it.
pub async fn lock_state_dir_within(state: &StateDir, wait: Duration) -> Result<StateLock, CtlError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match lock_state_dir(state) {
            Err(CtlError::AlreadyRunning { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// Takes the state directory's lock, or says that another agent holds it.
pub fn lock_state_dir(state: &StateDir) -> Result<StateLock, CtlError> {
    let path = state.lock_path();
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| io_err(&path, source))?;
    match file.try_lock() {
        Ok(()) => Ok(StateLock { _file: file }),
        Err(TryLockError::WouldBlock) => Err(CtlError::AlreadyRunning {
            dir: state.root().display().to_string(),
        }),
        Err(TryLockError::Error(source)) => Err(io_err(&path, source)),
    }
}

/// Binds the control socket. Needs the state lock: whatever socket file exists is then stale and removed. The socket
/// is created under a temporary name, given its final mode (and group), then renamed into place, so it is never
/// usable by others even briefly.
pub fn bind(state: &StateDir, control_group: Option<&str>, _lock: &StateLock) -> Result<UnixListener, CtlError> {
    let path = state.socket_path();
    match fs::remove_file(&path) {
        Ok(()) => tracing::debug!(path = %path.display(), "removed a stale control socket"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(io_err(&path, source)),
    }
    let gid = control_group.map(group_id).transpose()?;
    let tmp = state.root().join(format!(".meshd.sock.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|source| io_err(&tmp, source))?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    let result = (|| {
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(&tmp, None, Some(gid))?;
            // Group members must be able to reach the socket inside the (otherwise private) state directory.
            std::os::unix::fs::chown(state.root(), None, Some(gid))?;
            fs::set_permissions(state.root(), fs::Permissions::from_mode(0o710))?;
        }
        fs::rename(&tmp, &path)
    })();
    if let Err(source) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&path, source));
    }
    Ok(listener)
}

/// Removes the socket file at shutdown.
pub fn remove_socket(state: &StateDir) {
    let _ = fs::remove_file(state.socket_path());
}

fn group_id(name: &str) -> Result<u32, CtlError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let groups = fs::read_to_string("/etc/group").map_err(|source| io_err(Path::new("/etc/group"), source))?;
    groups
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let group = fields.next()?;
            let gid = fields.nth(1)?.parse::<u32>().ok()?;
            (group == name).then_some(gid)
        })
        .next()
        .ok_or_else(|| CtlError::UnknownGroup(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_agent_per_state_dir() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(tmp.path());
        let lock = lock_state_dir(&state).expect("first");
        assert!(matches!(lock_state_dir(&state), Err(CtlError::AlreadyRunning { .. })));
        drop(lock);
        lock_state_dir(&state).expect("free again");
    }

    #[tokio::test]
    async fn socket_is_private_and_stale_sockets_are_replaced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(tmp.path());
        let client = super::super::CtlClient::new(&state);
        assert!(matches!(client.status().await, Err(CtlError::NotRunning { .. })));
        // A stale socket file (a crashed agent): nobody listens on it.
        drop(std::os::unix::net::UnixListener::bind(state.socket_path()).expect("bind"));
        assert!(matches!(client.status().await, Err(CtlError::NotRunning { .. })));
        let lock = lock_state_dir(&state).expect("lock");
        let _listener = bind(&state, None, &lock).expect("bind replaces the stale socket");
        let mode = fs::metadata(state.socket_path()).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(client.is_running());
    }

    #[test]
    fn finds_groups() {
        assert_eq!(group_id("0").expect("numeric"), 0);
        assert_eq!(group_id("root").expect("root exists"), 0);
        assert!(matches!(
            group_id("no-such-group-meshd"),
            Err(CtlError::UnknownGroup(_))
        ));
    }
}

//! The state directory: everything this node keeps on disk, and the one place that names those files.
//!
//! Layout of `<state-dir>` (default `/var/lib/meshd`, created with mode 0700 when missing):
//! - `identity.json`: node id, name, overlay IP, network, coordinator URL, pinned certificate fingerprint, tags,
//!   public key (mode 0600: nothing secret, but nobody else's business either);
//! - `credential`: the bearer credential the coordinator issued at join (mode 0600);
//! - `private.key`: the WireGuard private key, base64 (mode 0600, see [`crate::keys`]);
//! - `map.json`: the last applied network map (see [`crate::cache`]);
//! - `meshd.sock`: the control socket of the running agent (see [`crate::ctl`]);
//! - `meshd.lock`: locked by the running agent (and by `join`), so that two agents never share a state directory.
//!
//! Every file is written to a temporary name with its final mode and then renamed, so a crash never leaves a
//! half-written file and a secret is never readable by others, not even briefly.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use meshd_protocol::api::JoinResponse;
use meshd_protocol::{CertFingerprint, NodeId, PublicKey};
use serde::{Deserialize, Serialize};

/// Why the state directory could not be used; messages say what to do next.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create the state directory {path}: {source} (run as root, or pick another with --state-dir)")]
    CreateDir { path: String, source: io::Error },
    #[error(
        "this node has not joined a network yet (no {path}); run `sudo meshd join <token>` with a token from your admin"
    )]
    NotJoined { path: String },
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: io::Error },
    #[error("{path} is damaged ({reason}); run `meshd leave --force` and join again")]
    Damaged { path: String, reason: String },
}

/// Who this node is in its network, as the coordinator told it at join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub node_id: NodeId,
    pub name: String,
    pub ip: Ipv4Addr,
    pub network: Ipv4Net,
    pub coordinator_url: String,
    /// SHA-256 (hex) of the coordinator's certificate; absent for a plain-HTTP coordinator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    pub tags: Vec<String>,
    pub public_key: PublicKey,
}

impl Identity {
    pub fn from_join(
        response: &JoinResponse,
        coordinator_url: &str,
        fingerprint: Option<CertFingerprint>,
        public_key: PublicKey,
    ) -> Self {
        Self {
            node_id: response.node_id,
            name: response.name.clone(),
            ip: response.ip,
            network: response.network,
            coordinator_url: coordinator_url.to_string(),
            fingerprint: fingerprint.map(|f| f.to_hex()),
            tags: response.tags.clone(),
            public_key,
        }
    }

    /// The pinned certificate, if any.
    pub fn pinned(&self) -> Result<Option<CertFingerprint>, StateError> {
        self.fingerprint
            .as_deref()
            .map(CertFingerprint::from_hex)
            .transpose()
            .map_err(|e| StateError::Damaged {
                path: "identity.json".into(),
                reason: e.to_string(),
            })
    }
}

/// The paths of one agent's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn identity_path(&self) -> PathBuf {
        self.root.join("identity.json")
    }
    pub fn credential_path(&self) -> PathBuf {
        self.root.join("credential")
    }
    pub fn key_path(&self) -> PathBuf {
        self.root.join("private.key")
    }
    pub fn cache_path(&self) -> PathBuf {
        self.root.join("map.json")
    }
    pub fn socket_path(&self) -> PathBuf {
        self.root.join("meshd.sock")
    }
    pub fn lock_path(&self) -> PathBuf {
        self.root.join("meshd.lock")
    }

    /// Creates the directory (mode 0700) if it does not exist yet.
    pub fn ensure(&self) -> Result<(), StateError> {
        if self.root.is_dir() {
            return Ok(());
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(|source| StateError::CreateDir {
                path: self.root.display().to_string(),
                source,
            })
    }

    pub fn has_identity(&self) -> bool {
        self.identity_path().exists()
    }

    pub fn save_identity(&self, identity: &Identity, credential: &str) -> Result<(), StateError> {
        let path = self.credential_path();
        write_file_atomic(&path, credential.as_bytes(), 0o600).map_err(|source| write_err(&path, source))?;
        let path = self.identity_path();
        let json = serde_json::to_vec_pretty(identity).expect("an identity always serializes");
        write_file_atomic(&path, &json, 0o600).map_err(|source| write_err(&path, source))
    }

    /// Loads the identity and credential saved by `meshd join`.
    pub fn load_identity(&self) -> Result<(Identity, String), StateError> {
        let path = self.identity_path();
        let bytes = fs::read(&path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => StateError::NotJoined {
                path: path.display().to_string(),
            },
            _ => StateError::Read {
                path: path.display().to_string(),
                source,
            },
        })?;
        let identity: Identity = serde_json::from_slice(&bytes).map_err(|e| StateError::Damaged {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let path = self.credential_path();
        let credential = fs::read_to_string(&path).map_err(|source| StateError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let credential = credential.trim().to_string();
        if credential.is_empty() {
            return Err(StateError::Damaged {
                path: path.display().to_string(),
                reason: "empty".into(),
            });
        }
        Ok((identity, credential))
    }

    /// Deletes identity, credential and cached map but keeps the key: what a node removed by an admin forgets.
    pub fn forget_membership(&self) -> Result<(), StateError> {
        remove_all(&[self.identity_path(), self.credential_path(), self.cache_path()])
    }

    /// Deletes identity, credential, key and cached map (what `meshd leave` forgets). Missing files are fine.
    pub fn forget(&self) -> Result<(), StateError> {
        remove_all(&[
            self.identity_path(),
            self.credential_path(),
            self.key_path(),
            self.cache_path(),
        ])
    }
}

fn remove_all(paths: &[PathBuf]) -> Result<(), StateError> {
    for path in paths {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(write_err(path, source)),
        }
    }
    Ok(())
}

fn write_err(path: &Path, source: io::Error) -> StateError {
    StateError::Write {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `data` to `path` atomically: a temporary file created with `mode` (so it is never more readable than
/// that), synced, then renamed over `path`.
pub fn write_file_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::other("path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp{}", file_name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // A leftover temporary file from a crashed run may have had another mode: enforce ours.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(data)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            node_id: 3,
            name: "gpu".into(),
            ip: Ipv4Addr::new(10, 77, 0, 3),
            network: "10.77.0.0/16".parse().expect("cidr"),
            coordinator_url: "https://198.18.0.1:8443".into(),
            fingerprint: Some(CertFingerprint([7; 32]).to_hex()),
            tags: vec!["gpu".into()],
            public_key: PublicKey::from_bytes([1; 32]),
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn identity_round_trips_with_private_modes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(tmp.path().join("state"));
        state.ensure().expect("ensure");
        assert_eq!(mode(state.root()), 0o700);
        assert!(matches!(state.load_identity(), Err(StateError::NotJoined { .. })));
        state.save_identity(&identity(), "cred-secret").expect("save");
        assert_eq!(mode(&state.credential_path()), 0o600);
        assert_eq!(mode(&state.identity_path()), 0o600);
        let (loaded, credential) = state.load_identity().expect("load");
        assert_eq!(loaded, identity());
        assert_eq!(credential, "cred-secret");
        assert_eq!(loaded.pinned().expect("hex"), Some(CertFingerprint([7; 32])));
        state.forget().expect("forget");
        assert!(!state.has_identity());
        state.forget().expect("forgetting twice is fine");
    }

    #[test]
    fn atomic_write_replaces_and_tightens_mode() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("f");
        fs::write(&path, "old").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        write_file_atomic(&path, b"new", 0o600).expect("write");
        assert_eq!(fs::read_to_string(&path).expect("read"), "new");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(
            fs::read_dir(tmp.path()).expect("ls").count(),
            1,
            "no temporary file left"
        );
    }
}

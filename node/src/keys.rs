//! This node's WireGuard key pair.
//!
//! Owns generating the X25519 key (x25519-dalek, on this machine) and keeping the private key in the state directory
//! with mode 0600 from the moment the file exists. The private key is never sent anywhere and never logged: this
//! module hands it only to the data plane (and uses it itself for the join proof, a Diffie-Hellman with the
//! coordinator's join key), and [`NodeKey`]'s `Debug` prints the public half.

use std::fmt;
use std::io;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use meshd_protocol::PublicKey;
use x25519_dalek::StaticSecret;

use crate::state::write_file_atomic;

/// Why the key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read the private key {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("cannot write the private key {path}: {source}")]
    Write { path: String, source: io::Error },
    #[error(
        "the private key file {path} is damaged (expected 32 bytes of base64); run `meshd leave --force` and join again"
    )]
    Damaged { path: String },
}

/// The node's key pair.
#[derive(Clone)]
pub struct NodeKey {
    secret: StaticSecret,
}

impl NodeKey {
    /// A fresh random key pair.
    pub fn generate() -> Self {
        Self {
            secret: StaticSecret::random(),
        }
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey::from_bytes(x25519_dalek::PublicKey::from(&self.secret).to_bytes())
    }

    /// The join proof for enrolling this key with `token_id` and `hostname` at the coordinator whose join key is
    /// `join_key` (see [`meshd_protocol::proof`]): proves possession of the private key without sending it.
    pub fn join_proof(&self, join_key: &PublicKey, token_id: &str, hostname: &str) -> [u8; 32] {
        let shared = self
            .secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(*join_key.as_bytes()));
        meshd_protocol::api::join_proof(shared.as_bytes(), token_id, &self.public_key(), hostname)
    }

    /// The private key, for the data plane only.
    pub fn secret(&self) -> StaticSecret {
        self.secret.clone()
    }

    /// Reads the key file (standard base64, like `wg genkey`).
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let bytes = STANDARD.decode(text.trim()).map_err(|_| KeyFileError::Damaged {
            path: path.display().to_string(),
        })?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| KeyFileError::Damaged {
            path: path.display().to_string(),
        })?;
        Ok(Self {
            secret: StaticSecret::from(bytes),
        })
    }

    /// Writes the key file, created with mode 0600 (never readable by others, not even briefly).
    pub fn save(&self, path: &Path) -> Result<(), KeyFileError> {
        let mut text = STANDARD.encode(self.secret.to_bytes());
        text.push('\n');
        write_file_atomic(path, text.as_bytes(), 0o600).map_err(|source| KeyFileError::Write {
            path: path.display().to_string(),
            source,
        })
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({:?})", self.public_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn saves_with_mode_0600_and_loads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("private.key");
        let key = NodeKey::generate();
        key.save(&path).expect("save");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = NodeKey::load(&path).expect("load");
        assert_eq!(loaded.public_key(), key.public_key());
        assert_ne!(NodeKey::generate().public_key(), key.public_key(), "keys are random");
    }

    #[test]
    fn debug_never_prints_the_private_key() {
        let key = NodeKey::generate();
        let private = STANDARD.encode(key.secret().to_bytes());
        let debug = format!("{key:?}");
        assert!(!debug.contains(&private[..8]));
        assert!(debug.contains("pk:"));
    }

    #[test]
    fn join_proof_is_what_the_coordinator_computes() {
        // The coordinator's side of the DH: its private join key with this node's public key.
        let coordinator = StaticSecret::random();
        let join_key = PublicKey::from_bytes(x25519_dalek::PublicKey::from(&coordinator).to_bytes());
        let key = NodeKey::generate();
        let proof = key.join_proof(&join_key, "tk1", "laptop");
        let shared = coordinator.diffie_hellman(&x25519_dalek::PublicKey::from(*key.public_key().as_bytes()));
        assert!(meshd_protocol::api::verify_join_proof(
            shared.as_bytes(),
            "tk1",
            &key.public_key(),
            "laptop",
            &proof
        ));
        assert_ne!(NodeKey::generate().join_proof(&join_key, "tk1", "laptop"), proof);
    }

    #[test]
    fn damaged_file_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("private.key");
        std::fs::write(&path, "not a key").expect("write");
        assert!(matches!(NodeKey::load(&path), Err(KeyFileError::Damaged { .. })));
    }
}

//! The last applied network map on disk, so that `meshd up` brings the mesh back while the coordinator is down.
//!
//! Owns reading and writing `<state-dir>/map.json` (temporary file + rename: a crash leaves the old map or the new
//! one, never half of one). A damaged cache is not fatal: the agent logs it and waits for a full map instead.
//! Beside it, `preshared-keys.json` (0600): the preshared keys of the pairs that use one, so that a device pair keeps
//! working from the cache too.

use std::io;
use std::path::{Path, PathBuf};

use std::collections::HashMap;

use meshd_protocol::api::{PeerPresharedKey, PresharedKeys};
use meshd_protocol::{NetworkMap, PresharedKey, PublicKey};

use crate::state::write_file_atomic;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read the cached map {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("the cached map {path} is damaged ({reason}); it will be replaced by the coordinator's next full map")]
    Damaged { path: String, reason: String },
    #[error("cannot write the cached map {path}: {source}")]
    Write { path: String, source: io::Error },
}

/// The on-disk cache of one agent.
#[derive(Debug, Clone)]
pub struct MapCache {
    path: PathBuf,
}

impl MapCache {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cached map, or `None` if there is none yet.
    pub fn load(&self) -> Result<Option<NetworkMap>, CacheError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CacheError::Read {
                    path: self.display(),
                    source,
                });
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| CacheError::Damaged {
                path: self.display(),
                reason: e.to_string(),
            })
    }

    pub fn store(&self, map: &NetworkMap) -> Result<(), CacheError> {
        let json = serde_json::to_vec(map).expect("a network map always serializes");
        write_file_atomic(&self.path, &json, 0o600).map_err(|source| CacheError::Write {
            path: self.display(),
            source,
        })
    }

    /// Deletes the cache and the preshared keys (the node was removed, or leaves). Missing files are fine.
    pub fn remove(&self) -> Result<(), CacheError> {
        for path in [self.path.clone(), self.preshared_keys_path()] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(CacheError::Write {
                        path: path.display().to_string(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    fn preshared_keys_path(&self) -> PathBuf {
        self.path.with_file_name("preshared-keys.json")
    }

    /// The cached preshared keys (empty when there are none or the file is damaged: they are fetched again).
    pub fn load_preshared_keys(&self) -> HashMap<PublicKey, PresharedKey> {
        let path = self.preshared_keys_path();
        let Ok(bytes) = std::fs::read(&path) else {
            return HashMap::new();
        };
        match serde_json::from_slice::<PresharedKeys>(&bytes) {
            Ok(keys) => keys.keys.into_iter().map(|k| (k.peer, k.preshared_key)).collect(),
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring damaged cached preshared keys: {e}");
                HashMap::new()
            }
        }
    }

    pub fn store_preshared_keys(&self, keys: &HashMap<PublicKey, PresharedKey>) -> Result<(), CacheError> {
        let body = PresharedKeys {
            keys: keys
                .iter()
                .map(|(peer, preshared_key)| PeerPresharedKey {
                    peer: *peer,
                    preshared_key: *preshared_key,
                })
                .collect(),
        };
        let json = serde_json::to_vec(&body).expect("preshared keys always serialize");
        let path = self.preshared_keys_path();
        write_file_atomic(&path, &json, 0o600).map_err(|source| CacheError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    fn display(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_protocol::{MapNode, PublicKey};
    use std::net::Ipv4Addr;

    pub(crate) fn sample_map() -> NetworkMap {
        let node = |id: i64| MapNode {
            id,
            name: format!("n{id}"),
            ip: Ipv4Addr::new(10, 77, 0, id as u8),
            public_key: PublicKey::from_bytes([id as u8; 32]),
            endpoints: vec![],
            online: true,
            last_seen: None,
            tags: vec![],
            kind: meshd_protocol::NodeKind::Agent,
            preshared_key: false,
        };
        NetworkMap {
            version: 4,
            network: "10.77.0.0/16".parse().expect("cidr"),
            self_node: node(1),
            peers: vec![node(2)],
            dns: None,
        }
    }

    #[test]
    fn stores_loads_and_removes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = MapCache::new(tmp.path().join("map.json"));
        assert_eq!(cache.load().expect("empty"), None);
        cache.store(&sample_map()).expect("store");
        assert_eq!(cache.load().expect("load"), Some(sample_map()));
        cache.remove().expect("remove");
        cache.remove().expect("twice");
        assert_eq!(cache.load().expect("gone"), None);
    }

    #[test]
    fn damaged_cache_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = MapCache::new(tmp.path().join("map.json"));
        std::fs::write(cache.path(), "{ nope").expect("write");
        assert!(matches!(cache.load(), Err(CacheError::Damaged { .. })));
    }
}

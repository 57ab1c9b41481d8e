//! Secrets the coordinator hands out (join tokens, node credentials, admin API keys): generation, the string formats,
//! hashing and constant-time comparison. No IO.
//!
//! Every secret is 32 random bytes from the OS generator (`rand::rngs::OsRng`) and only its SHA-256 is stored (hex).
//! A presented secret names its row by a public id (token id, node id, key id), so a lookup is one indexed read and the
//! secret itself is compared with `subtle` in constant time: no timing oracle on the secret. Formats:
//! - admin API key: `mshk_<id>_<secret>` (id: 12 alphanumerics; secret: base64url, no padding)
//! - node credential: `mshn_<node id>_<secret>`
//! - join token: [`meshd_protocol::JoinToken`] (id + secret + URL + certificate fingerprint).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng;
use rand::distributions::Alphanumeric;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use meshd_protocol::NodeId;

const API_KEY_PREFIX: &str = "mshk_";
const NODE_CREDENTIAL_PREFIX: &str = "mshn_";
/// Length of public ids (API keys, tokens): 12 alphanumerics = 71 bits, only needs to be unique, it is not secret.
const ID_LEN: usize = 12;

/// 32 random bytes.
pub fn random_secret() -> [u8; 32] {
    let mut secret = [0u8; 32];
    OsRng.fill(&mut secret);
    secret
}

/// A random public identifier (alphanumeric).
pub fn random_id() -> String {
    OsRng.sample_iter(&Alphanumeric).take(ID_LEN).map(char::from).collect()
}

/// Hex SHA-256 of `bytes`: the stored form of a secret.
pub fn hash_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Constant-time comparison of a presented secret's hash with the stored hex hash.
pub fn hash_matches(presented_hash: &[u8; 32], stored_hex: &str) -> bool {
    match hex::decode(stored_hex) {
        Ok(stored) => stored.len() == 32 && bool::from(stored.as_slice().ct_eq(presented_hash.as_slice())),
        Err(_) => false,
    }
}

/// A freshly generated bearer secret: the string shown once and the hash that is stored.
#[derive(Debug)]
pub struct Issued {
    pub id: String,
    pub text: String,
    pub hash_hex: String,
}

/// A new admin API key.
pub fn new_api_key() -> Issued {
    let id = random_id();
    let secret = random_secret();
    let text = format!("{API_KEY_PREFIX}{id}_{}", URL_SAFE_NO_PAD.encode(secret));
    Issued {
        id,
        text,
        hash_hex: hash_hex(&secret),
    }
}

/// The secret half of a node credential. The stored hash covers only the secret, so it can be computed before the
/// node row (and so its id) exists; [`NodeSecret::credential`] makes the string once the id is known.
#[derive(Debug)]
pub struct NodeSecret {
    secret: [u8; 32],
    pub hash_hex: String,
}

impl NodeSecret {
    pub fn generate() -> Self {
        let secret = random_secret();
        Self {
            secret,
            hash_hex: hash_hex(&secret),
        }
    }

    /// The bearer credential handed to the node once.
    pub fn credential(&self, node_id: NodeId) -> String {
        format!(
            "{NODE_CREDENTIAL_PREFIX}{node_id}_{}",
            URL_SAFE_NO_PAD.encode(self.secret)
        )
    }
}

/// A presented bearer secret split into its id and the hash of its secret part.
#[derive(Debug)]
pub struct Presented<I> {
    pub id: I,
    pub hash: [u8; 32],
}

fn split(text: &str, prefix: &str) -> Option<(String, [u8; 32])> {
    let rest = text.trim().strip_prefix(prefix)?;
    // The id has no `_`; the base64url secret may contain `_`, so split at the first one only.
    let (id, secret) = rest.split_once('_')?;
    let secret = URL_SAFE_NO_PAD.decode(secret).ok()?;
    if id.is_empty() || secret.len() != 32 {
        return None;
    }
    Some((id.to_string(), Sha256::digest(&secret).into()))
}

pub fn parse_api_key(text: &str) -> Option<Presented<String>> {
    let (id, hash) = split(text, API_KEY_PREFIX)?;
    id.bytes()
        .all(|b| b.is_ascii_alphanumeric())
        .then_some(Presented { id, hash })
}

pub fn parse_node_credential(text: &str) -> Option<Presented<NodeId>> {
    let (id, hash) = split(text, NODE_CREDENTIAL_PREFIX)?;
    Some(Presented {
        id: id.parse().ok()?,
        hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_round_trip() {
        let key = new_api_key();
        let presented = parse_api_key(&key.text).expect("parses");
        assert_eq!(presented.id, key.id);
        assert!(hash_matches(&presented.hash, &key.hash_hex));
        let other = new_api_key();
        assert!(!hash_matches(&presented.hash, &other.hash_hex));
        assert!(parse_api_key("mshk_abc").is_none());
        assert!(parse_api_key(&key.text.replace("mshk_", "mshn_")).is_none());
    }

    #[test]
    fn node_credentials_round_trip() {
        let cred = NodeSecret::generate();
        let presented = parse_node_credential(&cred.credential(42)).expect("parses");
        assert_eq!(presented.id, 42);
        assert!(hash_matches(&presented.hash, &cred.hash_hex));
        assert!(parse_node_credential("mshn_x_AAAA").is_none());
        assert!(!hash_matches(&presented.hash, "not hex"));
    }
}

//! The coordinator's static X25519 join key and the check of join proofs made against it (the scheme is described
//! in [`meshd_protocol::proof`]). No IO: the key is generated here, stored by `serve` in the settings table (so every
//! replica on one PostgreSQL database shares it) and handed back to [`JoinKey::from_stored`].
//!
//! The private half never prints (`Debug` shows the public key) and never leaves the database and this process.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use meshd_protocol::PublicKey;
use meshd_protocol::api::verify_join_proof;
use x25519_dalek::StaticSecret;

use crate::secrets;

/// The stored form of the join key could not be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "the stored join key (settings row `join_key`) is damaged; delete that row and restart (nodes that joined keep \
     working, only new joins use the new key)"
)]
pub struct DamagedJoinKey;

/// The coordinator's join key pair.
#[derive(Clone)]
pub struct JoinKey {
    secret: StaticSecret,
    public: PublicKey,
}

impl JoinKey {
    /// A fresh random key, in its stored form (standard base64 of the 32 private bytes).
    pub fn generate_stored() -> String {
        STANDARD.encode(secrets::random_secret())
    }

    /// The key from its stored form.
    pub fn from_stored(text: &str) -> Result<Self, DamagedJoinKey> {
        let bytes: [u8; 32] = STANDARD
            .decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(DamagedJoinKey)?;
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from_bytes(x25519_dalek::PublicKey::from(&secret).to_bytes());
        Ok(Self { secret, public })
    }

    /// The public half, published by `GET /api/v1/info`.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// Does `proof` (standard base64, as sent in the join request) prove possession of the private key of
    /// `public_key` for this token id and hostname? Constant time in the proof; false for a low-order public key
    /// (whose shared secret anyone can compute) and for anything that is not base64 of 32 bytes.
    pub fn verify(&self, token_id: &str, public_key: &PublicKey, hostname: &str, proof: &str) -> bool {
        let Ok(proof) = STANDARD.decode(proof.trim()) else {
            return false;
        };
        let shared = self
            .secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(*public_key.as_bytes()));
        if !shared.was_contributory() {
            return false;
        }
        verify_join_proof(shared.as_bytes(), token_id, public_key, hostname, &proof)
    }
}

impl fmt::Debug for JoinKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinKey({:?})", self.public)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_protocol::api::join_proof;

    fn node() -> (StaticSecret, PublicKey) {
        let secret = StaticSecret::random();
        let public = PublicKey::from_bytes(x25519_dalek::PublicKey::from(&secret).to_bytes());
        (secret, public)
    }

    fn prove(node: &StaticSecret, coordinator: PublicKey, token_id: &str, key: &PublicKey, hostname: &str) -> String {
        let shared = node.diffie_hellman(&x25519_dalek::PublicKey::from(*coordinator.as_bytes()));
        STANDARD.encode(join_proof(shared.as_bytes(), token_id, key, hostname))
    }

    #[test]
    fn accepts_the_holder_of_the_private_key_only() {
        let stored = JoinKey::generate_stored();
        let join_key = JoinKey::from_stored(&stored).expect("stored form parses");
        assert_eq!(
            JoinKey::from_stored(&stored).expect("again").public_key(),
            join_key.public_key(),
            "the stored form is the whole key"
        );
        let (secret, public) = node();
        let proof = prove(&secret, join_key.public_key(), "tk1", &public, "laptop");
        assert!(join_key.verify("tk1", &public, "laptop", &proof));
        assert!(!join_key.verify("tk2", &public, "laptop", &proof));
        assert!(!join_key.verify("tk1", &public, "other", &proof));
        assert!(!join_key.verify("tk1", &public, "laptop", ""));
        assert!(!join_key.verify("tk1", &public, "laptop", "not base64!"));
        // Someone else's key, proved with the attacker's own private key: refused.
        let (_, victim) = node();
        let forged = prove(&secret, join_key.public_key(), "tk1", &victim, "laptop");
        assert!(!join_key.verify("tk1", &victim, "laptop", &forged));
        // A proof made against another coordinator's join key: refused.
        let other = JoinKey::from_stored(&JoinKey::generate_stored()).expect("key");
        let elsewhere = prove(&secret, other.public_key(), "tk1", &public, "laptop");
        assert!(!join_key.verify("tk1", &public, "laptop", &elsewhere));
    }

    #[test]
    fn low_order_keys_cannot_prove() {
        // The point of order 1 (u = 1): the shared secret is all zeros whatever the private key, so anyone could
        // compute a "proof" for it.
        let mut low = [0u8; 32];
        low[0] = 1;
        let low = PublicKey::from_bytes(low);
        let join_key = JoinKey::from_stored(&JoinKey::generate_stored()).expect("key");
        let proof = STANDARD.encode(join_proof(&[0u8; 32], "tk1", &low, "h"));
        assert!(!join_key.verify("tk1", &low, "h", &proof));
    }

    #[test]
    fn damaged_and_debug() {
        assert!(JoinKey::from_stored("AAAA").is_err());
        assert!(JoinKey::from_stored("not base64").is_err());
        let stored = JoinKey::generate_stored();
        let key = JoinKey::from_stored(&stored).expect("key");
        assert!(
            !format!("{key:?}").contains(&stored[..12]),
            "Debug never prints the private key"
        );
    }
}

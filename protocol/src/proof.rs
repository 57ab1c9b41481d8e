//! The join proof: how a joining node proves it holds the private key of the public key it enrols.
//!
//! Why it is needed: public keys are public (every node's map carries them) and a team shares a reusable token, so
//! without a proof any token holder could "re-join" another node's key and take over its record (a new credential,
//! the old one revoked, bogus endpoints, deletion).
//!
//! Why not a signature: WireGuard keys are X25519 keys, which cannot sign. Instead the coordinator has a static X25519
//! *join key* (published by `GET /api/v1/info`, [`crate::api::CoordinatorInfo`]). The node computes the shared secret
//! `X25519(node private key, coordinator join key)`; the coordinator computes the same value as
//! `X25519(coordinator private key, node public key)`. Only a holder of the node's private key (or of the
//! coordinator's) can compute it, so an HMAC keyed with it proves possession of the node's private key without that
//! key ever leaving the node and without any cryptography of our own (x25519-dalek does the DH, `hmac` + `sha2` the MAC).
//!
//! The proof is `HMAC-SHA256(shared secret, "meshd join proof v1\0" || token id || "\0" || node public key (32 bytes)
//! || hostname)`, sent as standard base64 in [`crate::api::JoinRequest::proof`]:
//! - the domain-separation prefix keeps the MAC from meaning anything in another context (and names the version);
//! - the token id and hostname are bound, so a proof cannot be reused for another request shape (another token, or
//!   another hostname); the token id is alphanumeric, so the `\0` separator is unambiguous, and the key has a fixed
//!   length, so the hostname can come last without one;
//! - the proof is deterministic, so it does not stop a *replay* of the same request by whoever saw it: TLS (with the
//!   certificate pinned by the token's fingerprint) keeps third parties from seeing it, as it does for the token
//!   secret and the credential in the response.
//!
//! The coordinator checks the proof in constant time (`hmac`'s `verify_slice`) before it touches the database, and
//! refuses a shared secret that is not contributory (a low-order public key, for which anyone could compute it).
//! Pure: no IO, no randomness.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::key::PublicKey;

/// Prefix of the MAC'd message: domain separation and version of the scheme.
pub const JOIN_PROOF_DOMAIN: &[u8] = b"meshd join proof v1\0";
/// Length of a proof in bytes (HMAC-SHA256).
pub const JOIN_PROOF_LEN: usize = 32;

/// The keyed MAC over the message of one join request, ready to finalize or verify.
fn join_mac(shared_secret: &[u8; 32], token_id: &str, public_key: &PublicKey, hostname: &str) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(shared_secret).expect("HMAC accepts keys of any length");
    mac.update(JOIN_PROOF_DOMAIN);
    mac.update(token_id.as_bytes());
    mac.update(b"\0");
    mac.update(public_key.as_bytes());
    mac.update(hostname.as_bytes());
    mac
}

/// The proof a node sends with its join request (see the module doc); `shared_secret` is
/// `X25519(node private key, coordinator join key)`.
pub fn join_proof(shared_secret: &[u8; 32], token_id: &str, public_key: &PublicKey, hostname: &str) -> [u8; 32] {
    join_mac(shared_secret, token_id, public_key, hostname)
        .finalize()
        .into_bytes()
        .into()
}

/// True when `proof` is the proof of this request shape under `shared_secret`; compares in constant time. A proof of
/// the wrong length is simply false.
pub fn verify_join_proof(
    shared_secret: &[u8; 32],
    token_id: &str,
    public_key: &PublicKey,
    hostname: &str,
    proof: &[u8],
) -> bool {
    join_mac(shared_secret, token_id, public_key, hostname)
        .verify_slice(proof)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARED: [u8; 32] = [0x11; 32];

    fn key() -> PublicKey {
        PublicKey::from_bytes([0x22; 32])
    }

    #[test]
    fn known_answer_pins_the_wire_format() {
        // Computed independently: python3 -c "import hmac,hashlib; print(hmac.new(b'\x11'*32,
        //   b'meshd join proof v1\0tk1\0' + b'\x22'*32 + b'laptop', hashlib.sha256).hexdigest())"
        let proof = join_proof(&SHARED, "tk1", &key(), "laptop");
        assert_eq!(
            hex::encode(proof),
            "c4e4266536d2fc5f9e5f900a3ff3acdb86949af355fa5ac2c46ba63631452541"
        );
    }

    #[test]
    fn verifies_only_the_same_request_shape() {
        let proof = join_proof(&SHARED, "tk1", &key(), "laptop");
        assert!(verify_join_proof(&SHARED, "tk1", &key(), "laptop", &proof));
        assert!(
            !verify_join_proof(&SHARED, "tk2", &key(), "laptop", &proof),
            "another token id"
        );
        assert!(
            !verify_join_proof(&SHARED, "tk1", &key(), "laptop2", &proof),
            "another hostname"
        );
        let other_key = PublicKey::from_bytes([0x23; 32]);
        assert!(
            !verify_join_proof(&SHARED, "tk1", &other_key, "laptop", &proof),
            "another key"
        );
        assert!(
            !verify_join_proof(&[0x12; 32], "tk1", &key(), "laptop", &proof),
            "another secret"
        );
        assert!(
            !verify_join_proof(&SHARED, "tk1", &key(), "laptop", &proof[..31]),
            "truncated"
        );
        assert!(!verify_join_proof(&SHARED, "tk1", &key(), "laptop", &[]), "missing");
        // The separator after the token id: moving a character between token id and hostname changes the proof.
        assert_ne!(
            join_proof(&SHARED, "tk1a", &key(), "b"),
            join_proof(&SHARED, "tk1", &key(), "ab")
        );
    }
}

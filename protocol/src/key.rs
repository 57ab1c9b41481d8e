//! Typed WireGuard (X25519) public keys. Private keys never appear in this crate: they never cross the wire.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a public key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not valid base64: {0}")]
    Base64(String),
    #[error("key must be 32 bytes, got {0}")]
    Length(usize),
    #[error("the all-zero key is not a valid public key")]
    Zero,
}

/// A WireGuard public key: 32 bytes, written as standard base64 (44 characters) like `wg(8)` does.
///
/// `Debug` prints a short prefix (`pk:AbCdEf12…`) so logs stay readable; `Display` prints the full key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(value_type = String, example = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="))]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = STANDARD.decode(s.trim()).map_err(|e| KeyError::Base64(e.to_string()))?;
        let bytes: [u8; 32] = bytes.as_slice().try_into().map_err(|_| KeyError::Length(bytes.len()))?;
        if bytes == [0u8; 32] {
            return Err(KeyError::Zero);
        }
        Ok(Self(bytes))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pk:{}…", &self.to_base64()[..8])
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A WireGuard preshared key: 32 secret bytes mixed into the handshake of one pair of peers (base64 like `wg(8)`).
///
/// It adds a symmetric secret on top of the Diffie-Hellman (hardening against a future quantum computer that
/// breaks X25519); it does not replace it, so whoever knows a preshared key still cannot decrypt the pair's traffic.
/// `Debug` never prints it.
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(value_type = String))]
pub struct PresharedKey([u8; 32]);

impl PresharedKey {
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl FromStr for PresharedKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = STANDARD.decode(s.trim()).map_err(|e| KeyError::Base64(e.to_string()))?;
        let bytes: [u8; 32] = bytes.as_slice().try_into().map_err(|_| KeyError::Length(bytes.len()))?;
        Ok(Self(bytes))
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("psk:<redacted>")
    }
}

impl Serialize for PresharedKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for PresharedKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_keys() {
        let key = PublicKey::from_bytes([7u8; 32]);
        let text = key.to_string();
        assert_eq!(text.len(), 44);
        assert_eq!(text.parse::<PublicKey>(), Ok(key));
        assert_eq!(format!("{key:?}"), format!("pk:{}…", &text[..8]));
        assert!(matches!("AAAA".parse::<PublicKey>(), Err(KeyError::Length(3))));
        assert!(matches!("not base64!".parse::<PublicKey>(), Err(KeyError::Base64(_))));
        assert_eq!(STANDARD.encode([0u8; 32]).parse::<PublicKey>(), Err(KeyError::Zero));
        let json = serde_json::to_string(&key).expect("serializes");
        assert_eq!(serde_json::from_str::<PublicKey>(&json).expect("parses"), key);
    }

    #[test]
    fn preshared_keys_round_trip_and_never_print() {
        let psk = PresharedKey::from_bytes([9u8; 32]);
        assert_eq!(format!("{psk:?}"), "psk:<redacted>");
        let json = serde_json::to_string(&psk).expect("serializes");
        assert_eq!(serde_json::from_str::<PresharedKey>(&json).expect("parses"), psk);
        assert!(matches!("AAAA".parse::<PresharedKey>(), Err(KeyError::Length(3))));
    }
}

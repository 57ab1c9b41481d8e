//! The join token: one opaque string that carries everything `meshd join` needs.
//!
//! A token is `meshd1_` followed by unpadded base64url of a small JSON object:
//! `{"u": coordinator URL, "i": token id, "s": secret (base64url, 32 random bytes), "f": certificate SHA-256 (hex, absent
//! when the coordinator serves plain HTTP)}`. The id lets the coordinator find the token row without scanning; the
//! secret is what proves possession (only its SHA-256 is stored, compared in constant time). The fingerprint pins the
//! coordinator's certificate, so a self-signed certificate is as safe as a CA-issued one and needs no extra step.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Prefix of every token; the digit is the token format version.
pub const TOKEN_PREFIX: &str = "meshd1_";
/// Length of a token secret in bytes (256 bits; the issue asks for at least 128).
pub const SECRET_LEN: usize = 32;

/// Why a string is not a usable join token. Messages say what to do next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "this is not a meshd join token (it should start with `{TOKEN_PREFIX}`); copy the whole token the admin gave you"
    )]
    Prefix,
    #[error("the join token is damaged ({0}); copy the whole token again, it is one line without spaces")]
    Malformed(String),
}

/// SHA-256 of the coordinator's TLS certificate (DER), as pinned by nodes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertFingerprint(pub [u8; 32]);

impl CertFingerprint {
    /// Fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Result<Self, TokenError> {
        let bytes = hex::decode(s.replace(':', "")).map_err(|e| TokenError::Malformed(format!("fingerprint: {e}")))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| TokenError::Malformed("fingerprint must be 32 bytes".into()))?;
        Ok(Self(bytes))
    }
}

impl fmt::Debug for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Display for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Base URL of the coordinator as nodes reach it, e.g. `https://coord.example.com:8443`.
    pub coordinator_url: String,
    /// Public identifier of the token row (also shown in `GET /api/v1/tokens`).
    pub id: String,
    /// The secret; never logged.
    pub secret: [u8; SECRET_LEN],
    /// Pinned certificate; `None` when the coordinator speaks plain HTTP (behind a TLS proxy, or tests).
    pub fingerprint: Option<CertFingerprint>,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    u: String,
    i: String,
    s: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    f: Option<String>,
}

impl JoinToken {
    /// The opaque string handed to `meshd join`.
    pub fn encode(&self) -> String {
        let wire = Wire {
            u: self.coordinator_url.clone(),
            i: self.id.clone(),
            s: URL_SAFE_NO_PAD.encode(self.secret),
            f: self.fingerprint.map(|f| f.to_hex()),
        };
        let json = serde_json::to_vec(&wire).expect("a struct of strings always serializes");
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Parses a token, tolerating surrounding white space (copy and paste).
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let body = text.trim().strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Prefix)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TokenError::Malformed(format!("base64: {e}")))?;
        let wire: Wire = serde_json::from_slice(&json).map_err(|e| TokenError::Malformed(format!("contents: {e}")))?;
        let secret = URL_SAFE_NO_PAD
            .decode(&wire.s)
            .map_err(|e| TokenError::Malformed(format!("secret: {e}")))?;
        let secret: [u8; SECRET_LEN] = secret
            .try_into()
            .map_err(|_| TokenError::Malformed("secret has the wrong length".into()))?;
        if !(wire.u.starts_with("https://") || wire.u.starts_with("http://")) {
            return Err(TokenError::Malformed(
                "coordinator URL must be http:// or https://".into(),
            ));
        }
        if wire.i.is_empty() || wire.i.len() > 64 || !wire.i.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(TokenError::Malformed("token id".into()));
        }
        let fingerprint = wire.f.as_deref().map(CertFingerprint::from_hex).transpose()?;
        Ok(Self {
            coordinator_url: wire.u.trim_end_matches('/').to_string(),
            id: wire.i,
            secret,
            fingerprint,
        })
    }

    /// SHA-256 of the secret: the only form the coordinator stores.
    pub fn secret_hash(&self) -> [u8; 32] {
        Sha256::digest(self.secret).into()
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("coordinator_url", &self.coordinator_url)
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JoinToken {
        JoinToken {
            coordinator_url: "https://198.18.0.1:8443".into(),
            id: "tk7f3a".into(),
            secret: [9u8; SECRET_LEN],
            fingerprint: Some(CertFingerprint([3u8; 32])),
        }
    }

    #[test]
    fn round_trips() {
        let token = sample();
        let text = token.encode();
        assert!(text.starts_with(TOKEN_PREFIX));
        assert!(!text.contains(char::is_whitespace));
        assert_eq!(JoinToken::parse(&format!("  {text}\n")), Ok(token.clone()));
        let plain = JoinToken {
            fingerprint: None,
            ..token
        };
        assert_eq!(JoinToken::parse(&plain.encode()), Ok(plain));
    }

    #[test]
    fn rejects_garbage_with_helpful_errors() {
        assert_eq!(JoinToken::parse("hello"), Err(TokenError::Prefix));
        assert!(matches!(JoinToken::parse("meshd1_!!!"), Err(TokenError::Malformed(_))));
        let text = sample().encode();
        assert!(matches!(
            JoinToken::parse(&text[..text.len() - 6]),
            Err(TokenError::Malformed(_))
        ));
        assert!(
            !format!("{:?}", sample()).contains("9, 9"),
            "Debug must not print the secret"
        );
    }
}

//! Join-token policy: when a stored token may enrol a node. Pure: no IO (the store calls [`check`] inside the join
//! transaction, so the check and the use-count increment are atomic).

use crate::model::now_unix;

/// A join token as stored (never the secret: only its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub secret_hash: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    /// `None`: unlimited (reusable).
    pub max_uses: Option<i64>,
    pub uses: i64,
    pub revoked_at: Option<i64>,
    pub tags: Vec<String>,
}

impl TokenRecord {
    /// `active`, `expired`, `revoked` or `used_up`.
    pub fn state(&self, now: i64) -> &'static str {
        match check(self, now, false) {
            Ok(()) => "active",
            Err(TokenRejection::Revoked { .. }) => "revoked",
            Err(TokenRejection::Expired { .. }) => "expired",
            Err(TokenRejection::UsedUp { .. }) => "used_up",
            Err(TokenRejection::Unknown) => "invalid",
        }
    }
}

/// Why a join token was refused. The messages say what to do next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error(
        "this join token is not known to the coordinator (wrong secret, or a token of another coordinator); ask your \
         admin for a new one: meshd-coordinator token create"
    )]
    Unknown,
    #[error(
        "this join token expired at {} (unix {at}); ask your admin for a new one: meshd-coordinator token create",
        fmt_time(*at)
    )]
    Expired { at: i64 },
    #[error("this join token was revoked by an admin; ask your admin for a new one: meshd-coordinator token create")]
    Revoked { at: i64 },
    #[error(
        "this join token was already used {max} time(s), its limit; ask your admin for a new one: \
         meshd-coordinator token create (add --reusable or --uses N for several machines)"
    )]
    UsedUp { max: i64 },
}

fn fmt_time(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Whether `token` may enrol a node now. `ignore_uses`: a node re-joining with the token it joined with does not
/// need a use left (it consumes none; see `store::nodes::join`).
pub fn check(token: &TokenRecord, now: i64, ignore_uses: bool) -> Result<(), TokenRejection> {
    if let Some(at) = token.revoked_at {
        return Err(TokenRejection::Revoked { at });
    }
    if let Some(at) = token.expires_at
        && now >= at
    {
        return Err(TokenRejection::Expired { at });
    }
    if !ignore_uses
        && let Some(max) = token.max_uses
        && token.uses >= max
    {
        return Err(TokenRejection::UsedUp { max });
    }
    Ok(())
}

/// Convenience for callers without a clock of their own.
pub fn check_now(token: &TokenRecord, ignore_uses: bool) -> Result<(), TokenRejection> {
    check(token, now_unix(), ignore_uses)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> TokenRecord {
        TokenRecord {
            id: "t".into(),
            secret_hash: String::new(),
            created_at: 0,
            expires_at: Some(100),
            max_uses: Some(1),
            uses: 0,
            revoked_at: None,
            tags: vec![],
        }
    }

    #[test]
    fn checks_revocation_expiry_and_uses() {
        assert_eq!(check(&token(), 50, false), Ok(()));
        assert_eq!(check(&token(), 100, false), Err(TokenRejection::Expired { at: 100 }));
        let used = TokenRecord { uses: 1, ..token() };
        assert_eq!(check(&used, 50, false), Err(TokenRejection::UsedUp { max: 1 }));
        assert_eq!(check(&used, 50, true), Ok(()));
        let revoked = TokenRecord {
            revoked_at: Some(10),
            ..token()
        };
        assert_eq!(check(&revoked, 50, true), Err(TokenRejection::Revoked { at: 10 }));
        let unlimited = TokenRecord {
            max_uses: None,
            uses: 1000,
            expires_at: None,
            ..token()
        };
        assert_eq!(check(&unlimited, i64::MAX, false), Ok(()));
        assert_eq!(used.state(50), "used_up");
        assert!(
            TokenRejection::Expired { at: 0 }
                .to_string()
                .contains("1970-01-01T00:00:00Z")
        );
    }
}

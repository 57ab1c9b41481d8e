//! Key/value settings: what `serve` publishes for the CLI (public URL, certificate fingerprint, network), the
//! coordinator's join key (shared by every replica on one database) and the change log's pruning mark.

use super::{Result, Store};

/// The URL nodes use to reach the coordinator (written by `serve`, read by `token create`).
pub const PUBLIC_URL: &str = "public_url";
/// Hex SHA-256 of the served certificate, empty when serving plain HTTP.
pub const CERT_FINGERPRINT: &str = "cert_fingerprint";
/// The overlay network nodes were allocated from.
pub const NETWORK: &str = "network";
/// The coordinator's X25519 join key (private, base64), see [`crate::joinkey`]; never printed.
pub const JOIN_KEY: &str = "join_key";
/// Every change with a version at or below this was pruned from the log.
pub const PRUNED_THROUGH: &str = "pruned_through";
/// What every full map says about the whole network (`<network> <dns domain>`), as the last `serve` had it.
pub const MAP_SETTINGS: &str = "map_settings";
/// A node whose map is older than this version needs a full map: [`MAP_SETTINGS`] changed then.
pub const FULL_MAP_BEFORE: &str = "full_map_before";
/// Where stock WireGuard devices send their datagrams (`host:port` of the coordinator's gateway, as `serve` last
/// published it; empty when the gateway is off): the `Endpoint` of every peer in an exported device config.
pub const GATEWAY_ENDPOINT: &str = "gateway_endpoint";
/// The secret every pair's preshared key is derived from (base64, 32 random bytes); see [`crate::psk`]. Never printed.
pub const PSK_SECRET: &str = "psk_secret";

impl Store {
    pub async fn setting(&self, key: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(self.pool())
            .await?)
    }

    pub async fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        let mut w = self.write().await?;
        Self::set_setting_in(&mut w.tx, key, value).await?;
        w.commit().await
    }

    /// The value of `key`, storing `candidate` first if there is none: of processes racing to create it (replicas
    /// starting together), every one gets the value the first one stored.
    pub async fn setting_or_insert(&self, key: &str, candidate: &str) -> Result<String> {
        let mut w = self.write().await?;
        sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(candidate)
            .execute(&mut *w.tx)
            .await?;
        let value: String = sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_one(&mut *w.tx)
            .await?;
        w.commit().await?;
        Ok(value)
    }

    pub(super) async fn set_setting_in(tx: &mut sqlx::AnyConnection, key: &str, value: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

//! Join tokens: create, list, revoke, and the row lookup used by the join transaction.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Result, Store, StoreError, to_json};
use crate::model::now_unix;
use crate::tokens::TokenRecord;

/// A token to create; the caller generated id and secret (only the hash arrives here).
#[derive(Debug)]
pub struct NewToken {
    pub id: String,
    pub secret_hash: String,
    pub expires_at: Option<i64>,
    /// `None`: unlimited.
    pub max_uses: Option<i64>,
    pub tags: Vec<String>,
}

fn decode_token(row: &AnyRow) -> Result<TokenRecord> {
    let tags: String = row.try_get("tags")?;
    Ok(TokenRecord {
        id: row.try_get("id")?,
        secret_hash: row.try_get("secret_hash")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        max_uses: row.try_get("max_uses")?,
        uses: row.try_get("uses")?,
        revoked_at: row.try_get("revoked_at")?,
        tags: serde_json::from_str(&tags).map_err(|e| StoreError::Corrupt(format!("token tags: {e}")))?,
    })
}

impl Store {
    pub async fn create_token(&self, actor: &str, token: NewToken) -> Result<TokenRecord> {
        let mut w = self.write().await?;
        sqlx::query(
            "INSERT INTO join_tokens (id, secret_hash, created_at, expires_at, max_uses, uses, tags) \
             VALUES ($1, $2, $3, $4, $5, 0, $6)",
        )
        .bind(&token.id)
        .bind(&token.secret_hash)
        .bind(now_unix())
        .bind(token.expires_at)
        .bind(token.max_uses)
        .bind(to_json(&token.tags))
        .execute(&mut *w.tx)
        .await?;
        let detail = format!(
            "uses {}, expires {}, tags {:?}",
            token.max_uses.map_or("unlimited".to_string(), |n| n.to_string()),
            token.expires_at.map_or("never".to_string(), |t| t.to_string()),
            token.tags
        );
        w.audit(actor, "token.create", &format!("token:{}", token.id), &detail)
            .await?;
        let record = Self::token_in(&mut w.tx, &token.id)
            .await?
            .ok_or(StoreError::NotFound)?;
        w.commit().await?;
        Ok(record)
    }

    /// Every token, newest first.
    pub async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let rows = sqlx::query(
            "SELECT id, secret_hash, created_at, expires_at, max_uses, uses, revoked_at, tags \
                                FROM join_tokens ORDER BY created_at DESC, id",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(decode_token).collect()
    }

    /// Revokes a token (kept for the record). `NotFound` if there is no such token.
    pub async fn revoke_token(&self, actor: &str, id: &str) -> Result<TokenRecord> {
        let mut w = self.write().await?;
        let updated = sqlx::query("UPDATE join_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now_unix())
            .bind(id)
            .execute(&mut *w.tx)
            .await?
            .rows_affected();
        let record = Self::token_in(&mut w.tx, id).await?.ok_or(StoreError::NotFound)?;
        if updated > 0 {
            w.audit(actor, "token.revoke", &format!("token:{id}"), "").await?;
        }
        w.commit().await?;
        Ok(record)
    }

    pub(super) async fn token_in(tx: &mut sqlx::AnyConnection, id: &str) -> Result<Option<TokenRecord>> {
        let row = sqlx::query(
            "SELECT id, secret_hash, created_at, expires_at, max_uses, uses, revoked_at, tags \
             FROM join_tokens WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        row.as_ref().map(decode_token).transpose()
    }
}

//! Admin API keys: create, list, delete, and the hash lookup used by the admin auth extractor.

use super::{Result, Store, StoreError};
use crate::model::now_unix;

/// An admin API key as listed (never the secret).
#[derive(Debug, Clone)]
pub struct ApiKeyRecord {
    pub id: String,
    pub description: String,
    pub created_at: i64,
}

impl Store {
    pub async fn create_api_key(&self, actor: &str, id: &str, secret_hash: &str, description: &str) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query("INSERT INTO api_keys (id, secret_hash, description, created_at) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(secret_hash)
            .bind(description)
            .bind(now_unix())
            .execute(&mut *w.tx)
            .await?;
        w.audit(actor, "apikey.create", &format!("apikey:{id}"), description)
            .await?;
        w.commit().await
    }

    pub async fn api_key_hash(&self, id: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar("SELECT secret_hash FROM api_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await?)
    }

    pub async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>> {
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT id, description, created_at FROM api_keys ORDER BY created_at, id")
                .fetch_all(self.pool())
                .await?;
        Ok(rows
            .into_iter()
            .map(|(id, description, created_at)| ApiKeyRecord {
                id,
                description,
                created_at,
            })
            .collect())
    }

    pub async fn delete_api_key(&self, actor: &str, id: &str) -> Result<()> {
        let mut w = self.write().await?;
        let n = sqlx::query("DELETE FROM api_keys WHERE id = $1")
            .bind(id)
            .execute(&mut *w.tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        w.audit(actor, "apikey.delete", &format!("apikey:{id}"), "").await?;
        w.commit().await
    }
}

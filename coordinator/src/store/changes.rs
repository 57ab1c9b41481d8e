//! The change log: what the broker and resuming streams read, and its pruning.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::settings::PRUNED_THROUGH;
use super::{Result, Store, decode_node, node_columns};
use crate::model::{ChangeKind, ChangeRecord};

fn decode_change(row: &AnyRow) -> Result<ChangeRecord> {
    let version: i64 = row.try_get("version")?;
    let kind: String = row.try_get("change_kind")?;
    let node_present: Option<i64> = row.try_get("id")?;
    Ok(ChangeRecord {
        version: version.max(0) as u64,
        node_id: row.try_get("change_node")?,
        kind: ChangeKind::parse(&kind),
        node: node_present.map(|_| decode_node(row)).transpose()?,
    })
}

impl Store {
    /// The newest version in the log (0 before the first change).
    pub async fn current_version(&self) -> Result<u64> {
        let max: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM changes")
            .fetch_one(self.pool())
            .await?;
        match max {
            Some(v) => Ok(v.max(0) as u64),
            None => self.pruned_through().await,
        }
    }

    /// Versions at or below this were pruned: a stream resuming from below needs a full map.
    pub async fn pruned_through(&self) -> Result<u64> {
        let value = self.setting(PRUNED_THROUGH).await?;
        Ok(value.and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    /// Up to `limit` changes after `version`, oldest first, each with the node's current state.
    pub async fn changes_after(&self, version: u64, limit: i64) -> Result<Vec<ChangeRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT c.version, c.node_id AS change_node, c.kind AS change_kind, ",
            node_columns!(),
            " FROM changes c LEFT JOIN nodes n ON n.id = c.node_id WHERE c.version > $1 ORDER BY c.version LIMIT $2"
        ))
        .bind(version as i64)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(decode_change).collect()
    }

    /// What a stream that saw `version` missed, coalesced: the newest change per node after `version` (the node's
    /// current state makes the older ones redundant), oldest first. At most one message per changed node.
    pub async fn missed_changes(&self, version: u64) -> Result<Vec<ChangeRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT c.version, c.node_id AS change_node, c.kind AS change_kind, ",
            node_columns!(),
            " FROM changes c LEFT JOIN nodes n ON n.id = c.node_id",
            " WHERE c.version IN (SELECT MAX(version) FROM changes WHERE version > $1 GROUP BY node_id)",
            " ORDER BY c.version"
        ))
        .bind(version as i64)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(decode_change).collect()
    }

    /// Drops all but the newest `keep` changes. Returns the new pruning mark.
    pub async fn prune_changes(&self, keep: u64) -> Result<u64> {
        let mut w = self.write().await?;
        let max: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM changes")
            .fetch_one(&mut *w.tx)
            .await?;
        let mark: Option<String> = sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
            .bind(PRUNED_THROUGH)
            .fetch_optional(&mut *w.tx)
            .await?;
        let mark: u64 = mark.and_then(|v| v.parse().ok()).unwrap_or(0);
        let cutoff = (max.unwrap_or(0).max(0) as u64).saturating_sub(keep);
        if cutoff <= mark {
            return Ok(mark);
        }
        sqlx::query("DELETE FROM changes WHERE version <= $1")
            .bind(cutoff as i64)
            .execute(&mut *w.tx)
            .await?;
        Self::set_setting_in(&mut w.tx, PRUNED_THROUGH, &cutoff.to_string()).await?;
        w.commit().await?;
        Ok(cutoff)
    }
}

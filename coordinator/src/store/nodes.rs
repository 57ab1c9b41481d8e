//! Nodes: join, admin registration of plain WireGuard devices, reads, updates, deletion, endpoints and presence.
//! Every change appends to the change log in the same transaction.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use meshd_protocol::{JoinToken, NodeId, PublicKey};
use sqlx::Row;

use super::{Result, Store, StoreError, decode_node, node_columns, to_json};
use crate::model::{ChangeKind, Node, NodeKind, now_unix};
use crate::secrets::{self, NodeSecret};
use crate::{ipam, naming, tokens};

/// A join request whose token has been parsed.
#[derive(Debug)]
pub struct JoinInput<'a> {
    pub token: &'a JoinToken,
    pub public_key: PublicKey,
    pub hostname: &'a str,
    pub network: Ipv4Net,
}

/// Result of a successful join.
#[derive(Debug)]
pub struct JoinOutcome {
    pub node: Node,
    /// The node's new bearer credential (shown once).
    pub credential: String,
    /// True when the public key was already enrolled: same node, same address, a fresh credential.
    pub rejoined: bool,
}

/// An admin's change to a node; `None` fields stay as they are.
#[derive(Debug, Default)]
pub struct NodeUpdate {
    pub name: Option<String>,
    pub tags: Option<Vec<String>>,
}

impl Store {
    /// Enrols a node with a join token (or re-enrols a known public key), in one serialized transaction.
    ///
    /// Re-joining with the same public key returns the same node and address with a fresh credential (the old one
    /// stops working: whoever re-joins holds a valid token *and* the node's private key, which the HTTP layer checked
    /// with the join proof before calling this; a node that lost its state but kept its key must be able to recover).
    /// Re-joining with the *same* token it joined with consumes no use, so `meshd join <token>` may be repeated
    /// with a single-use token (e.g. after a crash before the credential was saved); a different token must be
    /// valid and gives up one use. Revoked and expired tokens are refused in every case.
    ///
    /// Callers must have verified the join proof (possession of the private key of `public_key`, see
    /// [`meshd_protocol::proof`]): public keys are public, so without it any token holder could re-enrol another
    /// node's key and take over its record.
    pub async fn join(&self, input: JoinInput<'_>) -> Result<JoinOutcome> {
        let now = now_unix();
        let mut w = self.write().await?;
        let token = Self::token_in(&mut w.tx, &input.token.id)
            .await?
            .ok_or(tokens::TokenRejection::Unknown)?;
        if !secrets::hash_matches(&input.token.secret_hash(), &token.secret_hash) {
            return Err(tokens::TokenRejection::Unknown.into());
        }
        let key = input.public_key.to_base64();
        let existing = sqlx::query("SELECT id, token_id FROM nodes WHERE public_key = $1")
            .bind(&key)
            .fetch_optional(&mut *w.tx)
            .await?;
        let same_token = existing
            .as_ref()
            .map(|row| row.try_get::<Option<String>, _>("token_id"))
            .transpose()?
            .flatten()
            .is_some_and(|id| id == token.id);
        tokens::check(&token, now, same_token)?;
        if !same_token {
            sqlx::query("UPDATE join_tokens SET uses = uses + 1 WHERE id = $1")
                .bind(&token.id)
                .execute(&mut *w.tx)
                .await?;
        }
        let secret = NodeSecret::generate();
        let (node_id, rejoined) = match existing {
            Some(row) => {
                let id: i64 = row.try_get("id")?;
                sqlx::query("UPDATE nodes SET credential_hash = $1, kind = $2, token_id = $3 WHERE id = $4")
                    .bind(&secret.hash_hex)
                    .bind(NodeKind::Meshd.as_str())
                    .bind(&token.id)
                    .bind(id)
                    .execute(&mut *w.tx)
                    .await?;
                // Always a change (the kind may have changed from `wireguard`, and the node's own open stream,
                // opened with the replaced credential, re-checks its credential on changes about itself and ends).
                w.append_change(id, ChangeKind::Changed).await?;
                w.audit(
                    &format!("node:{id}"),
                    "rejoin",
                    &format!("node:{id}"),
                    &format!("token {}", token.id),
                )
                .await?;
                (id, true)
            }
            None => {
                let name = Self::unique_name_in(&mut w.tx, &naming::sanitize(input.hostname)).await?;
                let ip = Self::free_ip_in(&mut w.tx, input.network).await?;
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO nodes (name, ip, public_key, kind, credential_hash, tags, token_id, created_at, \
                     last_seen) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) RETURNING id",
                )
                .bind(&name)
                .bind(i64::from(u32::from(ip)))
                .bind(&key)
                .bind(NodeKind::Meshd.as_str())
                .bind(&secret.hash_hex)
                .bind(to_json(&token.tags))
                .bind(&token.id)
                .bind(now)
                .fetch_one(&mut *w.tx)
                .await?;
                w.append_change(id, ChangeKind::Added).await?;
                w.audit(
                    &format!("token:{}", token.id),
                    "join",
                    &format!("node:{id}"),
                    &format!("name {name}, ip {ip}, key {}", input.public_key.to_base64()),
                )
                .await?;
                (id, false)
            }
        };
        let node = Self::node_in(&mut w.tx, node_id).await?.ok_or(StoreError::NotFound)?;
        w.commit().await?;
        Ok(JoinOutcome {
            node,
            credential: secret.credential(node_id),
            rejoined,
        })
    }

    /// Registers a plain WireGuard device (no credential) by its public key; the name must be valid and free.
    /// With `preshared_key`, every pair with the device mixes a preshared key into its handshake.
    pub async fn register_device(
        &self,
        actor: &str,
        name: &str,
        public_key: PublicKey,
        tags: &[String],
        preshared_key: bool,
        network: Ipv4Net,
    ) -> Result<Node> {
        let now = now_unix();
        let mut w = self.write().await?;
        let key = public_key.to_base64();
        let taken: Option<i64> = sqlx::query_scalar("SELECT id FROM nodes WHERE public_key = $1")
            .bind(&key)
            .fetch_optional(&mut *w.tx)
            .await?;
        if let Some(id) = taken {
            return Err(StoreError::Conflict(format!(
                "this public key already belongs to node {id}"
            )));
        }
        Self::ensure_name_free_in(&mut w.tx, name, None).await?;
        let ip = Self::free_ip_in(&mut w.tx, network).await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO nodes (name, ip, public_key, kind, credential_hash, tags, created_at, preshared_key) \
             VALUES ($1, $2, $3, $4, NULL, $5, $6, $7) RETURNING id",
        )
        .bind(name)
        .bind(i64::from(u32::from(ip)))
        .bind(&key)
        .bind(NodeKind::Wireguard.as_str())
        .bind(to_json(&tags))
        .bind(now)
        .bind(i64::from(preshared_key))
        .fetch_one(&mut *w.tx)
        .await?;
        w.append_change(id, ChangeKind::Added).await?;
        w.audit(
            actor,
            "node.register",
            &format!("node:{id}"),
            &format!("name {name}, ip {ip}, key {key}, preshared key {preshared_key}"),
        )
        .await?;
        let node = Self::node_in(&mut w.tx, id).await?.ok_or(StoreError::NotFound)?;
        w.commit().await?;
        Ok(node)
    }

    pub async fn node(&self, id: NodeId) -> Result<Option<Node>> {
        let row = sqlx::query(concat!("SELECT ", node_columns!(), " FROM nodes n WHERE n.id = $1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(decode_node).transpose()
    }

    /// Every node, by id.
    pub async fn nodes(&self) -> Result<Vec<Node>> {
        let rows = sqlx::query(concat!("SELECT ", node_columns!(), " FROM nodes n ORDER BY n.id"))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(decode_node).collect()
    }

    /// (all nodes, nodes with a connected stream).
    pub async fn node_counts(&self) -> Result<(i64, i64)> {
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM nodes")
            .fetch_one(self.pool())
            .await?;
        let online: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM nodes WHERE online_streams > 0")
            .fetch_one(self.pool())
            .await?;
        Ok((total, online))
    }

    /// The stored credential hash of a node: `None` if the node does not exist, `Some(None)` for a device without one.
    pub async fn node_credential_hash(&self, id: NodeId) -> Result<Option<Option<String>>> {
        Ok(sqlx::query_scalar("SELECT credential_hash FROM nodes WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// Renames and/or retags a node.
    pub async fn update_node(&self, actor: &str, id: NodeId, update: NodeUpdate) -> Result<Node> {
        let mut w = self.write().await?;
        let before = Self::node_in(&mut w.tx, id).await?.ok_or(StoreError::NotFound)?;
        let mut details = Vec::new();
        if let Some(name) = update.name.as_deref()
            && name != before.name
        {
            Self::ensure_name_free_in(&mut w.tx, name, Some(id)).await?;
            sqlx::query("UPDATE nodes SET name = $1 WHERE id = $2")
                .bind(name)
                .bind(id)
                .execute(&mut *w.tx)
                .await?;
            details.push(format!("name {} -> {name}", before.name));
        }
        if let Some(tags) = update.tags.as_ref()
            && *tags != before.tags
        {
            sqlx::query("UPDATE nodes SET tags = $1 WHERE id = $2")
                .bind(to_json(tags))
                .bind(id)
                .execute(&mut *w.tx)
                .await?;
            details.push(format!("tags {:?} -> {tags:?}", before.tags));
        }
        if !details.is_empty() {
            w.append_change(id, ChangeKind::Changed).await?;
            w.audit(actor, "node.update", &format!("node:{id}"), &details.join("; "))
                .await?;
        }
        let node = Self::node_in(&mut w.tx, id).await?.ok_or(StoreError::NotFound)?;
        w.commit().await?;
        Ok(node)
    }

    /// Deletes a node: its credential stops working with this commit and every map loses it.
    pub async fn delete_node(&self, actor: &str, action: &str, id: NodeId) -> Result<Node> {
        let mut w = self.write().await?;
        let node = Self::node_in(&mut w.tx, id).await?.ok_or(StoreError::NotFound)?;
        sqlx::query("DELETE FROM nodes WHERE id = $1")
            .bind(id)
            .execute(&mut *w.tx)
            .await?;
        w.append_change(id, ChangeKind::Removed).await?;
        w.audit(
            actor,
            action,
            &format!("node:{id}"),
            &format!("name {}, ip {}", node.name, node.ip),
        )
        .await?;
        w.commit().await?;
        Ok(node)
    }

    /// Stores the endpoints a node reported; a change only when they differ. Returns false if the node is gone.
    pub async fn set_endpoints(&self, id: NodeId, endpoints: &[SocketAddr]) -> Result<bool> {
        let mut w = self.write().await?;
        let current: Option<String> = sqlx::query_scalar("SELECT endpoints FROM nodes WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *w.tx)
            .await?;
        let Some(current) = current else { return Ok(false) };
        let json = to_json(&endpoints);
        sqlx::query("UPDATE nodes SET endpoints = $1, last_seen = $2 WHERE id = $3")
            .bind(&json)
            .bind(now_unix())
            .bind(id)
            .execute(&mut *w.tx)
            .await?;
        if current != json {
            w.append_change(id, ChangeKind::Endpoints).await?;
        }
        w.commit().await?;
        Ok(true)
    }

    /// Writes presence transitions decided by [`crate::presence`] in one transaction: one change per node whose
    /// state actually flips (a node deleted meanwhile is skipped).
    pub async fn set_presence(&self, online: &[NodeId], offline: &[NodeId]) -> Result<()> {
        let now = now_unix();
        let mut w = self.write().await?;
        for (ids, value, kind) in [(online, 1i64, ChangeKind::Online), (offline, 0, ChangeKind::Offline)] {
            for &id in ids {
                let flipped = sqlx::query(
                    "UPDATE nodes SET online_streams = $1, last_seen = $2 WHERE id = $3 AND online_streams <> $1",
                )
                .bind(value)
                .bind(now)
                .bind(id)
                .execute(&mut *w.tx)
                .await?
                .rows_affected();
                if flipped > 0 {
                    w.append_change(id, kind).await?;
                }
            }
        }
        w.commit().await
    }

    /// Nodes the database shows online (at start-up: those of the previous process, held online for a grace period).
    pub async fn online_node_ids(&self) -> Result<Vec<NodeId>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM nodes WHERE online_streams > 0 ORDER BY id")
                .fetch_all(self.pool())
                .await?,
        )
    }

    /// The network nodes were allocated from, if any node exists outside `network` (a changed `--network`).
    pub async fn nodes_outside(&self, network: Ipv4Net) -> Result<Vec<(String, Ipv4Addr)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT name, ip FROM nodes ORDER BY ip")
            .fetch_all(self.pool())
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(name, ip)| u32::try_from(ip).ok().map(|ip| (name, Ipv4Addr::from(ip))))
            .filter(|(_, ip)| !ipam::is_assignable(network, *ip))
            .collect())
    }

    pub(super) async fn node_in(tx: &mut sqlx::AnyConnection, id: NodeId) -> Result<Option<Node>> {
        let row = sqlx::query(concat!("SELECT ", node_columns!(), " FROM nodes n WHERE n.id = $1"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        row.as_ref().map(decode_node).transpose()
    }

    async fn unique_name_in(tx: &mut sqlx::AnyConnection, base: &str) -> Result<String> {
        // Usually the hostname is free: one indexed lookup. Only when it is taken, read the names with its prefix.
        let taken: Option<i64> = sqlx::query_scalar("SELECT id FROM nodes WHERE name = $1")
            .bind(base)
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_none() {
            return Ok(base.to_string());
        }
        // `base` is sanitized ([a-z0-9-]), so it holds no LIKE wildcard.
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM nodes WHERE name LIKE $1")
            .bind(format!("{}%", &base[..base.len().min(naming::MAX_NAME_LEN - 4)]))
            .fetch_all(&mut *tx)
            .await?;
        let names: HashSet<String> = names.into_iter().collect();
        Ok(naming::unique(base, |n| n == base || names.contains(n)))
    }

    async fn ensure_name_free_in(tx: &mut sqlx::AnyConnection, name: &str, except: Option<NodeId>) -> Result<()> {
        let owner: Option<i64> = sqlx::query_scalar("SELECT id FROM nodes WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        match owner {
            Some(owner) if Some(owner) != except => Err(StoreError::Conflict(format!(
                "the name `{name}` is taken by node {owner}; pick another"
            ))),
            _ => Ok(()),
        }
    }

    async fn free_ip_in(tx: &mut sqlx::AnyConnection, network: Ipv4Net) -> Result<Ipv4Addr> {
        let (first, last) = ipam::assignable_range(network);
        let (count, max): (i64, Option<i64>) =
            sqlx::query_as("SELECT COUNT(*), MAX(ip) FROM nodes WHERE ip >= $1 AND ip <= $2")
                .bind(i64::from(first))
                .bind(i64::from(last))
                .fetch_one(&mut *tx)
                .await?;
        let max = max
            .map(|m| u32::try_from(m).map_err(|e| StoreError::Corrupt(format!("ip: {e}"))))
            .transpose()?;
        let found = match ipam::allocate_dense(network, count.max(0) as u64, max) {
            Some(found) => found,
            None => {
                // Gaps left by deleted nodes: read the addresses and take the lowest free one.
                let used: Vec<i64> = sqlx::query_scalar("SELECT ip FROM nodes WHERE ip >= $1 AND ip <= $2 ORDER BY ip")
                    .bind(i64::from(first))
                    .bind(i64::from(last))
                    .fetch_all(&mut *tx)
                    .await?;
                ipam::lowest_free(network, used.into_iter().filter_map(|ip| u32::try_from(ip).ok()))
            }
        };
        found.ok_or(StoreError::NetworkFull(network))
    }
}

//! The only code that touches SQL. One code path for SQLite and PostgreSQL through sqlx's `Any` driver.
//!
//! Portability rules (see `shared/notes/crates.md`): `$1` placeholders, every integer is `i64` (BIGINT), flags are
//! INTEGER, times are unix seconds, lists are JSON text, hashes hex text; no query macros.
//!
//! # Writes are serialized
//! Every write runs in [`Store::write`]: a process-wide async mutex, then on SQLite `BEGIN IMMEDIATE` (takes the
//! database write lock up front, so a transaction that reads then writes never fails to upgrade its lock; other
//! processes such as `meshd-coordinator token create` wait in SQLite's busy timeout), on PostgreSQL a transaction that
//! first takes a transaction-scoped advisory lock shared by every coordinator process on that database.
//! Why serialize instead of relying on constraints and retries:
//! - address allocation and name picking become plain "read, pick, insert" with no retry loop, and 200 concurrent
//!   joins yield 200 distinct addresses on both backends;
//! - a single-use token is checked and consumed in one transaction, so of two racing joins exactly one wins;
//! - on PostgreSQL, a `changes` version is drawn from its sequence while the lock is held, so version order equals
//!   commit order across all replicas. A broker that has read every change up to version V can then never later
//!   see a smaller version commit (with concurrent writers a sequence value taken early may commit late, and a
//!   reader following "version > last seen" would skip it forever).
//!
//! The write rate of a control plane (joins, endpoint reports, connects) is far below what one serialized writer
//! sustains (see the `join_bench` example), so the simplicity is cheap.
//!
//! After a write transaction that appended a change commits, the store wakes the broker ([`Store::change_notify`]);
//! on PostgreSQL the transaction also sends `NOTIFY meshd_changes` (delivered at commit) for other replicas.

mod apikeys;
mod audit;
mod changes;
mod migrate;
mod nodes;
mod settings;

/// Names of the settings rows.
pub mod settings_keys {
    pub use super::settings::{
        CERT_FINGERPRINT, FULL_MAP_BEFORE, JOIN_KEY, MAP_SETTINGS, NETWORK, PRUNED_THROUGH, PUBLIC_URL,
    };
}
mod tokens;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{Any, AnyPool, Row, Transaction};
use tokio::sync::{Mutex, MutexGuard, Notify};

pub use audit::AuditEntry;
pub use nodes::{JoinInput, JoinOutcome, NodeUpdate};
pub use tokens::NewToken;

use crate::model::{ChangeKind, Node, NodeKind, now_unix};
use crate::tokens::TokenRejection;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres");

/// Channel of `NOTIFY` on PostgreSQL: a change was committed (the payload is empty; listeners read the change log).
pub const PG_CHANGES_CHANNEL: &str = "meshd_changes";
/// Key of the PostgreSQL advisory lock that serializes writers of all replicas (an arbitrary constant: "meshd").
const PG_WRITE_LOCK_KEY: i64 = 0x006d_6573_6864;
/// Pool sizes: SQLite has one writer anyway (readers run in parallel in WAL mode); PostgreSQL serves the streams'
/// reads of several replicas, so a few more.
const SQLITE_POOL_SIZE: u32 = 8;
const POSTGRES_POOL_SIZE: u32 = 16;
/// How long an operation waits for a pooled connection before failing (a 500, not a hang).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Errors of the store. `Db` and `Corrupt` are internal; the others are answers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("applying database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot take the migration lock {path}: {source}")]
    MigrationLock { path: String, source: std::io::Error },
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Token(#[from] TokenRejection),
    #[error("the network {0} has no free address left; delete unused nodes or restart with a larger --network")]
    NetworkFull(ipnet::Ipv4Net),
    #[error("corrupt row in the database: {0}")]
    Corrupt(String),
    #[error("unsupported database URL `{0}`: use sqlite://PATH or postgres://USER:PASSWORD@HOST/DB")]
    UnsupportedUrl(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    pool: AnyPool,
    backend: Backend,
    url: String,
    /// Serializes write transactions of this process; see the module doc. A tokio mutex because it is held across
    /// the awaits of the transaction.
    write_lock: Mutex<()>,
    /// Woken after a transaction that appended a change commits.
    changed: Arc<Notify>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("backend", &self.inner.backend).finish()
    }
}

/// The default database: SQLite in the data directory.
pub fn default_url(data_dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", data_dir.join("meshd.db").display())
}

impl Store {
    /// Connects, enables WAL on SQLite and applies the embedded migrations (serialized across processes, see
    /// [`migrate`]).
    pub async fn connect(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_string()));
        };
        let size = match backend {
            Backend::Sqlite => SQLITE_POOL_SIZE,
            Backend::Postgres => POSTGRES_POOL_SIZE,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(size)
            .min_connections(1) // keeps an in-memory SQLite database alive
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await?;
        migrate::run(&pool, backend, url).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                backend,
                url: url.to_string(),
                write_lock: Mutex::new(()),
                changed: Arc::new(Notify::new()),
            }),
        })
    }

    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// The URL this store was opened with (the broker's PostgreSQL listener opens its own connection with it).
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Notified after every committed transaction that appended to the change log (in this process).
    pub fn change_notify(&self) -> Arc<Notify> {
        self.inner.changed.clone()
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.inner.pool
    }

    /// Starts a serialized write transaction (see the module doc).
    pub(crate) async fn write(&self) -> Result<WriteTx<'_>> {
        let guard = self.inner.write_lock.lock().await;
        let tx = match self.inner.backend {
            Backend::Sqlite => self.inner.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => {
                let mut tx = self.inner.pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(PG_WRITE_LOCK_KEY)
                    .execute(&mut *tx)
                    .await?;
                tx
            }
        };
        Ok(WriteTx {
            tx,
            _guard: guard,
            store: self,
            changed: false,
        })
    }

    /// Is the database reachable?
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(self.pool()).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.inner.pool.close().await;
    }
}

/// A write transaction holding the process write lock (and on PostgreSQL the advisory lock).
pub(crate) struct WriteTx<'a> {
    pub tx: Transaction<'static, Any>,
    _guard: MutexGuard<'a, ()>,
    store: &'a Store,
    changed: bool,
}

impl WriteTx<'_> {
    /// Appends a change-log row for `node_id` in this transaction.
    pub async fn append_change(&mut self, node_id: i64, kind: ChangeKind) -> Result<i64> {
        let version: i64 =
            sqlx::query_scalar("INSERT INTO changes (node_id, kind, created_at) VALUES ($1, $2, $3) RETURNING version")
                .bind(node_id)
                .bind(kind.as_str())
                .bind(now_unix())
                .fetch_one(&mut *self.tx)
                .await?;
        self.changed = true;
        Ok(version)
    }

    /// Records an admin action or a join in the audit log, in this transaction.
    pub async fn audit(&mut self, actor: &str, action: &str, target: &str, detail: &str) -> Result<()> {
        sqlx::query("INSERT INTO audit_log (at, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5)")
            .bind(now_unix())
            .bind(actor)
            .bind(action)
            .bind(target)
            .bind(detail)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    pub async fn commit(mut self) -> Result<()> {
        if self.changed && self.store.backend() == Backend::Postgres {
            // Delivered to every listener (all replicas) when the transaction commits.
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(PG_CHANGES_CHANNEL)
                .execute(&mut *self.tx)
                .await?;
        }
        self.tx.commit().await?;
        if self.changed {
            self.store.inner.changed.notify_one();
        }
        Ok(())
    }
}

/// The columns of a node row, in the order [`decode_node`] expects (a macro so it can go into `concat!`).
macro_rules! node_columns {
    () => {
        "n.id, n.name, n.ip, n.public_key, n.kind, n.endpoints, n.online_streams, n.last_seen, n.tags, n.created_at"
    };
}
pub(crate) use node_columns;

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

/// Decodes a node from a row that selected [`node_columns`].
pub(crate) fn decode_node(row: &AnyRow) -> Result<Node> {
    let ip: i64 = row.try_get("ip")?;
    let ip = u32::try_from(ip).map_err(|e| corrupt("ip", e))?;
    let public_key: String = row.try_get("public_key")?;
    let endpoints: String = row.try_get("endpoints")?;
    let tags: String = row.try_get("tags")?;
    let kind: String = row.try_get("kind")?;
    let online_streams: i64 = row.try_get("online_streams")?;
    Ok(Node {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        ip: ip.into(),
        public_key: meshd_protocol::PublicKey::from_str(&public_key).map_err(|e| corrupt("public_key", e))?,
        kind: NodeKind::parse(&kind),
        endpoints: serde_json::from_str(&endpoints).map_err(|e| corrupt("endpoints", e))?,
        online: online_streams > 0,
        last_seen: row.try_get("last_seen")?,
        tags: serde_json::from_str(&tags).map_err(|e| corrupt("tags", e))?,
        created_at: row.try_get("created_at")?,
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("lists of strings and addresses always serialize")
}

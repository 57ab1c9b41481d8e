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
//!
//! # A failed write leaves nothing behind
//! A write can fail half-way: the disk fills up, the directory turns read-only, PostgreSQL restarts. SQLite may then
//! roll the transaction back by itself (`SQLITE_FULL`, `SQLITE_IOERR`), after which sqlx's own `ROLLBACK` fails and
//! sqlx still counts the connection as inside a transaction; returned to the pool like that, every later
//! `BEGIN IMMEDIATE` on it fails ("begin_with at non-zero transaction depth") until a restart. So every connection
//! is checked when it comes back to the pool ([`connection_is_clean`]): one still in a transaction is closed and the
//! pool opens a fresh one. PostgreSQL connections broken by a server restart fail sqlx's test before acquire and are
//! replaced the same way.
//!
//! # Readiness
//! [`Store::writable`] answers whether a write can commit now: a probe transaction (one settings row), run at most
//! every [`WRITE_PROBE_INTERVAL`], and at once after a write failed. `/readyz` reports it (see `http::meta`).

mod apikeys;
mod audit;
mod changes;
mod migrate;
mod nodes;
mod settings;

/// Names of the settings rows.
pub mod settings_keys {
    pub use super::settings::{
        CERT_FINGERPRINT, FULL_MAP_BEFORE, GATEWAY_ENDPOINT, JOIN_KEY, MAP_SETTINGS, NETWORK, PRUNED_THROUGH,
        PSK_SECRET, PUBLIC_URL,
    };
}
mod tokens;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::error::DatabaseError;
use sqlx::migrate::Migrator;
use sqlx::{Any, AnyConnection, AnyPool, Connection, Row, Transaction};
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
/// How long a readiness answer may be reused before the next write probe: a monitor polling every second costs one
/// tiny serialized write per interval, not one per request (`/readyz` is unauthenticated).
pub const WRITE_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Longest a readiness probe waits for its write: a monitor's own timeout is a few seconds, and a pool that cannot
/// reach PostgreSQL would otherwise hold the answer for the whole [`ACQUIRE_TIMEOUT`].
pub const WRITE_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest the start-up integrity check (`PRAGMA quick_check`) may take; a database too large to check in this time
/// is served with a warning rather than not at all (quick_check reads every page: about 1 s per GiB on an SSD).
pub const INTEGRITY_CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// Settings key the write probe rewrites (the time of the last probe).
const WRITE_PROBE_KEY: &str = "write_probe";

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
    #[error(
        "the database is damaged (PRAGMA quick_check: {detail}); the coordinator will not serve from it: stop every \
         process using it, restore the database file from your latest backup (or move it aside and start afresh: \
         nodes must then join again), and start the coordinator again"
    )]
    Damaged { detail: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// True when the database cannot take the operation *now* but may later without anyone changing the data: a
    /// full disk, a read-only file system, an I/O error, a busy lock, a database server that is away or restarting.
    /// The API answers these with 503 (retry later) instead of 500 (a bug).
    pub fn is_unavailable(&self) -> bool {
        let Self::Db(error) = self else {
            return false;
        };
        match error {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
                true
            }
            sqlx::Error::Database(e) => {
                if let Some(sqlite) = e.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
                    // Primary result code = low byte of the extended one: BUSY 5, LOCKED 6, READONLY 8, IOERR 10,
                    // FULL 13, CANTOPEN 14.
                    let code = sqlite.code().and_then(|c| c.parse::<i64>().ok()).unwrap_or(0);
                    return matches!(code & 0xff, 5 | 6 | 8 | 10 | 13 | 14);
                }
                if let Some(pg) = e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                    // SQLSTATE classes: 08 connection exception, 53 insufficient resources (53100 disk full),
                    // 57P01-57P03 server shutting down or starting, 25006 read-only transaction (a standby).
                    let code = pg.code();
                    return code.starts_with("08")
                        || code.starts_with("53")
                        || code.starts_with("57P")
                        || code == "25006";
                }
                false
            }
            _ => false,
        }
    }
}

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
    /// What the last write showed about whether writes can commit (see [`Store::writable`]).
    write_health: std::sync::Mutex<WriteHealth>,
}

/// The last known outcome of a write: `Ok` or the error's text, and when it was seen.
#[derive(Debug, Clone)]
struct WriteHealth {
    outcome: Result<(), String>,
    at: Option<Instant>,
}

/// Whether writes can commit, as [`Store::writable`] last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writable {
    Yes,
    /// The error of the last write or write probe.
    No(String),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("backend", &self.inner.backend).finish()
    }
}

/// The file of a SQLite database URL (`None`: in memory, or PostgreSQL).
pub fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    migrate::sqlite_file(url)
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
            .after_release(|connection, _| Box::pin(connection_is_clean(connection)))
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
                write_health: std::sync::Mutex::new(WriteHealth {
                    outcome: Ok(()),
                    at: None,
                }),
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
        let tx = self.begin_write().await.inspect_err(|e| self.note_write(Err(e)))?;
        Ok(WriteTx {
            tx,
            _guard: guard,
            store: self,
            changed: false,
        })
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Any>> {
        Ok(match self.inner.backend {
            Backend::Sqlite => self.inner.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => {
                let mut tx = self.inner.pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(PG_WRITE_LOCK_KEY)
                    .execute(&mut *tx)
                    .await?;
                tx
            }
        })
    }

    /// Records the outcome of a write transaction's begin or commit (answers such as a refused token are not
    /// failures of the database and never get here).
    fn note_write(&self, outcome: Result<(), &StoreError>) {
        let mut health = self
            .inner
            .write_health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        health.outcome = outcome.map_err(|e| e.to_string());
        health.at = Some(Instant::now());
        let gauge = if health.outcome.is_ok() { 1.0 } else { 0.0 };
        metrics::gauge!(crate::telemetry::DATABASE_WRITABLE).set(gauge);
    }

    /// Can a write commit now? Answers from the last write when it is recent and succeeded; otherwise runs a probe
    /// (rewrites one settings row in a serialized write transaction). A failed write is never trusted for long: the
    /// next call after [`WRITE_PROBE_INTERVAL`] probes again, so readiness comes back as soon as writes do.
    pub async fn writable(&self) -> Writable {
        let recent = {
            let health = self
                .inner
                .write_health
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match health.at {
                Some(at) if at.elapsed() < WRITE_PROBE_INTERVAL => Some(health.outcome.clone()),
                _ => None,
            }
        };
        let outcome = match recent {
            Some(outcome) => outcome,
            None => {
                let stamp = now_unix().to_string();
                let probe = self.set_setting(WRITE_PROBE_KEY, &stamp);
                match tokio::time::timeout(WRITE_PROBE_TIMEOUT, probe).await {
                    Ok(Ok(())) => Ok(()),
                    // `set_setting` noted begin and commit; a statement that failed in between is noted here.
                    Ok(Err(e)) => {
                        self.note_write(Err(&e));
                        Err(e.to_string())
                    }
                    // Not noted: a probe queued behind a slow write says nothing about the next write.
                    Err(_) => Err(format!(
                        "a write did not commit within {WRITE_PROBE_TIMEOUT:?} (database server away or overloaded)"
                    )),
                }
            }
        };
        match outcome {
            Ok(()) => Writable::Yes,
            Err(e) => Writable::No(e),
        }
    }

    /// On SQLite, `PRAGMA quick_check` (every page's structure, not index contents), bounded by `limit`: a damaged
    /// page that start-up happens not to read would otherwise be found by a later write or a node's join, far from
    /// any backup. Fails with [`StoreError::Damaged`] saying what to do. Returns false when the check did not
    /// finish in time (the caller warns). PostgreSQL checks its own pages (checksums, its own tools): nothing to do.
    pub async fn check_integrity(&self, limit: Duration) -> Result<bool> {
        if self.inner.backend != Backend::Sqlite {
            return Ok(true);
        }
        let check = sqlx::query_scalar::<_, String>("PRAGMA quick_check(20)").fetch_all(self.pool());
        let rows = match tokio::time::timeout(limit, check).await {
            Err(_) => return Ok(false),
            Ok(Ok(rows)) => rows,
            // SQLITE_CORRUPT / SQLITE_NOTADB: the check could not even walk the file.
            Ok(Err(sqlx::Error::Database(e))) => {
                return Err(StoreError::Damaged {
                    detail: e.message().to_string(),
                });
            }
            Ok(Err(e)) => return Err(e.into()),
        };
        if rows.len() == 1 && rows[0] == "ok" {
            return Ok(true);
        }
        Err(StoreError::Damaged {
            detail: rows.join("; "),
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
        let committed = self.tx.commit().await.map_err(StoreError::from);
        self.store.note_write(committed.as_ref().map(|_| ()));
        committed?;
        if self.changed {
            self.store.inner.changed.notify_one();
        }
        Ok(())
    }
}

/// The pool's check of a connection coming back (see the module doc): keep it only if it is outside any
/// transaction. Costs nothing on the common path (no transaction open). Otherwise a ping first lets a queued
/// `ROLLBACK` finish (sqlx queues one when a transaction is dropped; SQLite's worker lowers the depth only once it
/// ran), so only a connection whose rollback failed is closed. Errors close the connection too.
async fn connection_is_clean(connection: &mut AnyConnection) -> std::result::Result<bool, sqlx::Error> {
    if !connection.is_in_transaction() {
        return Ok(true);
    }
    connection.ping().await?;
    if connection.is_in_transaction() {
        tracing::warn!("closing a database connection left inside a failed transaction; the pool opens a fresh one");
        return Ok(false);
    }
    Ok(true)
}

/// The columns of a node row, in the order [`decode_node`] expects (a macro so it can go into `concat!`).
macro_rules! node_columns {
    () => {
        "n.id, n.name, n.ip, n.public_key, n.kind, n.endpoints, n.online_streams, n.last_seen, n.tags, n.created_at, \
         n.preshared_key"
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
    let preshared_key: i64 = row.try_get("preshared_key")?;
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
        preshared_key: preshared_key != 0,
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("lists of strings and addresses always serialize")
}

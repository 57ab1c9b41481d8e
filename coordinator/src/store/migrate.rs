//! Applying the embedded migrations, once, even when several processes open a fresh database at the same moment
//! (the first `serve` and a CLI command such as `token create`, or replicas starting together).
//!
//! On PostgreSQL sqlx's migrator takes an advisory lock itself. On SQLite it takes none: two processes both read an
//! empty `_sqlx_migrations`, both apply migration 1, and the second fails ("table settings already exists"). So on
//! SQLite every process holds an exclusive `flock` on `<database file>.migrate-lock` (std's `File::lock`, no unsafe)
//! while it sets WAL mode and runs the migrator; the second one then finds the migrations applied and does nothing.
//! The kernel drops the lock when the holder exits, however it exits, so a crashed process never leaves it stale;
//! the file itself stays (deleting a lock file that another process may have just opened would break the exclusion).
//! In-memory databases belong to one process and need no lock.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::sqlite::SqliteConnectOptions;

use super::{Backend, POSTGRES_MIGRATIONS, Result, SQLITE_MIGRATIONS, StoreError};

/// Suffix of the lock file next to the SQLite database file.
const LOCK_SUFFIX: &str = ".migrate-lock";
/// Longest wait for another process's migration (they take milliseconds; this only bounds a hung process).
const LOCK_WAIT: Duration = Duration::from_secs(60);
const LOCK_POLL: Duration = Duration::from_millis(25);

/// Prepares the database and applies the migrations, serialized across processes (see the module doc).
pub(super) async fn run(pool: &AnyPool, backend: Backend, url: &str) -> Result<()> {
    match backend {
        Backend::Postgres => Ok(POSTGRES_MIGRATIONS.run(pool).await?),
        Backend::Sqlite => {
            let _lock = match lock_path(url) {
                Some(path) => Some(lock(&path).await?),
                None => None,
            };
            // Persistent in the file: readers never block the writer and vice versa.
            sqlx::query("PRAGMA journal_mode = WAL").execute(pool).await?;
            SQLITE_MIGRATIONS.run(pool).await?;
            Ok(())
        }
    }
}

/// The lock file of a SQLite database URL; `None` for an in-memory database.
fn lock_path(url: &str) -> Option<PathBuf> {
    let mut name = sqlite_file(url)?.into_os_string();
    name.push(LOCK_SUFFIX);
    Some(PathBuf::from(name))
}

/// The database file of a SQLite URL; `None` for an in-memory database or another backend.
pub(super) fn sqlite_file(url: &str) -> Option<PathBuf> {
    if !url.starts_with("sqlite:") {
        return None;
    }
    let options = SqliteConnectOptions::from_str(url).ok()?;
    let file = options.get_filename();
    // sqlx names in-memory databases `file:sqlx-in-memory-N`; `mode=memory` also means no file.
    let in_memory = url.contains("mode=memory") || file.to_str().is_some_and(|f| f.starts_with("file:"));
    if in_memory || file.as_os_str().is_empty() {
        return None;
    }
    Some(file.to_path_buf())
}

/// Takes the exclusive lock on `path` (created 0600 if missing), waiting up to [`LOCK_WAIT`]. Released on drop.
async fn lock(path: &Path) -> Result<File> {
    let io_error = |source| StoreError::MigrationLock {
        path: path.display().to_string(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error)?;
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(LOCK_POLL).await;
            }
            Err(TryLockError::WouldBlock) => {
                return Err(io_error(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "another process has been migrating this database for over {LOCK_WAIT:?}; check for a hung \
                         meshd-coordinator process using it"
                    ),
                )));
            }
            Err(TryLockError::Error(source)) => return Err(io_error(source)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_file_sits_next_to_the_database_file() {
        assert_eq!(
            lock_path("sqlite:///var/lib/meshd/meshd.db?mode=rwc"),
            Some(PathBuf::from("/var/lib/meshd/meshd.db.migrate-lock"))
        );
        assert_eq!(
            lock_path("sqlite://data/meshd.db"),
            Some(PathBuf::from("data/meshd.db.migrate-lock"))
        );
        assert_eq!(lock_path("sqlite::memory:"), None);
        assert_eq!(lock_path("sqlite://?mode=memory"), None);
        assert_eq!(lock_path("sqlite:x.db?mode=memory"), None);
    }

    #[tokio::test]
    async fn the_lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.migrate-lock");
        let held = lock(&path).await.expect("first lock");
        let second = File::open(&path).expect("open");
        assert!(
            matches!(second.try_lock(), Err(TryLockError::WouldBlock)),
            "held elsewhere"
        );
        drop(held);
        let again = tokio::time::timeout(Duration::from_secs(5), lock(&path)).await;
        assert!(again.expect("in time").is_ok(), "free after drop");
    }
}

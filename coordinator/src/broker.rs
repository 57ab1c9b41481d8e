//! Fan-out of committed changes to the map streams of this process, and across replicas.
//!
//! One task per process reads the change log after the last version it has seen and broadcasts each change,
//! serialized once ([`ChangeEvent`]), on a `tokio::sync::broadcast` channel of `Arc`s: a stream's cost per change is
//! one `Arc` clone and one write of shared bytes, O(1) whatever the size of the network (Headscale recomputes every
//! node's map per change; we do not). The database is the source of truth, not the channel:
//! - a writer in this process wakes the task after commit ([`crate::store::Store::change_notify`]);
//! - on PostgreSQL every writer (in any coordinator process on the database) also sends `NOTIFY meshd_changes`, and
//!   this task `LISTEN`s, so a change committed by another replica reaches the streams here;
//! - a slow poll ([`POLL_INTERVAL`]) catches anything else: a `meshd-coordinator` CLI command writing to SQLite,
//!   a notification lost while the listener reconnected.
//!
//! Versions are read in commit order (see `store` on why), so "everything after the last version seen" misses nothing.
//! A stream that falls behind by more than [`CHANNEL_CAPACITY`] events gets `Lagged` and resyncs with a full map
//! rather than slowing the others. The task also prunes the change log to the newest `keep` entries.
//!
//! The broker also keeps every node's current map entry, serialized ([`MapCache`]), updated from the same change
//! rows before each broadcast: streams build full maps from it without a database query.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::mapcache::MapCache;
use crate::netmap::ChangeEvent;
use crate::store::{Backend, PG_CHANGES_CHANNEL, Store};

/// Events buffered per stream before a slow stream is told it lagged (and resyncs with a full map).
pub const CHANNEL_CAPACITY: usize = 1024;
/// Safety-net poll of the change log (cross-process writes on SQLite; missed notifications).
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Changes read per query.
const BATCH: i64 = 512;
/// Pause before retrying after a database error.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// The fan-out hub. Subscribe before reading a map's version: every change above that version is then delivered.
pub struct Broker {
    tx: broadcast::Sender<Arc<ChangeEvent>>,
    /// Last version broadcast.
    seen: AtomicU64,
    /// Every node's map entry at (at least) version `seen`.
    cache: MapCache,
    /// Told after every batch broadcast.
    advanced: Notify,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("seen", &self.seen.load(Ordering::Relaxed))
            .finish()
    }
}

impl Broker {
    /// Starts the broker task (and on PostgreSQL its listener); both stop with `shutdown`.
    pub async fn start(
        store: Store,
        keep_changes: u64,
        shutdown: CancellationToken,
    ) -> crate::store::Result<Arc<Self>> {
        let (tx, _) = broadcast::channel(CHANNEL_CAPACITY);
        let start = store.current_version().await?;
        let nodes = store.nodes().await?;
        let broker = Arc::new(Self {
            tx,
            seen: AtomicU64::new(start),
            cache: MapCache::new(start, &nodes),
            advanced: Notify::new(),
        });
        let wake = store.change_notify();
        if store.backend() == Backend::Postgres {
            tokio::spawn(listen_postgres(store.url().to_string(), wake.clone(), shutdown.clone()));
        }
        tokio::spawn(run(broker.clone(), store, wake, keep_changes, shutdown));
        Ok(broker)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ChangeEvent>> {
        self.tx.subscribe()
    }

    /// The current map entries (subscribe first, then read: every change above the cache's version then arrives).
    pub fn cache(&self) -> &MapCache {
        &self.cache
    }

    /// Waits (at most `timeout`) until the cache reflects `version`: a stream about to send a full map waits for
    /// what was committed before it asked (its own online change, an admin's rename a moment ago). False on timeout.
    pub async fn wait_for(&self, version: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let advanced = self.advanced.notified();
            tokio::pin!(advanced);
            advanced.as_mut().enable();
            if self.cache.version() >= version {
                return true;
            }
            if tokio::time::timeout_at(deadline, advanced).await.is_err() {
                return false;
            }
        }
    }

    /// Last version broadcast by this process.
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::Acquire)
    }

    /// Reads and broadcasts every change after the last one seen.
    async fn catch_up(&self, store: &Store) -> crate::store::Result<usize> {
        let mut sent = 0;
        loop {
            let after = self.seen();
            let batch = store.changes_after(after, BATCH).await?;
            let n = batch.len();
            for change in &batch {
                self.cache.apply(change);
                let event = Arc::new(ChangeEvent::new(change));
                self.seen.store(event.version, Ordering::Release);
                // No receivers is fine: no stream is open.
                let _ = self.tx.send(event);
            }
            sent += n;
            if n > 0 {
                self.advanced.notify_waiters();
            }
            if (n as i64) < BATCH {
                return Ok(sent);
            }
        }
    }
}

async fn run(broker: Arc<Broker>, store: Store, wake: Arc<Notify>, keep: u64, shutdown: CancellationToken) {
    let mut since_prune = 0usize;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(POLL_INTERVAL) => {}
        }
        match broker.catch_up(&store).await {
            Ok(n) => since_prune += n,
            Err(e) => {
                tracing::warn!(error = %e, "broker could not read the change log; retrying");
                tokio::time::sleep(RETRY_DELAY).await;
                wake.notify_one();
                continue;
            }
        }
        // Pruning costs a write: do it once per `keep / 8` changes seen, not per change.
        if since_prune as u64 >= (keep / 8).max(1) {
            since_prune = 0;
            match store.prune_changes(keep).await {
                Ok(mark) => tracing::debug!(pruned_through = mark, "change log pruned"),
                Err(e) => tracing::warn!(error = %e, "could not prune the change log"),
            }
        }
    }
}

/// On PostgreSQL: wakes the broker on every `NOTIFY meshd_changes` from any coordinator process on the database.
async fn listen_postgres(url: String, wake: Arc<Notify>, shutdown: CancellationToken) {
    loop {
        let listener = listen_once(&url, &wake);
        tokio::select! {
            () = shutdown.cancelled() => return,
            result = listener => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "lost the PostgreSQL change listener; changes of other replicas arrive by polling until it reconnects");
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn listen_once(url: &str, wake: &Notify) -> Result<(), sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect(url).await?;
    listener.listen(PG_CHANGES_CHANNEL).await?;
    tracing::debug!("listening for changes of other coordinator replicas");
    // Catch up on anything committed while we were not listening.
    wake.notify_one();
    loop {
        listener.recv().await?;
        wake.notify_one();
    }
}

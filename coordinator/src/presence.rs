//! Presence: which nodes have a map stream open here, and when that becomes an `online`/`offline` change.
//!
//! Every online or offline change is one delta to *every* stream, so presence is the control plane's N x N path: a
//! restart of the coordinator, or a network blip that drops many nodes at once, used to be N offline changes then N
//! online changes, each fanned out to N streams (10^8 messages at 10,000 nodes), plus one serialized write
//! transaction per stream open and close. Here:
//! - stream opens and closes are counted in memory (no database write on the request path);
//! - a node whose last stream closes stays online for a grace period ([`Presence::grace`]): one that reconnects
//!   within it (a flaky link, an agent restart, a coordinator restart) never goes offline, and nobody hears of it;
//! - at start-up, nodes the database still shows online (the previous process's streams) are held online for the same
//!   grace instead of being reset at once, plus [`RESTART_HOLD_PER_NODE`] for each of them: all of them reconnect at
//!   once, and that storm (a TLS handshake and a credential lookup each) takes time proportional to their number. A
//!   restart then costs no change at all for nodes that come back in time; one that holds them too briefly turns the
//!   storm into K offline and K online changes to K streams (K^2 messages) exactly when the process is busiest;
//! - the transitions that remain are written in batches: one write transaction per [`FLUSH_INTERVAL`] however many
//!   nodes came or went, and the broker then fans the batch out together.
//!
//! The database column `online_streams` now holds 1 (online) or 0; the counts live here. Presence is per process: with
//! several replicas on one PostgreSQL database this still needs per-replica presence with expiry (see
//! ARCHITECTURE.md, known limits).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshd_protocol::NodeId;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// How often pending transitions are written (and the longest a new stream waits to be seen online by its peers).
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// Default grace before a node without a stream is marked offline.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);
/// Extra start-up hold per node that was online before a restart (10,000 nodes: +10 s; measured: 10,000 streams were
/// back within 3.2 s on two cores), bounded by [`RESTART_HOLD_MAX`].
pub const RESTART_HOLD_PER_NODE: Duration = Duration::from_millis(1);
pub const RESTART_HOLD_MAX: Duration = Duration::from_secs(120);
/// Pause before retrying a failed write.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// The presence tracker of this process; cheap to share.
pub struct Presence {
    state: Mutex<State>,
    /// Wakes the writer task.
    wake: Notify,
    /// Told after every write (streams waiting for their node to be online).
    flushed: Notify,
    grace: Duration,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence").field("grace", &self.grace).finish()
    }
}

#[derive(Default)]
struct State {
    nodes: HashMap<NodeId, Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Streams open in this process.
    streams: u32,
    /// What the database (and so every map) says.
    online: bool,
    /// When a node without streams is to be marked offline.
    offline_at: Option<Instant>,
}

/// Transitions to write.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    pub online: Vec<NodeId>,
    pub offline: Vec<NodeId>,
}

impl Presence {
    /// A tracker that holds `previously_online` (what the database says at start-up) online for `grace` plus
    /// [`RESTART_HOLD_PER_NODE`] each, and the task that writes transitions; the task stops with `shutdown`.
    pub fn start(
        store: Store,
        previously_online: Vec<NodeId>,
        grace: Duration,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let presence = Arc::new(Self::new(previously_online, grace, Instant::now()));
        tokio::spawn(write_transitions(presence.clone(), store, shutdown));
        presence
    }

    fn new(previously_online: Vec<NodeId>, grace: Duration, now: Instant) -> Self {
        let count = u32::try_from(previously_online.len()).unwrap_or(u32::MAX);
        let hold = grace + (RESTART_HOLD_PER_NODE * count).min(RESTART_HOLD_MAX);
        let nodes = previously_online
            .into_iter()
            .map(|id| {
                let entry = Entry {
                    streams: 0,
                    online: true,
                    offline_at: Some(now + hold),
                };
                (id, entry)
            })
            .collect();
        Self {
            state: Mutex::new(State { nodes }),
            wake: Notify::new(),
            flushed: Notify::new(),
            grace,
        }
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A map stream of `id` opened.
    pub fn connected(&self, id: NodeId) {
        let mut state = self.lock();
        let entry = state.nodes.entry(id).or_insert(Entry {
            streams: 0,
            online: false,
            offline_at: None,
        });
        entry.streams += 1;
        entry.offline_at = None;
        if !entry.online {
            self.wake.notify_one();
        }
    }

    /// A map stream of `id` closed.
    pub fn disconnected(&self, id: NodeId, now: Instant) {
        let mut state = self.lock();
        if let Some(entry) = state.nodes.get_mut(&id) {
            entry.streams = entry.streams.saturating_sub(1);
            if entry.streams == 0 {
                entry.offline_at = Some(now + self.grace);
                self.wake.notify_one();
            }
        }
    }

    /// Whether the database (and so every map) shows `id` online.
    pub fn is_online(&self, id: NodeId) -> bool {
        self.lock().nodes.get(&id).is_some_and(|e| e.online)
    }

    /// Waits (at most `timeout`) until `id` is online in the database: a stream sends its first message only then,
    /// so the node's peers, the admin API and the metrics agree with what the node sees.
    pub async fn wait_online(&self, id: NodeId, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let written = self.flushed.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            if self.is_online(id) {
                return;
            }
            if tokio::time::timeout_at(deadline, written).await.is_err() {
                return;
            }
        }
    }

    /// Streams open for `id` in this process.
    pub fn streams(&self, id: NodeId) -> u32 {
        self.lock().nodes.get(&id).map_or(0, |e| e.streams)
    }

    /// The transitions due at `now`: nodes with a stream not yet online, nodes without one past their grace.
    pub fn due(&self, now: Instant) -> Due {
        let state = self.lock();
        let mut due = Due::default();
        for (id, entry) in &state.nodes {
            if entry.streams > 0 && !entry.online {
                due.online.push(*id);
            } else if entry.streams == 0 && entry.online && entry.offline_at.is_some_and(|at| at <= now) {
                due.offline.push(*id);
            }
        }
        due.online.sort_unstable();
        due.offline.sort_unstable();
        due
    }

    /// Records that `due` was written; forgets nodes that are offline without streams.
    pub fn written(&self, due: &Due) {
        let mut state = self.lock();
        for id in &due.online {
            if let Some(entry) = state.nodes.get_mut(id) {
                entry.online = true;
            }
        }
        for id in &due.offline {
            if let Some(entry) = state.nodes.get_mut(id) {
                entry.online = false;
            }
        }
        state.nodes.retain(|_, e| e.streams > 0 || e.online);
    }

    /// The earliest pending offline deadline.
    fn next_deadline(&self) -> Option<Instant> {
        self.lock()
            .nodes
            .values()
            .filter(|e| e.streams == 0 && e.online)
            .filter_map(|e| e.offline_at)
            .min()
    }
}

/// Writes due transitions in batches until shutdown. (At shutdown nothing is written: the streams' nodes stay online
/// in the database and the next start holds them for the grace period.)
async fn write_transitions(presence: Arc<Presence>, store: Store, shutdown: CancellationToken) {
    loop {
        let sleep_until = presence
            .next_deadline()
            .map_or(tokio::time::Instant::now() + Duration::from_secs(3600), |at| at.into());
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = presence.wake.notified() => {}
            () = tokio::time::sleep_until(sleep_until) => {}
        }
        // Let the streams that open together be written together.
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(FLUSH_INTERVAL) => {}
        }
        let due = presence.due(Instant::now());
        if due.online.is_empty() && due.offline.is_empty() {
            continue;
        }
        match store.set_presence(&due.online, &due.offline).await {
            Ok(()) => {
                tracing::debug!(
                    online = due.online.len(),
                    offline = due.offline.len(),
                    "presence written"
                );
                presence.written(&due);
                presence.flushed.notify_waiters();
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not write presence; retrying");
                tokio::time::sleep(RETRY_DELAY).await;
                presence.wake.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quick_reconnect_is_no_change() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(5);
        let p = Presence::new(vec![], grace, t0);
        p.connected(1);
        assert_eq!(p.due(t0).online, vec![1]);
        p.written(&p.due(t0));
        assert_eq!(p.due(t0), Due::default());
        p.disconnected(1, t0);
        assert_eq!(
            p.due(t0 + Duration::from_secs(1)),
            Due::default(),
            "held online during the grace"
        );
        p.connected(1);
        assert_eq!(
            p.due(t0 + Duration::from_secs(10)),
            Due::default(),
            "came back: no change at all"
        );
        p.disconnected(1, t0 + Duration::from_secs(10));
        assert_eq!(p.due(t0 + Duration::from_secs(16)).offline, vec![1]);
        p.written(&p.due(t0 + Duration::from_secs(16)));
        assert_eq!(p.streams(1), 0);
        assert!(p.lock().nodes.is_empty(), "offline nodes without streams are forgotten");
    }

    #[test]
    fn two_streams_of_one_node_and_start_up_grace() {
        let t0 = Instant::now();
        let p = Presence::new(vec![7, 8], Duration::from_secs(5), t0);
        assert_eq!(p.due(t0), Due::default(), "held online after a restart");
        p.connected(7);
        p.connected(7);
        p.disconnected(7, t0);
        let due = p.due(t0 + Duration::from_secs(6));
        assert_eq!(due.offline, vec![8], "7 still has a stream; 8 never came back");
        assert!(due.online.is_empty(), "7 was online all along");
    }
}

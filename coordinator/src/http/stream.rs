//! The map stream: `GET /api/v1/map`, one long-lived Server-Sent Events response per node.
//!
//! Why SSE: the map flows one way (coordinator -> node; the node's few writes are ordinary requests), SSE is plain
//! HTTP/1.1 that passes proxies and TLS terminators untouched, and resuming is built in: every event carries the
//! map version as its `id`, and a reconnecting client sends `Last-Event-ID` (or `?since=V`). WebSocket would add a
//! second framing and an upgrade that some proxies block, for a return channel we do not need.
//!
//! Each event is named `map` ([`meshd_protocol::paths::MAP_EVENT`]), its `data` is a JSON
//! [`meshd_protocol::MapMessage`]. The first message is a `full` map, or, when the node resumes from a version the
//! change log still covers, only what it missed (the newest change per node). Then deltas as they commit, each the
//! same shared bytes for every stream (see [`crate::netmap`]). A stream that lags behind the broker resyncs with a
//! full map. The node is online while at least one of its streams is open. Its own deletion ends its stream.
//! Keep-alive comments every [`KEEP_ALIVE`] keep idle proxies from closing the connection and reveal dead peers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use meshd_protocol::api::ErrorBody;
use meshd_protocol::paths::MAP_EVENT;
use meshd_protocol::{MapMessage, NodeId};
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use utoipa::IntoParams;

use super::AppState;
use super::extract::{ApiQuery, NodeAuth};
use crate::error::ApiError;
use crate::netmap::{self, ChangeEvent};
use crate::store::StoreError;
use crate::telemetry;

/// Interval of SSE keep-alive comments.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events queued per stream between the stream task and the HTTP body; a slow client back-pressures the task,
/// which then lags on the broadcast channel and resyncs.
const QUEUE: usize = 32;

#[derive(Debug, Deserialize, IntoParams)]
pub struct MapQuery {
    /// Last map version the node applied; the stream then starts with what it missed (or a full map if that is too
    /// old). The `Last-Event-ID` header does the same; this parameter wins when both are present.
    pub since: Option<u64>,
}

/// Follow this node's network map (Server-Sent Events).
#[utoipa::path(
    get, path = "/api/v1/map", tag = "node",
    params(MapQuery),
    security(("node" = [])),
    responses(
        (status = 200, description = "An SSE stream of events named `map` whose id is the version and whose data is a MapMessage: first a full map (or the missed deltas), then deltas", content_type = "text/event-stream", body = MapMessage),
        (status = 400, description = "Bad query string", body = ErrorBody),
        (status = 401, description = "Invalid node credential", body = ErrorBody),
    )
)]
pub async fn map(
    State(state): State<AppState>,
    node: NodeAuth,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<MapQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let since = query.since.or_else(|| {
        headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    // Subscribe before reading anything: every change above the version we start from then reaches us.
    let changes = state.broker.subscribe();
    state.store.stream_connected(node.node_id).await?;
    let (tx, rx) = mpsc::channel(QUEUE);
    let session = StreamSession {
        state: state.clone(),
        node_id: node.node_id,
        secret_hash: node.secret_hash,
        tx,
    };
    tokio::spawn(session.run(changes, since));
    Ok(Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// One node's stream: the task that feeds the HTTP body.
struct StreamSession {
    state: AppState,
    node_id: NodeId,
    /// Hash of the credential the stream was opened with.
    secret_hash: [u8; 32],
    tx: mpsc::Sender<Result<Event, Infallible>>,
}

/// Why a stream ended.
#[derive(Debug)]
enum End {
    ClientGone,
    NodeDeleted,
    CredentialReplaced,
    Shutdown,
    Store(StoreError),
}

impl From<StoreError> for End {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl StreamSession {
    async fn run(self, changes: broadcast::Receiver<Arc<ChangeEvent>>, since: Option<u64>) {
        metrics::gauge!(telemetry::MAP_STREAMS).increment(1.0);
        tracing::info!(node = self.node_id, ?since, "map stream opened");
        let end = self.serve(changes, since).await;
        metrics::gauge!(telemetry::MAP_STREAMS).decrement(1.0);
        match &end {
            End::Store(e) => tracing::warn!(node = self.node_id, error = %e, "map stream ended by a database error"),
            other => tracing::info!(node = self.node_id, reason = ?other, "map stream closed"),
        }
        if !matches!(end, End::NodeDeleted)
            && let Err(e) = self.state.store.stream_disconnected(self.node_id).await
        {
            tracing::warn!(node = self.node_id, error = %e, "could not mark the node offline");
        }
    }

    async fn serve(&self, mut changes: broadcast::Receiver<Arc<ChangeEvent>>, since: Option<u64>) -> End {
        let mut last_sent = match self.start(since).await {
            Ok(version) => version,
            Err(end) => return end,
        };
        loop {
            let received = tokio::select! {
                () = self.state.shutdown.cancelled() => return End::Shutdown,
                () = self.tx.closed() => return End::ClientGone,
                received = changes.recv() => received,
            };
            match received {
                Ok(event) => {
                    if event.version <= last_sent {
                        continue; // already covered by the map or replay we started with
                    }
                    let Some(json) = event.for_viewer(self.node_id) else {
                        return End::NodeDeleted;
                    };
                    // A change about this node may be a re-join that replaced its credential: a stream opened with
                    // the old one must end, as any later request with it fails. Checked only on changes about the
                    // node itself, so a peer's change still costs this stream nothing but the write.
                    if event.node_id == self.node_id && !self.credential_still_valid().await {
                        return End::CredentialReplaced;
                    }
                    if let Err(end) = self.send(event.version, json).await {
                        return end;
                    }
                    last_sent = event.version;
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(node = self.node_id, missed, "map stream lagged; resending the full map");
                    match self.send_full().await {
                        Ok(version) => last_sent = version,
                        Err(end) => return end,
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return End::Shutdown,
            }
        }
    }

    /// Sends the missed changes when `since` is still covered by the log, else a full map. Returns the version the
    /// node is at afterwards.
    async fn start(&self, since: Option<u64>) -> Result<u64, End> {
        let store = &self.state.store;
        if let Some(since) = since {
            let pruned = store.pruned_through().await?;
            let current = store.current_version().await?;
            if since >= pruned && since <= current {
                let mut version = since;
                for change in store.missed_changes(since).await? {
                    let event = ChangeEvent::new(&change);
                    let Some(json) = event.for_viewer(self.node_id) else {
                        return Err(End::NodeDeleted);
                    };
                    self.send(event.version, json).await?;
                    version = version.max(event.version);
                }
                // Every committed change above `since` was in the replay (versions commit in order), so the
                // broadcast only needs to bring what is above the newest one replayed.
                return Ok(version);
            }
            tracing::debug!(
                node = self.node_id,
                since,
                pruned,
                current,
                "resume point not covered; sending a full map"
            );
        }
        self.send_full().await
    }

    async fn credential_still_valid(&self) -> bool {
        match self.state.store.node_credential_hash(self.node_id).await {
            Ok(Some(Some(hash))) => crate::secrets::hash_matches(&self.secret_hash, &hash),
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(node = self.node_id, error = %e, "could not re-check the node credential; keeping the stream");
                true
            }
        }
    }

    async fn send_full(&self) -> Result<u64, End> {
        let store = &self.state.store;
        // Version first, then the nodes: the map may already include changes above `version`; they are sent again
        // as deltas, which is harmless (deltas carry whole nodes, applying one twice changes nothing).
        let version = store.current_version().await?;
        let nodes = store.nodes().await?;
        let Some(map) = netmap::full_map(version, self.state.network, self.node_id, &nodes) else {
            return Err(End::NodeDeleted);
        };
        let json = netmap::to_json(&MapMessage::Full { map });
        self.send(version, &json).await?;
        Ok(version)
    }

    async fn send(&self, version: u64, json: &Arc<str>) -> Result<(), End> {
        let event = Event::default().event(MAP_EVENT).id(version.to_string()).data(&**json);
        tokio::select! {
            () = self.state.shutdown.cancelled() => Err(End::Shutdown),
            sent = self.tx.send(Ok(event)) => {
                sent.map_err(|_| End::ClientGone)?;
                metrics::counter!(telemetry::MAP_UPDATES).increment(1);
                Ok(())
            }
        }
    }
}

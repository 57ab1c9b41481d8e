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
//! full map. The node is online while at least one of its streams is open (and for a grace period after the last one
//! closes, see [`crate::presence`]). Its own deletion ends its stream.
//! Keep-alive comments every [`KEEP_ALIVE`] keep idle proxies from closing the connection and reveal dead peers.
//!
//! Cost per stream, which is what decides how many nodes one coordinator serves (see `meshd-loadgen`):
//! - the connection: the listener serves map-stream requests itself ([`serve_raw`], see [`super::serve`]): rustls,
//!   one task and a small queue per stream, no hyper connection (the router's [`map`] handler serves the same
//!   stream to requests the listener leaves to hyper);
//! - opening: one credential lookup; the full map comes from the broker's [`crate::mapcache::MapCache`], and a resume
//!   from the newest version needs no query at all;
//! - per change: the same pre-built SSE bytes for every stream ([`ChangeEvent::frame_for_viewer`]); changes that
//!   arrive together (a batch of presence changes) are written as one chunk.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use meshd_protocol::api::ErrorBody;
use meshd_protocol::{MapMessage, NodeId};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use utoipa::IntoParams;

use super::AppState;
use super::extract::{ApiQuery, NodeAuth};
use crate::error::ApiError;
use crate::netmap::{self, ChangeEvent};
use crate::presence::Presence;
use crate::store::StoreError;
use crate::telemetry;

/// Interval of SSE keep-alive comments.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Chunks queued per stream between the stream task and the HTTP body; a slow client back-pressures the task,
/// which then lags on the broadcast channel and resyncs.
const QUEUE: usize = 32;
/// Most changes written as one chunk.
const MAX_BATCH: usize = 256;
/// Longest a new stream waits for its node to be written online before its first message.
const ONLINE_WAIT: Duration = Duration::from_secs(2);
/// Longest a new stream waits for the broker to learn of a node that just joined.
const JOIN_WAIT: Duration = Duration::from_secs(5);
const KEEP_ALIVE_COMMENT: &[u8] = b":\n\n";

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
) -> Result<Response, ApiError> {
    let since = query.since.or_else(|| {
        headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    let rx = open(&state, node, since);
    let mut response = Body::from_stream(ReceiverStream::new(rx)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// Starts the session of an authenticated stream; the receiver yields its chunks, dropping it ends the session.
fn open(state: &AppState, node: NodeAuth, since: Option<u64>) -> mpsc::Receiver<Result<Bytes, Infallible>> {
    // Subscribe before reading anything: every change above the version we start from then reaches us.
    let changes = state.broker.subscribe();
    state.presence.connected(node.node_id);
    let connection = Connected {
        presence: state.presence.clone(),
        node_id: node.node_id,
    };
    let (tx, rx) = mpsc::channel(QUEUE);
    let session = StreamSession {
        state: state.clone(),
        node_id: node.node_id,
        secret_hash: node.secret_hash,
        tx,
    };
    tokio::spawn(session.run(changes, since, connection));
    rx
}

/// A map-stream request as the listener ([`super::serve`]) read it off the connection: `GET /api/v1/map` over
/// HTTP/1.1 with no body and no upgrade. Anything else is left to hyper and the router.
#[derive(Debug)]
pub struct MapRequest {
    authorization: Option<String>,
    /// `?since=`; an unparsable value is a 400, as through the router.
    since: Result<Option<u64>, String>,
    last_event_id: Option<u64>,
}

impl MapRequest {
    /// Recognizes a complete map-stream request head.
    pub fn parse(head: &[u8]) -> Option<Self> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(_)) = request.parse(head) else {
            return None;
        };
        if request.method != Some("GET") || request.version != Some(1) {
            return None;
        }
        let target = request.path?;
        let (path, query) = target.split_once('?').map_or((target, None), |(p, q)| (p, Some(q)));
        if path != meshd_protocol::paths::MAP {
            return None;
        }
        let mut parsed = Self {
            authorization: None,
            since: Ok(None),
            last_event_id: None,
        };
        for h in request.headers.iter() {
            let value = std::str::from_utf8(h.value).ok().map(str::trim);
            let name = h.name;
            if name.eq_ignore_ascii_case("authorization") {
                parsed.authorization = value.map(str::to_string);
            } else if name.eq_ignore_ascii_case("last-event-id") {
                parsed.last_event_id = value.and_then(|v| v.parse().ok());
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                || name.eq_ignore_ascii_case("upgrade")
                || name.eq_ignore_ascii_case("expect")
                || (name.eq_ignore_ascii_case("content-length") && value != Some("0"))
            {
                return None;
            }
        }
        for pair in query.unwrap_or("").split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if key == "since" {
                parsed.since = value
                    .parse()
                    .map(Some)
                    .map_err(|e| format!("Failed to deserialize query string: since: {e}"));
            }
        }
        Some(parsed)
    }
}

/// Serves a map stream on a connection of its own (see [`super::serve`] for why not through hyper): the same
/// authentication, resume and session as [`map`], written as an HTTP/1.1 chunked response straight to `io`.
pub async fn serve_raw<IO>(mut io: IO, request: MapRequest, state: AppState)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let started = Instant::now();
    let authenticated = match request.since {
        Err(message) => Err(ApiError::bad_request(message)),
        Ok(since) => NodeAuth::check(request.authorization.as_deref(), &state)
            .await
            .map(|node| (node, since.or(request.last_event_id))),
    };
    let (node, since) = match authenticated {
        Ok(opened) => opened,
        Err(e) => {
            let response = e.into_response();
            record_request(started, response.status().as_u16());
            let _ = tokio::time::timeout(RAW_WRITE_TIMEOUT, write_response(&mut io, response)).await;
            return;
        }
    };
    let mut rx = open(&state, node, since);
    record_request(started, 200);
    let (mut reader, mut writer) = tokio::io::split(io);
    if writer.write_all(RAW_STREAM_HEAD).await.is_err() {
        return;
    }
    // Only to notice the client going away; a stream request has no body, later bytes are ignored.
    let mut probe = [0u8; 16];
    loop {
        tokio::select! {
            chunk = rx.recv() => {
                let Some(Ok(chunk)) = chunk else {
                    // The session ended (deleted node, shutdown): end the chunked body.
                    let _ = tokio::time::timeout(RAW_WRITE_TIMEOUT, async {
                        writer.write_all(b"0\r\n\r\n").await?;
                        writer.shutdown().await
                    })
                    .await;
                    return;
                };
                if write_chunk(&mut writer, &chunk).await.is_err() {
                    return;
                }
            }
            read = reader.read(&mut probe) => {
                if !matches!(read, Ok(n) if n > 0) {
                    return;
                }
            }
        }
    }
}

/// Bound on writing an error answer or the end of a stream to a client that does not read.
const RAW_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const RAW_STREAM_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
                                 transfer-encoding: chunked\r\n\r\n";
/// Chunks up to this size are written as one piece with their framing (one TLS record); larger ones (full maps)
/// in three writes, without a copy.
const SMALL_CHUNK: usize = 16 * 1024;

async fn write_chunk<W: AsyncWrite + Unpin>(writer: &mut W, chunk: &[u8]) -> std::io::Result<()> {
    let size = format!("{:x}\r\n", chunk.len());
    if chunk.len() <= SMALL_CHUNK {
        let mut framed = Vec::with_capacity(size.len() + chunk.len() + 2);
        framed.extend_from_slice(size.as_bytes());
        framed.extend_from_slice(chunk);
        framed.extend_from_slice(b"\r\n");
        writer.write_all(&framed).await?;
    } else {
        writer.write_all(size.as_bytes()).await?;
        writer.write_all(chunk).await?;
        writer.write_all(b"\r\n").await?;
    }
    writer.flush().await
}

/// Writes a complete (error) response and closes the connection.
async fn write_response<W: AsyncWrite + Unpin>(writer: &mut W, response: Response) -> std::io::Result<()> {
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        if let Ok(value) = value.to_str() {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    head.push_str(&format!("content-length: {}\r\nconnection: close\r\n\r\n", body.len()));
    writer.write_all(head.as_bytes()).await?;
    writer.write_all(&body).await?;
    writer.shutdown().await
}

/// The request metric the router's middleware records for every other route.
fn record_request(started: Instant, status: u16) {
    metrics::histogram!(
        telemetry::HTTP_DURATION,
        "method" => "GET",
        "route" => meshd_protocol::paths::MAP,
        "status" => status.to_string()
    )
    .record(started.elapsed().as_secs_f64());
}

/// A counted open stream; dropping it tells presence the stream closed.
struct Connected {
    presence: Arc<Presence>,
    node_id: NodeId,
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.presence.disconnected(self.node_id, Instant::now());
    }
}

/// One node's stream: the task that feeds the HTTP body.
struct StreamSession {
    state: AppState,
    node_id: NodeId,
    /// Hash of the credential the stream was opened with.
    secret_hash: [u8; 32],
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
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
    async fn run(self, changes: broadcast::Receiver<Arc<ChangeEvent>>, since: Option<u64>, connection: Connected) {
        metrics::gauge!(telemetry::MAP_STREAMS).increment(1.0);
        tracing::info!(node = self.node_id, ?since, "map stream opened");
        let end = self.serve(changes, since).await;
        metrics::gauge!(telemetry::MAP_STREAMS).decrement(1.0);
        match &end {
            End::Store(e) => tracing::warn!(node = self.node_id, error = %e, "map stream ended by a database error"),
            other => tracing::info!(node = self.node_id, reason = ?other, "map stream closed"),
        }
        drop(connection);
    }

    async fn serve(&self, mut changes: broadcast::Receiver<Arc<ChangeEvent>>, since: Option<u64>) -> End {
        self.state.presence.wait_online(self.node_id, ONLINE_WAIT).await;
        let mut last_sent = match self.start(since).await {
            Ok(version) => version,
            Err(end) => return end,
        };
        let keep_alive = tokio::time::sleep(KEEP_ALIVE);
        tokio::pin!(keep_alive);
        loop {
            let received = tokio::select! {
                () = self.state.shutdown.cancelled() => return End::Shutdown,
                () = self.tx.closed() => return End::ClientGone,
                () = &mut keep_alive => {
                    if let Err(end) = self.send(Bytes::from_static(KEEP_ALIVE_COMMENT), 0).await {
                        return end;
                    }
                    keep_alive.as_mut().reset(tokio::time::Instant::now() + KEEP_ALIVE);
                    continue;
                }
                received = changes.recv() => received,
            };
            // Take everything already queued with it: one write for a batch.
            let mut batch = Vec::new();
            let mut next = Some(received);
            while let Some(received) = next.take() {
                match received {
                    Ok(event) => {
                        if event.version > last_sent {
                            let Some(frame) = event.frame_for_viewer(self.node_id) else {
                                return End::NodeDeleted;
                            };
                            // A change about this node may be a re-join that replaced its credential: a stream
                            // opened with the old one must end, as any later request with it fails. Checked only on
                            // changes about the node itself, so a peer's change costs this stream only the write.
                            if event.node_id == self.node_id && !self.credential_still_valid().await {
                                return End::CredentialReplaced;
                            }
                            batch.push(frame.clone());
                            last_sent = event.version;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(node = self.node_id, missed, "map stream lagged; resending the full map");
                        // The full map covers everything queued before it.
                        batch.clear();
                        match self.send_full().await {
                            Ok(version) => last_sent = version,
                            Err(end) => return end,
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return End::Shutdown,
                }
                if batch.len() < MAX_BATCH {
                    next = match changes.try_recv() {
                        Ok(event) => Some(Ok(event)),
                        Err(broadcast::error::TryRecvError::Lagged(n)) => {
                            Some(Err(broadcast::error::RecvError::Lagged(n)))
                        }
                        Err(broadcast::error::TryRecvError::Empty) => None,
                        Err(broadcast::error::TryRecvError::Closed) => Some(Err(broadcast::error::RecvError::Closed)),
                    };
                }
            }
            if batch.is_empty() {
                continue;
            }
            let count = batch.len() as u64;
            let chunk = if batch.len() == 1 {
                batch.swap_remove(0)
            } else {
                let mut joined = BytesMut::with_capacity(batch.iter().map(Bytes::len).sum());
                for frame in &batch {
                    joined.extend_from_slice(frame);
                }
                joined.freeze()
            };
            if let Err(end) = self.send(chunk, count).await {
                return end;
            }
            keep_alive.as_mut().reset(tokio::time::Instant::now() + KEEP_ALIVE);
        }
    }

    /// Sends the missed changes when `since` is still covered by the log, else a full map. Returns the version the
    /// node is at afterwards.
    async fn start(&self, since: Option<u64>) -> Result<u64, End> {
        let store = &self.state.store;
        if let Some(since) = since.filter(|since| *since >= self.state.full_map_before) {
            // Resuming from the newest version (a reconnect, even across a coordinator restart, when nothing changed
            // meanwhile): nothing was missed, and everything newer arrives through the subscription.
            if since == self.state.broker.cache().version() {
                return Ok(since);
            }
            let pruned = store.pruned_through().await?;
            let current = store.current_version().await?;
            if since >= pruned && since <= current {
                let mut version = since;
                for change in store.missed_changes(since).await? {
                    let event = ChangeEvent::new(&change);
                    let Some(frame) = event.frame_for_viewer(self.node_id) else {
                        return Err(End::NodeDeleted);
                    };
                    self.send(frame.clone(), 1).await?;
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

    /// Sends the full map from the broker's cache, once the cache has caught up with the change log (the broker reads it
    /// right after each commit). A node missing from it then is gone (checked against the database).
    async fn send_full(&self) -> Result<u64, End> {
        // Read-your-writes: the map includes everything committed before it was asked for.
        let committed = self.state.store.current_version().await?;
        if !self.state.broker.wait_for(committed, JOIN_WAIT).await {
            tracing::warn!(
                node = self.node_id,
                committed,
                "the broker is behind the change log; sending an older map"
            );
        }
        let cache = self.state.broker.cache();
        let deadline = Instant::now() + JOIN_WAIT;
        loop {
            if let Some((version, json)) = cache.full_map_json(self.node_id, self.state.network, &self.state.dns) {
                self.send(netmap::sse_frame(version, &json), 1).await?;
                return Ok(version);
            }
            if Instant::now() > deadline || self.state.store.node_credential_hash(self.node_id).await?.is_none() {
                return Err(End::NodeDeleted);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Queues a chunk of `events` map events (0 for a keep-alive comment) for the HTTP body.
    async fn send(&self, chunk: Bytes, events: u64) -> Result<(), End> {
        tokio::select! {
            () = self.state.shutdown.cancelled() => Err(End::Shutdown),
            sent = self.tx.send(Ok(chunk)) => {
                sent.map_err(|_| End::ClientGone)?;
                if events > 0 {
                    metrics::counter!(telemetry::MAP_UPDATES).increment(events);
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MapRequest;

    #[test]
    fn only_plain_map_stream_requests_take_the_lean_path() {
        let ok = MapRequest::parse(
            b"GET /api/v1/map?since=7 HTTP/1.1\r\nhost: x\r\nAuthorization: Bearer abc\r\nLast-Event-ID: 5\r\n\r\n",
        )
        .expect("a map stream request");
        assert_eq!(ok.authorization.as_deref(), Some("Bearer abc"));
        assert_eq!(ok.since, Ok(Some(7)));
        assert_eq!(ok.last_event_id, Some(5));
        let bad_since = MapRequest::parse(b"GET /api/v1/map?since=-3 HTTP/1.1\r\n\r\n").expect("parsed");
        assert!(bad_since.since.is_err(), "answered 400 like the router does");
        for other in [
            &b"GET /api/v1/map HTTP/1.0\r\n\r\n"[..],
            b"POST /api/v1/map HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}",
            b"GET /api/v1/mapx HTTP/1.1\r\n\r\n",
            b"GET /api/v1/relay HTTP/1.1\r\n\r\n",
            b"GET /api/v1/map HTTP/1.1\r\nUpgrade: meshd-relay\r\n\r\n",
            b"GET /api/v1/map HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"GET /api/v1/map HTTP/1.1\r\nhost: x\r\n",
        ] {
            assert!(MapRequest::parse(other).is_none(), "{}", String::from_utf8_lossy(other));
        }
    }
}

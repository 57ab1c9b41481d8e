//! The relay client: one long-lived connection to the coordinator's relay (`GET /api/v1/relay` upgraded to
//! `meshd-relay`, design section 4) that carries WireGuard and disco datagrams for peers no direct path reaches.
//!
//! Owns: opening the connection over the same pinned TLS as the control client (HTTP/1.1, [`ControlClient::for_relay`]),
//! checking the server's `ServerHello` names this node's key, moving datagrams between the relay and the data plane's
//! relay channels (the writer batches every datagram waiting into one buffer per wakeup; the reader hands `Recv`
//! frames over without ever waiting on the engine), answering the server's pings and pinging it every
//! [`PING_INTERVAL`] (the round trip is kept in [`RelayStatus`] for `meshd netcheck`/`status`), reconnecting with a
//! capped exponential backoff with jitter, and telling the data plane on every change whether the relay is up.
//!
//! Must not: look inside a datagram (they are opaque WireGuard/disco bytes), block the data plane, or stop the agent:
//! a coordinator that is away only means "no relay"; direct paths keep working.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use meshd_protocol::PublicKey;
use meshd_protocol::relay::{FRAME_HEADER_LEN, FrameHeader, MAX_DATAGRAM_LEN, RelayFrame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::agent::DataPlane;
use crate::control::{Backoff, ControlClient, ControlError};
use crate::engine::RelayDatagram;

/// How often the client pings the relay (the RTT shown by netcheck/status, and a liveness check of our own).
pub const PING_INTERVAL: Duration = Duration::from_secs(15);
/// A connection that brings nothing for this long is dead (the server pings every 30 s; we ping every 15 s and the
/// server answers): close it and reconnect.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(45);
/// Time allowed for the server's `ServerHello` after the upgrade.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most datagrams taken from the engine per writer wakeup (one write of one buffer).
const WRITE_BATCH: usize = 128;
/// Control frames (pongs, pings) waiting for the writer; a full queue drops a pong (the peer pings again).
const CONTROL_QUEUE: usize = 16;
/// Streaks of failed connects are logged at their first attempt, then every this many.
const FAILURE_LOG_EVERY: u32 = 10;
/// Read buffer of a session: many small frames arrive per read syscall.
const READ_BUFFER: usize = 64 * 1024;

/// What the relay client knows about its connection, shared with netcheck and status.
#[derive(Debug, Default)]
pub struct RelayStatus {
    connected: AtomicBool,
    /// Last ping round trip in microseconds (0: none yet on this connection).
    rtt_micros: AtomicU64,
    /// Datagrams received from the relay that the data plane's queue had no room for.
    dropped_inbound: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A snapshot of [`RelayStatus`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RelaySnapshot {
    pub connected: bool,
    /// Round trip of the last ping answered on the current connection.
    pub latency_ms: Option<f64>,
    /// Why the last connection attempt failed or the last connection ended, if it did.
    pub last_error: Option<String>,
    pub dropped_inbound: u64,
}

impl RelayStatus {
    pub fn snapshot(&self) -> RelaySnapshot {
        let rtt = self.rtt_micros.load(Ordering::Relaxed);
        RelaySnapshot {
            connected: self.connected.load(Ordering::Relaxed),
            latency_ms: (rtt > 0).then(|| rtt as f64 / 1000.0),
            last_error: self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            dropped_inbound: self.dropped_inbound.load(Ordering::Relaxed),
        }
    }

    fn set_error(&self, error: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }

    fn record_rtt(&self, rtt: Duration) {
        let micros = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
        self.rtt_micros.store(micros, Ordering::Relaxed);
    }
}

/// Why one relay session ended.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Connect(#[from] ControlError),
    #[error("the relay connection broke: {0}")]
    Io(#[from] std::io::Error),
    #[error("the relay sent no ServerHello within {0:?}")]
    NoHello(Duration),
    #[error(
        "the relay authenticated this connection as {got:?}, not as this node ({expected:?}); the coordinator is confused: report it"
    )]
    WrongKey { expected: PublicKey, got: PublicKey },
    #[error("the relay sent a bad frame: {0}")]
    Frame(String),
    #[error("the relay was silent for {0:?}")]
    Idle(Duration),
    #[error("the coordinator closed the relay connection")]
    Closed,
}

/// The relay client of a running agent.
pub struct RelayClient {
    pub client: ControlClient,
    pub credential: String,
    pub own_key: PublicKey,
    pub dataplane: Arc<dyn DataPlane>,
    pub status: Arc<RelayStatus>,
}

impl RelayClient {
    /// Connects and reconnects until `shutdown`. Returns at once (with a warning) if the data plane has no relay
    /// channels or they were already taken: there can be one relay client per data plane.
    pub async fn run(self, shutdown: CancellationToken) {
        let Some((mut outbound, inbound)) = self.dataplane.relay_channels() else {
            tracing::warn!("the data plane offers no relay channel (or it is taken); running without a relay");
            return;
        };
        let mut backoff = Backoff::new();
        let mut failures: u32 = 0;
        loop {
            // Datagrams queued while disconnected are stale (the engine sent them before it knew): drop them.
            while outbound.try_recv().is_ok() {}
            let session = tokio::select! {
                () = shutdown.cancelled() => break,
                result = self.connect() => result,
            };
            let result: Result<(), RelayError> = match session {
                Ok(stream) => {
                    if failures > 0 {
                        tracing::info!(attempts = failures + 1, "relay reconnected");
                    } else {
                        tracing::info!(url = %self.client.base_url(), "relay connected");
                    }
                    failures = 0;
                    backoff.reset();
                    self.set_connected(true);
                    self.status.set_error(None);
                    let ended = Session::new(&self.status, &inbound)
                        .run(stream, &mut outbound, &shutdown)
                        .await;
                    self.set_connected(false);
                    self.status.rtt_micros.store(0, Ordering::Relaxed);
                    match ended {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::warn!("{e}; reconnecting (direct paths keep working)");
                            Err(e)
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    if failures % FAILURE_LOG_EVERY == 1 {
                        tracing::warn!(attempt = failures, "relay unavailable: {e}; direct paths keep working");
                    } else {
                        tracing::debug!(attempt = failures, "relay unavailable: {e}");
                    }
                    Err(e)
                }
            };
            if let Err(e) = result {
                self.status.set_error(Some(e.to_string()));
            }
            let delay = backoff.next_delay();
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        self.set_connected(false);
        tracing::debug!("relay client stopped");
    }

    fn set_connected(&self, connected: bool) {
        let was = self.status.connected.swap(connected, Ordering::Relaxed);
        if was != connected {
            self.dataplane.set_relay_connected(connected);
        }
    }

    /// Opens the upgraded connection and checks the `ServerHello`.
    async fn connect(&self) -> Result<reqwest::Upgraded, RelayError> {
        let mut stream = self.client.open_relay(&self.credential).await?;
        let mut payload = Vec::new();
        let kind = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut stream, &mut payload))
            .await
            .map_err(|_| RelayError::NoHello(HELLO_TIMEOUT))??;
        match RelayFrame::decode(kind, &payload).map_err(|e| RelayError::Frame(e.to_string()))? {
            RelayFrame::ServerHello { key } if key == self.own_key => Ok(stream),
            RelayFrame::ServerHello { key } => Err(RelayError::WrongKey {
                expected: self.own_key,
                got: key,
            }),
            other => Err(RelayError::Frame(format!("expected ServerHello, got {other:?}"))),
        }
    }
}

/// Reads one frame header and payload into `payload`; returns the frame type.
async fn read_frame(stream: &mut (impl AsyncRead + Unpin), payload: &mut Vec<u8>) -> Result<u8, RelayError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match stream.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(RelayError::Closed),
        Err(e) => return Err(e.into()),
    }
    // A length above the maximum is an error: the stream cannot be resynchronised, so the session ends.
    let header = FrameHeader::parse(&header).map_err(|e| RelayError::Frame(e.to_string()))?;
    payload.resize(header.len, 0);
    stream.read_exact(payload).await?;
    Ok(header.frame_type)
}

/// One connected session: reader, writer and pinger over one stream.
struct Session<'a> {
    status: &'a RelayStatus,
    inbound: &'a mpsc::Sender<RelayDatagram>,
}

impl<'a> Session<'a> {
    fn new(status: &'a RelayStatus, inbound: &'a mpsc::Sender<RelayDatagram>) -> Self {
        Self { status, inbound }
    }

    /// Runs until the connection breaks (`Err`) or `shutdown` (`Ok`).
    async fn run<S>(
        &self,
        stream: S,
        outbound: &mut mpsc::Receiver<RelayDatagram>,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError>
    where
        S: AsyncRead + AsyncWrite + Send,
    {
        let (read, mut write) = tokio::io::split(stream);
        let mut read = BufReader::with_capacity(READ_BUFFER, read);
        let (control_tx, mut control_rx) = mpsc::channel::<Control>(CONTROL_QUEUE);
        let pings = PingTracker::default();
        let result = tokio::select! {
            () = shutdown.cancelled() => Ok(()),
            r = self.reader(&mut read, &control_tx, &pings) => r,
            r = writer(&mut write, outbound, &mut control_rx) => r,
            r = pinger(&control_tx, &pings) => r,
        };
        if result.is_ok() {
            // A clean goodbye: the server sees the TLS close and drops our registration at once.
            let _ = tokio::time::timeout(Duration::from_secs(1), write.shutdown()).await;
        }
        result
    }

    async fn reader(
        &self,
        read: &mut (impl AsyncRead + Unpin),
        control: &mpsc::Sender<Control>,
        pings: &PingTracker,
    ) -> Result<(), RelayError> {
        let mut payload = Vec::with_capacity(2048);
        loop {
            let kind = tokio::time::timeout(IDLE_TIMEOUT, read_frame(read, &mut payload))
                .await
                .map_err(|_| RelayError::Idle(IDLE_TIMEOUT))??;
            let frame = RelayFrame::decode(kind, &payload).map_err(|e| RelayError::Frame(e.to_string()))?;
            match frame {
                RelayFrame::Recv { src, datagram } => {
                    let datagram = RelayDatagram {
                        peer: src,
                        datagram: Bytes::copy_from_slice(datagram),
                    };
                    // Never wait on the data plane: a full queue drops, as a congested UDP path would.
                    if self.inbound.try_send(datagram).is_err() {
                        self.status.dropped_inbound.fetch_add(1, Ordering::Relaxed);
                    }
                }
                RelayFrame::Ping { data } => {
                    let _ = control.try_send(Control::Pong(data));
                }
                RelayFrame::Pong { data } => {
                    if let Some(rtt) = pings.answered(data) {
                        tracing::trace!(?rtt, "relay pong");
                        self.status.record_rtt(rtt);
                    }
                }
                RelayFrame::PeerGone { key } => {
                    tracing::debug!(peer = ?key, "the relay has no connection for this peer");
                }
                RelayFrame::ServerHello { .. } | RelayFrame::Send { .. } => {
                    tracing::debug!("ignoring an unexpected relay frame from the server");
                }
                _ => {}
            }
        }
    }
}

/// Frames the reader or the pinger want written.
#[derive(Debug)]
enum Control {
    Ping([u8; 8]),
    Pong([u8; 8]),
}

/// Takes every datagram waiting (up to [`WRITE_BATCH`]) and every control frame, encodes them into one buffer and
/// writes it with one call.
async fn writer(
    write: &mut (impl AsyncWrite + Unpin),
    outbound: &mut mpsc::Receiver<RelayDatagram>,
    control: &mut mpsc::Receiver<Control>,
) -> Result<(), RelayError> {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let mut buffer = Vec::with_capacity(64 * 1024);
    loop {
        buffer.clear();
        tokio::select! {
            n = outbound.recv_many(&mut batch, WRITE_BATCH) => {
                if n == 0 {
                    // The data plane is gone: the agent is shutting down.
                    return Ok(());
                }
            }
            Some(frame) = control.recv() => encode_control(&frame, &mut buffer),
        }
        while let Ok(frame) = control.try_recv() {
            encode_control(&frame, &mut buffer);
        }
        for datagram in batch.drain(..) {
            let framed = RelayFrame::Send {
                dst: datagram.peer,
                datagram: &datagram.datagram,
            }
            .encode(&mut buffer);
            if !framed {
                tracing::debug!(
                    len = datagram.datagram.len(),
                    max = MAX_DATAGRAM_LEN,
                    "datagram too large for the relay; dropped"
                );
            }
        }
        if !buffer.is_empty() {
            write.write_all(&buffer).await?;
            write.flush().await?;
        }
        if buffer.capacity() > 1024 * 1024 {
            // One burst of huge batches must not pin a megabyte per connection forever.
            buffer = Vec::with_capacity(64 * 1024);
        }
    }
}

fn encode_control(frame: &Control, buffer: &mut Vec<u8>) {
    match *frame {
        Control::Ping(data) => RelayFrame::Ping { data }.encode(buffer),
        Control::Pong(data) => RelayFrame::Pong { data }.encode(buffer),
    };
}

/// Pings the relay every [`PING_INTERVAL`], the first one at once (netcheck wants a latency soon after start).
async fn pinger(control: &mpsc::Sender<Control>, pings: &PingTracker) -> Result<(), RelayError> {
    let mut ticker = tokio::time::interval(PING_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let data: [u8; 8] = rand::random();
        pings.sent(data);
        if control.send(Control::Ping(data)).await.is_err() {
            return Ok(());
        }
    }
}

/// The outstanding ping (only the last one counts: an answer to an older one is ignored).
#[derive(Debug, Default)]
struct PingTracker {
    outstanding: Mutex<Option<([u8; 8], Instant)>>,
}

impl PingTracker {
    fn sent(&self, data: [u8; 8]) {
        *self.outstanding.lock().unwrap_or_else(|p| p.into_inner()) = Some((data, Instant::now()));
    }

    /// The round trip if `data` answers the outstanding ping.
    fn answered(&self, data: [u8; 8]) -> Option<Duration> {
        let mut outstanding = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
        match *outstanding {
            Some((sent, at)) if sent == data => {
                *outstanding = None;
                Some(at.elapsed())
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_outstanding_ping_is_timed() {
        let pings = PingTracker::default();
        assert_eq!(pings.answered([1; 8]), None);
        pings.sent([1; 8]);
        pings.sent([2; 8]);
        assert_eq!(pings.answered([1; 8]), None, "a stale answer is ignored");
        assert!(pings.answered([2; 8]).is_some());
        assert_eq!(pings.answered([2; 8]), None, "answered once");
    }

    /// Reads the next frame off the fake server's end (type and owned payload).
    async fn next_frame(server: &mut (impl AsyncRead + Unpin)) -> (u8, Vec<u8>) {
        let mut payload = Vec::new();
        let kind = tokio::time::timeout(Duration::from_secs(5), read_frame(server, &mut payload))
            .await
            .expect("a frame in time")
            .expect("a frame");
        (kind, payload)
    }

    #[tokio::test]
    async fn session_moves_datagrams_both_ways_answers_pings_and_measures_rtt() {
        let (client_end, mut server) = tokio::io::duplex(256 * 1024);
        let status = RelayStatus::default();
        let (inbound_tx, mut inbound_rx) = mpsc::channel(16);
        let (outbound_tx, mut outbound_rx) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let peer = PublicKey::from_bytes([7; 32]);

        let session = async {
            Session::new(&status, &inbound_tx)
                .run(client_end, &mut outbound_rx, &shutdown)
                .await
        };
        let script = async {
            // The client pings at once; answer it so that an RTT is recorded.
            let (kind, payload) = next_frame(&mut server).await;
            let RelayFrame::Ping { data } = RelayFrame::decode(kind, &payload).expect("decode") else {
                panic!("expected the first ping, got type {kind}");
            };
            let mut out = Vec::new();
            RelayFrame::Pong { data }.encode(&mut out);
            // A server ping and a datagram for us, in one write.
            RelayFrame::Ping { data: [9; 8] }.encode(&mut out);
            RelayFrame::Recv {
                src: peer,
                datagram: b"from the peer",
            }
            .encode(&mut out);
            server.write_all(&out).await.expect("write");

            let (kind, payload) = next_frame(&mut server).await;
            assert_eq!(
                RelayFrame::decode(kind, &payload).expect("decode"),
                RelayFrame::Pong { data: [9; 8] }
            );
            let received = tokio::time::timeout(Duration::from_secs(5), inbound_rx.recv())
                .await
                .expect("in time")
                .expect("datagram");
            assert_eq!(received.peer, peer);
            assert_eq!(&received.datagram[..], b"from the peer");

            // Datagrams from the engine leave as Send frames, in order.
            for i in 0..3u8 {
                outbound_tx
                    .send(RelayDatagram {
                        peer,
                        datagram: Bytes::from(vec![i; 100]),
                    })
                    .await
                    .expect("send");
            }
            for i in 0..3u8 {
                let (kind, payload) = next_frame(&mut server).await;
                match RelayFrame::decode(kind, &payload).expect("decode") {
                    RelayFrame::Send { dst, datagram } => {
                        assert_eq!(dst, peer);
                        assert_eq!(datagram, &[i; 100][..]);
                    }
                    other => panic!("expected Send, got {other:?}"),
                }
            }
            assert!(status.snapshot().latency_ms.is_some(), "the pong was timed");
            shutdown.cancel();
        };
        let (result, ()) = tokio::join!(session, script);
        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn session_ends_on_an_oversized_frame_or_a_closed_stream() {
        let (client_end, mut server) = tokio::io::duplex(1024);
        let status = RelayStatus::default();
        let (inbound_tx, _inbound_rx) = mpsc::channel(4);
        let (_outbound_tx, mut outbound_rx) = mpsc::channel(4);
        let shutdown = CancellationToken::new();
        server.write_all(&[0x03, 0xff, 0xff, 0xff, 0xff]).await.expect("write");
        let result = Session::new(&status, &inbound_tx)
            .run(client_end, &mut outbound_rx, &shutdown)
            .await;
        assert!(matches!(result, Err(RelayError::Frame(_))), "{result:?}");

        let (client_end, server) = tokio::io::duplex(1024);
        drop(server);
        let result = Session::new(&status, &inbound_tx)
            .run(client_end, &mut outbound_rx, &shutdown)
            .await;
        assert!(result.is_err(), "a closed stream ends the session: {result:?}");
    }

    #[test]
    fn status_snapshot_reports_latency_only_once_measured() {
        let status = RelayStatus::default();
        assert_eq!(status.snapshot().latency_ms, None);
        status.record_rtt(Duration::from_micros(1500));
        assert_eq!(status.snapshot().latency_ms, Some(1.5));
        status.set_error(Some("boom".into()));
        assert_eq!(status.snapshot().last_error.as_deref(), Some("boom"));
    }
}

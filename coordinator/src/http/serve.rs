//! The listener: accepts connections (TLS or plain), reads each request head itself and routes map streams to a lean
//! path of their own ([`super::stream::serve_raw`]); every other connection goes to hyper and the axum router, with
//! the bytes already read put back in front.
//!
//! Why not hand every connection to hyper: a map stream is one request that never ends, and what hyper keeps for its
//! connection is sized for many requests. Measured with heaptrack at 2,000 streams, each held ~42 KiB beyond the
//! coordinator's base: hyper's read buffer (16 KiB, grown while parsing the one request), its write buffer (8 KiB),
//! the connection task of hyper-util's HTTP/1+HTTP/2 server (6 KiB), plus rustls (~6 KiB) and the stream's own task
//! and queue (~4 KiB). At 10,000 nodes that is over 400 MiB for connections that only ever write small deltas. Here a
//! map stream keeps rustls, a small task and its queue, and writes its chunks straight to the connection.
//!
//! Limits, because the open-descriptor limit is what caps a coordinator: a new connection has
//! [`ConnectionLimits::header_timeout`] for its TLS handshake and first request head; a kept-alive API connection is
//! closed after [`ConnectionLimits::idle_timeout`] without a complete new head (hyper's header read timeout, which
//! runs from the moment it waits for the next request); at most [`ConnectionLimits::max_per_ip`] connections are open
//! from one source address, more are closed at once and counted (`meshd_connections_refused_total`). Map streams
//! and upgraded relay connections leave these timeouts behind once their request is read: they carry their own
//! keepalives and idle timeouts.
//!
//! Shutdown: stop accepting, end map streams (their sessions watch the cancellation token), ask hyper connections to
//! finish their current request, and wait for them up to [`GRACEFUL_SHUTDOWN`].

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use bytes::{Buf, Bytes, BytesMut};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::AppState;
use super::stream::{self, MapRequest};
use crate::config::ConnectionLimits;
use crate::telemetry;

/// How long shutdown waits for open requests (map streams end at once on shutdown).
pub const GRACEFUL_SHUTDOWN: Duration = Duration::from_secs(5);
/// Longest request head read before the request is routed (a larger one goes to hyper, which answers 431).
const MAX_HEAD: usize = 16 * 1024;
/// Pause after an accept error (out of file descriptors: let some close).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until `cancel` fires; `tls` is the server config (ALPN http/1.1), `None` for plain HTTP.
pub async fn run(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    state: AppState,
    limits: ConnectionLimits,
    cancel: CancellationToken,
) -> io::Result<()> {
    let acceptor = tls.map(TlsAcceptor::from);
    let open = Arc::new(Open::default());
    let per_ip = Arc::new(PerIp::new(limits.max_per_ip));
    loop {
        let (tcp, peer) = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let Some(ip_slot) = per_ip.enter(peer.ip()) else {
            // Closed before a byte is read: costs the descriptor for microseconds only.
            drop(tcp);
            telemetry::connection_refused("per_ip_limit");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let guard = open.enter();
        let (acceptor, app, state, cancel) = (acceptor.clone(), app.clone(), state.clone(), cancel.clone());
        tokio::spawn(async move {
            let _guards = (guard, ip_slot);
            match acceptor {
                Some(acceptor) => {
                    // The handshake and the first head share one deadline.
                    let deadline = tokio::time::Instant::now() + limits.header_timeout;
                    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        // Not TLS, or a failed handshake: the client learns it from the closed connection.
                        Ok(Err(_)) => return,
                        Err(_) => {
                            telemetry::connection_timed_out("handshake");
                            return;
                        }
                    };
                    connection(tls, app, state, limits, deadline, cancel).await;
                }
                None => {
                    let deadline = tokio::time::Instant::now() + limits.header_timeout;
                    connection(tcp, app, state, limits, deadline, cancel).await;
                }
            }
        });
    }
    drop(listener);
    open.wait(GRACEFUL_SHUTDOWN).await;
    Ok(())
}

/// One accepted connection: the map stream path, or hyper. The first head must be complete by `head_deadline`.
async fn connection<IO>(
    mut io: IO,
    app: Router,
    state: AppState,
    limits: ConnectionLimits,
    head_deadline: tokio::time::Instant,
    cancel: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut head = BytesMut::with_capacity(1024);
    let routed = tokio::time::timeout_at(head_deadline, read_head(&mut io, &mut head)).await;
    let complete = match routed {
        Ok(Ok(complete)) => complete,
        Ok(Err(_)) => return,
        Err(_) => {
            telemetry::connection_timed_out("header");
            return;
        }
    };
    if complete && let Some(request) = MapRequest::parse(&head) {
        drop(head);
        // Boxed so the task holds only a pointer while it runs either branch.
        Box::pin(stream::serve_raw(io, request, state)).await;
        return;
    }
    Box::pin(hyper_connection(
        Rewind::new(head.freeze(), io),
        app,
        limits.idle_timeout,
        cancel,
    ))
    .await;
}

/// Reads until the end of the request head (true), the size cap or EOF (false: hyper then answers or closes).
async fn read_head<IO: AsyncRead + Unpin>(io: &mut IO, head: &mut BytesMut) -> io::Result<bool> {
    loop {
        if memchr_head_end(head) {
            return Ok(true);
        }
        if head.len() >= MAX_HEAD {
            return Ok(false);
        }
        if head.capacity() - head.len() < 512 {
            head.reserve(4096);
        }
        if io.read_buf(head).await? == 0 {
            return Ok(false);
        }
    }
}

fn memchr_head_end(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n")
}

/// Serves API requests on one connection. hyper's header read timeout runs from the moment it waits for a request
/// head, so it is also the idle timeout of a kept-alive connection; it does not run while a request is handled, nor
/// after an upgrade (the relay) has taken the connection.
async fn hyper_connection<IO>(io: Rewind<IO>, app: Router, idle_timeout: Duration, cancel: CancellationToken)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = cancel.cancelled() => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(GRACEFUL_SHUTDOWN, connection).await;
}

/// Open connections per source address, capped (0: no cap). A std mutex: held for one map operation, never across
/// an await.
struct PerIp {
    max: u32,
    open: Mutex<HashMap<IpAddr, u32>>,
}

/// One connection's place in [`PerIp`]; given back on drop.
struct PerIpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn new(max: u32) -> Self {
        Self {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for a connection from `ip`, or `None` when that address has `max` open already.
    fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<PerIpSlot> {
        let ip = ip.to_canonical();
        if self.max > 0 {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            let count = open.entry(ip).or_insert(0);
            if *count >= self.max {
                return None;
            }
            *count += 1;
        }
        Some(PerIpSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for PerIpSlot {
    fn drop(&mut self) {
        if self.table.max == 0 {
            return;
        }
        let mut open = self.table.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Counts open connections so shutdown can wait for them.
#[derive(Default)]
struct Open {
    count: AtomicUsize,
    closed: Notify,
}

struct OpenGuard(Arc<Open>);

impl Open {
    fn enter(self: &Arc<Self>) -> OpenGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        OpenGuard(self.clone())
    }

    async fn wait(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                return;
            }
        }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

/// A connection with bytes already read from it put back in front.
struct Rewind<IO> {
    pre: Bytes,
    inner: IO,
}

impl<IO> Rewind<IO> {
    fn new(pre: Bytes, inner: IO) -> Self {
        Self { pre, inner }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pre.has_remaining() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            if !self.pre.has_remaining() {
                self.pre = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The TLS server config for `cert`/`key` (PEM), HTTP/1.1 only (the relay upgrade needs it; agents speak it).
pub fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use anyhow::Context as _;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading the TLS certificate {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading the TLS key {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not form a usable pair")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_cap_counts_and_gives_back() {
        let table = Arc::new(PerIp::new(2));
        let a: IpAddr = "198.18.0.1".parse().expect("ip");
        let mapped: IpAddr = "::ffff:198.18.0.1".parse().expect("ip");
        let b: IpAddr = "198.18.0.2".parse().expect("ip");
        let first = table.enter(a).expect("first");
        let _second = table.enter(mapped).expect("second (same address, IPv4-mapped)");
        assert!(table.enter(a).is_none(), "third from one address is refused");
        let _other = table.enter(b).expect("another address has its own count");
        drop(first);
        let _again = table.enter(a).expect("a closed connection frees its place");
        let unlimited = Arc::new(PerIp::new(0));
        let slots: Vec<_> = (0..100).filter_map(|_| unlimited.enter(a)).collect();
        assert_eq!(slots.len(), 100, "0 means no limit");
    }
}

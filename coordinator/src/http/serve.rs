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
//! Shutdown: stop accepting, end map streams (their sessions watch the cancellation token), ask hyper connections to
//! finish their current request, and wait for them up to [`GRACEFUL_SHUTDOWN`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use bytes::{Buf, Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::AppState;
use super::stream::{self, MapRequest};

/// How long shutdown waits for open requests (map streams end at once on shutdown).
pub const GRACEFUL_SHUTDOWN: Duration = Duration::from_secs(5);
/// Longest request head read before the request is routed (a larger one goes to hyper, which answers 431).
const MAX_HEAD: usize = 16 * 1024;
/// A client has this long for its TLS handshake and request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after an accept error (out of file descriptors: let some close).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until `cancel` fires; `tls` is the server config (ALPN http/1.1), `None` for plain HTTP.
pub async fn run(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    state: AppState,
    cancel: CancellationToken,
) -> io::Result<()> {
    let acceptor = tls.map(TlsAcceptor::from);
    let open = Arc::new(Open::default());
    loop {
        let (tcp, _) = tokio::select! {
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
        let _ = tcp.set_nodelay(true);
        let guard = open.enter();
        let (acceptor, app, state, cancel) = (acceptor.clone(), app.clone(), state.clone(), cancel.clone());
        tokio::spawn(async move {
            let _guard = guard;
            match acceptor {
                Some(acceptor) => {
                    let Ok(Ok(tls)) = tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(tcp)).await else {
                        return;
                    };
                    connection(tls, app, state, cancel).await;
                }
                None => connection(tcp, app, state, cancel).await,
            }
        });
    }
    drop(listener);
    open.wait(GRACEFUL_SHUTDOWN).await;
    Ok(())
}

/// One accepted connection: the map stream path, or hyper.
async fn connection<IO>(mut io: IO, app: Router, state: AppState, cancel: CancellationToken)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut head = BytesMut::with_capacity(1024);
    let routed = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut io, &mut head)).await;
    let Ok(Ok(complete)) = routed else { return };
    if complete && let Some(request) = MapRequest::parse(&head) {
        drop(head);
        // Boxed so the task holds only a pointer while it runs either branch.
        Box::pin(stream::serve_raw(io, request, state)).await;
        return;
    }
    Box::pin(hyper_connection(Rewind::new(head.freeze(), io), app, cancel)).await;
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

async fn hyper_connection<IO>(io: Rewind<IO>, app: Router, cancel: CancellationToken)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    let connection = hyper::server::conn::http1::Builder::new()
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

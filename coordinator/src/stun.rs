//! The STUN server: answers binding requests on the configured UDP ports with the sender's address as the
//! coordinator sees it (XOR-MAPPED-ADDRESS), so a node behind NAT learns its public address and port.
//!
//! Owns the UDP sockets and their tasks; the byte format is [`meshd_protocol::stun`]. Only well-formed binding
//! requests are answered; anything else is dropped without a reply (and never panics). A response (32 or 44 bytes)
//! is at most a little longer than the smallest request (20 bytes), so the server is no useful amplifier.
//! Not here: the HTTP API (`GET /api/v1/info` publishes the ports this module bound).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use meshd_protocol::stun::{self, MAX_BINDING_RESPONSE_LEN};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::telemetry;

/// Largest datagram read; longer ones are cut by the kernel and then fail the length check (never a valid request).
const RECV_BUFFER: usize = 2048;
/// Pause after a receive error that is not about one peer, so a broken socket cannot spin a core.
const ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Binds one UDP socket per port on `ip` (port 0: any free port) and answers STUN on each until `shutdown`.
/// Returns the ports actually bound, in the order given.
pub async fn start(ip: IpAddr, ports: &[u16], shutdown: CancellationToken) -> anyhow::Result<Vec<u16>> {
    let mut sockets = Vec::with_capacity(ports.len());
    for &port in ports {
        let addr = SocketAddr::new(ip, port);
        let socket = UdpSocket::bind(addr).await.with_context(|| {
            format!("binding the STUN port {addr} (choose another with --stun-port/--stun-alt-port, or --no-stun)")
        })?;
        sockets.push(socket);
    }
    let mut bound = Vec::with_capacity(sockets.len());
    for socket in sockets {
        let local = socket.local_addr().context("reading the STUN socket's address")?;
        bound.push(local.port());
        tracing::info!(addr = %local, "STUN server listening");
        tokio::spawn(serve(socket, shutdown.clone()));
    }
    Ok(bound)
}

async fn serve(socket: UdpSocket, shutdown: CancellationToken) {
    let requests = metrics::counter!(telemetry::STUN_REQUESTS);
    let mut buf = [0u8; RECV_BUFFER];
    let mut out = [0u8; MAX_BINDING_RESPONSE_LEN];
    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => return,
            received = socket.recv_from(&mut buf) => received,
        };
        let (len, from) = match received {
            Ok(received) => received,
            // An ICMP error for an earlier reply surfaces here on Linux; it concerns one peer, not the socket.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) => {
                tracing::debug!(error = %e, "STUN receive failed");
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
        };
        let Some(reply_len) = answer(&buf[..len], from, &mut out) else {
            tracing::trace!(%from, len, "ignored a datagram that is not a STUN binding request");
            continue;
        };
        requests.increment(1);
        if let Err(e) = socket.send_to(&out[..reply_len], from).await {
            tracing::debug!(%from, error = %e, "could not send a STUN response");
        }
    }
}

/// The response to `request` from `from`, written into `out`; `None` when the datagram is not a binding request.
pub fn answer(request: &[u8], from: SocketAddr, out: &mut [u8; MAX_BINDING_RESPONSE_LEN]) -> Option<usize> {
    let tx = stun::parse_binding_request(request).ok()?;
    let len = stun::write_binding_response(tx, from, out);
    (len > 0).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_protocol::stun::{TransactionId, binding_request, parse_binding_response};

    async fn exchange(client: &UdpSocket, server: SocketAddr, datagram: &[u8]) -> Option<Vec<u8>> {
        client.send_to(datagram, server).await.expect("send");
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) => {
                assert_eq!(from, server, "the answer comes from the port asked");
                Some(buf[..n].to_vec())
            }
            _ => None,
        }
    }

    #[tokio::test]
    async fn answers_binding_requests_on_both_ports_and_ignores_garbage() {
        let shutdown = CancellationToken::new();
        let ip: IpAddr = "127.0.0.1".parse().expect("literal");
        let ports = start(ip, &[0, 0], shutdown.clone()).await.expect("bind");
        assert_eq!(ports.len(), 2);
        assert_ne!(ports[0], ports[1]);
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        let me = client.local_addr().expect("addr");
        for (i, port) in ports.iter().enumerate() {
            let server = SocketAddr::new(ip, *port);
            // Garbage and a response (not a request) get no answer; the server keeps serving afterwards.
            assert_eq!(exchange(&client, server, b"hello there, not stun at all").await, None);
            assert_eq!(exchange(&client, server, &[0u8; 0]).await, None);
            let mut bogus = binding_request(TransactionId([1; 12]));
            bogus[1] = 0x01;
            bogus[0] = 0x01;
            assert_eq!(exchange(&client, server, &bogus).await, None);
            let tx = TransactionId([i as u8 + 7; 12]);
            let reply = exchange(&client, server, &binding_request(tx)).await.expect("answered");
            assert_eq!(parse_binding_response(&reply), Ok((tx, me)));
        }
        shutdown.cancel();
    }

    #[test]
    fn answer_is_none_for_non_requests() {
        let mut out = [0u8; MAX_BINDING_RESPONSE_LEN];
        let from: SocketAddr = "198.18.0.9:1234".parse().expect("literal");
        assert_eq!(answer(b"", from, &mut out), None);
        assert_eq!(answer(&[0u8; 20], from, &mut out), None);
        let tx = TransactionId([5; 12]);
        let len = answer(&binding_request(tx), from, &mut out).expect("a request");
        assert_eq!(parse_binding_response(&out[..len]), Ok((tx, from)));
    }
}

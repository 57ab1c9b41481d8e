//! The agent's DNS responder: answers for the mesh's names on the node's overlay address, port 53, and forwards
//! other names of overlay clients to the host's upstream resolvers.
//!
//! The socket loop around [`super::forward::decide`] (pure: answer locally, forward, or ignore; the answers about
//! the mesh come from `meshd_protocol::dns::answer`, pure and fuzzed). Queries are answered only when they come
//! from the overlay network or loopback; anything else is dropped without an answer. The table is read through an
//! `ArcSwap`, so a map change is visible to the next query without a lock.
//!
//! A forward sends the query bytes unchanged from a fresh ephemeral UDP socket connected to the upstream (the
//! kernel then delivers only that upstream's datagrams, and the answer must carry the query's ID), and relays the
//! answer unchanged to the client from the responder's socket. Forwards run in tasks of their own, at most
//! [`MAX_FORWARDS`] at once; beyond that a query gets SERVFAIL at once (cheap, no bigger than the query, and it
//! tells the client's stub resolver to try its next server instead of waiting out its timeout).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use meshd_protocol::dns::NameTable;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::forward::{Decision, decide, servfail};

/// Largest datagram read. Queries are small; a larger one is truncated by the kernel and fails to parse (dropped).
const MAX_QUERY: usize = 1232;
/// Forwards in flight at most. Each holds a task and a socket for up to [`FORWARD_TIMEOUT`] per upstream; 128 is
/// far above what a few devices' browsers ask at once and keeps a misbehaving peer from costing more than 128
/// descriptors.
pub const MAX_FORWARDS: usize = 128;
/// How long one upstream gets to answer before the next is asked: shorter than the 5 s after which stub resolvers
/// (glibc, Windows, Apple) retry, so a dead first upstream still leaves time for the second.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest answer relayed: the largest EDNS payload clients announce in practice. A larger datagram is not relayed
/// (the next upstream is asked); clients that need more retry over TCP after a truncated answer.
pub const MAX_ANSWER: usize = 4096;

/// The name table as the resolver reads it: replaced whole on every map change.
pub type SharedTable = Arc<ArcSwapOption<NameTable>>;

/// What the responder did, for `meshd status`.
#[derive(Debug, Default)]
pub struct ResolverCounters {
    /// Answers sent: about the mesh, REFUSED, and answers relayed from an upstream (or SERVFAIL when none came).
    pub answered: AtomicU64,
    /// Queries from outside the overlay and loopback, and datagrams that are no query: no answer sent.
    pub ignored: AtomicU64,
}

/// Why a forward got no answer from one upstream.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(
        "upstream resolver {upstream}: {source} (check the nameserver lines of /etc/resolv.conf; restart meshd after \
         changing them)"
    )]
    Io {
        upstream: SocketAddr,
        source: std::io::Error,
    },
    #[error("upstream resolver {upstream} did not answer within {timeout:?} (is it reachable from this host?)")]
    Timeout { upstream: SocketAddr, timeout: Duration },
    #[error("upstream resolver {upstream} answered with more than {MAX_ANSWER} bytes; not relayed")]
    TooLarge { upstream: SocketAddr },
    #[error("no upstream resolver configured (no nameserver lines in /etc/resolv.conf)")]
    NoUpstream,
}

/// The socket loop around [`decide`].
pub struct Resolver {
    socket: Arc<UdpSocket>,
    table: SharedTable,
    upstreams: Arc<[SocketAddr]>,
    counters: Arc<ResolverCounters>,
}

impl Resolver {
    /// Binds `address` (the overlay address, port 53; tests use loopback port 0). Names outside the mesh asked by
    /// overlay clients go to `upstreams` in order; with none they are REFUSED.
    pub async fn bind(address: SocketAddr, table: SharedTable, upstreams: Vec<SocketAddr>) -> std::io::Result<Self> {
        Ok(Self {
            socket: Arc::new(UdpSocket::bind(address).await?),
            table,
            upstreams: upstreams.into(),
            counters: Arc::default(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    pub fn counters(&self) -> Arc<ResolverCounters> {
        self.counters.clone()
    }

    /// Answers until `shutdown`; forwards still in flight then are abandoned.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut buf = vec![0u8; MAX_QUERY];
        let permits = Arc::new(Semaphore::new(MAX_FORWARDS));
        // Dropped (aborting what is left) when the loop returns.
        let mut forwards = JoinSet::new();
        loop {
            while forwards.try_join_next().is_some() {}
            let (len, source) = tokio::select! {
                () = shutdown.cancelled() => return,
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok(r) => r,
                    Err(e) => {
                        // ICMP errors from earlier answers surface here on Linux; they are no reason to stop.
                        tracing::trace!("DNS socket: {e}");
                        continue;
                    }
                },
            };
            let request = &buf[..len];
            let table = self.table.load();
            let reply = match decide(table.as_deref(), source.ip(), request, !self.upstreams.is_empty()) {
                Decision::Ignore => {
                    self.counters.ignored.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Decision::Answer(reply) => reply,
                Decision::Forward => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let socket = self.socket.clone();
                        let upstreams = self.upstreams.clone();
                        let counters = self.counters.clone();
                        let query = request.to_vec();
                        forwards.spawn(async move {
                            relay(&socket, source, &query, &upstreams, FORWARD_TIMEOUT).await;
                            counters.answered.fetch_add(1, Ordering::Relaxed);
                            drop(permit);
                        });
                        continue;
                    }
                    Err(_) => {
                        tracing::debug!(%source, "{MAX_FORWARDS} DNS forwards in flight; answering SERVFAIL");
                        match servfail(request) {
                            Some(reply) => reply,
                            None => continue,
                        }
                    }
                },
            };
            self.counters.answered.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.socket.send_to(&reply, source).await {
                tracing::trace!(%source, "DNS answer not sent: {e}");
            }
        }
    }
}

/// Forwards `query` to `upstreams` and sends the first answer, unchanged, to `client` from `socket` (the
/// responder's, so the answer comes from the address the client asked); SERVFAIL when no upstream answered.
pub async fn relay(socket: &UdpSocket, client: SocketAddr, query: &[u8], upstreams: &[SocketAddr], timeout: Duration) {
    let reply = match forward(query, upstreams, timeout).await {
        Ok(reply) => reply,
        Err(e) => {
            tracing::debug!(%client, "DNS forward failed: {e}");
            match servfail(query) {
                Some(reply) => reply,
                None => return,
            }
        }
    };
    if let Err(e) = socket.send_to(&reply, client).await {
        tracing::trace!(%client, "forwarded DNS answer not sent: {e}");
    }
}

/// Asks `upstreams` in order, each for at most `timeout`; returns the first answer to `query` (at most
/// [`MAX_ANSWER`] bytes, unchanged), or the last upstream's failure.
pub async fn forward(query: &[u8], upstreams: &[SocketAddr], timeout: Duration) -> Result<Vec<u8>, ForwardError> {
    let mut last = ForwardError::NoUpstream;
    for &upstream in upstreams {
        match ask(query, upstream, timeout).await {
            Ok(answer) => return Ok(answer),
            Err(e) => {
                tracing::debug!("{e}");
                last = e;
            }
        }
    }
    Err(last)
}

/// One query to one upstream from a fresh connected socket: only datagrams from `upstream` arrive on it, and only one
/// with the query's ID and the response bit set is taken as the answer (anything else is skipped until `timeout`).
async fn ask(query: &[u8], upstream: SocketAddr, timeout: Duration) -> Result<Vec<u8>, ForwardError> {
    let io = |source| ForwardError::Io { upstream, source };
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(io)?;
    socket.connect(upstream).await.map_err(io)?;
    socket.send(query).await.map_err(io)?;
    let deadline = tokio::time::Instant::now() + timeout;
    // One byte more than the largest answer relayed, so a larger one is seen as such rather than cut silently.
    let mut buf = vec![0u8; MAX_ANSWER + 1];
    loop {
        let len = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            Err(_) => return Err(ForwardError::Timeout { upstream, timeout }),
            // A connected UDP socket reports the upstream's ICMP port unreachable here: next upstream at once.
            Ok(received) => received.map_err(io)?,
        };
        let answer = &buf[..len];
        let ours = len >= 12 && answer.get(..2) == query.get(..2) && answer[2] & 0x80 != 0;
        if !ours {
            continue;
        }
        if len > MAX_ANSWER {
            return Err(ForwardError::TooLarge { upstream });
        }
        return Ok(answer.to_vec());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};
    use meshd_protocol::netmap::fixtures::{map, node};

    fn table() -> NameTable {
        NameTable::from_map(&map(vec![node(2, "gpu-server")])).expect("dns on")
    }

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut q = Message::new(id, MessageType::Query, OpCode::Query);
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).expect("name"), RecordType::A));
        q.to_vec().expect("encode")
    }

    /// A fake upstream on 127.0.0.1 port 0: for each query it first sends `noise` (foreign answers the forwarder
    /// must skip), then `answer(query)`. Every query it receives goes to the returned channel.
    async fn fake_upstream(
        noise: Vec<Vec<u8>>,
        answer: impl Fn(&[u8]) -> Vec<u8> + Send + 'static,
    ) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("upstream");
        let address = socket.local_addr().expect("addr");
        let (seen, queries) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                let _ = seen.send(buf[..len].to_vec());
                for datagram in &noise {
                    socket.send_to(datagram, from).await.expect("noise");
                }
                socket.send_to(&answer(&buf[..len]), from).await.expect("answer");
            }
        });
        (address, queries)
    }

    /// An answer only a relay that changes nothing gives back: the query's ID and flags, then marker bytes.
    fn marked_answer(query: &[u8]) -> Vec<u8> {
        let mut answer = query.to_vec();
        answer[2] |= 0x80;
        answer.extend_from_slice(b"upstream-marker");
        answer
    }

    #[tokio::test]
    async fn forwards_unchanged_past_a_dead_upstream_and_foreign_answers() {
        // The first upstream never answers (a bound socket nobody reads): the forwarder must move on after the
        // timeout. The second first sends datagrams that are no answer to this query, then the answer.
        let dead = UdpSocket::bind("127.0.0.1:0").await.expect("dead upstream");
        let q = query(0x5151, "example.com.");
        let mut wrong_id = marked_answer(&q);
        wrong_id[1] ^= 0xff;
        let mut not_a_response = marked_answer(&q);
        not_a_response[2] &= 0x7f;
        let (live, mut seen) = fake_upstream(vec![wrong_id, not_a_response, vec![0x51]], marked_answer).await;
        let responder = UdpSocket::bind("127.0.0.1:0").await.expect("responder");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        let timeout = Duration::from_millis(300);
        let started = tokio::time::Instant::now();
        let upstreams = [dead.local_addr().expect("addr"), live];
        relay(&responder, client.local_addr().expect("addr"), &q, &upstreams, timeout).await;
        assert!(
            started.elapsed() >= timeout,
            "the dead upstream was given its timeout first"
        );
        let mut buf = vec![0u8; 5000];
        let (len, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("an answer within 5 s")
            .expect("recv");
        assert_eq!(
            from,
            responder.local_addr().expect("addr"),
            "answered from the responder's address"
        );
        assert_eq!(
            &buf[..len],
            marked_answer(&q).as_slice(),
            "the upstream's answer, unchanged"
        );
        assert_eq!(seen.recv().await.expect("a query"), q, "the query, unchanged");
        let (len, _) = dead.try_recv_from(&mut buf).expect("the dead upstream was asked first");
        assert_eq!(&buf[..len], q.as_slice());
    }

    #[tokio::test]
    async fn no_answer_means_servfail_and_oversized_answers_are_not_relayed() {
        let q = query(77, "example.com.");
        let (huge, _seen) = fake_upstream(vec![], |query| {
            let mut answer = marked_answer(query);
            answer.resize(MAX_ANSWER + 1, 0);
            answer
        })
        .await;
        let timeout = Duration::from_millis(200);
        match forward(&q, &[huge], timeout).await {
            Err(ForwardError::TooLarge { upstream }) => assert_eq!(upstream, huge),
            other => panic!("expected TooLarge, got {other:?}"),
        }
        let (fits, _seen) = fake_upstream(vec![], |query| {
            let mut answer = marked_answer(query);
            answer.resize(MAX_ANSWER, 0);
            answer
        })
        .await;
        assert_eq!(
            forward(&q, &[huge, fits], timeout).await.expect("answer").len(),
            MAX_ANSWER
        );
        assert!(matches!(forward(&q, &[], timeout).await, Err(ForwardError::NoUpstream)));

        let dead = UdpSocket::bind("127.0.0.1:0").await.expect("dead upstream");
        let responder = UdpSocket::bind("127.0.0.1:0").await.expect("responder");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        let client_addr = client.local_addr().expect("addr");
        relay(
            &responder,
            client_addr,
            &q,
            &[dead.local_addr().expect("addr")],
            timeout,
        )
        .await;
        let mut buf = vec![0u8; 1500];
        let len = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
            .await
            .expect("an answer within 5 s")
            .expect("recv");
        let reply = Message::from_vec(&buf[..len]).expect("decode");
        assert_eq!(reply.metadata.id, 77);
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    }

    /// Through the whole responder: a loopback client is this host and gets REFUSED for a name outside the mesh even
    /// with an upstream configured, and the upstream never hears of it (overlay sources need a namespace; the
    /// decision for them is tested in `forward`).
    #[tokio::test]
    async fn loopback_clients_are_never_forwarded() {
        let (upstream, mut seen) = fake_upstream(vec![], marked_answer).await;
        let shared: SharedTable = Arc::new(ArcSwapOption::from_pointee(table()));
        let resolver = Resolver::bind("127.0.0.1:0".parse().expect("addr"), shared, vec![upstream])
            .await
            .expect("bind");
        let server = resolver.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(resolver.run(shutdown.clone()));
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        client.connect(server).await.expect("connect");
        client.send(&query(9, "example.com.")).await.expect("send");
        let mut buf = vec![0u8; 1500];
        let len = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
            .await
            .expect("an answer within 5 s")
            .expect("recv");
        let reply = Message::from_vec(&buf[..len]).expect("decode");
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        assert!(seen.try_recv().is_err(), "nothing was forwarded");
        shutdown.cancel();
        task.await.expect("resolver task");
    }

    /// A burst of 10,000 queries over a real socket (dnsperf-style: a window of queries in flight): every one is
    /// answered correctly.
    #[tokio::test]
    async fn a_burst_of_ten_thousand_queries_is_answered() {
        const QUERIES: usize = 10_000;
        const IN_FLIGHT: usize = 64;
        let shared: SharedTable = Arc::new(ArcSwapOption::from_pointee(table()));
        let resolver = Resolver::bind("127.0.0.1:0".parse().expect("addr"), shared, vec![])
            .await
            .expect("bind");
        let server = resolver.local_addr().expect("addr");
        let counters = resolver.counters();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(resolver.run(shutdown.clone()));
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        client.connect(server).await.expect("connect");
        let names = [
            "gpu-server.mesh.internal.",
            "laptop.mesh.internal.",
            "nope.mesh.internal.",
            "example.com.",
        ];
        let mut sent = 0usize;
        let mut good = 0usize;
        let mut buf = vec![0u8; 1500];
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut outstanding = std::collections::HashMap::new();
        while good < QUERIES {
            while sent < QUERIES && outstanding.len() < IN_FLIGHT {
                let mut q = Message::new(sent as u16, MessageType::Query, OpCode::Query);
                let name = names[sent % names.len()];
                q.add_query(Query::query(Name::from_ascii(name).expect("name"), RecordType::A));
                client.send(&q.to_vec().expect("encode")).await.expect("send");
                outstanding.insert(sent as u16, name);
                sent += 1;
            }
            let len = tokio::time::timeout_at(deadline, client.recv(&mut buf))
                .await
                .expect("answers within 60 s")
                .expect("recv");
            let reply = Message::from_vec(&buf[..len]).expect("a valid answer");
            let name = outstanding
                .remove(&reply.metadata.id)
                .expect("an answer to a query we sent");
            let expected = match name {
                "gpu-server.mesh.internal." | "laptop.mesh.internal." => ResponseCode::NoError,
                "nope.mesh.internal." => ResponseCode::NXDomain,
                _ => ResponseCode::Refused,
            };
            assert_eq!(reply.metadata.response_code, expected, "{name}");
            good += 1;
        }
        assert_eq!(counters.answered.load(Ordering::Relaxed), QUERIES as u64);
        assert_eq!(counters.ignored.load(Ordering::Relaxed), 0);
        shutdown.cancel();
        task.await.expect("resolver task");
    }
}

//! The agent's DNS responder: answers for the mesh's names on the node's overlay address, port 53.
//!
//! The socket loop around `meshd_protocol::dns::answer` (pure, fuzzed; what is answered and what refused is decided
//! there). Queries are answered only when they come from the overlay network or loopback
//! (`meshd_protocol::dns::accepts`); anything else is dropped without an answer. The table is read through an
//! `ArcSwap`, so a map change is visible to the next query without a lock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use meshd_protocol::dns::{NameTable, accepts, answer};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// Largest datagram read. Queries are small; a larger one is truncated by the kernel and fails to parse (dropped).
const MAX_QUERY: usize = 1232;

/// The name table as the resolver reads it: replaced whole on every map change.
pub type SharedTable = Arc<ArcSwapOption<NameTable>>;

/// What the responder did, for `meshd status`.
#[derive(Debug, Default)]
pub struct ResolverCounters {
    pub answered: AtomicU64,
    /// Queries from outside the overlay and loopback, and datagrams that are no query: no answer sent.
    pub ignored: AtomicU64,
}

/// The socket loop around [`answer`].
pub struct Resolver {
    socket: UdpSocket,
    table: SharedTable,
    counters: Arc<ResolverCounters>,
}

impl Resolver {
    /// Binds `address` (the overlay address, port 53; tests use loopback port 0).
    pub async fn bind(address: SocketAddr, table: SharedTable) -> std::io::Result<Self> {
        Ok(Self {
            socket: UdpSocket::bind(address).await?,
            table,
            counters: Arc::default(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    pub fn counters(&self) -> Arc<ResolverCounters> {
        self.counters.clone()
    }

    /// Answers until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut buf = vec![0u8; MAX_QUERY];
        loop {
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
            let table = self.table.load();
            let network = table.as_ref().and_then(|t| t.network());
            if !accepts(source.ip(), network) {
                self.counters.ignored.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match answer(table.as_deref(), &buf[..len]) {
                Some(reply) => {
                    self.counters.answered.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = self.socket.send_to(&reply, source).await {
                        tracing::trace!(%source, "DNS answer not sent: {e}");
                    }
                }
                None => {
                    self.counters.ignored.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
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

    /// A burst of 10,000 queries over a real socket (dnsperf-style: a window of queries in flight): every one is
    /// answered correctly.
    #[tokio::test]
    async fn a_burst_of_ten_thousand_queries_is_answered() {
        const QUERIES: usize = 10_000;
        const IN_FLIGHT: usize = 64;
        let shared: SharedTable = Arc::new(ArcSwapOption::from_pointee(table()));
        let resolver = Resolver::bind("127.0.0.1:0".parse().expect("addr"), shared)
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

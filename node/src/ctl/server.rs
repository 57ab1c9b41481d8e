//! The agent side of the control socket: answers status, ping, netcheck and down.
//!
//! Status merges the map (names and addresses: the coordinator's truth) with the engine's live view (endpoints,
//! handshakes, counters). Ping resolves a peer by name or overlay address in the map and sends ICMP echoes over the
//! overlay from the agent ([`crate::ping`]); each reply names the path the engine had for the peer when it arrived.
//! Netcheck probes STUN through the data plane ([`crate::netcheck`]). Down cancels the agent's shutdown token. Connections still open at
//! shutdown are aborted.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{PathTotals, PeerReport, PingReply, PingSummary, Reply, Request, SelfStatus, StatusReport};
use crate::agent::AgentState;
use crate::control::ControlClient;
use crate::engine::PeerStatus;
use crate::netcheck::{self, CheckSource, NetcheckReport};
use crate::ping::Pinger;

/// Longest request line accepted (requests are tiny; this bounds what a confused client can make us buffer).
const MAX_REQUEST_LEN: u64 = 4096;
/// A client that connects must send its request within this time (a stuck client must not pin a task).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between echo requests, like ping(8).
const PING_INTERVAL: Duration = Duration::from_secs(1);

/// Serves control requests until `shutdown`; then aborts the connections still open (a ping in progress). Returns
/// the listener so that the caller keeps the socket bound until the agent has fully stopped: `meshd down` waits
/// for the socket to go away, and then the interface and the state lock are already released.
pub async fn serve(listener: UnixListener, agent: Arc<AgentState>, shutdown: CancellationToken) -> UnixListener {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(handle(stream, agent.clone(), shutdown.clone()));
                }
                Err(e) => {
                    tracing::warn!("control socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
    listener
}

async fn handle(stream: UnixStream, agent: Arc<AgentState>, shutdown: CancellationToken) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST_LEN);
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!("control request unreadable: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("control client sent no request in time");
            return;
        }
    }
    let request = match serde_json::from_str::<Request>(&line) {
        Ok(request) => request,
        Err(e) => {
            let _ = send(&mut write, &Reply::Error(format!("bad request: {e}"))).await;
            return;
        }
    };
    tracing::debug!(?request, "control request");
    let result = match request {
        Request::Status => send(&mut write, &Reply::Status(Box::new(status_report(&agent)))).await,
        Request::Netcheck => send(&mut write, &Reply::Netcheck(netcheck(&agent).await)).await,
        Request::Down => {
            tracing::info!("stop requested over the control socket");
            let sent = send(&mut write, &Reply::Stopping).await;
            shutdown.cancel();
            sent
        }
        Request::Ping {
            target,
            count,
            timeout_secs,
        } => {
            ping(
                &mut write,
                &agent,
                &target,
                count.clamp(1, 100),
                timeout_secs.clamp(1, 30),
            )
            .await
        }
    };
    if let Err(e) = result {
        tracing::debug!("control reply failed: {e}");
    }
}

async fn send(write: &mut (impl AsyncWriteExt + Unpin), reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).expect("replies always serialize");
    line.push(b'\n');
    write.write_all(&line).await?;
    write.flush().await
}

/// Merges the map (names, addresses: the coordinator's truth) with the engine's live view (endpoints, counters).
pub fn status_report(agent: &AgentState) -> StatusReport {
    let engine = agent.dataplane.status();
    let map = agent.map();
    let identity = &agent.identity;
    let fqdn = |name: &str| {
        map.as_ref()
            .and_then(|m| m.dns.as_ref())
            .map(|dns| meshd_protocol::names::fqdn(name, &dns.domain))
    };
    let peers: Vec<PeerReport> = map
        .as_ref()
        .map(|map| {
            map.peers
                .iter()
                .map(|peer| {
                    let live = engine.peers.iter().find(|p| p.public_key == peer.public_key);
                    let (latency_ms, relay_rx_bytes, relay_tx_bytes) = live.map_or((None, 0, 0), path_figures);
                    PeerReport {
                        name: peer.name.clone(),
                        fqdn: fqdn(&peer.name),
                        ip: peer.ip,
                        public_key: peer.public_key.to_base64(),
                        // The engine's direct address as it is (null on the relay); the map's first candidate
                        // only while the engine does not know the peer yet.
                        endpoint: match live {
                            Some(live) => live.endpoint,
                            None => peer.endpoints.first().copied(),
                        }
                        .map(|e| e.to_string()),
                        path: live.map_or("none", |p| p.path).to_string(),
                        latency_ms,
                        relay_rx_bytes,
                        relay_tx_bytes,
                        last_handshake: live.and_then(|p| p.last_handshake).map(|d| d.as_secs()),
                        rx_bytes: live.map_or(0, |p| p.rx_bytes),
                        tx_bytes: live.map_or(0, |p| p.tx_bytes),
                        online: peer.online,
                        id: peer.id,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let self_node = map.as_ref().map(|m| &m.self_node);
    let totals = PathTotals {
        direct_peers: peers.iter().filter(|p| p.path == "direct").count(),
        relayed_peers: peers.iter().filter(|p| p.path == "relay").count(),
        relayed_bytes: peers.iter().map(|p| p.relay_rx_bytes + p.relay_tx_bytes).sum(),
    };
    let name = self_node.map_or_else(|| identity.name.clone(), |n| n.name.clone());
    StatusReport {
        self_node: SelfStatus {
            fqdn: fqdn(&name),
            name,
            ip: identity.ip,
            public_key: identity.public_key.to_base64(),
            node_id: identity.node_id,
            network: identity.network.to_string(),
            interface: engine.interface.clone(),
            listen_port: engine.listen_port,
            state: agent.phase(),
            coordinator: identity.coordinator_url.clone(),
            map_version: map.as_ref().map(|m| m.version),
            tags: self_node.map_or_else(|| identity.tags.clone(), |n| n.tags.clone()),
            counters: serde_json::to_value(&engine.counters).unwrap_or_default(),
            relay: Some(agent.relay.snapshot()),
            endpoints: agent
                .discovery
                .get()
                .endpoints
                .iter()
                .map(ToString::to_string)
                .collect(),
            totals,
            dns: Some(agent.dns.snapshot()),
        },
        peers,
    }
}

/// Latency on the direct path and bytes through the relay of one peer, as the engine reports them.
fn path_figures(peer: &PeerStatus) -> (Option<f64>, u64, u64) {
    (peer.latency_ms, peer.relay_rx_bytes, peer.relay_tx_bytes)
}

/// STUN through the data plane's WireGuard socket (fresh probes, not the last discovery round) and the relay state.
async fn netcheck(agent: &AgentState) -> NetcheckReport {
    let mut notes = Vec::new();
    let mut servers = agent.discovery.get().servers;
    if servers.is_empty() {
        // Not learned yet (or the coordinator was away): ask now.
        let found = async {
            let client = ControlClient::new(&agent.identity.coordinator_url, agent.identity.pinned()?)?;
            netcheck::stun_servers(&client).await.map_err(anyhow::Error::from)
        }
        .await;
        match found {
            Ok(found) => servers = found,
            Err(e) => notes.push(format!("no STUN check: {e}")),
        }
    }
    let probes = netcheck::probe_all(&servers, |server| agent.dataplane.stun(server, netcheck::STUN_TIMEOUT)).await;
    NetcheckReport::new(CheckSource::Agent, probes, Some(agent.relay.snapshot()), notes)
}

async fn ping(
    write: &mut (impl AsyncWriteExt + Unpin),
    agent: &AgentState,
    target: &str,
    count: u16,
    timeout_secs: u16,
) -> io::Result<()> {
    let Some(map) = agent.map() else {
        return send(
            write,
            &Reply::Error("no network map yet: the agent has not heard from the coordinator".into()),
        )
        .await;
    };
    // `gpu-server`, `gpu-server.mesh.internal` and `gpu-server.mesh.internal.` all name the same peer.
    let bare = target.strip_suffix('.').unwrap_or(target);
    let bare = map
        .dns
        .as_ref()
        .and_then(|dns| {
            let cut = bare.len().checked_sub(dns.domain.len() + 1)?;
            let (name, suffix) = (bare.get(..cut)?, bare.get(cut..)?);
            (suffix.strip_prefix('.')?.eq_ignore_ascii_case(&dns.domain)).then_some(name)
        })
        .unwrap_or(bare);
    let peer = match target.parse::<Ipv4Addr>() {
        Ok(ip) => map.peers.iter().find(|p| p.ip == ip),
        Err(_) => map.peers.iter().find(|p| p.name.eq_ignore_ascii_case(bare)),
    };
    let Some(peer) = peer else {
        let names: Vec<&str> = map.peers.iter().map(|p| p.name.as_str()).collect();
        let message =
            if bare.eq_ignore_ascii_case(&map.self_node.name) || target.parse::<Ipv4Addr>() == Ok(map.self_node.ip) {
                format!("{target} is this node")
            } else {
                format!(
                    "no peer named {target:?} (peers: {})",
                    if names.is_empty() {
                        "none".into()
                    } else {
                        names.join(", ")
                    }
                )
            };
        return send(write, &Reply::Error(message)).await;
    };
    let (dest, key) = (peer.ip, peer.public_key);
    send(
        write,
        &Reply::PingStart {
            name: peer.name.clone(),
            ip: dest,
        },
    )
    .await?;
    let pinger = match Pinger::new(agent.identity.ip) {
        Ok(pinger) => Arc::new(pinger),
        Err(e) => return send(write, &Reply::Error(format!("cannot ping: {e}"))).await,
    };
    let timeout = Duration::from_secs(u64::from(timeout_secs));
    let mut received = 0;
    for seq in 1..=count {
        let echo = {
            let pinger = pinger.clone();
            tokio::task::spawn_blocking(move || pinger.echo(dest, seq, timeout)).await
        };
        let rtt = match echo {
            Ok(Ok(rtt)) => rtt,
            Ok(Err(e)) => return send(write, &Reply::Error(format!("ping failed: {e}"))).await,
            Err(e) => return send(write, &Reply::Error(format!("ping failed: {e}"))).await,
        };
        received += u16::from(rtt.is_some());
        let live = agent.dataplane.status().peers.into_iter().find(|p| p.public_key == key);
        let reply = PingReply {
            seq,
            rtt_ms: rtt.map(|d| d.as_secs_f64() * 1000.0),
            // The path the peer is on as the reply arrives (the engine switches paths between echoes).
            path: live.as_ref().map_or("none", |p| p.path).to_string(),
            endpoint: live
                .filter(|p| p.path == "direct")
                .and_then(|p| p.endpoint)
                .map(|e: SocketAddr| e.to_string()),
        };
        send(write, &Reply::PingReply(reply)).await?;
        if seq < count {
            tokio::time::sleep(PING_INTERVAL.saturating_sub(rtt.unwrap_or(PING_INTERVAL))).await;
        }
    }
    send(write, &Reply::PingDone(PingSummary { sent: count, received })).await
}

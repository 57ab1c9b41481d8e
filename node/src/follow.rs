//! Following the coordinator: the map stream and the endpoint reports of a running agent.
//!
//! Owns the [`ControlLoop`]: open the map stream resuming from the last applied version, apply each message through
//! [`AgentState::apply`], persist the map to the cache, reconnect with [`Backoff`] when the coordinator goes away
//! (the agent is then `degraded` and the mesh keeps running from the last map), and stop with
//! [`StopReason::Removed`] when the coordinator no longer accepts this node's credential. Endpoint discovery runs
//! beside it: local candidates plus the STUN-mapped address (STUN through the data plane's WireGuard socket), handed
//! to the data plane and reported whenever the set changes. Talks to the data plane only through [`crate::agent::DataPlane`], so tests run it against the real
//! coordinator with a fake engine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshd_protocol::api::EndpointReport;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agent::{AgentState, Phase};
use crate::cache::MapCache;
use crate::control::{Backoff, ControlClient, ControlError};
use crate::{endpoints, netcheck};

/// A streak of failed reconnects is logged on its first attempt and then every this many attempts (about every
/// five minutes once the backoff is at its cap).
const FAILURE_LOG_EVERY: u32 = 10;

/// How often local addresses are checked for changes (and a failed report retried).
const ENDPOINT_POLL_INTERVAL: Duration = Duration::from_secs(10);
/// STUN again after this long plus up to [`STUN_JITTER`] (keeps the mapped address fresh; NAT mappings of the
/// WireGuard socket are kept open by WireGuard and disco traffic, not by STUN).
const STUN_INTERVAL: Duration = Duration::from_secs(20);
const STUN_JITTER: Duration = Duration::from_secs(5);

/// Why the control loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Asked to stop (signal, `meshd down`).
    Shutdown,
    /// The coordinator rejected this node's credential: the admin deleted it. Peers and cache are gone.
    Removed,
}

/// Follows the coordinator: the map stream (reconnecting with backoff, resuming from the last applied version) and
/// endpoint reports. Runs until `shutdown` or until the node is removed.
pub struct ControlLoop {
    pub agent: Arc<AgentState>,
    pub client: ControlClient,
    pub credential: String,
    pub cache: MapCache,
}

impl ControlLoop {
    pub async fn run(self, shutdown: CancellationToken) -> StopReason {
        let removed = CancellationToken::new();
        let reporter = tokio::spawn(report_endpoints(
            self.agent.clone(),
            self.client.clone(),
            self.credential.clone(),
            shutdown.child_token(),
            removed.clone(),
        ));
        let keys = tokio::spawn(sync_preshared_keys(
            self.agent.clone(),
            self.client.clone(),
            self.credential.clone(),
            self.cache.clone(),
            shutdown.child_token(),
        ));
        let reason = tokio::select! {
            reason = self.follow_map(&removed) => reason,
            () = shutdown.cancelled() => StopReason::Shutdown,
            () = removed.cancelled() => StopReason::Removed,
        };
        reporter.abort();
        keys.abort();
        // Wait for the aborts to land: the tasks hold the agent (and so the data plane) until they are dropped.
        let _ = reporter.await;
        let _ = keys.await;
        if reason == StopReason::Removed {
            tracing::error!("the coordinator no longer accepts this node's credential: it was removed by an admin");
            self.agent.clear();
            if let Err(e) = self.cache.remove() {
                tracing::warn!("{e}");
            }
        }
        self.agent.set_phase(Phase::Stopped);
        reason
    }

    async fn follow_map(&self, removed: &CancellationToken) -> StopReason {
        let mut backoff = Backoff::new();
        let mut want_full = false;
        // Failures since the last successful connection: the first of a streak is a warning, the rest are
        // repeated only every `FAILURE_LOG_EVERY` attempts so that a long outage does not flood the log.
        let mut failures: u32 = 0;
        loop {
            let since = if want_full { None } else { self.agent.map_version() };
            want_full = false;
            match self.client.open_map(&self.credential, since).await {
                Ok(mut stream) => {
                    // Connected: a resumed stream with nothing missed stays silent until the next change.
                    tracing::debug!(url = %self.client.base_url(), ?since, "map stream open");
                    self.agent.set_phase(Phase::Running);
                    backoff.reset();
                    if failures > 0 {
                        tracing::info!(attempts = failures + 1, "reconnected to the coordinator");
                    }
                    failures = 0;
                    loop {
                        match stream.next().await {
                            None => {
                                tracing::warn!("the coordinator closed the map stream; reconnecting");
                                break;
                            }
                            Some(Ok(message)) => match self.agent.apply(message) {
                                Ok(Some(map)) => {
                                    if let Err(e) = self.cache.store(&map) {
                                        tracing::warn!("{e}");
                                    }
                                }
                                Ok(None) => {}
                                Err(e) => {
                                    tracing::warn!("{e}; asking the coordinator for a full map");
                                    want_full = true;
                                    break;
                                }
                            },
                            Some(Err(ControlError::Unauthorized { .. })) => return StopReason::Removed,
                            Some(Err(e)) => {
                                tracing::warn!("map stream broke: {e}");
                                break;
                            }
                        }
                    }
                }
                Err(ControlError::Unauthorized { .. }) => return StopReason::Removed,
                Err(e) => {
                    failures += 1;
                    if failures % FAILURE_LOG_EVERY == 1 {
                        if e.is_transient() {
                            tracing::warn!(attempt = failures, "{e}; the mesh keeps running from the last map");
                        } else {
                            tracing::error!(attempt = failures, "{e}; the mesh keeps running from the last map");
                        }
                    } else {
                        tracing::debug!(attempt = failures, "{e}");
                    }
                }
            }
            if removed.is_cancelled() {
                return StopReason::Removed;
            }
            self.agent.set_phase(Phase::Degraded);
            let delay = backoff.next_delay();
            tracing::debug!(?delay, "reconnecting to the coordinator");
            tokio::time::sleep(delay).await;
        }
    }
}

/// Fetches the preshared keys whenever the map has a pair (a stock device registered with one) whose key is not
/// known yet, retrying with backoff while the coordinator cannot be reached; each fetch is cached on disk. Between
/// changes it costs nothing (it waits on the map watch).
async fn sync_preshared_keys(
    agent: Arc<AgentState>,
    client: ControlClient,
    credential: String,
    cache: MapCache,
    shutdown: CancellationToken,
) {
    let mut maps = agent.subscribe_map();
    let mut backoff = Backoff::new();
    loop {
        if agent.needs_preshared_keys() {
            match client.preshared_keys(&credential).await {
                Ok(body) => {
                    backoff.reset();
                    let keys: std::collections::HashMap<_, _> =
                        body.keys.into_iter().map(|k| (k.peer, k.preshared_key)).collect();
                    tracing::info!(pairs = keys.len(), "preshared keys fetched");
                    if let Err(e) = cache.store_preshared_keys(&keys) {
                        tracing::warn!("{e}");
                    }
                    agent.set_preshared_keys(keys);
                }
                Err(e) => {
                    tracing::warn!("could not fetch preshared keys: {e}; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff.next_delay()) => continue,
                    }
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = maps.changed() => if changed.is_err() { return },
        }
    }
}

/// Reports this host's endpoints (local candidates + the STUN-mapped address) at start and whenever the set
/// changes, and hands the same set to the data plane; retries a failed report on the next poll. STUN runs every
/// [`STUN_INTERVAL`] (plus jitter) and at once when the local addresses change (a network change).
async fn report_endpoints(
    agent: Arc<AgentState>,
    client: ControlClient,
    credential: String,
    shutdown: CancellationToken,
    removed: CancellationToken,
) {
    let mut reported: Option<Vec<SocketAddr>> = None;
    let mut local_seen: Option<Vec<SocketAddr>> = None;
    let mut stun = StunState::default();
    let mut next_stun = Instant::now();
    let mut ticker = tokio::time::interval(ENDPOINT_POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
            () = tokio::time::sleep_until(next_stun) => {}
        }
        let addresses = match endpoints::local_addresses() {
            Ok(addresses) => addresses,
            Err(e) => {
                tracing::warn!("cannot list local addresses: {e}");
                continue;
            }
        };
        let port = agent.dataplane.listen_port();
        let local = endpoints::candidate_endpoints(&addresses, &agent.interface, agent.identity.network, port);
        let local_changed = local_seen.as_ref() != Some(&local);
        if local_changed || Instant::now() >= next_stun {
            if local_changed && local_seen.is_some() {
                tracing::info!(endpoints = ?local, "local addresses changed; asking STUN again");
            }
            stun.round(&agent, &client).await;
            next_stun = Instant::now() + STUN_INTERVAL + STUN_JITTER.mul_f64(rand::random::<f64>());
            local_seen = Some(local.clone());
        }
        let current = endpoints::merge_endpoints(&local, stun.mapped);
        if agent.discovery.get().endpoints != current {
            tracing::debug!(endpoints = ?current, "own endpoints");
            agent.dataplane.set_own_endpoints(current.clone());
            agent.discovery.update(|d| d.endpoints = current.clone());
        }
        if reported.as_ref() == Some(&current) {
            continue;
        }
        let report = EndpointReport {
            endpoints: current.clone(),
        };
        match client.report_endpoints(&credential, &report).await {
            Ok(()) => {
                tracing::info!(endpoints = ?current, "reported endpoints");
                reported = Some(current);
            }
            Err(ControlError::Unauthorized { .. }) => {
                removed.cancel();
                return;
            }
            Err(e) => {
                tracing::debug!("endpoint report failed, retrying later: {e}");
                reported = None;
            }
        }
    }
}

/// The STUN side of endpoint discovery: the coordinator's STUN servers (asked for again after a round without any
/// answer) and the last mapped address.
#[derive(Debug, Default)]
struct StunState {
    servers: Option<Vec<SocketAddr>>,
    mapped: Option<SocketAddr>,
}

impl StunState {
    /// Probes every STUN server through the data plane's WireGuard socket (the mapping peers will see).
    async fn round(&mut self, agent: &AgentState, client: &ControlClient) {
        if self.servers.is_none() {
            match netcheck::stun_servers(client).await {
                Ok(servers) => {
                    tracing::debug!(?servers, "STUN servers");
                    agent.discovery.update(|d| {
                        d.servers = servers.clone();
                        d.note = None;
                    });
                    self.servers = Some(servers);
                }
                Err(netcheck::ServersError::StunOff) => {
                    agent
                        .discovery
                        .update(|d| d.note = Some(netcheck::ServersError::StunOff.to_string()));
                    self.servers = Some(Vec::new());
                }
                Err(e) => {
                    // The coordinator is away: keep the last mapped address (it is likelier right than nothing).
                    tracing::debug!("cannot learn the STUN servers: {e}");
                    agent.discovery.update(|d| d.note = Some(e.to_string()));
                    return;
                }
            }
        }
        let servers = self.servers.clone().unwrap_or_default();
        if servers.is_empty() {
            self.mapped = None;
            return;
        }
        let probes = netcheck::probe_all(&servers, |server| agent.dataplane.stun(server, netcheck::STUN_TIMEOUT)).await;
        let mapped = probes.iter().find_map(|p| p.mapped);
        if mapped != self.mapped {
            match mapped {
                Some(address) => {
                    tracing::info!(%address, mapping = %netcheck::classify(&probes), "STUN-mapped address")
                }
                None => tracing::info!("no STUN answer: UDP to the coordinator may be blocked (the relay still works)"),
            }
        }
        if mapped.is_none() {
            // Ask for the servers again next round: the coordinator's STUN configuration may have changed.
            self.servers = None;
        }
        self.mapped = mapped;
        agent.discovery.update(|d| d.probes = probes);
    }
}

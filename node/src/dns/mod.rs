//! Names on this node: `ssh user@gpu-server` and `ssh user@gpu-server.mesh.internal` work with no step beyond
//! `meshd join`, and follow the map stream (a join, rename or deletion resolves, or stops resolving, within a
//! second or two).
//!
//! Owns the [`NameService`]: it watches the applied map, builds the [`NameTable`] (pure, in
//! `meshd_protocol::dns`, which also decides every DNS answer), publishes it to the agent's DNS responder
//! ([`resolver`], on the overlay address, port 53; it forwards other names of overlay clients to the host's
//! upstream resolvers, [`forward`]) and to the host:
//! - with systemd-resolved (its stub in `/etc/resolv.conf`, same network namespace): the mesh interface gets the
//!   responder as its per-link DNS server for the domain and the overlay's reverse zones ([`resolved`]);
//! - elsewhere (no resolved, containers, network namespaces): a managed block in the hosts file ([`hosts`]), which
//!   every resolver library reads first.
//!
//! `meshd down` (and `leave`, and removal by an admin) take the names away again: the block is removed, resolved's
//! link settings reverted. Knows nothing of packets; reads the map only through the agent's map watch.

pub mod forward;
pub mod hosts;
pub mod resolved;
pub mod resolver;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use meshd_protocol::NetworkMap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use hosts::HostsFile;
pub use meshd_protocol::dns::{Lookup, NameTable};
pub use resolved::Resolved;
pub use resolver::{Resolver, ResolverCounters, SharedTable};

/// Port of the responder on the overlay address: the standard one, so `DNS = <ip>` lines and `dig @<ip>` work.
pub const DNS_PORT: u16 = 53;

/// How the agent makes names resolve on this host (`meshd up --dns`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DnsMode {
    /// systemd-resolved when the host uses it, else the hosts file.
    #[default]
    Auto,
    /// systemd-resolved per-link DNS (falls back to the hosts file, with a warning, when resolved is not usable).
    Resolved,
    /// A managed block in the hosts file.
    Hosts,
    /// Leave name resolution alone: no responder, no hosts block.
    Off,
}

/// What the name service needs from the agent's configuration.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    pub mode: DnsMode,
    pub hosts_file: PathBuf,
    pub interface: String,
    /// This node's overlay address: where the responder listens.
    pub address: Ipv4Addr,
    /// Port of the responder ([`DNS_PORT`]; tests use 0).
    pub port: u16,
}

/// Names as `meshd status` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStatus {
    /// `resolved`, `hosts` or `off`: how the host resolves mesh names.
    pub mode: String,
    /// The network's domain (null until a map with names arrived, or from a coordinator without names).
    pub domain: Option<String>,
    /// Where the responder answers (`10.77.0.2:53`); null when it could not bind.
    pub resolver: Option<String>,
    /// The hosts file holding the block (hosts mode).
    pub hosts_file: Option<String>,
    /// Names resolvable now.
    pub names: usize,
    /// Queries answered (forwarded ones included), and datagrams ignored (not from the overlay or loopback, or not
    /// a query).
    pub answered: u64,
    pub ignored: u64,
    /// Why the set-up is not as asked (resolved unusable, port 53 taken).
    pub note: Option<String>,
    /// Why the last name update could not be published (the hosts file not writable, resolvectl failing); null once
    /// an update succeeds.
    #[serde(default)]
    pub error: Option<String>,
}

/// The status the service writes and the control socket reads.
#[derive(Debug, Default)]
pub struct DnsState {
    status: Mutex<DnsStatus>,
    counters: std::sync::OnceLock<Arc<ResolverCounters>>,
}

impl DnsState {
    /// The status with the responder's counters as of now.
    pub fn snapshot(&self) -> DnsStatus {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(c) = self.counters.get() {
            status.answered = c.answered.load(Ordering::Relaxed);
            status.ignored = c.ignored.load(Ordering::Relaxed);
        }
        status
    }
}

pub type StatusCell = Arc<DnsState>;

/// Where names go on this host.
enum Backend {
    Resolved(Resolved),
    Hosts(HostsFile),
    None,
}

/// The running name service; [`NameService::stop`] takes the names away again.
pub struct NameService {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    responder: Option<JoinHandle<()>>,
}

impl NameService {
    /// Starts the responder and the OS integration, and follows `maps` until [`NameService::stop`].
    pub async fn start(settings: DnsSettings, maps: watch::Receiver<Option<NetworkMap>>, status: StatusCell) -> Self {
        let stop = CancellationToken::new();
        if settings.mode == DnsMode::Off {
            set(&status, |s| s.mode = "off".into());
            return Self {
                stop,
                task: None,
                responder: None,
            };
        }
        let shared: SharedTable = Arc::new(ArcSwapOption::empty());
        let mut notes = Vec::new();
        let address = SocketAddr::from((settings.address, settings.port));
        // Read once: the upstreams overlay clients' other names go to (stock devices send every query here).
        let resolv_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let upstreams = forward::upstreams(&resolv_conf, settings.address);
        if upstreams.is_empty() {
            tracing::info!("no nameserver in /etc/resolv.conf: names outside the mesh are refused to overlay clients");
        }
        let responder = match Resolver::bind(address, shared.clone(), upstreams.clone()).await {
            Ok(resolver) => {
                let bound = resolver.local_addr().unwrap_or(address);
                set(&status, |s| s.resolver = Some(bound.to_string()));
                let _ = status.counters.set(resolver.counters());
                tracing::info!(%bound, ?upstreams, "DNS responder for mesh names, forwarding for overlay clients");
                Some(tokio::spawn(resolver.run(stop.child_token())))
            }
            Err(e) => {
                let note = format!(
                    "cannot answer DNS on {address} ({e}): another DNS server may listen on all addresses; names \
                     resolve through the hosts file"
                );
                tracing::warn!("{note}");
                notes.push(note);
                None
            }
        };
        let backend = choose_backend(&settings, responder.is_some(), &mut notes);
        set(&status, |s| {
            s.mode = match &backend {
                Backend::Resolved(_) => "resolved",
                Backend::Hosts(_) => "hosts",
                Backend::None => "off",
            }
            .into();
            s.hosts_file = match &backend {
                Backend::Hosts(h) => Some(h.path.display().to_string()),
                _ => None,
            };
            s.note = (!notes.is_empty()).then(|| notes.join("; "));
        });
        let task = tokio::spawn(follow(
            backend,
            settings.address,
            maps,
            shared,
            status,
            stop.child_token(),
        ));
        Self {
            stop,
            task: Some(task),
            responder,
        }
    }

    /// Takes the names away (hosts block removed, resolved reverted) and stops the responder; returns when done.
    pub async fn stop(mut self) {
        self.stop.cancel();
        for task in [self.task.take(), self.responder.take()].into_iter().flatten() {
            if let Err(e) = task.await {
                tracing::warn!("name service task failed: {e}");
            }
        }
    }
}

fn set(state: &DnsState, f: impl FnOnce(&mut DnsStatus)) {
    f(&mut state.status.lock().unwrap_or_else(|p| p.into_inner()));
}

fn choose_backend(settings: &DnsSettings, responder: bool, notes: &mut Vec<String>) -> Backend {
    let hosts = || Backend::Hosts(HostsFile::new(&settings.hosts_file, &settings.interface));
    match settings.mode {
        DnsMode::Off => Backend::None,
        DnsMode::Hosts => hosts(),
        DnsMode::Auto | DnsMode::Resolved => {
            let resolv_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            let reason = if responder {
                resolved::unavailable_reason(&resolv_conf)
            } else {
                Some("the DNS responder is not running".into())
            };
            match reason.map_or_else(|| Resolved::system(&settings.interface).ok_or_else(String::new), Err) {
                Ok(resolved) => {
                    tracing::info!(interface = %settings.interface, "mesh names through systemd-resolved");
                    Backend::Resolved(resolved)
                }
                Err(reason) => {
                    if settings.mode == DnsMode::Resolved {
                        let note = format!("--dns resolved: {reason}; using {}", settings.hosts_file.display());
                        tracing::warn!("{note}");
                        notes.push(note);
                    } else {
                        tracing::info!(
                            hosts = %settings.hosts_file.display(),
                            "mesh names through the hosts file (systemd-resolved not used: {reason})"
                        );
                    }
                    hosts()
                }
            }
        }
    }
}

/// Applies every name change to the responder and the host until `stop`, then takes the names away.
async fn follow(
    backend: Backend,
    address: Ipv4Addr,
    mut maps: watch::Receiver<Option<NetworkMap>>,
    shared: SharedTable,
    status: StatusCell,
    stop: CancellationToken,
) {
    let backend = Arc::new(backend);
    let mut current: Option<Arc<NameTable>> = None;
    // resolved's link settings depend on the domain and network only; re-applied when they change.
    let mut resolved_for: Option<(String, ipnet::Ipv4Net)> = None;
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                () = stop.cancelled() => break,
                changed = maps.changed() => if changed.is_err() { break },
            }
        }
        let table = maps
            .borrow_and_update()
            .as_ref()
            .and_then(NameTable::from_map)
            .map(Arc::new);
        if !first && table == current {
            continue;
        }
        if let Some(rejected) = table.as_ref().map(|t| t.rejected()).filter(|n| *n > 0) {
            tracing::warn!(
                rejected,
                "the map holds names that are not valid DNS labels; they do not resolve"
            );
        }
        first = false;
        shared.store(table.clone());
        let backend = backend.clone();
        let published = table.clone();
        let previous = resolved_for.clone();
        let outcome = tokio::task::spawn_blocking(move || publish(&backend, address, published.as_deref(), previous))
            .await
            .unwrap_or_else(|e| Err(format!("name update task failed: {e}")));
        match outcome {
            Ok(applied) => {
                resolved_for = applied;
                set(&status, |s| s.error = None);
            }
            Err(e) => {
                tracing::warn!("updating names: {e}");
                set(&status, |s| s.error = Some(e.clone()));
            }
        }
        if let Some(table) = &table {
            tracing::debug!(names = table.len(), domain = table.domain(), "names updated");
        }
        set(&status, |s| {
            s.domain = table.as_ref().map(|t| t.domain().to_string());
            s.names = table.as_ref().map_or(0, |t| t.len());
        });
        current = table;
    }
    // Take the names away: nothing may keep resolving to this node's interface once it is down.
    shared.store(None);
    let backend = backend.clone();
    let cleanup = tokio::task::spawn_blocking(move || match &*backend {
        Backend::Hosts(hosts) => hosts.write(None).map(drop).map_err(|e| e.to_string()),
        Backend::Resolved(resolved) => resolved.revert(),
        Backend::None => Ok(()),
    })
    .await;
    match cleanup {
        Ok(Ok(())) => tracing::debug!("mesh names removed"),
        Ok(Err(e)) => tracing::warn!("removing mesh names: {e}"),
        Err(e) => tracing::warn!("removing mesh names: {e}"),
    }
}

/// Publishes one table to the host. Returns what resolved is configured for now.
fn publish(
    backend: &Backend,
    address: Ipv4Addr,
    table: Option<&NameTable>,
    resolved_for: Option<(String, ipnet::Ipv4Net)>,
) -> Result<Option<(String, ipnet::Ipv4Net)>, String> {
    match backend {
        Backend::None => Ok(None),
        Backend::Hosts(hosts) => {
            if hosts.write(table).map_err(|e| e.to_string())? {
                tracing::debug!(path = %hosts.path.display(), "hosts file updated");
            }
            Ok(None)
        }
        Backend::Resolved(resolved) => {
            let Some(table) = table else {
                resolved.revert()?;
                return Ok(None);
            };
            let wanted = table.network().map(|net| (table.domain().to_string(), net));
            if let Some((domain, network)) = &wanted
                && resolved_for.as_ref() != Some(&(domain.clone(), *network))
            {
                resolved.apply(address, domain, *network)?;
            }
            resolved.flush_caches()?;
            Ok(wanted)
        }
    }
}

//! The meshd coordinator: enrols nodes with join tokens, allocates overlay addresses, streams each node its network
//! map, and serves the admin API. SQLite (default) or PostgreSQL.
//!
//! # Layout
//! - [`config`]: flags, `MESHD_*` variables and the TOML file, merged and validated into one typed config.
//! - [`http`]: the router, node and admin handlers, the map stream (SSE), auth extractors.
//! - [`error`]: `ApiError`, the one place that picks status codes and the error body.
//! - [`store`]: the only code that touches SQL; serialized write transactions; the change log.
//! - [`broker`]: fan-out of committed changes to this process's streams, and across replicas via LISTEN/NOTIFY.
//! - [`ipam`], [`naming`], [`tokens`], [`netmap`], [`wgconfig`], [`secrets`]: pure (no IO) policy and formats:
//!   addresses, names, token validity, map building, wg-quick files, credential formats.
//! - [`ops`]: operations shared by the API and the CLI; [`cli`]: the non-serving commands.
//! - [`tls`]: the self-signed certificate and its fingerprint; [`telemetry`]: Prometheus metrics.
//! - [`joinkey`]: the static X25519 join key and the check of join proofs (proof of possession of a node's key).
//! - [`stun`]: the STUN server (UDP) nodes learn their NAT-mapped address from; [`relay`]: the relay registry and
//!   connections that forward datagrams between agents without a direct path.
//!
//! Entry point for tests and embedding: [`run`] with a bound listener and a shutdown future.

pub mod broker;
pub mod cli;
pub mod config;
pub mod error;
pub mod gateway;
pub mod http;
pub mod ipam;
pub mod joinkey;
pub mod mapcache;
pub mod model;
pub mod naming;
pub mod netmap;
pub mod ops;
pub mod presence;
pub mod psk;
pub mod qr;
pub mod relay;
pub mod secrets;
pub mod store;
pub mod stun;
pub mod telemetry;
pub mod tls;
pub mod tokens;
pub mod wgconfig;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use crate::config::{ServeConfig, TlsMode};
use crate::store::{Store, settings_keys};

/// Runs the coordinator on `listener` until `shutdown` completes: opens the database (migrations), prepares TLS,
/// starts the broker and serves HTTP(S). Map streams are closed at shutdown.
pub async fn run(
    config: ServeConfig,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    tls::install_crypto_provider();
    telemetry::describe();
    let metrics = telemetry::handle();
    std::fs::create_dir_all(&config.storage.data_dir)
        .with_context(|| format!("creating the data directory {}", config.storage.data_dir.display()))?;
    if let Some(file) = store::sqlite_file(&config.storage.database_url) {
        check_writable(file.parent().unwrap_or(std::path::Path::new(".")))?;
    }
    let store = Store::connect(&config.storage.database_url)
        .await
        .with_context(|| format!("opening the database {}", redact_url(&config.storage.database_url)))?;
    check_integrity(&store, &config.storage.database_url).await?;
    check_network(&store, config.network).await?;
    let full_map_before = map_settings_epoch(&store, config.network, &config.dns_domain).await?;
    let join_key = load_join_key(&store).await?;

    let local = listener.local_addr().context("reading the listening address")?;
    let tls_on = config.tls != TlsMode::Off;
    let (public_url, guessed) = match &config.public_url {
        Some(url) => (url.clone(), false),
        None => (guess_public_url(local, tls_on), true),
    };
    let host = public_host(&public_url);
    let tls_files = tls::prepare(&config.tls, &config.storage.data_dir, std::slice::from_ref(&host))?;
    let fingerprint = tls_files.as_ref().map(|t| t.fingerprint);
    store.set_setting(settings_keys::PUBLIC_URL, &public_url).await?;
    store
        .set_setting(
            settings_keys::CERT_FINGERPRINT,
            &fingerprint.map(|f| f.to_hex()).unwrap_or_default(),
        )
        .await?;
    // Nodes the previous process had online stay online for the grace period (see `presence`).
    let previously_online = store.online_node_ids().await?;
    if guessed {
        tracing::warn!(url = %public_url, "no --public-url given; guessed from this host (nodes must reach it)");
        println!("Nodes will reach this coordinator at {public_url} (guessed; if that is wrong, pass --public-url).");
    }
    tracing::info!(
        listen = %local, url = %public_url, network = %config.network,
        tls = ?fingerprint.map(|f| f.to_hex()), "coordinator serving"
    );

    // Load the certificate before starting anything that would need stopping if it fails.
    let tls_config = match tls_files {
        None => None,
        Some(files) => Some(http::serve::tls_config(&files.cert, &files.key)?),
    };
    let cancel = CancellationToken::new();
    let broker = broker::Broker::start(store.clone(), config.keep_changes, cancel.clone()).await?;
    let presence = presence::Presence::start(store.clone(), previously_online, config.presence_grace, cancel.clone());
    // STUN answers on the listening address's IP (all addresses when it listens on all).
    let stun_ports = stun::start(local.ip(), &config.stun_ports, cancel.clone())
        .await
        .inspect_err(|_| cancel.cancel())?;
    let relay = config
        .relay
        .then(|| relay::Relay::start(store.clone(), &broker, config.relay_timers, cancel.clone()));
    let gateway = match (&config.gateway, &relay) {
        (Some(gateway_config), Some(relay)) => {
            let addr = std::net::SocketAddr::new(local.ip(), gateway_config.port);
            let gateway =
                gateway::Gateway::start(addr, store.clone(), broker.subscribe(), relay.clone(), cancel.clone())
                    .await
                    .inspect_err(|_| cancel.cancel())?;
            relay.attach_gateway(&gateway);
            Some(gateway)
        }
        _ => None,
    };
    publish_gateway_endpoint(&store, config.gateway.as_ref(), gateway.as_deref(), &host).await?;
    let state = http::AppState::new(http::StateInner {
        store: store.clone(),
        broker,
        presence,
        network: config.network,
        dns: meshd_protocol::DnsConfig {
            domain: config.dns_domain.clone(),
        },
        full_map_before,
        public_url,
        fingerprint,
        join_key,
        shutdown: cancel.clone(),
        metrics,
        request_timeout: config.request_timeout,
        stun_ports,
        relay,
        gateway,
        openapi_json: OnceLock::new(),
    });
    let app = http::router(state.clone());

    let on_shutdown = {
        let cancel = cancel.clone();
        async move {
            shutdown.await;
            cancel.cancel();
        }
    };
    listener.set_nonblocking(true).context("configuring the listener")?;
    let listener = tokio::net::TcpListener::from_std(listener).context("registering the listener")?;
    tokio::spawn(on_shutdown);
    let served = http::serve::run(listener, tls_config, app, state, config.limits, cancel.clone())
        .await
        .context(if tls_on { "serving HTTPS" } else { "serving HTTP" });
    cancel.cancel();
    store.close().await;
    served
}

/// Writes where devices must send (the `Endpoint` of exported configs; empty: no gateway) for the API and the CLI.
async fn publish_gateway_endpoint(
    store: &Store,
    config: Option<&config::GatewayConfig>,
    gateway: Option<&gateway::Gateway>,
    public_host: &str,
) -> anyhow::Result<()> {
    let endpoint = match (config, gateway) {
        (Some(config), Some(gateway)) => match &config.endpoint {
            Some(endpoint) => endpoint.clone(),
            None => {
                let port = gateway.local_addr()?.port();
                if public_host.contains(':') {
                    format!("[{public_host}]:{port}")
                } else {
                    format!("{public_host}:{port}")
                }
            }
        },
        _ => String::new(),
    };
    store
        .set_setting(settings_keys::GATEWAY_ENDPOINT, &endpoint)
        .await
        .context("publishing the gateway endpoint")?;
    Ok(())
}

/// SQLite writes its WAL and lock files next to the database: a read-only directory (a volume mounted `ro`, a file
/// system the kernel remounted read-only after errors) would only show up as failing joins. Say so at start instead.
fn check_writable(dir: &std::path::Path) -> anyhow::Result<()> {
    let probe = dir.join(format!(".meshd-write-check-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .and_then(|mut file| std::io::Write::write_all(&mut file, b"ok"));
    let _ = std::fs::remove_file(&probe);
    if let Err(e) = written {
        let what = if e.raw_os_error() == Some(libc::EROFS) {
            "is on a read-only file system"
        } else {
            "is not writable"
        };
        bail!(
            "the database directory {} {what} ({e}): the coordinator must write its database there; remount it \
             read-write or fix its permissions, or choose another directory with --data-dir (or a database with \
             --database-url)",
            dir.display()
        );
    }
    Ok(())
}

/// Refuses to serve from a damaged SQLite file (the error says to restore from a backup); a check that does not
/// finish in time is reported and start-up goes on.
async fn check_integrity(store: &Store, url: &str) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let finished = store
        .check_integrity(store::INTEGRITY_CHECK_TIMEOUT)
        .await
        .with_context(|| format!("checking the database {}", redact_url(url)))
        .inspect_err(|e| tracing::error!(error = %format!("{e:#}"), "refusing to serve from a damaged database"))?;
    if finished {
        tracing::debug!(took = ?started.elapsed(), "database integrity check passed");
    } else {
        tracing::warn!(
            limit = ?store::INTEGRITY_CHECK_TIMEOUT,
            "the database integrity check did not finish in time; serving without it (run `sqlite3 meshd.db \
             'PRAGMA quick_check'` while the coordinator is stopped to check it)"
        );
    }
    Ok(())
}

/// Refuses to start when nodes hold addresses outside the configured network (a changed `--network`): they would
/// keep addresses no new node could be routed to.
async fn check_network(store: &Store, network: ipnet::Ipv4Net) -> anyhow::Result<()> {
    let outside = store.nodes_outside(network).await?;
    if let Some((name, ip)) = outside.first() {
        let previous = store
            .setting(settings_keys::NETWORK)
            .await?
            .unwrap_or_else(|| "another network".into());
        bail!(
            "{} node(s) have addresses outside --network {network} (e.g. `{name}` has {ip}); they were allocated \
             from {previous}: start with --network {previous}, or delete those nodes first",
            outside.len()
        );
    }
    store.set_setting(settings_keys::NETWORK, &network.to_string()).await?;
    Ok(())
}

/// The version below which a resuming node gets a full map instead of deltas: network-wide settings (the network,
/// the DNS domain) are only in full maps, so when they differ from what the last `serve` had, every node needs a new
/// one. The next change to be written gets a version above today's newest, so a node that received a full map now
/// (at today's newest version) still gets full maps on reconnects until that next change: harmless, and cheaper
/// than a change row per node.
async fn map_settings_epoch(store: &Store, network: ipnet::Ipv4Net, dns_domain: &str) -> anyhow::Result<u64> {
    let current = format!("{network} {dns_domain}");
    let previous = store.setting(settings_keys::MAP_SETTINGS).await?;
    if previous.as_deref() != Some(current.as_str()) {
        let epoch = store.current_version().await? + 1;
        if let Some(previous) = previous {
            tracing::info!(%previous, %current, "network settings changed: every node gets a new full map");
        }
        store
            .set_setting(settings_keys::FULL_MAP_BEFORE, &epoch.to_string())
            .await?;
        store.set_setting(settings_keys::MAP_SETTINGS, &current).await?;
    }
    let epoch = store.setting(settings_keys::FULL_MAP_BEFORE).await?;
    Ok(epoch.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// The join key from the database, generated and stored on the first start (shared by every replica).
async fn load_join_key(store: &Store) -> anyhow::Result<joinkey::JoinKey> {
    let stored = store
        .setting_or_insert(settings_keys::JOIN_KEY, &joinkey::JoinKey::generate_stored())
        .await
        .context("reading the join key from the database")?;
    let key = joinkey::JoinKey::from_stored(&stored)?;
    tracing::debug!(join_key = ?key.public_key(), "join key loaded");
    Ok(key)
}

/// Host part of a URL (`https://host:port` -> `host`, brackets of IPv6 literals removed).
pub fn public_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6).to_string();
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h).to_string()
}

/// `scheme://ip:port` for nodes, when the admin gave no `--public-url`: the listening address if it is specific,
/// else this host's first non-loopback IPv4 address (from the kernel's local routing table), else loopback.
pub fn guess_public_url(local: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    let ip = match local.ip() {
        IpAddr::V4(v4) if !v4.is_unspecified() => v4,
        _ => local_ipv4().unwrap_or(Ipv4Addr::LOCALHOST),
    };
    format!("{scheme}://{ip}:{}", local.port())
}

/// First non-loopback local IPv4 address in `/proc/net/fib_trie` (no socket is opened, nothing is sent).
fn local_ipv4() -> Option<Ipv4Addr> {
    let text = std::fs::read_to_string("/proc/net/fib_trie").ok()?;
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(addr) = line.strip_prefix("|-- ") {
            last = addr.parse().ok();
        } else if line.contains("/32 host LOCAL")
            && let Some(ip) = last
            && !ip.is_loopback()
        {
            return Some(ip);
        }
    }
    None
}

/// A database URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_helpers() {
        assert_eq!(public_host("https://198.18.0.1:8443"), "198.18.0.1");
        assert_eq!(public_host("https://vpn.example.com"), "vpn.example.com");
        assert_eq!(public_host("https://[fd00::1]:8443"), "fd00::1");
        assert_eq!(redact_url("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("sqlite:///x"), "sqlite:///x");
        let guessed = guess_public_url("198.18.0.7:8443".parse().expect("addr"), true);
        assert_eq!(guessed, "https://198.18.0.7:8443");
        assert!(guess_public_url("0.0.0.0:9".parse().expect("addr"), false).starts_with("http://"));
    }
}

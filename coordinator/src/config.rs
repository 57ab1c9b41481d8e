//! Command line, `MESHD_*` environment variables and the optional TOML file, merged into one typed config per
//! command. Precedence: flag, then environment variable (clap reads both), then the file (`--config`), then the
//! default. The file uses the long flag names with `_` (`public_url = "https://..."`); unknown keys are an error, so a
//! typo never silently falls back to a default. Everything is validated here, at start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::ipam;

/// Defaults of `serve`.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
pub const DEFAULT_NETWORK: &str = "10.77.0.0/16";
pub const DEFAULT_DATA_DIR: &str = "./meshd-data";
/// Changes kept in the log for resuming streams; a node offline for longer gets a full map (a few KB per 100 nodes),
/// so this only needs to cover ordinary reconnects.
pub const DEFAULT_KEEP_CHANGES: u64 = 10_000;
/// UDP ports answering STUN binding requests; two, so a node can tell an endpoint-independent NAT mapping from an
/// endpoint-dependent one (same mapped port seen from both or not).
pub const DEFAULT_STUN_PORT: u16 = 3478;
pub const DEFAULT_STUN_ALT_PORT: u16 = 3479;
/// A new connection has this long for its TLS handshake and first request head. An agent sends both at once; only a
/// client that holds connections open without speaking (a descriptor-exhaustion attack) ever needs it.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A kept-alive API connection is closed after this long without a new request head (or with a head that does not
/// finish in this time). Below reqwest's 90 s pool idle time would only cost agents a reconnect, and agents' calls are
/// minutes apart: 60 s keeps the count of idle descriptors bounded. Map streams and relay connections are not
/// affected (they have their own keepalives).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Open connections allowed from one source address. Each node holds one map stream and at times a relay
/// connection and an API call, so 1,024 is several hundred nodes behind one NAT; a client opening connections from
/// one address cannot take the descriptors every other node needs.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 1024;

#[derive(Debug, Parser)]
#[command(
    name = "meshd-coordinator",
    version,
    about = "The meshd coordinator: enrols nodes with join tokens, allocates overlay addresses and streams network maps",
    after_help = "Every flag can also be set with its MESHD_* environment variable or in a TOML file given with --config \
                  (keys are the flag names with `_`, e.g. public_url = \"https://vpn.example.com:8443\")."
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// TOML file with settings (flags and environment variables take precedence).
    #[arg(long, env = "MESHD_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for the SQLite database and the self-signed certificate [default: ./meshd-data].
    #[arg(long, env = "MESHD_DATA_DIR", global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Database: sqlite://PATH or postgres://USER:PASSWORD@HOST/DB [default: SQLite in the data dir].
    #[arg(long, env = "MESHD_DATABASE_URL", global = true, value_name = "URL")]
    pub database_url: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator (HTTPS API and map streams).
    Serve(ServeArgs),
    /// Manage admin API keys.
    #[command(subcommand)]
    Apikey(ApikeyCommand),
    /// Manage join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Inspect and remove nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Stock WireGuard devices (phones, laptops with the WireGuard app): register one, print its config.
    #[command(subcommand)]
    Device(DeviceCommand),
}

#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Address and port to listen on [default: 0.0.0.0:8443].
    #[arg(long, env = "MESHD_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Overlay network nodes get addresses from [default: 10.77.0.0/16].
    #[arg(long, env = "MESHD_NETWORK", value_name = "CIDR")]
    pub network: Option<String>,
    /// URL nodes use to reach this coordinator, written into join tokens (default: guessed from this host's
    /// addresses and printed at start).
    #[arg(long, env = "MESHD_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<String>,
    /// PEM certificate (chain) to serve instead of the self-signed one; needs --tls-key.
    #[arg(long, env = "MESHD_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "MESHD_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP (only behind a TLS-terminating proxy); tokens then carry no certificate fingerprint.
    #[arg(
        long, env = "MESHD_NO_TLS", conflicts_with_all = ["tls_cert", "tls_key"],
        action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub no_tls: bool,
    /// Changes kept for nodes that resume their map stream [default: 10000].
    #[arg(long, env = "MESHD_KEEP_CHANGES", value_name = "N")]
    pub keep_changes: Option<u64>,
    /// UDP port answering STUN binding requests, on the listen address's IP (0: any free port) [default: 3478].
    #[arg(long, env = "MESHD_STUN_PORT", value_name = "PORT")]
    pub stun_port: Option<u16>,
    /// Second STUN port, so nodes can tell how their NAT maps ports (0: any free port) [default: 3479].
    #[arg(long, env = "MESHD_STUN_ALT_PORT", value_name = "PORT")]
    pub stun_alt_port: Option<u16>,
    /// Answer no STUN requests (nodes then only learn their public address from their peers).
    #[arg(
        long, env = "MESHD_NO_STUN", conflicts_with_all = ["stun_port", "stun_alt_port"],
        action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub no_stun: bool,
    /// Do not serve the relay (GET /api/v1/relay): peers without a direct path then cannot reach each other.
    #[arg(
        long, env = "MESHD_NO_RELAY",
        action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub no_relay: bool,
    /// UDP port of the WireGuard gateway that stock WireGuard apps use as the `Endpoint` of every meshd node, on
    /// the listen address's IP (0: any free port) [default: 51820]. Needs the relay.
    #[arg(long, env = "MESHD_GATEWAY_PORT", value_name = "PORT")]
    pub gateway_port: Option<u16>,
    /// What exported device configs put as `Endpoint` (`host:port`, e.g. when a router forwards another public
    /// port to the gateway) [default: the public URL's host and the gateway port].
    #[arg(long, env = "MESHD_GATEWAY_ENDPOINT", value_name = "HOST:PORT")]
    pub gateway_endpoint: Option<String>,
    /// Serve no gateway for stock WireGuard devices (they then reach only meshd nodes with a public address).
    #[arg(
        long, env = "MESHD_NO_GATEWAY", conflicts_with_all = ["gateway_port", "gateway_endpoint"],
        action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub no_gateway: bool,
    /// Domain of the nodes' names: `gpu-server` is also `gpu-server.<domain>` on every node [default:
    /// mesh.internal]. Changing it sends every node a new map at its next connection.
    #[arg(long, env = "MESHD_DNS_DOMAIN", value_name = "DOMAIN")]
    pub dns_domain: Option<String>,
    /// Time a new connection has for its TLS handshake and first request head, e.g. 10s [default: 10s].
    #[arg(long, env = "MESHD_HEADER_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub header_timeout: Option<Duration>,
    /// Idle API connections (no new request head) are closed after this, e.g. 60s; map streams and relay
    /// connections have keepalives of their own and are not affected [default: 60s].
    #[arg(long, env = "MESHD_IDLE_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Most connections open at once from one IP address; more are closed at once (0: no limit) [default: 1024].
    #[arg(long, env = "MESHD_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    pub max_connections_per_ip: Option<u32>,
    /// Log format: `text` (coloured only when stderr is a terminal) or `json` (one object per line).
    #[arg(long, env = "MESHD_LOG_FORMAT", value_name = "FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// How `serve` writes its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines; ANSI colours only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Connection limits of the listener (see `http::serve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// TLS handshake plus first request head.
    pub header_timeout: Duration,
    /// Without a new request head on a kept-alive API connection.
    pub idle_timeout: Duration,
    /// Open connections per source IP; 0: no limit.
    pub max_per_ip: u32,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ApikeyCommand {
    /// Create an admin API key; it is printed once, as the last line of stdout.
    Create {
        /// What the key is for (shown in `apikey list`).
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List admin API keys (ids only; secrets are not stored).
    List,
    /// Delete an admin API key; it stops working at once.
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a join token; it is printed as the last line of stdout. Single-use unless --reusable or --uses.
    Create(TokenCreateArgs),
    /// List join tokens and their state.
    List,
    /// Revoke a join token: it enrols nothing more (nodes that joined with it stay).
    Revoke { id: String },
}

#[derive(Debug, Clone, Args)]
pub struct TokenCreateArgs {
    /// Any number of nodes may join with this token (until it expires or is revoked).
    #[arg(long, conflicts_with = "uses")]
    pub reusable: bool,
    /// Number of nodes that may join with this token [default: 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub uses: Option<u32>,
    /// Lifetime, e.g. 30m, 24h, 7d (default: never expires).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub expires: Option<Duration>,
    /// Tag that joined nodes inherit (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// URL written into the token (default: the one `serve` uses, from the database).
    #[arg(long, env = "MESHD_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List nodes.
    List,
    /// Delete a node: its credential stops working and it leaves every map.
    Delete { id: i64 },
    /// Rename a node: every node resolves the new name (and stops resolving the old one) within seconds.
    Rename {
        id: i64,
        /// The new name: one DNS label of a-z, 0-9 and `-`.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Register a stock WireGuard device and print its wg-quick config (with --qr also as a QR code to scan).
    Add(DeviceAddArgs),
    /// Print a device's wg-quick config (with --qr also as a QR code to scan).
    Config {
        /// The device's node id or name.
        #[arg(value_name = "ID|NAME")]
        device: String,
        /// Also print the config as a QR code for the WireGuard app's "scan from QR code".
        #[arg(long)]
        qr: bool,
    },
}

#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("key").required(true).args(["public_key", "generate_key"])))]
pub struct DeviceAddArgs {
    /// The device's name: one DNS label of a-z, 0-9 and `-`.
    pub name: String,
    /// The public key the device's WireGuard app generated (base64).
    #[arg(long, value_name = "KEY")]
    pub public_key: Option<meshd_protocol::PublicKey>,
    /// Generate the device's key pair here: the private key is printed in the config once and stored nowhere.
    #[arg(long)]
    pub generate_key: bool,
    /// Tag of the device (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Register without a preshared key (by default every pair with the device uses one).
    #[arg(long)]
    pub no_preshared_key: bool,
    /// Also print the config as a QR code for the WireGuard app's "scan from QR code".
    #[arg(long)]
    pub qr: bool,
}

/// Keys of the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub listen: Option<SocketAddr>,
    pub network: Option<String>,
    pub public_url: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub no_tls: Option<bool>,
    pub keep_changes: Option<u64>,
    pub stun_port: Option<u16>,
    pub stun_alt_port: Option<u16>,
    pub no_stun: Option<bool>,
    pub no_relay: Option<bool>,
    pub gateway_port: Option<u16>,
    pub gateway_endpoint: Option<String>,
    pub no_gateway: Option<bool>,
    pub dns_domain: Option<String>,
    #[serde(default, with = "humantime_serde_opt")]
    pub header_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub idle_timeout: Option<Duration>,
    pub max_connections_per_ip: Option<u32>,
    pub log_format: Option<LogFormat>,
}

/// Durations in the file are written as on the command line (`"10s"`, `"2m"`).
mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| humantime::parse_duration(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }
}

/// Where the database and the data directory are; every command needs this.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    pub database_url: String,
}

/// How the coordinator serves HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// A certificate generated at first start and kept in the data dir; its fingerprint goes into tokens.
    SelfSigned,
    /// A certificate given by the admin.
    Files { cert: PathBuf, key: PathBuf },
    /// Plain HTTP behind a TLS-terminating proxy.
    Off,
}

/// The validated settings of `serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub storage: StorageConfig,
    pub listen: SocketAddr,
    pub network: Ipv4Net,
    /// `None`: guess from the host's addresses.
    pub public_url: Option<String>,
    pub tls: TlsMode,
    pub keep_changes: u64,
    /// UDP ports answering STUN on the listen address's IP (0: any free port); empty: STUN off.
    pub stun_ports: Vec<u16>,
    /// Serve the relay route.
    pub relay: bool,
    /// The WireGuard gateway for stock devices; `None`: off.
    pub gateway: Option<GatewayConfig>,
    /// How long a node stays online after its last map stream closed (and after a restart, for the nodes that were
    /// online): one that reconnects within it never goes offline (see `presence`).
    pub presence_grace: Duration,
    /// Relay keepalive and idle timeout (not flags: tuning knobs for embedding and tests).
    pub relay_timers: crate::relay::RelayTimers,
    /// Handler time limit (not a flag: a tuning knob for embedding and tests).
    pub request_timeout: Duration,
    /// The network's DNS domain, canonical (`meshd_protocol::names::normalize_domain`).
    pub dns_domain: String,
    /// Header and idle timeouts, connections per source address.
    pub limits: ConnectionLimits,
}

impl ServeConfig {
    /// Defaults for tests and embedding: plain HTTP, data in `data_dir`, STUN on two free ports, relay on.
    pub fn for_tests(data_dir: &Path, database_url: Option<String>) -> Self {
        let storage = StorageConfig {
            data_dir: data_dir.to_path_buf(),
            database_url: database_url.unwrap_or_else(|| crate::store::default_url(data_dir)),
        };
        Self {
            storage,
            listen: "127.0.0.1:0".parse().expect("a valid literal address"),
            network: DEFAULT_NETWORK.parse().expect("a valid literal network"),
            public_url: None,
            tls: TlsMode::Off,
            keep_changes: DEFAULT_KEEP_CHANGES,
            stun_ports: vec![0, 0],
            relay: true,
            gateway: Some(GatewayConfig {
                port: 0,
                endpoint: None,
            }),
            presence_grace: crate::presence::DEFAULT_GRACE,
            relay_timers: crate::relay::RelayTimers::default(),
            request_timeout: crate::http::REQUEST_TIMEOUT,
            dns_domain: meshd_protocol::names::DEFAULT_DNS_DOMAIN.to_string(),
            limits: ConnectionLimits::default(),
        }
    }
}

/// Where stock devices send their WireGuard datagrams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// UDP port on the listen address's IP (0: any free port).
    pub port: u16,
    /// `host:port` written into device configs; `None`: the public URL's host and the bound port.
    pub endpoint: Option<String>,
}

/// A `host:port` a WireGuard app can resolve: a name or address, and a port.
fn validate_gateway_endpoint(endpoint: &str) -> anyhow::Result<()> {
    let valid = endpoint.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok_and(|p| p != 0)
    });
    if !valid {
        bail!("--gateway-endpoint `{endpoint}` is not HOST:PORT (e.g. vpn.example.com:51820 or [2001:db8::1]:51820)");
    }
    Ok(())
}

/// Loads the config file named by `common`, if any.
pub fn load_file(common: &CommonArgs) -> anyhow::Result<FileConfig> {
    match &common.config {
        Some(path) => FileConfig::load(path),
        None => Ok(FileConfig::default()),
    }
}

pub fn storage(common: &CommonArgs, file: &FileConfig) -> StorageConfig {
    let data_dir = common
        .data_dir
        .clone()
        .or_else(|| file.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let database_url = common
        .database_url
        .clone()
        .or_else(|| file.database_url.clone())
        .unwrap_or_else(|| crate::store::default_url(&data_dir));
    StorageConfig { data_dir, database_url }
}

/// Checks a public URL: `http(s)://host[:port]`, no path; returns it without a trailing `/`.
pub fn validate_public_url(url: &str) -> anyhow::Result<String> {
    let trimmed = url.trim().trim_end_matches('/');
    let Some(rest) = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"))
    else {
        bail!("public URL `{url}` must start with https:// or http:// (e.g. https://vpn.example.com:8443)");
    };
    if rest.is_empty() || rest.contains('/') || rest.contains(char::is_whitespace) {
        bail!("public URL `{url}` must be scheme://host[:port] with no path (e.g. https://198.18.0.1:8443)");
    }
    Ok(trimmed.to_string())
}

/// Parses and checks the overlay network.
pub fn parse_network(text: &str) -> anyhow::Result<Ipv4Net> {
    let net: Ipv4Net = text
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("`{text}` is not an IPv4 network in CIDR form (e.g. 10.77.0.0/16)"))?;
    ipam::validate_network(net)?;
    Ok(net)
}

/// Merges flags/environment with the file and validates.
pub fn serve(common: &CommonArgs, args: &ServeArgs, file: &FileConfig) -> anyhow::Result<ServeConfig> {
    let storage = storage(common, file);
    let listen = match args.listen.or(file.listen) {
        Some(listen) => listen,
        None => DEFAULT_LISTEN.parse().expect("a valid literal address"),
    };
    let network = parse_network(
        args.network
            .as_deref()
            .or(file.network.as_deref())
            .unwrap_or(DEFAULT_NETWORK),
    )
    .context("invalid --network")?;
    let public_url = args
        .public_url
        .as_deref()
        .or(file.public_url.as_deref())
        .map(validate_public_url)
        .transpose()
        .context("invalid --public-url")?;
    let no_tls = args.no_tls || file.no_tls.unwrap_or(false);
    let cert = args.tls_cert.clone().or_else(|| file.tls_cert.clone());
    let key = args.tls_key.clone().or_else(|| file.tls_key.clone());
    let tls = match (no_tls, cert, key) {
        (true, None, None) => TlsMode::Off,
        (true, _, _) => bail!("--no-tls cannot be combined with --tls-cert/--tls-key: pick one"),
        (false, Some(cert), Some(key)) => TlsMode::Files { cert, key },
        (false, None, None) => TlsMode::SelfSigned,
        (false, _, _) => {
            bail!("--tls-cert and --tls-key go together: give both, or neither for a self-signed certificate")
        }
    };
    let keep_changes = args.keep_changes.or(file.keep_changes).unwrap_or(DEFAULT_KEEP_CHANGES);
    if keep_changes == 0 {
        bail!("--keep-changes must be at least 1");
    }
    let no_stun = args.no_stun || file.no_stun.unwrap_or(false);
    let stun_ports = if no_stun {
        Vec::new()
    } else {
        let port = args.stun_port.or(file.stun_port).unwrap_or(DEFAULT_STUN_PORT);
        let alt = args
            .stun_alt_port
            .or(file.stun_alt_port)
            .unwrap_or(DEFAULT_STUN_ALT_PORT);
        if port == alt && port != 0 {
            bail!(
                "--stun-port and --stun-alt-port are both {port}: they must differ (or turn STUN off with --no-stun)"
            );
        }
        vec![port, alt]
    };
    let relay = !(args.no_relay || file.no_relay.unwrap_or(false));
    let no_gateway = args.no_gateway || file.no_gateway.unwrap_or(false);
    let gateway = if no_gateway {
        None
    } else {
        let endpoint = args.gateway_endpoint.clone().or(file.gateway_endpoint.clone());
        if let Some(endpoint) = &endpoint {
            validate_gateway_endpoint(endpoint)?;
        }
        Some(GatewayConfig {
            port: args
                .gateway_port
                .or(file.gateway_port)
                .unwrap_or(crate::gateway::DEFAULT_PORT),
            endpoint,
        })
    };
    // The gateway reaches nodes over the relay: without the relay it is off, unless asked for explicitly.
    let gateway_asked = args.gateway_port.is_some() || args.gateway_endpoint.is_some();
    let gateway = if relay { gateway } else { None };
    if gateway_asked && !relay {
        bail!(
            "the WireGuard gateway forwards to nodes over the relay: with --no-relay also pass --no-gateway \
             (or serve the relay)"
        );
    }
    let dns_domain = meshd_protocol::names::normalize_domain(
        args.dns_domain
            .as_deref()
            .or(file.dns_domain.as_deref())
            .unwrap_or(meshd_protocol::names::DEFAULT_DNS_DOMAIN),
    )
    .context("invalid --dns-domain")?;
    let limits = ConnectionLimits {
        header_timeout: args
            .header_timeout
            .or(file.header_timeout)
            .unwrap_or(DEFAULT_HEADER_TIMEOUT),
        idle_timeout: args.idle_timeout.or(file.idle_timeout).unwrap_or(DEFAULT_IDLE_TIMEOUT),
        max_per_ip: args
            .max_connections_per_ip
            .or(file.max_connections_per_ip)
            .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_IP),
    };
    if limits.header_timeout.is_zero() || limits.idle_timeout.is_zero() {
        bail!("--header-timeout and --idle-timeout must be longer than zero (e.g. 10s)");
    }
    Ok(ServeConfig {
        storage,
        listen,
        network,
        public_url,
        tls,
        keep_changes,
        stun_ports,
        relay,
        gateway,
        presence_grace: crate::presence::DEFAULT_GRACE,
        relay_timers: crate::relay::RelayTimers::default(),
        request_timeout: crate::http::REQUEST_TIMEOUT,
        dns_domain,
        limits,
    })
}

/// The log format of `serve`: flag or environment, then the file, then text.
pub fn log_format(args: &ServeArgs, file: &FileConfig) -> LogFormat {
    args.log_format.or(file.log_format).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common() -> CommonArgs {
        CommonArgs {
            config: None,
            data_dir: Some("/tmp/x".into()),
            database_url: None,
        }
    }

    #[test]
    fn defaults_and_precedence() {
        let file: FileConfig = toml::from_str("network = \"10.9.0.0/24\"\nlisten = \"127.0.0.1:9\"").expect("toml");
        let args = ServeArgs {
            listen: Some("127.0.0.1:1".parse().expect("addr")),
            ..Default::default()
        };
        let cfg = serve(&common(), &args, &file).expect("valid");
        assert_eq!(cfg.listen.port(), 1, "flag beats file");
        assert_eq!(cfg.network.to_string(), "10.9.0.0/24", "file beats default");
        assert_eq!(cfg.tls, TlsMode::SelfSigned);
        assert_eq!(cfg.storage.database_url, "sqlite:///tmp/x/meshd.db?mode=rwc");
        assert_eq!(cfg.stun_ports, vec![DEFAULT_STUN_PORT, DEFAULT_STUN_ALT_PORT]);
        assert!(cfg.relay);
    }

    #[test]
    fn stun_and_relay_settings() {
        let file: FileConfig = toml::from_str("stun_port = 4000\nno_relay = true").expect("toml");
        let args = ServeArgs {
            stun_alt_port: Some(4001),
            ..Default::default()
        };
        let cfg = serve(&common(), &args, &file).expect("valid");
        assert_eq!(cfg.stun_ports, vec![4000, 4001]);
        assert!(!cfg.relay);
        let off = ServeArgs {
            no_stun: true,
            ..Default::default()
        };
        assert!(serve(&common(), &off, &file).expect("valid").stun_ports.is_empty());
        let same = ServeArgs {
            stun_alt_port: Some(4000),
            ..Default::default()
        };
        assert!(format!("{:#}", serve(&common(), &same, &file).expect_err("same port")).contains("must differ"));
        let ephemeral = ServeArgs {
            stun_port: Some(0),
            stun_alt_port: Some(0),
            ..Default::default()
        };
        assert_eq!(
            serve(&common(), &ephemeral, &file).expect("valid").stun_ports,
            vec![0, 0]
        );
    }

    #[test]
    fn connection_limits_and_log_format() {
        let cfg = serve(&common(), &ServeArgs::default(), &FileConfig::default()).expect("valid");
        assert_eq!(cfg.limits, ConnectionLimits::default());
        let file: FileConfig = toml::from_str(
            "header_timeout = \"2s\"\nidle_timeout = \"1m\"\nmax_connections_per_ip = 0\nlog_format = \"json\"",
        )
        .expect("toml");
        let args = ServeArgs {
            header_timeout: Some(Duration::from_secs(5)),
            ..Default::default()
        };
        let cfg = serve(&common(), &args, &file).expect("valid");
        assert_eq!(cfg.limits.header_timeout, Duration::from_secs(5), "flag beats file");
        assert_eq!(cfg.limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(cfg.limits.max_per_ip, 0);
        assert_eq!(log_format(&args, &file), LogFormat::Json);
        assert!(toml::from_str::<FileConfig>("idle_timeout = \"soon\"").is_err());
        let zero = ServeArgs {
            idle_timeout: Some(Duration::ZERO),
            ..Default::default()
        };
        assert!(serve(&common(), &zero, &FileConfig::default()).is_err());
    }

    #[test]
    fn rejects_bad_input() {
        assert!(
            toml::from_str::<FileConfig>("netwrok = \"10.0.0.0/8\"").is_err(),
            "unknown keys are errors"
        );
        let file: FileConfig = toml::from_str("network = \"10.0.0.0/31\"").expect("toml");
        let err = serve(&common(), &ServeArgs::default(), &file).expect_err("too small");
        assert!(format!("{err:#}").contains("too small"));
        let args = ServeArgs {
            network: Some("banana".into()),
            ..Default::default()
        };
        assert!(serve(&common(), &args, &FileConfig::default()).is_err());
        assert!(validate_public_url("ftp://x").is_err());
        assert!(validate_public_url("https://x/path").is_err());
        assert_eq!(validate_public_url("https://x:1/").expect("ok"), "https://x:1");
    }

    #[test]
    fn dns_domain_defaults_and_is_checked() {
        let cfg = serve(&common(), &ServeArgs::default(), &FileConfig::default()).expect("valid");
        assert_eq!(cfg.dns_domain, "mesh.internal");
        let file: FileConfig = toml::from_str("dns_domain = \"Team.Example.com.\"").expect("toml");
        assert_eq!(
            serve(&common(), &ServeArgs::default(), &file)
                .expect("valid")
                .dns_domain,
            "team.example.com"
        );
        let args = ServeArgs {
            dns_domain: Some("mesh.local".into()),
            ..Default::default()
        };
        let err = format!("{:#}", serve(&common(), &args, &file).expect_err("mdns"));
        assert!(err.contains("--dns-domain") && err.contains("mDNS"), "{err}");
    }
}

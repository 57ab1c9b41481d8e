//! The commands besides `serve`: admin API keys, join tokens, nodes, stock WireGuard devices. They open the same database as `serve` (a
//! separate process is fine: SQLite waits for the serving process's short write transactions, and the serving
//! process's broker picks up CLI changes by polling). Secrets are printed as the last line of stdout, so scripts can
//! take `| tail -n1`; everything else goes above it or to stderr.

use anyhow::{Context, bail};
use meshd_protocol::CertFingerprint;

use crate::config::{
    ApikeyCommand, CommonArgs, DeviceAddArgs, DeviceCommand, FileConfig, NodeCommand, StorageConfig, TlsMode,
    TokenCommand, TokenCreateArgs, validate_public_url,
};
use crate::model::now_unix;
use crate::ops::{self, TokenOptions};
use crate::store::{Store, settings_keys};
use crate::{public_host, redact_url, tls};

const ACTOR: &str = "cli";

pub async fn open(storage: &StorageConfig) -> anyhow::Result<Store> {
    std::fs::create_dir_all(&storage.data_dir)
        .with_context(|| format!("creating the data directory {}", storage.data_dir.display()))?;
    Store::connect(&storage.database_url)
        .await
        .with_context(|| format!("opening the database {}", redact_url(&storage.database_url)))
}

pub async fn apikey(storage: &StorageConfig, command: ApikeyCommand) -> anyhow::Result<()> {
    let store = open(storage).await?;
    match command {
        ApikeyCommand::Create { description } => {
            let (id, key) = ops::issue_api_key(&store, ACTOR, &description).await?;
            println!("Admin API key {id} created. Use it as `Authorization: Bearer <key>`; it is shown only once:");
            println!("{key}");
        }
        ApikeyCommand::List => {
            println!("{:<14} {:<22} DESCRIPTION", "ID", "CREATED");
            for key in store.api_keys().await? {
                println!("{:<14} {:<22} {}", key.id, fmt_time(key.created_at), key.description);
            }
        }
        ApikeyCommand::Delete { id } => match store.delete_api_key(ACTOR, &id).await {
            Ok(()) => println!("Admin API key {id} deleted."),
            Err(crate::store::StoreError::NotFound) => bail!("no admin API key `{id}` (see: apikey list)"),
            Err(e) => return Err(e.into()),
        },
    }
    store.close().await;
    Ok(())
}

pub async fn token(storage: &StorageConfig, command: TokenCommand) -> anyhow::Result<()> {
    let store = open(storage).await?;
    match command {
        TokenCommand::Create(args) => create_token(storage, &store, args).await?,
        TokenCommand::List => {
            println!("{:<14} {:<9} {:<9} {:<22} TAGS", "ID", "STATE", "USES", "EXPIRES");
            let now = now_unix();
            for t in store.tokens().await? {
                let uses = match t.max_uses {
                    Some(max) => format!("{}/{max}", t.uses),
                    None => format!("{}/-", t.uses),
                };
                let expires = t.expires_at.map_or_else(|| "never".to_string(), fmt_time);
                println!(
                    "{:<14} {:<9} {:<9} {:<22} {}",
                    t.id,
                    t.state(now),
                    uses,
                    expires,
                    t.tags.join(",")
                );
            }
        }
        TokenCommand::Revoke { id } => match store.revoke_token(ACTOR, &id).await {
            Ok(_) => println!("Token {id} revoked; it enrols nothing more."),
            Err(crate::store::StoreError::NotFound) => bail!("no token `{id}` (see: token list)"),
            Err(e) => return Err(e.into()),
        },
    }
    store.close().await;
    Ok(())
}

async fn create_token(storage: &StorageConfig, store: &Store, args: TokenCreateArgs) -> anyhow::Result<()> {
    let url = match &args.public_url {
        Some(url) => validate_public_url(url).context("invalid --public-url")?,
        None => store.setting(settings_keys::PUBLIC_URL).await?.context(
            "the coordinator's public URL is not known yet: start `meshd-coordinator serve` once with this database, \
             or pass --public-url https://HOST:8443",
        )?,
    };
    let fingerprint = match store.setting(settings_keys::CERT_FINGERPRINT).await? {
        Some(hex) if hex.is_empty() => None,
        Some(hex) => Some(CertFingerprint::from_hex(&hex).context("stored certificate fingerprint")?),
        // `serve` never ran: pin the self-signed certificate it will use (generated now if needed).
        None if url.starts_with("https://") => {
            tls::install_crypto_provider();
            let files = tls::prepare(&TlsMode::SelfSigned, &storage.data_dir, &[public_host(&url)])?;
            files.map(|f| f.fingerprint)
        }
        None => None,
    };
    let options = TokenOptions::new(args.reusable, args.uses, args.expires, args.tags);
    let (token, record) = ops::issue_token(store, ACTOR, &url, fingerprint, options)
        .await
        .map_err(|e| match e {
            ops::IssueError::Invalid(m) => anyhow::anyhow!(m),
            ops::IssueError::Store(e) => e.into(),
        })?;
    let uses = record
        .max_uses
        .map_or_else(|| "unlimited uses".to_string(), |n| format!("{n} use(s)"));
    let expires = record
        .expires_at
        .map_or_else(|| "never expires".to_string(), |t| format!("expires {}", fmt_time(t)));
    println!(
        "Join token {} for {url}: {uses}, {expires}. On each machine run: meshd join <token>",
        record.id
    );
    println!("{token}");
    Ok(())
}

pub async fn node(storage: &StorageConfig, command: NodeCommand) -> anyhow::Result<()> {
    let store = open(storage).await?;
    match command {
        NodeCommand::List => {
            println!(
                "{:<6} {:<24} {:<16} {:<8} {:<10} {:<22} TAGS",
                "ID", "NAME", "IP", "ONLINE", "KIND", "LAST SEEN"
            );
            for n in store.nodes().await? {
                let seen = n.last_seen.map_or_else(|| "never".to_string(), fmt_time);
                println!(
                    "{:<6} {:<24} {:<16} {:<8} {:<10} {:<22} {}",
                    n.id,
                    n.name,
                    n.ip.to_string(),
                    if n.online { "yes" } else { "no" },
                    n.kind.as_str(),
                    seen,
                    n.tags.join(",")
                );
            }
        }
        NodeCommand::Delete { id } => match store.delete_node(ACTOR, "node.delete", id).await {
            Ok(node) => println!("Node {id} ({}, {}) deleted.", node.name, node.ip),
            Err(crate::store::StoreError::NotFound) => bail!("no node {id} (see: node list)"),
            Err(e) => return Err(e.into()),
        },
        NodeCommand::Rename { id, name } => {
            crate::naming::validate(&name).map_err(|e| anyhow::anyhow!(e))?;
            let update = crate::store::NodeUpdate {
                name: Some(name),
                tags: None,
            };
            match store.update_node(ACTOR, id, update).await {
                Ok(node) => println!("Node {id} is now {} ({}).", node.name, node.ip),
                Err(crate::store::StoreError::NotFound) => bail!("no node {id} (see: node list)"),
                Err(crate::store::StoreError::Conflict(m)) => bail!("{m}"),
                Err(e) => return Err(e.into()),
            }
        }
    }
    store.close().await;
    Ok(())
}

pub async fn device(storage: &StorageConfig, command: DeviceCommand) -> anyhow::Result<()> {
    let store = open(storage).await?;
    let result = match command {
        DeviceCommand::Add(args) => add_device(&store, args).await,
        DeviceCommand::Config { device, qr } => {
            let id = find_node(&store, &device).await?;
            print_config(&store, id, None, qr).await
        }
    };
    store.close().await;
    result
}

async fn add_device(store: &Store, args: DeviceAddArgs) -> anyhow::Result<()> {
    // The key pair is made here, in this process: the private half goes into the printed config only.
    let generated = args
        .generate_key
        .then(|| x25519_dalek::StaticSecret::random_from_rng(rand::rngs::OsRng));
    let public_key = match (&generated, args.public_key) {
        (Some(secret), _) => meshd_protocol::PublicKey::from_bytes(x25519_dalek::PublicKey::from(secret).to_bytes()),
        (None, Some(key)) => key,
        (None, None) => bail!("give the device's public key with --public-key KEY, or --generate-key"),
    };
    let device = ops::NewDevice {
        name: args.name,
        public_key,
        tags: args.tags,
        preshared_key: !args.no_preshared_key,
    };
    let node = ops::register_device(store, ACTOR, device, stored_network(store).await?)
        .await
        .map_err(|e| match e {
            ops::IssueError::Invalid(m) => anyhow::anyhow!(m),
            ops::IssueError::Store(crate::store::StoreError::Conflict(m)) => anyhow::anyhow!(m),
            ops::IssueError::Store(e) => e.into(),
        })?;
    eprintln!(
        "Device {} ({}, {}) registered{}.",
        node.id,
        node.name,
        node.ip,
        if node.preshared_key { " with preshared keys" } else { "" }
    );
    if generated.is_some() {
        eprintln!(
            "warning: the config below holds the device's private key. It is shown this once and stored nowhere: \
             import it on the device now (or run `device config {}` later and paste the key yourself).",
            node.id
        );
    }
    print_config(store, node.id, generated.as_ref(), args.qr).await
}

/// Prints node `id`'s wg-quick config (and its QR code), warning on stderr when the gateway is off.
async fn print_config(
    store: &Store,
    id: meshd_protocol::NodeId,
    private_key: Option<&x25519_dalek::StaticSecret>,
    qr: bool,
) -> anyhow::Result<()> {
    let domain = stored_dns_domain(store).await?;
    let exported = ops::export_config(store, id, stored_network(store).await?, &domain, private_key)
        .await?
        .with_context(|| format!("no node {id} (see: node list)"))?;
    if !exported.gateway_on {
        eprintln!(
            "warning: the coordinator's WireGuard gateway is off (no gateway endpoint published), so each peer's \
             Endpoint is its last reported address: peers behind NAT will not be reachable from this device. Turn the \
             gateway on (`meshd-coordinator serve` without --no-gateway; default 51820/udp or --gateway-port, reachable \
             from the devices) and export the config again."
        );
    }
    print!("{}", exported.text);
    if qr {
        let code = crate::qr::terminal(&exported.text).map_err(|e| anyhow::anyhow!(e))?;
        println!();
        println!("Scan with the WireGuard app (\"Create from QR code\"):");
        print!("{code}");
        if !code.ends_with('\n') {
            println!();
        }
    }
    Ok(())
}

/// A node id, or the id of the node with that name.
async fn find_node(store: &Store, id_or_name: &str) -> anyhow::Result<meshd_protocol::NodeId> {
    if let Ok(id) = id_or_name.parse() {
        return Ok(id);
    }
    store
        .nodes()
        .await?
        .into_iter()
        .find(|n| n.name == id_or_name)
        .map(|n| n.id)
        .with_context(|| format!("no node named `{id_or_name}` (see: node list)"))
}

/// The network `serve` allocates from, as it last stored it.
async fn stored_network(store: &Store) -> anyhow::Result<ipnet::Ipv4Net> {
    let text = store.setting(settings_keys::NETWORK).await?.context(
        "the coordinator's network is not known yet: start `meshd-coordinator serve` once with this database",
    )?;
    text.parse()
        .with_context(|| format!("the stored network `{text}` is damaged; start `meshd-coordinator serve` again"))
}

/// The DNS domain of the last `serve` (the second word of its map settings), else the default.
async fn stored_dns_domain(store: &Store) -> anyhow::Result<String> {
    let settings = store.setting(settings_keys::MAP_SETTINGS).await?;
    Ok(settings
        .as_deref()
        .and_then(|s| s.split_whitespace().nth(1))
        .unwrap_or(meshd_protocol::names::DEFAULT_DNS_DOMAIN)
        .to_string())
}

/// Loads the storage settings for a non-serving command.
pub fn storage_for(common: &CommonArgs) -> anyhow::Result<StorageConfig> {
    let file: FileConfig = crate::config::load_file(common)?;
    Ok(crate::config::storage(common, &file))
}

fn fmt_time(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

//! The commands besides `serve`: admin API keys, join tokens, nodes. They open the same database as `serve` (a
//! separate process is fine: SQLite waits for the serving process's short write transactions, and the serving
//! process's broker picks up CLI changes by polling). Secrets are printed as the last line of stdout, so scripts can
//! take `| tail -n1`; everything else goes above it or to stderr.

use anyhow::{Context, bail};
use meshd_protocol::CertFingerprint;

use crate::config::{
    ApikeyCommand, CommonArgs, FileConfig, NodeCommand, StorageConfig, TlsMode, TokenCommand, TokenCreateArgs,
    validate_public_url,
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

/// Loads the storage settings for a non-serving command.
pub fn storage_for(common: &CommonArgs) -> anyhow::Result<StorageConfig> {
    let file: FileConfig = crate::config::load_file(common)?;
    Ok(crate::config::storage(common, &file))
}

fn fmt_time(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

//! Operations shared by the HTTP API and the CLI (so `token create` on the command line and `POST /api/v1/tokens`
//! make the same token), on top of the store.

use std::time::Duration;

use ipnet::Ipv4Net;
use meshd_protocol::{CertFingerprint, JoinToken, PublicKey};

use crate::model::{Node, now_unix};
use crate::psk::PskSecret;
use crate::store::{NewToken, Store, StoreError, settings_keys};
use crate::tokens::TokenRecord;
use crate::wgconfig::{self, ExportOptions};
use crate::{naming, secrets};

/// What a new token allows.
#[derive(Debug, Clone, Default)]
pub struct TokenOptions {
    /// `None`: unlimited uses.
    pub max_uses: Option<u32>,
    pub expires_in: Option<Duration>,
    pub tags: Vec<String>,
}

impl TokenOptions {
    /// From the user-facing switches: single-use unless `reusable` or `uses`.
    pub fn new(reusable: bool, uses: Option<u32>, expires_in: Option<Duration>, tags: Vec<String>) -> Self {
        let max_uses = if reusable { None } else { Some(uses.unwrap_or(1)) };
        Self {
            max_uses,
            expires_in,
            tags: naming::normalize_tags(tags),
        }
    }
}

/// Why a token could not be made or a device not registered.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates a join token and returns its string (shown once) and its record.
pub async fn issue_token(
    store: &Store,
    actor: &str,
    coordinator_url: &str,
    fingerprint: Option<CertFingerprint>,
    options: TokenOptions,
) -> Result<(String, TokenRecord), IssueError> {
    naming::validate_tags(&options.tags).map_err(IssueError::Invalid)?;
    if options.max_uses == Some(0) {
        return Err(IssueError::Invalid("uses must be at least 1".into()));
    }
    let expires_at = match options.expires_in {
        Some(d) if d.is_zero() => return Err(IssueError::Invalid("expiry must be in the future".into())),
        Some(d) => Some(now_unix().saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))),
        None => None,
    };
    let token = JoinToken {
        coordinator_url: coordinator_url.to_string(),
        id: secrets::random_id(),
        secret: secrets::random_secret(),
        fingerprint,
    };
    let record = store
        .create_token(
            actor,
            NewToken {
                id: token.id.clone(),
                secret_hash: hex::encode(token.secret_hash()),
                expires_at,
                max_uses: options.max_uses.map(i64::from),
                tags: options.tags,
            },
        )
        .await?;
    Ok((token.encode(), record))
}

/// Creates an admin API key; returns (id, the key string shown once).
pub async fn issue_api_key(store: &Store, actor: &str, description: &str) -> Result<(String, String), StoreError> {
    let key = secrets::new_api_key();
    store.create_api_key(actor, &key.id, &key.hash_hex, description).await?;
    Ok((key.id, key.text))
}

/// A stock WireGuard device to register (`POST /api/v1/nodes`, `device add`).
#[derive(Debug, Clone)]
pub struct NewDevice {
    pub name: String,
    pub public_key: PublicKey,
    pub tags: Vec<String>,
    /// Every pair with the device uses a preshared key (see [`crate::psk`]).
    pub preshared_key: bool,
}

/// Registers a stock WireGuard device after checking its name and tags.
pub async fn register_device(
    store: &Store,
    actor: &str,
    device: NewDevice,
    network: Ipv4Net,
) -> Result<Node, IssueError> {
    naming::validate(&device.name).map_err(IssueError::Invalid)?;
    naming::validate_tags(&device.tags).map_err(IssueError::Invalid)?;
    let tags = naming::normalize_tags(device.tags);
    Ok(store
        .register_device(
            actor,
            &device.name,
            device.public_key,
            &tags,
            device.preshared_key,
            network,
        )
        .await?)
}

/// The coordinator's preshared-key secret, created at first use (of replicas creating it at once, all get the one
/// stored first). One indexed read when it exists.
pub async fn psk_secret(store: &Store) -> Result<PskSecret, StoreError> {
    let stored = match store.setting(settings_keys::PSK_SECRET).await? {
        Some(stored) => stored,
        None => {
            store
                .setting_or_insert(settings_keys::PSK_SECRET, &PskSecret::generate_stored())
                .await?
        }
    };
    PskSecret::from_stored(&stored).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A device's wg-quick file and what the caller may want to warn about.
#[derive(Debug)]
pub struct ExportedConfig {
    pub device: Node,
    pub text: String,
    /// False when no gateway endpoint is published: agents behind NAT may be unreachable from the device.
    pub gateway_on: bool,
}

/// Renders node `id`'s wg-quick file ([`wgconfig`]) with the gateway endpoint `serve` published and the pairs'
/// preshared keys; `private_key` replaces the placeholder. `None` when there is no such node.
pub async fn export_config(
    store: &Store,
    id: meshd_protocol::NodeId,
    network: Ipv4Net,
    dns_domain: &str,
    private_key: Option<&x25519_dalek::StaticSecret>,
) -> Result<Option<ExportedConfig>, StoreError> {
    let nodes = store.nodes().await?;
    let Some(device) = nodes.iter().find(|n| n.id == id) else {
        return Ok(None);
    };
    let gateway = store
        .setting(settings_keys::GATEWAY_ENDPOINT)
        .await?
        .filter(|g| !g.trim().is_empty());
    let secret = psk_secret(store).await?;
    let options = ExportOptions {
        network,
        gateway_endpoint: gateway.as_deref().map(str::trim),
        dns_domain,
        psk_secret: &secret,
        private_key,
    };
    let text = wgconfig::render(device, &nodes, &options);
    Ok(Some(ExportedConfig {
        device: device.clone(),
        text,
        gateway_on: gateway.is_some(),
    }))
}

//! Admin routes (bearer admin API key): join tokens, nodes (including plain WireGuard devices and their wg-quick
//! config, as a file or a QR code), the audit log. Bodies are defined here: nodes never send them.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use meshd_protocol::api::ErrorBody;
use meshd_protocol::{NodeId, PublicKey};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::extract::{AdminAuth, ApiJson, ApiPath, ApiQuery};
use crate::error::ApiError;
use crate::model::{Node, now_unix};
use crate::ops::{self, IssueError, TokenOptions};
use crate::store::{AuditEntry, NodeUpdate};
use crate::tokens::TokenRecord;
use crate::{naming, qr};

/// `POST /api/v1/tokens`. Without `reusable` or `uses` a token is single-use.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// Any number of nodes may join with it.
    #[serde(default)]
    pub reusable: bool,
    /// Number of joins allowed (default 1); not with `reusable`.
    pub uses: Option<u32>,
    /// Lifetime such as `30m`, `24h`, `7d`; absent: never expires.
    #[schema(example = "24h")]
    pub expires: Option<String>,
    /// Tags that joined nodes inherit.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// A join token as listed (the secret is never stored, so never shown again).
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenInfo {
    pub id: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; absent: never expires.
    pub expires_at: Option<i64>,
    /// Absent: unlimited.
    pub max_uses: Option<i64>,
    pub uses: i64,
    pub revoked: bool,
    /// `active`, `expired`, `revoked` or `used_up`.
    pub state: String,
    pub tags: Vec<String>,
}

impl From<TokenRecord> for TokenInfo {
    fn from(t: TokenRecord) -> Self {
        let state = t.state(now_unix()).to_string();
        Self {
            id: t.id,
            created_at: t.created_at,
            expires_at: t.expires_at,
            max_uses: t.max_uses,
            uses: t.uses,
            revoked: t.revoked_at.is_some(),
            state,
            tags: t.tags,
        }
    }
}

/// A created token: the string is shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    /// The whole token for `meshd join <token>`.
    pub token: String,
    #[serde(flatten)]
    pub info: TokenInfo,
}

/// A node as the admin sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeInfo {
    pub id: NodeId,
    pub name: String,
    /// The name in the network's DNS domain; resolves on every node (and `name` alone does too).
    #[schema(example = "gpu-server.mesh.internal")]
    pub fqdn: String,
    #[schema(value_type = String, example = "10.77.0.5")]
    pub ip: std::net::Ipv4Addr,
    pub public_key: PublicKey,
    /// `meshd` (runs the agent) or `wireguard` (a plain WireGuard device registered by an admin).
    pub kind: String,
    pub online: bool,
    /// Unix seconds; absent if never seen.
    pub last_seen: Option<i64>,
    pub tags: Vec<String>,
    #[schema(value_type = Vec<String>)]
    pub endpoints: Vec<SocketAddr>,
    pub created_at: i64,
    /// Every pair with this node uses a preshared key.
    pub preshared_key: bool,
}

impl NodeInfo {
    pub fn new(n: Node, dns: &meshd_protocol::DnsConfig) -> Self {
        Self {
            id: n.id,
            fqdn: meshd_protocol::names::fqdn(&n.name, &dns.domain),
            name: n.name,
            ip: n.ip,
            public_key: n.public_key,
            kind: n.kind.as_str().to_string(),
            online: n.online,
            last_seen: n.last_seen,
            tags: n.tags,
            endpoints: n.endpoints,
            created_at: n.created_at,
            preshared_key: n.preshared_key,
        }
    }
}

/// `POST /api/v1/nodes`: register a device that cannot run meshd, by its WireGuard public key.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterDeviceRequest {
    /// DNS-safe name: lowercase letters, digits, `-`.
    #[schema(example = "alice-phone")]
    pub name: String,
    pub public_key: PublicKey,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Every pair with the device mixes a preshared key into its handshake (its config gets `PresharedKey` lines).
    /// Absent: true (it only adds protection).
    #[serde(default = "default_true")]
    #[schema(default = true)]
    pub preshared_key: bool,
}

fn default_true() -> bool {
    true
}

/// `PATCH /api/v1/nodes/{id}`: absent fields stay as they are.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateNodeRequest {
    pub name: Option<String>,
    /// Replaces the node's tags.
    pub tags: Option<Vec<String>>,
}

/// One audit-log entry.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEntryInfo {
    pub id: i64,
    /// Unix seconds.
    pub at: i64,
    /// `apikey:<id>`, `token:<id>` (a join), `node:<id>`, `cli`.
    pub actor: String,
    /// e.g. `join`, `token.create`, `node.delete`.
    pub action: String,
    pub target: String,
    pub detail: String,
}

impl From<AuditEntry> for AuditEntryInfo {
    fn from(e: AuditEntry) -> Self {
        Self {
            id: e.id,
            at: e.at,
            actor: e.actor,
            action: e.action,
            target: e.target,
            detail: e.detail,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct AuditQuery {
    /// Most entries to return (1 to 1000, default 100).
    pub limit: Option<i64>,
    /// Only entries with an id below this (paging backwards).
    pub before: Option<i64>,
}

fn issue_error(e: IssueError) -> ApiError {
    match e {
        IssueError::Invalid(message) => ApiError::bad_request(message),
        IssueError::Store(e) => e.into(),
    }
}

/// Create a join token.
#[utoipa::path(
    post, path = "/api/v1/tokens", tag = "admin",
    request_body = CreateTokenRequest,
    security(("admin" = [])),
    responses(
        (status = 201, description = "Created; `token` is shown only now", body = CreatedToken),
        (status = 400, description = "Bad JSON, expiry, uses or tags", body = ErrorBody),
        (status = 401, description = "Missing or invalid admin API key", body = ErrorBody),
    )
)]
pub async fn create_token(
    State(state): State<AppState>,
    admin: AdminAuth,
    ApiJson(request): ApiJson<CreateTokenRequest>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    if request.reusable && request.uses.is_some() {
        return Err(ApiError::bad_request("give either `reusable` or `uses`, not both"));
    }
    let expires_in = request
        .expires
        .as_deref()
        .map(humantime::parse_duration)
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("`expires` must be a duration such as 30m, 24h or 7d: {e}")))?;
    let options = TokenOptions::new(request.reusable, request.uses, expires_in, request.tags);
    let (token, record) = ops::issue_token(
        &state.store,
        &admin.actor(),
        &state.public_url,
        state.fingerprint,
        options,
    )
    .await
    .map_err(issue_error)?;
    tracing::info!(token = %record.id, "join token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token,
            info: record.into(),
        }),
    ))
}

/// List join tokens.
#[utoipa::path(
    get, path = "/api/v1/tokens", tag = "admin",
    security(("admin" = [])),
    responses(
        (status = 200, description = "Every token, newest first", body = Vec<TokenInfo>),
        (status = 401, description = "Missing or invalid admin API key", body = ErrorBody),
    )
)]
pub async fn list_tokens(State(state): State<AppState>, _admin: AdminAuth) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    let tokens = state.store.tokens().await?;
    Ok(Json(tokens.into_iter().map(TokenInfo::from).collect()))
}

/// Revoke a join token (nodes that joined with it stay).
#[utoipa::path(
    delete, path = "/api/v1/tokens/{id}", tag = "admin",
    params(("id" = String, Path, description = "Token id")),
    security(("admin" = [])),
    responses(
        (status = 204, description = "Revoked (or already revoked)"),
        (status = 401, description = "Missing or invalid admin API key", body = ErrorBody),
        (status = 404, description = "No such token", body = ErrorBody),
    )
)]
pub async fn revoke_token(
    State(state): State<AppState>,
    admin: AdminAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    state
        .store
        .revoke_token(&admin.actor(), &id)
        .await
        .map_err(|e| not_found_as(e, &format!("no token `{id}`")))?;
    tracing::info!(token = %id, "join token revoked");
    Ok(StatusCode::NO_CONTENT)
}

fn not_found_as(e: crate::store::StoreError, message: &str) -> ApiError {
    match e {
        crate::store::StoreError::NotFound => ApiError::not_found(message),
        other => other.into(),
    }
}

/// List nodes.
#[utoipa::path(
    get, path = "/api/v1/nodes", tag = "admin",
    security(("admin" = [])),
    responses(
        (status = 200, description = "Every node, by id", body = Vec<NodeInfo>),
        (status = 401, description = "Missing or invalid admin API key", body = ErrorBody),
    )
)]
pub async fn list_nodes(State(state): State<AppState>, _admin: AdminAuth) -> Result<Json<Vec<NodeInfo>>, ApiError> {
    let nodes = state.store.nodes().await?;
    Ok(Json(nodes.into_iter().map(|n| NodeInfo::new(n, &state.dns)).collect()))
}

/// Register a device that cannot run meshd (e.g. a phone with the WireGuard app) by its public key.
#[utoipa::path(
    post, path = "/api/v1/nodes", tag = "admin",
    request_body = RegisterDeviceRequest,
    security(("admin" = [])),
    responses(
        (status = 201, description = "Registered; fetch its config at /api/v1/nodes/{id}/wireguard-config", body = NodeInfo),
        (status = 400, description = "Bad JSON, key, name or tags", body = ErrorBody),
        (status = 401, description = "Missing or invalid admin API key", body = ErrorBody),
        (status = 409, description = "Name or key taken, or network full", body = ErrorBody),
    )
)]
pub async fn register_device(
    State(state): State<AppState>,
    admin: AdminAuth,
    ApiJson(request): ApiJson<RegisterDeviceRequest>,
) -> Result<(StatusCode, Json<NodeInfo>), ApiError> {
    let device = ops::NewDevice {
        name: request.name,
        public_key: request.public_key,
        tags: request.tags,
        preshared_key: request.preshared_key,
    };
    let node = ops::register_device(&state.store, &admin.actor(), device, state.network)
        .await
        .map_err(issue_error)?;
    tracing::info!(node = node.id, name = %node.name, ip = %node.ip, "WireGuard device registered");
    Ok((StatusCode::CREATED, Json(NodeInfo::new(node, &state.dns))))
}

async fn load_node(state: &AppState, id: NodeId) -> Result<Node, ApiError> {
    state
        .store
        .node(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no node {id}")))
}

/// Get one node.
#[utoipa::path(
    get, path = "/api/v1/nodes/{id}", tag = "admin",
    params(("id" = i64, Path, description = "Node id")),
    security(("admin" = [])),
    responses(
        (status = 200, description = "The node", body = NodeInfo),
        (status = 400, description = "The id is not a number", body = ErrorBody),
        (status = 401, description = "Missing or invalid admin API key", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
    )
)]
pub async fn get_node(
    State(state): State<AppState>,
    _admin: AdminAuth,
    ApiPath(id): ApiPath<NodeId>,
) -> Result<Json<NodeInfo>, ApiError> {
    Ok(Json(NodeInfo::new(load_node(&state, id).await?, &state.dns)))
}

/// Rename and/or retag a node.
#[utoipa::path(
    patch, path = "/api/v1/nodes/{id}", tag = "admin",
    params(("id" = i64, Path, description = "Node id")),
    request_body = UpdateNodeRequest,
    security(("admin" = [])),
    responses(
        (status = 200, description = "The updated node; peers get the change on their streams", body = NodeInfo),
        (status = 400, description = "Bad JSON, name or tags", body = ErrorBody),
        (status = 401, description = "Missing or invalid admin API key", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "Name taken", body = ErrorBody),
    )
)]
pub async fn update_node(
    State(state): State<AppState>,
    admin: AdminAuth,
    ApiPath(id): ApiPath<NodeId>,
    ApiJson(request): ApiJson<UpdateNodeRequest>,
) -> Result<Json<NodeInfo>, ApiError> {
    if let Some(name) = &request.name {
        naming::validate(name).map_err(ApiError::bad_request)?;
    }
    if let Some(tags) = &request.tags {
        naming::validate_tags(tags).map_err(ApiError::bad_request)?;
    }
    let update = NodeUpdate {
        name: request.name,
        tags: request.tags.map(naming::normalize_tags),
    };
    let node = state
        .store
        .update_node(&admin.actor(), id, update)
        .await
        .map_err(|e| not_found_as(e, &format!("no node {id}")))?;
    Ok(Json(NodeInfo::new(node, &state.dns)))
}

/// Delete a node: its credential stops working at once and it leaves every peer's map.
#[utoipa::path(
    delete, path = "/api/v1/nodes/{id}", tag = "admin",
    params(("id" = i64, Path, description = "Node id")),
    security(("admin" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "The id is not a number", body = ErrorBody),
        (status = 401, description = "Missing or invalid admin API key", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
    )
)]
pub async fn delete_node(
    State(state): State<AppState>,
    admin: AdminAuth,
    ApiPath(id): ApiPath<NodeId>,
) -> Result<StatusCode, ApiError> {
    let node = state
        .store
        .delete_node(&admin.actor(), "node.delete", id)
        .await
        .map_err(|e| not_found_as(e, &format!("no node {id}")))?;
    tracing::info!(node = node.id, name = %node.name, "node deleted by admin");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/nodes/{id}/wireguard-config?format=`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ConfigQuery {
    /// `conf` (the wg-quick file, default), `png` or `svg` (the file as a QR code for the phone apps to scan).
    pub format: Option<String>,
}

/// What `format` may be.
const CONFIG_FORMATS: &str = "conf, png, svg";

/// wg-quick config for a registered WireGuard device (or any node): its address, DNS, and every meshd node as a peer
/// (through the coordinator's gateway when it is on), as a file or a QR code.
#[utoipa::path(
    get, path = "/api/v1/nodes/{id}/wireguard-config", tag = "admin",
    params(("id" = i64, Path, description = "Node id"), ConfigQuery),
    security(("admin" = [])),
    responses(
        (status = 200, description = "wg-quick file; replace the PrivateKey placeholder with the device's own key", content_type = "text/plain", body = String),
        (status = 200, description = "The file as a QR code (`format=png`)", content_type = "image/png", body = Vec<u8>),
        (status = 200, description = "The file as a QR code (`format=svg`)", content_type = "image/svg+xml", body = String),
        (status = 400, description = "Unknown format, or the file is too long for a QR code", body = ErrorBody),
        (status = 401, description = "Missing or invalid admin API key", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
    )
)]
pub async fn wireguard_config(
    State(state): State<AppState>,
    _admin: AdminAuth,
    ApiPath(id): ApiPath<NodeId>,
    ApiQuery(query): ApiQuery<ConfigQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let format = query.format.as_deref().unwrap_or("conf");
    if !CONFIG_FORMATS.split(", ").any(|f| f == format) {
        return Err(ApiError::bad_request(format!(
            "unknown format `{format}`; use one of: {CONFIG_FORMATS}"
        )));
    }
    let exported = ops::export_config(&state.store, id, state.network, &state.dns.domain, None)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no node {id}")))?;
    let name = &exported.device.name;
    let qr_error = |e: qr::QrCodeError| match e {
        qr::QrCodeError::TooLong { .. } => ApiError::bad_request(e.to_string()),
        other => ApiError::internal(other),
    };
    let (content_type, disposition, body): (&str, String, Vec<u8>) = match format {
        "png" => (
            "image/png",
            format!("inline; filename=\"{name}.png\""),
            qr::png(&exported.text).map_err(qr_error)?,
        ),
        "svg" => (
            "image/svg+xml",
            format!("inline; filename=\"{name}.svg\""),
            qr::svg(&exported.text).map_err(qr_error)?.into_bytes(),
        ),
        _ => (
            "text/plain; charset=utf-8",
            format!("attachment; filename=\"{name}.conf\""),
            exported.text.into_bytes(),
        ),
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    ))
}

/// Read the audit log of admin actions and joins, newest first.
#[utoipa::path(
    get, path = "/api/v1/audit", tag = "admin",
    params(AuditQuery),
    security(("admin" = [])),
    responses(
        (status = 200, description = "Entries, newest first", body = Vec<AuditEntryInfo>),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "Missing or invalid admin API key", body = ErrorBody),
    )
)]
pub async fn audit_log(
    State(state): State<AppState>,
    _admin: AdminAuth,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<Json<Vec<AuditEntryInfo>>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("`limit` must be between 1 and 1000"));
    }
    let entries = state.store.audit_log(limit, query.before).await?;
    Ok(Json(entries.into_iter().map(AuditEntryInfo::from).collect()))
}

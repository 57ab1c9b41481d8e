//! `GET /api/v1/gateway` (admin): whether the WireGuard gateway for stock devices is on, where devices send, its
//! counters, and the device sessions it routes now (which device talks to which node, from which address).

use axum::Json;
use axum::extract::State;
use meshd_protocol::api::ErrorBody;
use serde::Serialize;

use super::AppState;
use super::extract::AdminAuth;
use crate::error::ApiError;
use crate::gateway::{GatewayStats, SessionView};
use crate::store::settings_keys;

/// The gateway as the admin sees it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GatewayInfo {
    /// False with `--no-gateway` (and then nothing else is set).
    pub enabled: bool,
    /// What exported device configs use as `Endpoint`.
    pub endpoint: Option<String>,
    /// The UDP port this coordinator process listens on.
    pub port: Option<u16>,
    pub stats: Option<GatewayStats>,
    pub sessions: Vec<SessionView>,
}

/// The WireGuard gateway for stock devices: endpoint, counters and the sessions it routes.
#[utoipa::path(
    get, path = "/api/v1/gateway", tag = "admin",
    security(("admin" = [])),
    responses(
        (status = 200, description = "The gateway's endpoint, counters and sessions", body = GatewayInfo),
        (status = 401, description = "Missing or invalid admin API key", body = ErrorBody),
    )
)]
pub async fn gateway(State(state): State<AppState>, _admin: AdminAuth) -> Result<Json<GatewayInfo>, ApiError> {
    let Some(gateway) = state.gateway.as_ref() else {
        return Ok(Json(GatewayInfo {
            enabled: false,
            endpoint: None,
            port: None,
            stats: None,
            sessions: Vec::new(),
        }));
    };
    let endpoint = state
        .store
        .setting(settings_keys::GATEWAY_ENDPOINT)
        .await?
        .filter(|e| !e.is_empty());
    Ok(Json(GatewayInfo {
        enabled: true,
        endpoint,
        port: gateway.local_addr().ok().map(|a| a.port()),
        stats: Some(gateway.stats()),
        sessions: gateway.sessions(),
    }))
}

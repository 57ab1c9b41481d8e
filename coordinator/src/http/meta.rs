//! Health, readiness, Prometheus metrics and the OpenAPI document. Unauthenticated: they reveal no node data beyond
//! counts.
//!
//! Two questions, two routes: `/healthz` (liveness) says the process answers and the database answers reads;
//! restarting the coordinator would not help when it fails for a full disk, so it stays 200 then and reports the
//! write problem in its body. `/readyz` (readiness) says whether the coordinator can enrol nodes and take admin
//! changes right now, i.e. whether a write commits (see `Store::writable`): 503 when it cannot, so a load balancer
//! or monitor sees a coordinator that reads fine but can no longer write.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use meshd_protocol::api::ErrorBody;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use crate::error::ApiError;
use crate::store::{Backend, Writable};
use crate::telemetry;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` when the database answers reads.
    pub status: String,
    pub version: String,
    /// `sqlite` or `postgres`.
    pub database: String,
    pub protocol_version: u32,
    /// Whether a write commits now (what `/readyz` answers); false while the disk is full, the database directory
    /// is read-only or the database server is away.
    pub writable: bool,
    /// Why writes fail, when `writable` is false (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_error: Option<String>,
}

/// Readiness: whether writes (joins, tokens, admin changes) commit now.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// `ready`, or `not_ready` with `write_error` saying why.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_error: Option<String>,
}

/// Liveness: the process answers and the database answers reads. Writes failing (full disk) do not fail it, since
/// a restart would not help; see `/readyz`.
#[utoipa::path(
    get, path = "/healthz", tag = "meta",
    responses(
        (status = 200, description = "Alive; `writable` tells whether writes commit", body = Health),
        (status = 500, description = "The database does not answer", body = ErrorBody),
    )
)]
pub async fn healthz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    state.store.ping().await?;
    let database = match state.store.backend() {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let write_error = match state.store.writable().await {
        Writable::Yes => None,
        Writable::No(error) => Some(error),
    };
    Ok(Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        database: database.into(),
        protocol_version: meshd_protocol::PROTOCOL_VERSION,
        writable: write_error.is_none(),
        write_error,
    }))
}

/// Readiness: 200 when a write commits now, 503 when it does not (disk full, read-only directory, database server
/// away). Probes with a tiny write at most every few seconds, so polling it is cheap.
#[utoipa::path(
    get, path = "/readyz", tag = "meta",
    responses(
        (status = 200, description = "Writes commit", body = Ready),
        (status = 503, description = "Writes fail; `write_error` says why", body = Ready),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Ready>) {
    match state.store.writable().await {
        Writable::Yes => (
            StatusCode::OK,
            Json(Ready {
                status: "ready".into(),
                write_error: None,
            }),
        ),
        Writable::No(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Ready {
                status: "not_ready".into(),
                write_error: Some(error),
            }),
        ),
    }
}

/// Prometheus metrics: nodes, online nodes, joins, map updates sent, request latencies.
#[utoipa::path(
    get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String))
)]
pub async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let (nodes, online) = state.store.node_counts().await?;
    let text = telemetry::render(&state.metrics, nodes, online);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

/// This document.
#[utoipa::path(
    get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "OpenAPI 3 document of every route", content_type = "application/json"))
)]
pub async fn openapi(State(state): State<AppState>) -> impl IntoResponse {
    match state.openapi_json.get() {
        Some(json) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            json.clone(),
        )
            .into_response(),
        None => ApiError::internal("the OpenAPI document was not built").into_response(),
    }
}

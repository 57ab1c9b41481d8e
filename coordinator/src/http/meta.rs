//! Health, Prometheus metrics and the OpenAPI document. Unauthenticated: they reveal no node data beyond counts.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use meshd_protocol::api::ErrorBody;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use crate::error::ApiError;
use crate::store::Backend;
use crate::telemetry;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` when the database answers.
    pub status: String,
    pub version: String,
    /// `sqlite` or `postgres`.
    pub database: String,
    pub protocol_version: u32,
}

/// Liveness and database reachability.
#[utoipa::path(
    get, path = "/healthz", tag = "meta",
    responses(
        (status = 200, description = "Healthy", body = Health),
        (status = 500, description = "The database does not answer", body = ErrorBody),
    )
)]
pub async fn healthz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    state.store.ping().await?;
    let database = match state.store.backend() {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    Ok(Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        database: database.into(),
        protocol_version: meshd_protocol::PROTOCOL_VERSION,
    }))
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

//! The HTTP API: router, shared state, OpenAPI document, metrics middleware and our 404/405 answers.
//!
//! Routes are registered through `utoipa_axum::routes!`, so the OpenAPI document (`GET /api/v1/openapi.json`) is
//! generated from the same annotations that register the handlers and cannot miss a route.
//! Layout: [`serve`] (the listener: map streams on a lean path of their own, the rest to hyper), [`node`] (what the
//! node agent calls), [`stream`] (the map stream), [`relay`] (the relay upgrade), [`admin`] (bearer admin API key),
//! [`meta`] (health, metrics, the document itself), [`extract`] (auth capabilities and error-mapping extractors).

pub mod admin;
pub mod extract;
pub mod gateway;
pub mod meta;
pub mod node;
pub mod relay;
pub mod serve;
pub mod stream;

use std::ops::Deref;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ipnet::Ipv4Net;
use meshd_protocol::CertFingerprint;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::broker::Broker;
use crate::error::ApiError;
use crate::joinkey::JoinKey;
use crate::store::Store;

/// Largest request body accepted (the biggest legitimate body, a join request, is well under 1 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest a handler may take to produce its response head, body reading included: a client trickling its body
/// cannot hold a task (and a write-lock waiter) forever. Map streams answer at once, so their long bodies are not cut.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What every handler can reach; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<StateInner>);

pub struct StateInner {
    pub store: Store,
    pub broker: Arc<Broker>,
    /// Which nodes have a map stream open; online/offline changes (see [`crate::presence`]).
    pub presence: Arc<crate::presence::Presence>,
    pub network: Ipv4Net,
    /// Naming, in every full map.
    pub dns: meshd_protocol::DnsConfig,
    /// A node resuming from a version below this gets a full map (network settings changed; see `serve`).
    pub full_map_before: u64,
    /// Written into tokens.
    pub public_url: String,
    /// Written into tokens; `None` when serving plain HTTP.
    pub fingerprint: Option<CertFingerprint>,
    /// Join proofs are checked against it; its public half is published by `GET /api/v1/info`.
    pub join_key: JoinKey,
    /// Ends map streams at shutdown (graceful shutdown waits for open responses).
    pub shutdown: CancellationToken,
    pub metrics: PrometheusHandle,
    /// See [`REQUEST_TIMEOUT`].
    pub request_timeout: std::time::Duration,
    /// UDP ports answering STUN (published by `GET /api/v1/info`); empty when STUN is off.
    pub stun_ports: Vec<u16>,
    /// The relay, `None` when it is off (`--no-relay`).
    pub relay: Option<Arc<crate::relay::Relay>>,
    /// The WireGuard gateway for stock devices, `None` when it is off (`--no-gateway`).
    pub gateway: Option<Arc<crate::gateway::Gateway>>,
    /// The generated OpenAPI document, set once the router is built.
    pub openapi_json: OnceLock<String>,
}

impl Deref for AppState {
    type Target = StateInner;
    fn deref(&self) -> &StateInner {
        &self.0
    }
}

impl AppState {
    pub fn new(inner: StateInner) -> Self {
        Self(Arc::new(inner))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "meshd coordinator API",
        description = "Enrolment, network maps and administration of a meshd WireGuard mesh. Node routes take the node \
                       credential from the join response, admin routes an admin API key, both as a Bearer token. \
                       Errors are {\"error\": {\"code\", \"message\"}}."
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "node", description = "Called by the meshd agent"),
        (name = "admin", description = "Administration (admin API key)"),
        (name = "meta", description = "Health, metrics and this document")
    )
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("admin", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        components.add_security_scheme("node", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// Builds the router and the OpenAPI document (stored in the state for `GET /api/v1/openapi.json`).
pub fn router(state: AppState) -> Router {
    let (router, doc) = OpenApiRouter::<AppState>::with_openapi(ApiDoc::openapi())
        .routes(routes!(node::info))
        .routes(routes!(node::join))
        .routes(routes!(stream::map))
        .routes(routes!(node::report_endpoints))
        .routes(routes!(node::preshared_keys))
        .routes(routes!(node::leave))
        .routes(routes!(relay::relay))
        .routes(routes!(admin::create_token, admin::list_tokens))
        .routes(routes!(admin::revoke_token))
        .routes(routes!(admin::list_nodes, admin::register_device))
        .routes(routes!(admin::get_node, admin::update_node, admin::delete_node))
        .routes(routes!(admin::wireguard_config))
        .routes(routes!(admin::audit_log))
        .routes(routes!(gateway::gateway))
        .routes(routes!(meta::healthz))
        .routes(routes!(meta::readyz))
        .routes(routes!(meta::metrics))
        .routes(routes!(meta::openapi))
        .split_for_parts();
    let json = doc.to_pretty_json().expect("the generated OpenAPI document serializes");
    let _ = state.openapi_json.set(json);
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(state.clone(), time_limit))
        .layer(axum::middleware::from_fn(record_metrics))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; the API is described at GET /api/v1/openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see GET /api/v1/openapi.json",
    )
}

/// Answers 408 in our format when a handler takes longer than the request timeout ([`REQUEST_TIMEOUT`]).
async fn time_limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(state.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("the request took longer than {:?}; retry", state.request_timeout),
        )
        .into_response(),
    }
}

/// Counts requests and their latency per route template (not per concrete path: bounded label values).
async fn record_metrics(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = request.method().to_string();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!(crate::telemetry::HTTP_DURATION, "method" => method, "route" => route, "status" => status)
        .record(started.elapsed().as_secs_f64());
    response
}

//! Routes the meshd agent calls: info, join, endpoint reports, preshared keys, leave. (The map stream is in
//! [`super::stream`].)
//!
//! Every join proves possession of the private key of its public key (see [`meshd_protocol::proof`]): the proof is
//! checked before the database is touched, for a first join and a re-join alike, so no token holder can take over
//! another node's record by presenting its (public) key.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use meshd_protocol::api::{
    CoordinatorInfo, EndpointReport, ErrorBody, JoinRequest, JoinResponse, MAX_ENDPOINTS, PresharedKeys,
};
use meshd_protocol::{JoinToken, PROTOCOL_VERSION};

use super::AppState;
use super::extract::{ApiJson, NodeAuth};
use crate::error::ApiError;
use crate::store::{JoinInput, StoreError};
use crate::{ops, psk, telemetry};

/// Longest hostname accepted (a full DNS name); it is cut to one 63-character label anyway.
const MAX_HOSTNAME_LEN: usize = 253;

/// What a node needs before it joins: the protocol version and the join key its proof is made against.
#[utoipa::path(
    get, path = "/api/v1/info", tag = "node",
    responses((status = 200, description = "Protocol version and the coordinator's join key", body = CoordinatorInfo))
)]
pub async fn info(State(state): State<AppState>) -> Json<CoordinatorInfo> {
    Json(CoordinatorInfo {
        protocol_version: PROTOCOL_VERSION,
        join_key: state.join_key.public_key(),
        stun_ports: state.stun_ports.clone(),
        relay: state.relay.is_some(),
        gateway_port: state
            .gateway
            .as_ref()
            .and_then(|gateway| gateway.local_addr().ok())
            .map(|addr| addr.port()),
    })
}

/// Enrol this machine with a join token, proving possession of the private key (`proof`).
#[utoipa::path(
    post, path = "/api/v1/join", tag = "node",
    request_body = JoinRequest,
    responses(
        (status = 200, description = "Joined (or joined again with a known key: same node and address)", body = JoinResponse),
        (status = 400, description = "Bad JSON, key or hostname, or a damaged token (`token_invalid`)", body = ErrorBody),
        (status = 401, description = "Unknown token (`token_invalid`), or no valid proof of possession of the private key (`proof_invalid`)", body = ErrorBody),
        (status = 403, description = "Token expired, revoked or used up", body = ErrorBody),
        (status = 409, description = "The network has no free address (`network_full`)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    )
)]
pub async fn join(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<JoinRequest>,
) -> Result<Json<JoinResponse>, ApiError> {
    let result = join_inner(&state, &request).await;
    if let Err(e) = &result {
        metrics::counter!(telemetry::JOINS_REFUSED, "code" => e.code).increment(1);
        tracing::warn!(hostname = %request.hostname, key = ?request.public_key, code = e.code, "join refused: {}", e.message);
    }
    result.map(Json)
}

async fn join_inner(state: &AppState, request: &JoinRequest) -> Result<JoinResponse, ApiError> {
    let token = JoinToken::parse(&request.token).map_err(|e| ApiError::token_malformed(e.to_string()))?;
    if request.hostname.len() > MAX_HOSTNAME_LEN {
        return Err(ApiError::bad_request(format!(
            "hostname is longer than {MAX_HOSTNAME_LEN} characters"
        )));
    }
    // Before the database: a request that does not prove the key costs no lock and no query.
    if !state
        .join_key
        .verify(&token.id, &request.public_key, &request.hostname, &request.proof)
    {
        return Err(ApiError::proof_invalid());
    }
    let input = JoinInput {
        token: &token,
        public_key: request.public_key,
        hostname: &request.hostname,
        network: state.network,
    };
    let outcome = state.store.join(input).await?;
    let node = outcome.node;
    metrics::counter!(telemetry::JOINS, "rejoin" => outcome.rejoined.to_string()).increment(1);
    tracing::info!(node = node.id, name = %node.name, ip = %node.ip, key = ?node.public_key, rejoined = outcome.rejoined, "node joined");
    Ok(JoinResponse {
        node_id: node.id,
        ip: node.ip,
        name: node.name,
        network: state.network,
        credential: outcome.credential,
        tags: node.tags,
        protocol_version: PROTOCOL_VERSION,
    })
}

/// Checks reported endpoints: routable unicast addresses with a port.
fn validate_endpoints(endpoints: &[SocketAddr]) -> Result<(), ApiError> {
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(ApiError::bad_request(format!(
            "{} endpoints reported; at most {MAX_ENDPOINTS} are accepted (send the best ones)",
            endpoints.len()
        )));
    }
    for endpoint in endpoints {
        let ip = endpoint.ip();
        if endpoint.port() == 0 || ip.is_unspecified() || ip.is_multicast() {
            return Err(ApiError::bad_request(format!(
                "endpoint {endpoint} is not a usable unicast address with a port"
            )));
        }
    }
    Ok(())
}

/// Report the UDP endpoints this node can be reached at (replaces the previous report).
#[utoipa::path(
    put, path = "/api/v1/node/endpoints", tag = "node",
    request_body = EndpointReport,
    security(("node" = [])),
    responses(
        (status = 204, description = "Stored; peers get the change on their streams"),
        (status = 400, description = "Bad JSON, too many or unusable endpoints", body = ErrorBody),
        (status = 401, description = "Invalid node credential", body = ErrorBody),
    )
)]
pub async fn report_endpoints(
    State(state): State<AppState>,
    node: NodeAuth,
    ApiJson(report): ApiJson<EndpointReport>,
) -> Result<StatusCode, ApiError> {
    validate_endpoints(&report.endpoints)?;
    let mut endpoints = report.endpoints;
    // Keep the node's order (best first) but drop repeats.
    let mut seen = std::collections::HashSet::new();
    endpoints.retain(|e| seen.insert(*e));
    if !state.store.set_endpoints(node.node_id, &endpoints).await? {
        return Err(StoreError::NotFound.into());
    }
    tracing::debug!(node = node.node_id, ?endpoints, "endpoints reported");
    Ok(StatusCode::NO_CONTENT)
}

/// The preshared key of every pair this node is part of that uses one (pairs with a node registered with
/// `preshared_key`, or every pair when this node itself was). Keys never travel in the map.
#[utoipa::path(
    get, path = "/api/v1/node/preshared-keys", tag = "node",
    security(("node" = [])),
    responses(
        (status = 200, description = "One key per peer whose pair with this node uses one", body = PresharedKeys),
        (status = 401, description = "Invalid node credential", body = ErrorBody),
    )
)]
pub async fn preshared_keys(State(state): State<AppState>, node: NodeAuth) -> Result<Json<PresharedKeys>, ApiError> {
    let nodes = state.store.nodes().await?;
    let caller = nodes
        .iter()
        .find(|n| n.id == node.node_id)
        .ok_or(StoreError::NotFound)?;
    let secret = ops::psk_secret(&state.store).await?;
    Ok(Json(PresharedKeys {
        keys: psk::keys_for(&secret, caller, &nodes),
    }))
}

/// Leave the network: the node is deleted and its credential stops working.
#[utoipa::path(
    delete, path = "/api/v1/node", tag = "node",
    security(("node" = [])),
    responses(
        (status = 204, description = "Left; peers drop this node"),
        (status = 401, description = "Invalid node credential", body = ErrorBody),
    )
)]
pub async fn leave(State(state): State<AppState>, node: NodeAuth) -> Result<StatusCode, ApiError> {
    let gone = state
        .store
        .delete_node(&format!("node:{}", node.node_id), "node.leave", node.node_id)
        .await?;
    tracing::info!(node = gone.id, name = %gone.name, "node left the network");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_validation() {
        let ok: Vec<SocketAddr> = vec!["198.18.0.2:51820".parse().expect("addr")];
        assert!(validate_endpoints(&ok).is_ok());
        assert!(validate_endpoints(&["0.0.0.0:1".parse().expect("addr")]).is_err());
        assert!(validate_endpoints(&["198.18.0.2:0".parse().expect("addr")]).is_err());
        assert!(validate_endpoints(&["224.0.0.1:5".parse().expect("addr")]).is_err());
        assert!(validate_endpoints(&vec![ok[0]; MAX_ENDPOINTS + 1]).is_err());
    }
}

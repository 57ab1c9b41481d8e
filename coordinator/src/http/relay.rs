//! `GET /api/v1/relay`: authenticates a meshd agent with its node credential and upgrades the HTTP/1.1 connection
//! to the `meshd-relay` frame protocol, then hands the raw (TLS) stream to [`crate::relay::Relay`].
//!
//! Only agents may connect: a registered WireGuard device never speaks the relay protocol (403). The connection is
//! registered under the public key of the authenticated node and nothing else.

use axum::extract::{Request, State};
use axum::http::header::{CONNECTION, UPGRADE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use meshd_protocol::relay::UPGRADE_PROTOCOL;

use super::AppState;
use super::extract::NodeAuth;
use crate::error::ApiError;
use crate::model::NodeKind;
use crate::relay::Identity;

/// Open a relay connection (HTTP/1.1 upgrade to `meshd-relay`; frames as in the protocol crate's `relay` module).
#[utoipa::path(
    get, path = "/api/v1/relay", tag = "node",
    security(("node" = [])),
    params(
        ("Connection" = String, Header, description = "Must contain `Upgrade`"),
        ("Upgrade" = String, Header, description = "Must be `meshd-relay`"),
    ),
    responses(
        (status = 101, description = "Switched to the meshd-relay frame protocol; the server sends ServerHello first"),
        (status = 401, description = "Missing, unknown or replaced node credential", body = meshd_protocol::api::ErrorBody),
        (status = 403, description = "The node is a plain WireGuard device, which cannot use the relay", body = meshd_protocol::api::ErrorBody),
        (status = 404, description = "This coordinator does not serve the relay (`--no-relay`)", body = meshd_protocol::api::ErrorBody),
        (status = 426, description = "Not an HTTP/1.1 upgrade request to `meshd-relay`", body = meshd_protocol::api::ErrorBody),
    )
)]
pub async fn relay(State(state): State<AppState>, auth: NodeAuth, mut request: Request) -> Result<Response, ApiError> {
    let Some(relay) = state.relay.clone() else {
        return Err(ApiError::not_found(
            "this coordinator does not serve the relay (it was started with --no-relay)",
        ));
    };
    if !wants_relay_upgrade(request.headers()) {
        return Err(upgrade_required());
    }
    let node = state
        .store
        .node(auth.node_id)
        .await?
        .ok_or_else(|| ApiError::unauthorized("this node no longer exists; join again: meshd join <token>"))?;
    if node.kind != NodeKind::Meshd {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "plain WireGuard devices cannot use the relay; only meshd agents can",
        ));
    }
    // Present only on an HTTP/1.1 connection hyper can hand over (not on HTTP/2).
    let Some(on_upgrade) = request.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return Err(upgrade_required());
    };
    let identity = Identity {
        node_id: node.id,
        key: node.public_key,
        secret_hash: auth.secret_hash,
    };
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => relay.serve(TokioIo::new(upgraded), identity).await,
            Err(e) => tracing::debug!(node = identity.node_id, error = %e, "relay upgrade failed"),
        }
    });
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
    Ok(response)
}

/// `Connection` lists `upgrade` and `Upgrade` names `meshd-relay` (both case-insensitive).
fn wants_relay_upgrade(headers: &HeaderMap) -> bool {
    let connection = headers.get_all(CONNECTION).iter().any(|value| {
        value
            .to_str()
            .is_ok_and(|v| v.split(',').any(|token| token.trim().eq_ignore_ascii_case("upgrade")))
    });
    let upgrade = headers.get_all(UPGRADE).iter().any(|value| {
        value
            .to_str()
            .is_ok_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(UPGRADE_PROTOCOL)))
    });
    connection && upgrade
}

fn upgrade_required() -> ApiError {
    ApiError::new(
        StatusCode::UPGRADE_REQUIRED,
        "upgrade_required",
        "the relay needs an HTTP/1.1 request with `Connection: Upgrade` and `Upgrade: meshd-relay`",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_upgrade_headers() {
        let mut headers = HeaderMap::new();
        assert!(!wants_relay_upgrade(&headers));
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(!wants_relay_upgrade(&headers));
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!wants_relay_upgrade(&headers));
        headers.insert(UPGRADE, HeaderValue::from_static("MESHD-relay"));
        assert!(wants_relay_upgrade(&headers));
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        assert!(!wants_relay_upgrade(&headers));
    }
}

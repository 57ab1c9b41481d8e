//! Request extractors: JSON/path/query wrappers whose rejections use our error format, and the two bearer-auth
//! capabilities, [`AdminAuth`] (an admin API key) and [`NodeAuth`] (a node credential). Both look the secret's row up
//! by the public id in the secret and compare hashes in constant time ([`crate::secrets`]). Node credentials are
//! checked against the database on every request, so a deleted node is refused at once.

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::AppState;
use crate::error::ApiError;
use crate::secrets;
use meshd_protocol::NodeId;

/// `axum::Json` with 400/413 answers in our format.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// `axum::extract::Path` with 400 answers in our format.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// `axum::extract::Query` with 400 answers in our format.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

fn bearer(parts: &Parts) -> Option<&str> {
    bearer_token(parts.headers.get(AUTHORIZATION)?.to_str().ok()?)
}

/// The token of an `Authorization: Bearer <token>` header value.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// The caller holds a valid admin API key.
#[derive(Debug, Clone)]
pub struct AdminAuth {
    pub key_id: String,
}

impl AdminAuth {
    /// How the audit log names this caller.
    pub fn actor(&self) -> String {
        format!("apikey:{}", self.key_id)
    }
}

const ADMIN_HINT: &str =
    "send an admin API key as `Authorization: Bearer mshk_...`; create one with: meshd-coordinator apikey create";

impl FromRequestParts<AppState> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let Some(text) = bearer(parts) else {
            return Err(ApiError::unauthorized(format!("missing admin API key: {ADMIN_HINT}")));
        };
        let Some(presented) = secrets::parse_api_key(text) else {
            return Err(ApiError::unauthorized(format!("malformed admin API key: {ADMIN_HINT}")));
        };
        let stored = state.store.api_key_hash(&presented.id).await?;
        match stored {
            Some(hash) if secrets::hash_matches(&presented.hash, &hash) => Ok(Self { key_id: presented.id }),
            _ => Err(ApiError::unauthorized(format!(
                "unknown or deleted admin API key: {ADMIN_HINT}"
            ))),
        }
    }
}

/// The caller is a node holding its current credential.
#[derive(Debug, Clone, Copy)]
pub struct NodeAuth {
    pub node_id: NodeId,
    /// SHA-256 of the presented secret, so a long-lived stream can re-check that it is still the current one.
    pub secret_hash: [u8; 32],
}

const NODE_HINT: &str = "this node's credential is not valid (the node was deleted, or it joined again elsewhere); \
                         join again with a new token: meshd join <token>";

impl FromRequestParts<AppState> for NodeAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let authorization = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        Self::check(authorization, state).await
    }
}

impl NodeAuth {
    /// Checks the value of an `Authorization` header (the map stream's own listener path calls this directly).
    pub async fn check(authorization: Option<&str>, state: &AppState) -> Result<Self, ApiError> {
        let Some(presented) = authorization
            .and_then(bearer_token)
            .and_then(secrets::parse_node_credential)
        else {
            return Err(ApiError::unauthorized(format!(
                "missing or malformed node credential: {NODE_HINT}"
            )));
        };
        match state.store.node_credential_hash(presented.id).await? {
            Some(Some(hash)) if secrets::hash_matches(&presented.hash, &hash) => Ok(Self {
                node_id: presented.id,
                secret_hash: presented.hash,
            }),
            _ => Err(ApiError::unauthorized(NODE_HINT)),
        }
    }
}

//! `ApiError`: the one place that turns failures into HTTP status codes and the `{"error": {"code", "message"}}` body
//! ([`meshd_protocol::api::ErrorBody`]). Codes come from [`meshd_protocol::api::error_codes`]; messages say what to do
//! next. Internal errors are logged with their cause and answered with a generic message (no database details leak).

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use meshd_protocol::api::{ErrorBody, ErrorDetail, error_codes as codes};

use crate::store::StoreError;
use crate::tokens::TokenRejection;

/// An error answer of the API.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, codes::UNAUTHORIZED, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, codes::CONFLICT, message)
    }

    pub fn payload_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::PAYLOAD_TOO_LARGE,
            format!(
                "request body too large: the limit is {} bytes",
                crate::http::MAX_BODY_BYTES
            ),
        )
    }

    pub fn token_malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, codes::TOKEN_INVALID, message)
    }

    /// A join that does not prove possession of the private key of its public key.
    pub fn proof_invalid() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            codes::PROOF_INVALID,
            "the join request does not prove possession of the private key of its public key (missing or wrong \
             `proof`): a bug in the node, or a forged request; a node joins with its own key only",
        )
    }

    /// The database cannot write now (disk full, read-only, server away): logged as an error (an operator must act)
    /// and answered 503, so clients retry later and monitors see an outage, not a bug.
    pub fn unavailable(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "the database cannot take writes; see /readyz");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::UNAVAILABLE,
            "the coordinator cannot write to its database right now (disk full, read-only or database server \
             away); retry later; the operator finds the cause in the coordinator's log",
        )
    }

    /// Logs the cause; the client learns only that it was our fault.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error answering a request");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            codes::INTERNAL,
            "internal error in the coordinator; the operator finds the cause in its log",
        )
    }
}

impl From<TokenRejection> for ApiError {
    fn from(rejection: TokenRejection) -> Self {
        let (status, code) = match rejection {
            TokenRejection::Unknown => (StatusCode::UNAUTHORIZED, codes::TOKEN_INVALID),
            TokenRejection::Expired { .. } => (StatusCode::FORBIDDEN, codes::TOKEN_EXPIRED),
            TokenRejection::Revoked { .. } => (StatusCode::FORBIDDEN, codes::TOKEN_REVOKED),
            TokenRejection::UsedUp { .. } => (StatusCode::FORBIDDEN, codes::TOKEN_USED_UP),
        };
        Self::new(status, code, rejection.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => Self::not_found("no such object"),
            StoreError::Conflict(message) => Self::conflict(message),
            StoreError::Token(rejection) => rejection.into(),
            StoreError::NetworkFull(_) => Self::new(StatusCode::CONFLICT, codes::NETWORK_FULL, error.to_string()),
            other if other.is_unavailable() => Self::unavailable(other),
            other => Self::internal(other),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::payload_too_large();
        }
        let hint = match &rejection {
            JsonRejection::MissingJsonContentType(_) => " (send the header Content-Type: application/json)",
            _ => "",
        };
        Self::bad_request(format!("invalid JSON body: {}{hint}", rejection.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::bad_request(format!("invalid path: {}", rejection.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request(format!("invalid query string: {}", rejection.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

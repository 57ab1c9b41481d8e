//! The HTTP client of the coordinator's node-facing API. Knows nothing of WireGuard.
//!
//! Owns: joining with a token (fetching the coordinator's join key and sending the proof of possession of this node's
//! private key, computed by [`NodeKey`], over the same pinned connection), following the network map (Server-Sent Events, resumed with `?since=V`), reporting
//! endpoints, leaving, TLS pinning (through [`crate::tls`]) and the reconnect [`Backoff`]. Turns every failure into a
//! [`ControlError`] a person can act on: which URL was unreachable, why a token was rejected, which certificate was
//! met instead of the pinned one, or that this node's credential no longer works (the admin deleted it).

use std::error::Error as _;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use meshd_protocol::api::{
    CoordinatorInfo, EndpointReport, ErrorBody, JoinRequest, JoinResponse, PresharedKeys, error_codes,
};
use meshd_protocol::{CertFingerprint, JoinToken, MapMessage, paths};
use rand::Rng;
use reqwest::{RequestBuilder, Response, StatusCode};

use crate::keys::NodeKey;
use crate::tls::{self, PinnedCertVerifier, TlsError};

/// Time allowed to open a TCP connection to the coordinator.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for a whole request/response call (everything except the map stream).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// A map stream that brings nothing (not even a keep-alive comment) for this long is considered dead and reopened.
/// The coordinator sends keep-alives well within it; a silently vanished coordinator is noticed in this time.
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(45);

/// Why a call to the coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the coordinator at {url}: {detail} (check that it runs and that this machine can reach it)")]
    Unreachable { url: String, detail: String },
    #[error(
        "the coordinator at {url} presented a certificate with SHA-256 {got}, but the join token pins {expected}: this is not the coordinator your admin set up (or its certificate changed); ask for a new token"
    )]
    FingerprintMismatch { url: String, expected: String, got: String },
    #[error(
        "the coordinator rejected the join token: {reason} ({code}: {message}){}",
        next_step_unless_given(message)
    )]
    TokenRejected {
        code: String,
        reason: &'static str,
        message: String,
    },
    #[error(
        "the coordinator refused this node's proof that it holds its private key ({message}); this is a bug in meshd \
         or the coordinator, or something between them alters requests: report it with both versions"
    )]
    ProofRejected { message: String },
    #[error("the coordinator no longer accepts this node's credential ({message})")]
    Unauthorized { message: String },
    #[error("the coordinator answered {status} ({code}: {message})")]
    Http { status: u16, code: String, message: String },
    #[error("unexpected answer from the coordinator: {0}")]
    Protocol(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The advice to get a new token, unless the coordinator's message already gives it (it does for every refusal it
/// explains; saying it twice in one line reads like two problems).
fn next_step_unless_given(message: &str) -> &'static str {
    if message.contains("ask your admin") {
        ""
    } else {
        "; ask your admin for a new token"
    }
}

impl ControlError {
    /// True when retrying later may help (the coordinator is away or hiccuped); false when a person must act.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Protocol(_) => true,
            Self::Http { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            Self::FingerprintMismatch { .. }
            | Self::TokenRejected { .. }
            | Self::ProofRejected { .. }
            | Self::Unauthorized { .. }
            | Self::Tls(_) => false,
        }
    }
}

/// A client bound to one coordinator.
#[derive(Debug, Clone)]
pub struct ControlClient {
    base_url: String,
    http: reqwest::Client,
    pin: Option<Arc<PinnedCertVerifier>>,
}

impl ControlClient {
    /// A client for `base_url` (`https://...` or `http://...`), pinning `fingerprint` when given; without one, an
    /// https coordinator is verified against the CA bundle of [`tls::ca_bundle_path`].
    pub fn new(base_url: &str, fingerprint: Option<CertFingerprint>) -> Result<Self, ControlError> {
        Self::with_ca_bundle(base_url, fingerprint, &tls::ca_bundle_path())
    }

    /// Like [`ControlClient::new`] with an explicit CA bundle (used only when there is no fingerprint).
    pub fn with_ca_bundle(
        base_url: &str,
        fingerprint: Option<CertFingerprint>,
        ca_bundle: &std::path::Path,
    ) -> Result<Self, ControlError> {
        Self::build(base_url, fingerprint, ca_bundle, false)
    }

    /// A client for the relay connection ([`ControlClient::open_relay`]): HTTP/1.1 only (an HTTP upgrade does not
    /// exist in HTTP/2) and no read timeout (the relay session detects a dead connection with its own pings).
    /// Same TLS trust as [`ControlClient::new`].
    pub fn for_relay(base_url: &str, fingerprint: Option<CertFingerprint>) -> Result<Self, ControlError> {
        Self::build(base_url, fingerprint, &tls::ca_bundle_path(), true)
    }

    fn build(
        base_url: &str,
        fingerprint: Option<CertFingerprint>,
        ca_bundle: &std::path::Path,
        relay: bool,
    ) -> Result<Self, ControlError> {
        let base_url = base_url.trim_end_matches('/').to_string();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("meshd/", env!("CARGO_PKG_VERSION")));
        builder = if relay {
            builder.http1_only()
        } else {
            builder.read_timeout(STREAM_IDLE_TIMEOUT)
        };
        let mut pin = None;
        if base_url.starts_with("https://") {
            let config = match fingerprint {
                Some(fingerprint) => {
                    let verifier = Arc::new(PinnedCertVerifier::new(fingerprint));
                    pin = Some(verifier.clone());
                    tls::pinned_config(verifier)?
                }
                None => tls::ca_roots_config(ca_bundle)?,
            };
            builder = builder.use_preconfigured_tls(config);
        } else if fingerprint.is_some() {
            tracing::warn!(url = %base_url, "the token pins a certificate but the coordinator URL is plain http");
        }
        let http = builder
            .build()
            .map_err(|e| ControlError::Protocol(format!("building the HTTP client: {e}")))?;
        Ok(Self { base_url, http, pin })
    }

    /// A client for the coordinator named in a join token.
    pub fn for_token(token: &JoinToken) -> Result<Self, ControlError> {
        Self::new(&token.coordinator_url, token.fingerprint)
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `GET /api/v1/info`: the coordinator's protocol version and join key.
    pub async fn info(&self) -> Result<CoordinatorInfo, ControlError> {
        let call = self.http.get(self.url(paths::INFO)).timeout(CALL_TIMEOUT);
        let response = self.send(call).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(ControlError::Http {
                status: 404,
                code: error_codes::NOT_FOUND.into(),
                message: format!(
                    "{} is missing: the coordinator is older than this meshd and cannot check join proofs; upgrade it",
                    paths::INFO
                ),
            });
        }
        if !response.status().is_success() {
            return Err(error_from(response).await);
        }
        response
            .json()
            .await
            .map_err(|e| ControlError::Protocol(format!("info response: {e}")))
    }

    /// Enrols `key` with the token `token_text` (`POST /api/v1/join`): fetches the coordinator's join key first and
    /// sends the proof that this node holds the private key. Both calls go over this client's (pinned) connection;
    /// the private key never leaves [`NodeKey`].
    pub async fn join(&self, token_text: &str, key: &NodeKey, hostname: &str) -> Result<JoinResponse, ControlError> {
        let token = JoinToken::parse(token_text).map_err(|e| ControlError::TokenRejected {
            code: error_codes::TOKEN_INVALID.into(),
            reason: "it is not valid (unknown, malformed or mistyped)",
            message: e.to_string(),
        })?;
        let info = self.info().await?;
        let request = JoinRequest {
            token: token_text.trim().to_string(),
            public_key: key.public_key(),
            hostname: hostname.to_string(),
            proof: STANDARD.encode(key.join_proof(&info.join_key, &token.id, hostname)),
        };
        let call = self
            .http
            .post(self.url(paths::JOIN))
            .timeout(CALL_TIMEOUT)
            .json(&request);
        let response = self.send(call).await?;
        if !response.status().is_success() {
            let (status, code, message) = error_parts(response).await;
            return Err(join_error(status, code, message));
        }
        response
            .json()
            .await
            .map_err(|e| ControlError::Protocol(format!("join response: {e}")))
    }

    /// `PUT /api/v1/node/endpoints`.
    pub async fn report_endpoints(&self, credential: &str, report: &EndpointReport) -> Result<(), ControlError> {
        let call = self
            .http
            .put(self.url(paths::ENDPOINTS))
            .timeout(CALL_TIMEOUT)
            .bearer_auth(credential)
            .json(report);
        self.expect_success(call).await
    }

    /// `GET /api/v1/node/preshared-keys`: the preshared keys of the pairs this node is part of.
    pub async fn preshared_keys(&self, credential: &str) -> Result<PresharedKeys, ControlError> {
        let call = self
            .http
            .get(self.url(paths::PRESHARED_KEYS))
            .timeout(CALL_TIMEOUT)
            .bearer_auth(credential);
        let response = self.send(call).await?;
        if !response.status().is_success() {
            return Err(error_from(response).await);
        }
        response
            .json()
            .await
            .map_err(|e| ControlError::Protocol(format!("preshared keys response: {e}")))
    }

    /// `DELETE /api/v1/node`: this node leaves; its credential stops working.
    pub async fn leave(&self, credential: &str) -> Result<(), ControlError> {
        let call = self
            .http
            .delete(self.url(paths::NODE_SELF))
            .timeout(CALL_TIMEOUT)
            .bearer_auth(credential);
        self.expect_success(call).await
    }

    /// Opens the map stream, resuming after version `since` (None: start with a full map).
    pub async fn open_map(&self, credential: &str, since: Option<u64>) -> Result<MapStream, ControlError> {
        let mut call = self
            .http
            .get(self.url(paths::MAP))
            .bearer_auth(credential)
            .header("accept", "text/event-stream");
        if let Some(version) = since {
            call = call.query(&[("since", version)]);
        }
        let response = self.send(call).await?;
        if !response.status().is_success() {
            return Err(error_from(response).await);
        }
        let url = self.base_url.clone();
        let events = response.bytes_stream().eventsource();
        Ok(MapStream {
            url,
            events: Box::pin(events),
        })
    }

    /// Opens the relay (`GET /api/v1/relay` upgraded to `meshd-relay`) and returns the raw stream the relay frames
    /// travel on. Needs a client made with [`ControlClient::for_relay`].
    pub async fn open_relay(&self, credential: &str) -> Result<reqwest::Upgraded, ControlError> {
        let call = self
            .http
            .get(self.url(paths::RELAY))
            .bearer_auth(credential)
            .header(reqwest::header::CONNECTION, "Upgrade")
            .header(reqwest::header::UPGRADE, meshd_protocol::relay::UPGRADE_PROTOCOL);
        // A whole-request timeout would also cut the upgraded stream: bound only the handshake.
        let response = tokio::time::timeout(CALL_TIMEOUT, self.send(call))
            .await
            .map_err(|_| ControlError::Unreachable {
                url: self.base_url.clone(),
                detail: format!("no answer to the relay request within {CALL_TIMEOUT:?}"),
            })??;
        match response.status() {
            StatusCode::SWITCHING_PROTOCOLS => {}
            StatusCode::NOT_FOUND => {
                return Err(ControlError::Http {
                    status: 404,
                    code: error_codes::NOT_FOUND.into(),
                    message: format!(
                        "{} is missing: the coordinator is older than this meshd and has no relay; upgrade it \
                         (direct paths keep working meanwhile)",
                        paths::RELAY
                    ),
                });
            }
            _ => return Err(error_from(response).await),
        }
        tokio::time::timeout(CALL_TIMEOUT, response.upgrade())
            .await
            .map_err(|_| ControlError::Protocol("the relay upgrade did not complete in time".into()))?
            .map_err(|e| ControlError::Protocol(format!("relay upgrade failed: {}", error_chain(&e))))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    async fn expect_success(&self, call: RequestBuilder) -> Result<(), ControlError> {
        let response = self.send(call).await?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(error_from(response).await)
        }
    }

    async fn send(&self, call: RequestBuilder) -> Result<Response, ControlError> {
        call.send().await.map_err(|e| self.transport_error(&e))
    }

    fn transport_error(&self, error: &reqwest::Error) -> ControlError {
        if let Some(pin) = &self.pin
            && let Some(got) = pin.last_mismatch()
        {
            return ControlError::FingerprintMismatch {
                url: self.base_url.clone(),
                expected: pin.pinned().to_hex(),
                got: got.to_hex(),
            };
        }
        ControlError::Unreachable {
            url: self.base_url.clone(),
            detail: error_chain(error),
        }
    }
}

type EventStream = Pin<
    Box<
        dyn Stream<Item = Result<eventsource_stream::Event, eventsource_stream::EventStreamError<reqwest::Error>>>
            + Send,
    >,
>;

/// An open map stream.
pub struct MapStream {
    url: String,
    events: EventStream,
}

impl MapStream {
    /// The next map message; `None` when the coordinator closed the stream. Events of other names are skipped
    /// (the coordinator may add some later).
    pub async fn next(&mut self) -> Option<Result<MapMessage, ControlError>> {
        loop {
            let event = match self.events.next().await? {
                Ok(event) => event,
                Err(e) => {
                    let detail = match &e {
                        eventsource_stream::EventStreamError::Transport(t) => error_chain(t),
                        other => other.to_string(),
                    };
                    return Some(Err(ControlError::Unreachable {
                        url: self.url.clone(),
                        detail,
                    }));
                }
            };
            if event.event != paths::MAP_EVENT {
                tracing::debug!(event = %event.event, "skipping unknown map stream event");
                continue;
            }
            return Some(
                serde_json::from_str(&event.data)
                    .map_err(|e| ControlError::Protocol(format!("map message (event id {:?}): {e}", event.id))),
            );
        }
    }
}

/// Reads an error response into a [`ControlError`], using the coordinator's [`ErrorBody`] when there is one.
async fn error_from(response: Response) -> ControlError {
    let (status, code, message) = error_parts(response).await;
    error_of(status, code, message)
}

/// Status, code and message of an error response (code `unknown` when the body is not our [`ErrorBody`]).
async fn error_parts(response: Response) -> (StatusCode, String, String) {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => (body.error.code, body.error.message),
        Err(_) => (String::from("unknown"), text.chars().take(200).collect()),
    };
    (status, code, message)
}

fn error_of(status: StatusCode, code: String, message: String) -> ControlError {
    if status == StatusCode::UNAUTHORIZED {
        return ControlError::Unauthorized { message };
    }
    ControlError::Http {
        status: status.as_u16(),
        code,
        message,
    }
}

/// A refused join: a refused proof of key possession, or a refusal about the token, is explained as such.
fn join_error(status: StatusCode, code: String, message: String) -> ControlError {
    if status == StatusCode::UNAUTHORIZED && code == error_codes::PROOF_INVALID {
        return ControlError::ProofRejected { message };
    }
    token_error(error_of(status, code, message))
}

/// At join, a refusal about the token is explained as such.
fn token_error(error: ControlError) -> ControlError {
    let ControlError::Http { status, code, message } = error else {
        if let ControlError::Unauthorized { message } = error {
            return ControlError::TokenRejected {
                code: error_codes::UNAUTHORIZED.into(),
                reason: "it is not valid",
                message,
            };
        }
        return error;
    };
    let reason = match code.as_str() {
        error_codes::TOKEN_EXPIRED => "it has expired",
        error_codes::TOKEN_USED_UP => "it has already been used up",
        error_codes::TOKEN_REVOKED => "it was revoked",
        error_codes::TOKEN_INVALID => "it is not valid (unknown, malformed or mistyped)",
        _ => return ControlError::Http { status, code, message },
    };
    ControlError::TokenRejected { code, reason, message }
}

/// `error: cause: cause`, since reqwest's own message hides the interesting part (connection refused, DNS...).
fn error_chain(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Reconnect delays: exponential with full jitter, fast at first (a coordinator restart is over in a second),
/// capped so that a long outage costs a request every half minute at most.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// Upper bound of the first delay.
    pub const FIRST: Duration = Duration::from_millis(1000);
    /// No delay exceeds this.
    pub const CAP: Duration = Duration::from_secs(30);

    pub fn new() -> Self {
        Self { attempt: 0 }
    }

    /// After a success: the next failure starts fast again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The delay before the next attempt: uniform in [ceiling/2, ceiling] where the ceiling doubles per failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = Self::FIRST.saturating_mul(1u32 << self.attempt.min(6)).min(Self::CAP);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(rand::thread_rng().r#gen::<f64>())
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_fast_grows_and_caps() {
        let mut backoff = Backoff::new();
        let first = backoff.next_delay();
        assert!(
            first >= Duration::from_millis(500) && first <= Duration::from_millis(1000),
            "{first:?}"
        );
        let delays: Vec<_> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Backoff::CAP));
        assert!(delays[10] >= Backoff::CAP / 2, "grows to the cap: {delays:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(1000));
    }

    #[test]
    fn token_refusals_say_why() {
        let refused = |code: &str| {
            token_error(ControlError::Http {
                status: 403,
                code: code.into(),
                message: "from the server".into(),
            })
        };
        let text = refused(error_codes::TOKEN_EXPIRED).to_string();
        assert!(
            text.contains("expired") && text.contains("from the server") && text.contains("new token"),
            "{text}"
        );
        assert!(refused(error_codes::TOKEN_USED_UP).to_string().contains("used up"));
        assert!(refused(error_codes::TOKEN_REVOKED).to_string().contains("revoked"));
        assert!(refused(error_codes::TOKEN_INVALID).to_string().contains("not valid"));
        assert!(matches!(refused(error_codes::INTERNAL), ControlError::Http { .. }));
        assert!(!refused(error_codes::TOKEN_REVOKED).is_transient());
    }

    #[test]
    fn refused_join_proof_is_not_blamed_on_the_token() {
        let error = join_error(
            StatusCode::UNAUTHORIZED,
            error_codes::PROOF_INVALID.into(),
            "does not prove possession of the private key".into(),
        );
        assert!(matches!(error, ControlError::ProofRejected { .. }), "{error}");
        assert!(!error.is_transient());
        let text = error.to_string();
        assert!(text.contains("private key") && text.contains("report it"), "{text}");
        let error = join_error(
            StatusCode::UNAUTHORIZED,
            error_codes::TOKEN_INVALID.into(),
            "unknown".into(),
        );
        assert!(matches!(error, ControlError::TokenRejected { .. }), "{error}");
        let error = join_error(
            StatusCode::FORBIDDEN,
            error_codes::TOKEN_REVOKED.into(),
            "revoked".into(),
        );
        assert!(error.to_string().contains("revoked"), "{error}");
    }

    #[test]
    fn token_advice_is_given_once() {
        let from_coordinator = "this join token is not known to the coordinator (wrong secret, or a token of another \
                                coordinator); ask your admin for a new one: meshd-coordinator token create";
        let text = join_error(
            StatusCode::UNAUTHORIZED,
            error_codes::TOKEN_INVALID.into(),
            from_coordinator.into(),
        )
        .to_string();
        assert_eq!(text.matches("ask your admin").count(), 1, "{text}");
        assert!(text.contains("meshd-coordinator token create"), "{text}");
        // A message without advice (an older coordinator, a proxy's answer) still gets it.
        let text = join_error(
            StatusCode::FORBIDDEN,
            error_codes::TOKEN_EXPIRED.into(),
            "expired".into(),
        )
        .to_string();
        assert_eq!(text.matches("ask your admin").count(), 1, "{text}");
    }

    #[tokio::test]
    async fn unreachable_coordinator_names_the_url() {
        // Port 9 on loopback: nothing listens (discard is never enabled on test machines); refused at once.
        let client = ControlClient::new("http://127.0.0.1:9", None).expect("client");
        let error = client.leave("cred").await.expect_err("nothing listens");
        assert!(error.is_transient());
        let text = error.to_string();
        assert!(
            text.contains("http://127.0.0.1:9") && text.contains("cannot reach"),
            "{text}"
        );
    }
}

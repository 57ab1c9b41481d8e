//! Test harness: a real coordinator on 127.0.0.1 port 0 against a real database, with an HTTP client.
//!
//! Backends: SQLite in a temp dir always; PostgreSQL when `MESHD_TEST_POSTGRES_URL` points at a server where the
//! user may create databases (each test gets a fresh `meshd_t_<pid>_<n>` database, dropped at the end). With
//! `MESHD_TEST_REQUIRE_POSTGRES=1` a missing URL fails the PostgreSQL tests instead of skipping them (CI sets it).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use meshd_coordinator::config::ServeConfig;
use meshd_protocol::api::{CoordinatorInfo, JoinResponse, MAX_ENDPOINTS, join_proof};
use meshd_protocol::{JoinToken, MapMessage, PublicKey};
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::sync::oneshot;
use x25519_dalek::StaticSecret;

pub const PG_ENV: &str = "MESHD_TEST_POSTGRES_URL";
const _: usize = MAX_ENDPOINTS;

#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite,
    Postgres(String),
}

impl Backend {
    /// The PostgreSQL backend if configured; `None` (after saying so) if not.
    pub fn postgres() -> Option<Self> {
        match std::env::var(PG_ENV) {
            Ok(url) if !url.is_empty() => Some(Self::Postgres(url)),
            _ => {
                if std::env::var("MESHD_TEST_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
                    panic!("{PG_ENV} is not set but MESHD_TEST_REQUIRE_POSTGRES=1");
                }
                eprintln!(
                    "SKIPPED: set {PG_ENV}=postgres://USER:PASSWORD@127.0.0.1/postgres to run the PostgreSQL half"
                );
                None
            }
        }
    }
}

/// Runs `$body(backend)` as two tests, `sqlite` and `postgres`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident => $body:ident;)*) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$body($crate::harness::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                if let Some(backend) = $crate::harness::Backend::postgres() {
                    super::$body(backend).await
                }
            }
        }
    )*};
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A database for one test (and its data dir); dropped with it.
pub struct TestDb {
    pub url: String,
    pub dir: tempfile::TempDir,
    pg: Option<(String, String)>,
    /// A data directory the test owns (a tmpfs it mounted), instead of `dir`.
    data_dir_at: Option<PathBuf>,
}

impl TestDb {
    pub async fn new(backend: &Backend) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        match backend {
            Backend::Sqlite => Self {
                url: meshd_coordinator::store::default_url(dir.path()),
                dir,
                pg: None,
                data_dir_at: None,
            },
            Backend::Postgres(admin_url) => {
                let name = format!(
                    "meshd_t_{}_{}",
                    std::process::id(),
                    COUNTER.fetch_add(1, Ordering::SeqCst)
                );
                let mut conn = sqlx::PgConnection::connect(admin_url)
                    .await
                    .expect("connect to the PostgreSQL admin URL");
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("drop old db");
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                conn.close().await.expect("close");
                let url = replace_db(admin_url, &name);
                Self {
                    url,
                    dir,
                    pg: Some((admin_url.clone(), name)),
                    data_dir_at: None,
                }
            }
        }
    }

    /// SQLite in `data_dir`, a directory the test owns and cleans up itself (e.g. a tmpfs it mounted).
    pub fn sqlite_at(data_dir: &std::path::Path) -> Self {
        Self {
            url: meshd_coordinator::store::default_url(data_dir),
            dir: tempfile::tempdir().expect("tempdir"),
            pg: None,
            data_dir_at: Some(data_dir.to_path_buf()),
        }
    }

    /// The database at `url` as it is (a server the test owns and removes itself): nothing is created or dropped.
    pub fn existing(url: &str) -> Self {
        Self {
            url: url.to_string(),
            dir: tempfile::tempdir().expect("tempdir"),
            pg: None,
            data_dir_at: None,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        match &self.data_dir_at {
            Some(dir) => dir.clone(),
            None => self.dir.path().to_path_buf(),
        }
    }
}

fn replace_db(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.pg.take() {
            // Drop runs outside async context rules: use a small runtime on its own thread.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&mut conn)
                        .await;
                    }
                });
            })
            .join();
        }
    }
}

/// A running coordinator.
pub struct Coord {
    pub base: String,
    pub client: reqwest::Client,
    pub admin_key: String,
    /// PEM of the self-signed certificate when started with [`Coord::start_tls`].
    pub cert_pem: Option<Vec<u8>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Coord {
    pub async fn start(db: &TestDb) -> Self {
        Self::start_with(db, |_| {}).await
    }

    pub async fn start_with(db: &TestDb, tweak: impl FnOnce(&mut ServeConfig)) -> Self {
        Self::start_inner(db, false, tweak).await
    }

    /// A coordinator serving HTTPS with its self-signed certificate; `client` trusts that certificate.
    pub async fn start_tls(db: &TestDb) -> Self {
        Self::start_inner(db, true, |_| {}).await
    }

    async fn start_inner(db: &TestDb, tls: bool, tweak: impl FnOnce(&mut ServeConfig)) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let scheme = if tls { "https" } else { "http" };
        let mut config = ServeConfig::for_tests(&db.data_dir(), Some(db.url.clone()));
        config.public_url = Some(format!("{scheme}://{addr}"));
        if tls {
            config.tls = meshd_coordinator::config::TlsMode::SelfSigned;
        }
        tweak(&mut config);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(meshd_coordinator::run(config, listener, async move {
            let _ = rx.await;
        }));
        let base = format!("{scheme}://{addr}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
        let mut cert_pem = None;
        if tls {
            let cert_path = db.data_dir().join("tls/cert.pem");
            while !cert_path.exists() {
                assert!(!task.is_finished(), "coordinator exited during start-up");
                assert!(Instant::now() < deadline, "certificate generated");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let pem = std::fs::read(&cert_path).expect("cert");
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"));
            cert_pem = Some(pem);
        }
        let client = builder.build().expect("client");
        loop {
            if let Ok(r) = client.get(format!("{base}/healthz")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(!task.is_finished(), "coordinator exited during start-up");
            assert!(Instant::now() < deadline, "coordinator did not become healthy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let store = meshd_coordinator::store::Store::connect(&db.url).await.expect("store");
        let (_, admin_key) = meshd_coordinator::ops::issue_api_key(&store, "test", "tests")
            .await
            .expect("key");
        store.close().await;
        Self {
            base,
            client,
            admin_key,
            cert_pem,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// A client of a coordinator the test runs itself (a separate process), with an admin key it made.
    pub fn external(base: &str, admin_key: &str) -> Self {
        Self {
            base: base.to_string(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            admin_key: admin_key.to_string(),
            cert_pem: None,
            shutdown: None,
            task: None,
        }
    }

    /// Stops the coordinator and waits for it (bounded).
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("coordinator stops in time");
            result.expect("task").expect("coordinator ran cleanly");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path)).bearer_auth(&self.admin_key)
    }

    /// Sends an admin request, with `body` as JSON when given.
    pub async fn admin_send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> reqwest::Response {
        let request = self.admin(method, path);
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        request.send().await.expect("send")
    }

    /// An admin request whose answer is JSON (status not checked: callers assert on the body).
    pub async fn admin_json<T: serde::de::DeserializeOwned>(&self, method: reqwest::Method, path: &str) -> T {
        self.admin_send(method, path, None).await.json().await.expect("json")
    }

    /// `POST /api/v1/tokens` with `body`; returns the token string.
    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    pub async fn token(&self, body: Value) -> String {
        let r = self
            .admin(reqwest::Method::POST, "/api/v1/tokens")
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 201, "token create: {}", r.text().await.unwrap_or_default());
        let v: Value = r.json().await.expect("json");
        v["token"].as_str().expect("token field").to_string()
    }

    /// The coordinator's join key, as `GET /api/v1/info` publishes it.
    pub async fn join_key(&self) -> PublicKey {
        let r = self
            .client
            .get(self.url("/api/v1/info"))
            .send()
            .await
            .expect("send info");
        assert_eq!(r.status(), 200, "info: {}", r.text().await.unwrap_or_default());
        let info: CoordinatorInfo = r.json().await.expect("info body");
        assert_eq!(info.protocol_version, meshd_protocol::PROTOCOL_VERSION);
        info.join_key
    }

    /// Raw join, proving possession of `key` as a real node does.
    pub async fn join_raw(&self, token: &str, key: &TestKey, hostname: &str) -> reqwest::Response {
        let proof = key.proof(&self.join_key().await, &token_id(token), key, hostname);
        self.join_with_proof(token, key, hostname, Some(&proof)).await
    }

    /// Raw join with the given proof (`None`: the field is left out).
    pub async fn join_with_proof(
        &self,
        token: &str,
        key: &PublicKey,
        hostname: &str,
        proof: Option<&str>,
    ) -> reqwest::Response {
        let mut body = json!({"token": token, "public_key": key.to_string(), "hostname": hostname});
        if let Some(proof) = proof {
            body["proof"] = json!(proof);
        }
        self.client
            .post(self.url("/api/v1/join"))
            .json(&body)
            .send()
            .await
            .expect("send join")
    }

    /// A join that must succeed.
    pub async fn join(&self, token: &str, key: &TestKey, hostname: &str) -> JoinResponse {
        let r = self.join_raw(token, key, hostname).await;
        assert_eq!(r.status(), 200, "join: {}", r.text().await.unwrap_or_default());
        r.json().await.expect("join response")
    }

    /// Opens a map stream with the node's credential.
    pub async fn stream(&self, credential: &str, since: Option<&str>, last_event_id: Option<&str>) -> MapStream {
        let mut req = self
            .client
            .get(self.url("/api/v1/map"))
            .bearer_auth(credential)
            .timeout(Duration::from_secs(600));
        if let Some(since) = since {
            req = req.query(&[("since", since)]);
        }
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let r = req.send().await.expect("open stream");
        assert_eq!(r.status(), 200, "stream: {}", r.text().await.unwrap_or_default());
        assert!(
            r.headers()["content-type"]
                .to_str()
                .expect("ct")
                .starts_with("text/event-stream"),
            "SSE content type"
        );
        MapStream {
            events: Box::pin(r.bytes_stream().eventsource()),
        }
    }
}

impl Drop for Coord {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

type EventResult = Result<eventsource_stream::Event, eventsource_stream::EventStreamError<reqwest::Error>>;

/// A node's map stream as a test reads it.
pub struct MapStream {
    events: std::pin::Pin<Box<dyn Stream<Item = EventResult> + Send>>,
}

impl MapStream {
    /// The next map message; panics on timeout or end of stream. Checks the SSE framing (event name, id = version).
    pub async fn next(&mut self, within: Duration) -> MapMessage {
        match self.try_next(within).await {
            Some(m) => m,
            None => panic!("no map message within {within:?} (stream ended or timed out)"),
        }
    }

    /// The next message, `None` if the stream ended or nothing came within `within`.
    pub async fn try_next(&mut self, within: Duration) -> Option<MapMessage> {
        let event = tokio::time::timeout(within, self.events.next()).await.ok()??.ok()?;
        assert_eq!(event.event, meshd_protocol::paths::MAP_EVENT);
        let message: MapMessage = serde_json::from_str(&event.data).expect("data is a MapMessage");
        assert_eq!(event.id, message.version().to_string(), "SSE id is the version");
        Some(message)
    }

    /// True if the stream ends (EOF) within `within`.
    pub async fn ends_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.events.next()).await {
                Err(_) => return false,
                Ok(None) | Ok(Some(Err(_))) => return true,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Reads messages until `pred` holds for one; returns it. Panics after `within`.
    pub async fn until(&mut self, within: Duration, mut pred: impl FnMut(&MapMessage) -> bool) -> MapMessage {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self.next(left).await;
            if pred(&m) {
                return m;
            }
        }
    }
}

/// A node's real X25519 key pair, so that its joins can prove possession of the private key. Dereferences to its
/// public key.
#[derive(Clone)]
pub struct TestKey {
    secret: StaticSecret,
    public: PublicKey,
}

impl TestKey {
    fn from_secret(secret: StaticSecret) -> Self {
        let public = PublicKey::from_bytes(x25519_dalek::PublicKey::from(&secret).to_bytes());
        Self { secret, public }
    }

    /// The private half, for tests that run a real WireGuard `Tunn` with this key.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// The join proof (base64) for joining as `as_key` with this key's private half (a forgery when `as_key` is
    /// not this key's public key), against the coordinator's `join_key`.
    pub fn proof(&self, join_key: &PublicKey, token_id: &str, as_key: &PublicKey, hostname: &str) -> String {
        let shared = self
            .secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(*join_key.as_bytes()));
        STANDARD.encode(join_proof(shared.as_bytes(), token_id, as_key, hostname))
    }
}

impl std::fmt::Debug for TestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TestKey({:?})", self.public)
    }
}

impl std::ops::Deref for TestKey {
    type Target = PublicKey;
    fn deref(&self) -> &PublicKey {
        &self.public
    }
}

/// A distinct key pair per `n` (and per test process), the same on every call with the same `n`.
pub fn key(n: u32) -> TestKey {
    let mut bytes = [0u8; 32];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    bytes[4..8].copy_from_slice(&std::process::id().to_be_bytes());
    bytes[31] = 0x5a;
    TestKey::from_secret(StaticSecret::from(bytes))
}

/// The token id of a token string; empty when it does not parse (tests of damaged tokens).
pub fn token_id(token: &str) -> String {
    JoinToken::parse(token).map(|t| t.id).unwrap_or_default()
}

/// Error code of an error response (asserting the body format).
pub async fn error_code(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.expect("error body is JSON");
    let code = v["error"]["code"].as_str().expect("error.code").to_string();
    assert!(!v["error"]["message"].as_str().expect("error.message").is_empty());
    (status, code)
}

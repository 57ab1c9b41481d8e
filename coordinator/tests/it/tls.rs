//! Serving HTTPS with the self-signed certificate: its fingerprint is in the tokens and matches what is served.

use std::time::{Duration, Instant};

use meshd_coordinator::config::TlsMode;
use meshd_protocol::{CertFingerprint, JoinToken};
use serde_json::{Value, json};

use crate::harness::{Backend, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_tls_is_pinned_in_tokens() {
    let db = TestDb::new(&Backend::Sqlite).await;
    // Start with TLS on a free port; the harness's plain-HTTP health check does not apply, so drive it by hand.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut config = meshd_coordinator::config::ServeConfig::for_tests(&db.data_dir(), Some(db.url.clone()));
    config.tls = TlsMode::SelfSigned;
    config.public_url = Some(format!("https://{addr}"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(meshd_coordinator::run(config, listener, async move {
        let _ = rx.await;
    }));

    let cert_path = db.data_dir().join("tls/cert.pem");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cert_path.exists() {
        assert!(Instant::now() < deadline, "certificate generated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pem = std::fs::read(&cert_path).expect("cert");
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let base = format!("https://{addr}");
    loop {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await
            && r.status().is_success()
        {
            break;
        }
        assert!(Instant::now() < deadline, "HTTPS health");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = meshd_coordinator::store::Store::connect(&db.url).await.expect("store");
    let (_, admin) = meshd_coordinator::ops::issue_api_key(&store, "test", "")
        .await
        .expect("key");
    let r = client
        .post(format!("{base}/api/v1/tokens"))
        .bearer_auth(&admin)
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 201);
    let token: Value = r.json().await.expect("json");
    let token = JoinToken::parse(token["token"].as_str().expect("token")).expect("parse");
    assert_eq!(token.coordinator_url, base);
    let expected = meshd_coordinator::tls::fingerprint_of(&cert_path).expect("fingerprint");
    assert_eq!(token.fingerprint, Some(expected));
    // Cross-check the pin against the DER of the PEM with an independent decoder (base64 of the PEM body).
    let text = String::from_utf8(pem).expect("utf8");
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    use base64::Engine;
    let der = base64::engine::general_purpose::STANDARD.decode(body).expect("der");
    assert_eq!(CertFingerprint::of_der(&der), expected);
    store.close().await;
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops")
        .expect("task")
        .expect("ran cleanly");
}

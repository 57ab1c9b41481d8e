//! https without a pinned certificate: a coordinator behind a certificate from a CA is verified against CA roots.

use meshd_node::control::{ControlClient, ControlError};
use meshd_node::keys::NodeKey;
use meshd_protocol::JoinToken;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

use crate::harness::{Coordinator, Node};

fn new_ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_issued_certificate_without_pin_uses_ca_roots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = new_ca();
    let server_key = KeyPair::generate().expect("key");
    let server = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&server_key, &ca)
        .expect("server certificate");
    let (cert, key, bundle, other_bundle) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("ca.pem"),
        dir.path().join("other-ca.pem"),
    );
    std::fs::write(&cert, server.pem()).expect("write");
    std::fs::write(&key, server_key.serialize_pem()).expect("write");
    std::fs::write(&bundle, ca.pem()).expect("write");
    std::fs::write(&other_bundle, new_ca().pem()).expect("write");

    let coordinator = Coordinator::start_with(
        true,
        &[
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ],
    );
    let text = coordinator.token(&["--reusable"]);
    // The coordinator pins its configured certificate too; the pinned path works with it.
    Node::enrol(&text, "pinned").await.expect("pinned join");

    let token = JoinToken {
        fingerprint: None,
        ..JoinToken::parse(&text).expect("token")
    };
    let text = token.encode();
    let trusted = ControlClient::with_ca_bundle(&token.coordinator_url, None, &bundle).expect("client");
    let joined = trusted
        .join(&text, &NodeKey::generate(), "by-ca")
        .await
        .expect("verified against the CA");
    assert_eq!(joined.name, "by-ca");

    let untrusted = ControlClient::with_ca_bundle(&token.coordinator_url, None, &other_bundle).expect("client");
    match untrusted.join(&text, &NodeKey::generate(), "mitm").await {
        Err(ControlError::Unreachable { detail, .. }) => {
            assert!(detail.to_lowercase().contains("certificate"), "{detail}")
        }
        other => panic!("a certificate from another CA must be refused, got {other:?}"),
    }

    let missing = dir.path().join("no-such-bundle.pem");
    let error = ControlClient::with_ca_bundle(&token.coordinator_url, None, &missing).expect_err("no roots");
    assert!(error.to_string().contains("no-such-bundle.pem"), "{error}");
}

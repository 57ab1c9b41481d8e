//! What a person sees when joining goes wrong: each refusal names its cause and the next step.

use meshd_node::control::ControlError;
use meshd_node::daemon::DaemonError;
use meshd_protocol::{CertFingerprint, JoinToken};

use crate::harness::{Coordinator, Node};

fn control_error(result: Result<Node, DaemonError>) -> ControlError {
    match result {
        Err(DaemonError::Control(e)) => e,
        Err(other) => panic!("expected a coordinator error, got {other}"),
        Ok(_) => panic!("expected the join to fail"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_tokens_say_why() {
    let coordinator = Coordinator::start(true);

    let single = coordinator.token(&[]);
    Node::enrol(&single, "first").await.expect("first use works");
    let error = control_error(Node::enrol(&single, "second").await);
    assert!(
        matches!(&error, ControlError::TokenRejected { code, .. } if code == "token_used_up"),
        "{error}"
    );
    assert!(error.to_string().contains("used up"), "{error}");

    let revoked = coordinator.token(&["--reusable"]);
    let id = JoinToken::parse(&revoked).expect("token").id;
    coordinator.cli(&["token", "revoke", &id]).expect("revoke");
    let error = control_error(Node::enrol(&revoked, "late").await);
    assert!(
        matches!(&error, ControlError::TokenRejected { code, .. } if code == "token_revoked"),
        "{error}"
    );

    let expiring = coordinator.token(&["--expires", "1s"]);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let error = control_error(Node::enrol(&expiring, "slow").await);
    assert!(
        matches!(&error, ControlError::TokenRejected { code, .. } if code == "token_expired"),
        "{error}"
    );

    // A token whose secret is wrong (forged or mistyped) enrols nothing either.
    let mut forged = JoinToken::parse(&coordinator.token(&[])).expect("token");
    forged.secret = [0x55; 32];
    let error = control_error(Node::enrol(&forged.encode(), "forged").await);
    assert!(matches!(&error, ControlError::TokenRejected { .. }), "{error}");
    let text = error.to_string();
    assert_eq!(text.matches("ask your admin").count(), 1, "the advice once: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_fingerprint_and_unreachable_coordinator() {
    let coordinator = Coordinator::start(true);
    let mut token = JoinToken::parse(&coordinator.token(&[])).expect("token");
    let real = token.fingerprint.expect("pinned");
    token.fingerprint = Some(CertFingerprint([0xab; 32]));
    let error = control_error(Node::enrol(&token.encode(), "mitm").await);
    match &error {
        ControlError::FingerprintMismatch { expected, got, .. } => {
            assert_eq!(expected, &"ab".repeat(32));
            assert_eq!(got, &real.to_hex(), "names the certificate it met");
        }
        other => panic!("expected a fingerprint mismatch, got {other}"),
    }

    // The real pin still works with the same coordinator.
    token.fingerprint = Some(real);
    Node::enrol(&token.encode(), "genuine")
        .await
        .expect("pinned join works");

    // Nothing listens: the error names the URL.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let nowhere = JoinToken {
        coordinator_url: format!("https://127.0.0.1:{closed}"),
        ..token
    };
    let error = control_error(Node::enrol(&nowhere.encode(), "lost").await);
    assert!(matches!(error, ControlError::Unreachable { .. }), "{error}");
    assert!(
        error.to_string().contains(&format!("https://127.0.0.1:{closed}")),
        "{error}"
    );
}

#[tokio::test]
async fn malformed_tokens_never_reach_the_network() {
    for (text, needle) in [("hello", "not a meshd join token"), ("meshd1_@@@", "damaged")] {
        match Node::enrol(text, "x").await {
            Err(DaemonError::Token(e)) => assert!(e.to_string().contains(needle), "{e}"),
            Err(other) => panic!("expected a token error, got {other}"),
            Ok(_) => panic!("garbage joined"),
        }
    }
}

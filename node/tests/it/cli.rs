//! The `meshd` binary as scripts use it: exit statuses and messages, without root.

use std::process::{Command, Output};

fn meshd(state_dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshd"))
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .env_remove("MESHD_STATE_DIR")
        .output()
        .expect("run meshd")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn exit_statuses_and_messages_for_scripts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("state");

    let out = meshd(&dir, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("meshd is not running for state dir {}", dir.display())));
    assert!(out.stdout.is_empty(), "nothing on stdout for scripts to misparse");

    let out = meshd(&dir, &["ping", "gpu", "-c", "1"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));

    let out = meshd(&dir, &["up"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("meshd join"), "{}", stderr(&out));

    let out = meshd(&dir, &["join", "not-a-token"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not a meshd join token"), "{}", stderr(&out));

    let out = meshd(&dir, &["down"]);
    assert_eq!(out.status.code(), Some(0), "down is idempotent");
    assert!(stderr(&out).contains("not running"));

    let out = meshd(&dir, &["leave"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));

    let out = meshd(&dir, &["ping"]);
    assert_eq!(out.status.code(), Some(2), "usage errors are 2");

    let out = meshd(&dir, &["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for command in ["join", "up", "status", "ping", "down", "leave", "--state-dir"] {
        assert!(help.contains(command), "--help mentions {command}");
    }
}

#[test]
fn leave_needs_the_coordinator_or_force() {
    use meshd_node::keys::NodeKey;
    use meshd_node::state::{Identity, StateDir};

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("state");
    let state = StateDir::new(&dir);
    state.ensure().expect("mkdir");
    let key = NodeKey::generate();
    key.save(&state.key_path()).expect("key");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let identity = Identity {
        node_id: 7,
        name: "laptop".into(),
        ip: "10.77.0.7".parse().expect("ip"),
        network: "10.77.0.0/16".parse().expect("cidr"),
        coordinator_url: format!("http://127.0.0.1:{closed}"),
        fingerprint: None,
        tags: vec![],
        public_key: key.public_key(),
    };
    state.save_identity(&identity, "credential").expect("identity");

    let out = meshd(&dir, &["leave"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("http://127.0.0.1:{closed}")),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert!(
        state.has_identity(),
        "nothing deleted when the coordinator was not told"
    );

    let out = meshd(&dir, &["leave", "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!state.has_identity());
    assert!(!state.key_path().exists() && !state.credential_path().exists());
}

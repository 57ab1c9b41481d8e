//! The `meshd-coordinator` binary: help, secrets printed as the last line, helpful failures, config validation.

use std::process::{Command, Output};

use meshd_protocol::JoinToken;

const BIN: &str = env!("CARGO_BIN_EXE_meshd-coordinator");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("MESHD_DATABASE_URL")
        .env_remove("MESHD_DATA_DIR")
        .output()
        .expect("run binary")
}

fn last_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn help_documents_every_flag() {
    let out = run(&["serve", "--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--network",
        "--public-url",
        "--tls-cert",
        "--tls-key",
        "--no-tls",
        "--data-dir",
        "--database-url",
        "--config",
        "MESHD_LISTEN",
    ] {
        assert!(text.contains(flag), "serve --help mentions {flag}");
    }
    let out = run(&["token", "create", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--reusable", "--uses", "--expires", "--tag", "--public-url"] {
        assert!(text.contains(flag), "token create --help mentions {flag}");
    }
}

#[test]
fn cli_commands_print_secrets_last() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8");

    let out = run(&["--data-dir", d, "apikey", "create"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(last_line(&out).starts_with("mshk_"));

    // No serve yet and no --public-url: a clear error.
    let out = run(&["--data-dir", d, "token", "create"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--public-url"));

    // With --public-url https: pinned to the self-signed certificate generated in the data dir (serve will use it).
    let out = run(&[
        "token",
        "create",
        "--data-dir",
        d,
        "--public-url",
        "https://198.18.0.1:8443",
        "--uses",
        "3",
        "--expires",
        "24h",
        "--tag",
        "gpu",
        "--tag",
        "lab",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = JoinToken::parse(&last_line(&out)).expect("last line is a token");
    assert_eq!(token.coordinator_url, "https://198.18.0.1:8443");
    let expected = meshd_coordinator::tls::fingerprint_of(&dir.path().join("tls/cert.pem")).expect("cert");
    assert_eq!(token.fingerprint, Some(expected));

    let out = run(&["--data-dir", d, "token", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&token.id) && text.contains("0/3") && text.contains("gpu,lab"),
        "{text}"
    );
    let out = run(&["--data-dir", d, "token", "revoke", &token.id]);
    assert!(out.status.success());
    let out = run(&["--data-dir", d, "token", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("revoked"));
    let out = run(&["--data-dir", d, "token", "revoke", "nosuch"]);
    assert!(!out.status.success());
    let out = run(&["--data-dir", d, "token", "create", "--reusable", "--uses", "2"]);
    assert!(!out.status.success(), "--reusable conflicts with --uses");
    let out = run(&["--data-dir", d, "node", "list"]);
    assert!(out.status.success());
}

#[test]
fn serve_rejects_bad_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8");
    let out = run(&[
        "--data-dir",
        d,
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--network",
        "10.0.0.0/31",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("too small"));
    let out = run(&[
        "--data-dir",
        d,
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--network",
        "banana",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CIDR"));
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nnetwrok = \"10.0.0.0/8\"\n").expect("write");
    let out = run(&["--data-dir", d, "--config", config.to_str().expect("utf8"), "serve"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("netwrok"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nnetwork = \"10.1.2.0/16\"\n").expect("write");
    let out = run(&["--data-dir", d, "--config", config.to_str().expect("utf8"), "serve"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("10.1.0.0/16"),
        "suggests the network address"
    );
    let out = run(&[
        "--data-dir",
        d,
        "--database-url",
        "mysql://x",
        "serve",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sqlite://"));
}

/// A node deleted with the CLI (another process writing the SQLite database) leaves open streams too: the serving
/// process's broker polls the change log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_changes_reach_open_streams() {
    use crate::harness::{Backend, Coord, TestDb, key};
    use meshd_protocol::MapMessage;
    use std::time::{Duration, Instant};

    let db = TestDb::new(&Backend::Sqlite).await;
    let c = Coord::start(&db).await;
    let token = c.token(serde_json::json!({"reusable": true})).await;
    let a = c.join(&token, &key(1), "a").await;
    let b = c.join(&token, &key(2), "b").await;
    let mut sa = c.stream(&a.credential, None, None).await;
    let _ = sa.next(Duration::from_secs(5)).await;
    let started = Instant::now();
    let d = db.data_dir();
    let id = b.node_id.to_string();
    let out =
        tokio::task::spawn_blocking(move || run(&["--data-dir", d.to_str().expect("utf8"), "node", "delete", &id]))
            .await
            .expect("join");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = sa
        .until(
            Duration::from_secs(3),
            |m| matches!(m, MapMessage::PeerRemoved { id, .. } if *id == b.node_id),
        )
        .await;
    eprintln!("CLI deletion reached the stream after {:?}", started.elapsed());
    c.stop().await;
}

/// Starts `serve` with stderr in a file (not a terminal), waits until it logs that it serves, stops it (by PID) and
/// returns the log.
fn serve_log(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(BIN)
        .args([
            "--data-dir",
            dir.path().to_str().expect("utf8"),
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .args([
            "--no-tls",
            "--no-stun",
            "--gateway-port",
            "0",
            "--public-url",
            "http://127.0.0.1:9",
        ])
        .args(extra)
        .env_remove("MESHD_DATABASE_URL")
        .env_remove("MESHD_DATA_DIR")
        .env_remove("MESHD_LOG_FORMAT")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("coordinator serving") || std::time::Instant::now() > deadline {
            break text;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("serve exited ({status}): {text}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // By PID: SIGKILL is enough, the log is written line by line.
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("coordinator serving"), "serve started: {text}");
    text
}

#[test]
fn log_file_has_no_colour_codes_and_json_is_one_object_per_line() {
    let text = serve_log(&[]);
    assert!(
        !text.contains('\u{1b}'),
        "no ANSI escape codes when stderr is not a terminal: {text:?}"
    );

    let json = serve_log(&["--log-format", "json"]);
    assert!(!json.contains('\u{1b}'), "{json:?}");
    let mut lines = 0;
    for line in json.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(value["level"].is_string() && value["fields"].is_object(), "{line}");
        lines += 1;
    }
    assert!(lines > 0);
}

/// `device add` / `device config`: the generated private key goes into the printed config only, the QR code is
/// printed with the text, and the missing gateway is warned about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_add_and_config() {
    use crate::harness::{Backend, Coord, TestDb, key};
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    let db = TestDb::new(&Backend::Sqlite).await;
    let c = Coord::start(&db).await;
    let token = c.token(serde_json::json!({})).await;
    c.join(&token, &key(1), "server").await;
    let d = db.data_dir().to_str().expect("utf8").to_string();
    let cli = move |args: Vec<String>| {
        let d = d.clone();
        tokio::task::spawn_blocking(move || {
            let mut all = vec!["--data-dir".to_string(), d];
            all.extend(args);
            run(&all.iter().map(String::as_str).collect::<Vec<_>>())
        })
    };
    let args = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();

    let out = cli(args("device add phone --generate-key --tag mobile --qr"))
        .await
        .expect("join");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("shown this once and stored nowhere"), "{stderr}");
    // The coordinator serves the gateway here: no warning, and every peer's Endpoint is the gateway.
    assert!(!stderr.contains("gateway is off"), "{stderr}");
    assert!(stdout.contains("Endpoint = "), "{stdout}");
    let private = stdout
        .lines()
        .find_map(|l| l.strip_prefix("PrivateKey = "))
        .expect("PrivateKey line");
    let bytes: [u8; 32] = STANDARD.decode(private).expect("base64").try_into().expect("32 bytes");
    let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(bytes));
    let nodes: serde_json::Value = c.admin_json(reqwest::Method::GET, "/api/v1/nodes").await;
    let phone = nodes
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == "phone")
        .expect("phone registered");
    assert_eq!(
        phone["public_key"],
        STANDARD.encode(public.as_bytes()),
        "registered with the generated key"
    );
    assert_eq!(phone["preshared_key"], true);
    assert_eq!(phone["tags"], serde_json::json!(["mobile"]));
    assert!(stdout.contains("PresharedKey = ") && stdout.contains("DNS = 10.77.0.2, mesh.internal"));
    assert!(stdout.contains('\u{2588}'), "QR code printed");
    // The private key was stored nowhere the coordinator can show.
    let audit = c
        .admin_send(reqwest::Method::GET, "/api/v1/audit", None)
        .await
        .text()
        .await
        .expect("audit");
    assert!(!audit.contains(private) && !nodes.to_string().contains(private));

    let out = cli(args(&format!(
        "device add tablet --public-key {} --no-preshared-key",
        *key(9)
    )))
    .await
    .expect("join");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("PresharedKey"));

    // By name, later: the placeholder (the private key is gone).
    let out = cli(args("device config phone")).await.expect("join");
    assert!(out.status.success());
    let again = String::from_utf8_lossy(&out.stdout);
    assert!(again.contains(meshd_coordinator::wgconfig::PRIVATE_KEY_PLACEHOLDER) && !again.contains(private));

    let out = cli(args("device add nokey")).await.expect("join");
    assert!(!out.status.success());
    let out = cli(args("device config nosuch")).await.expect("join");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node named `nosuch`"));
    c.stop().await;
}

//! Fault injection: the coordinator meets a full disk, a read-only data directory, a PostgreSQL restart, a damaged
//! database page and a wall-clock jump, and must recover without a restart (or, for the damaged page, refuse to
//! serve and say what to do). Each test prints one `FAULT <name>: survived` line when it passes (scripts/test-all.sh
//! collects them).
//!
//! Disk faults use a tmpfs of a few MiB mounted in a temp dir (needs root; the test says SKIPPED when it cannot
//! mount). The PostgreSQL restart uses a private throwaway server (initdb + pg_ctl as the `postgres` user, on a free
//! port of 127.0.0.1) that the test stops, starts and removes: never the shared cluster other tests use.
//! Every mount and server is a guard removed on drop, also when the test fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Coord, TestDb, error_code, key};

/// Size of the test tmpfs: room for the database and its WAL, small enough to fill in milliseconds.
const TMPFS_SIZE: &str = "4m";

fn survived(fault: &str, detail: &str) {
    println!("FAULT {fault}: survived ({detail})");
}

/// A tmpfs mounted on a fresh temp dir; unmounted (lazily, so open files cannot keep it) and removed on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl Tmpfs {
    /// `None` (after printing why) when this machine cannot mount one (not root, no mount namespace rights).
    fn mount() -> Option<Self> {
        let dir = tempfile::Builder::new()
            .prefix("meshd-fault-")
            .tempdir()
            .expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_SIZE},mode=0700"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(out) if out.status.success() => Some(Self { dir, mounted: true }),
            Ok(out) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs (run as root): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Remounts read-only (`true`) or read-write.
    fn set_read_only(&self, read_only: bool) {
        let mode = if read_only { "remount,ro" } else { "remount,rw" };
        let out = Command::new("mount")
            .args(["-o", mode])
            .arg(self.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -o {mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Fills the file system to the last block; returns the filler file (delete it to free the space).
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).expect("create filler");
        let chunk = vec![0xa5u8; 64 * 1024];
        // Bounded: a 4 MiB file system takes at most 64 chunks, then single bytes until the last block is used.
        for _ in 0..1024 {
            if file.write_all(&chunk).is_err() {
                break;
            }
        }
        for _ in 0..(64 * 1024) {
            if file.write_all(&[0xa5]).and_then(|()| file.flush()).is_err() {
                break;
            }
        }
        let _ = file.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
            self.mounted = false;
        }
    }
}

/// `/readyz` status and body.
async fn ready(c: &Coord) -> (u16, Value) {
    let r = c.client.get(c.url("/readyz")).send().await.expect("readyz");
    let status = r.status().as_u16();
    (status, r.json().await.expect("readyz body"))
}

/// Polls `/readyz` until it answers `want` (bounded); returns the last body.
async fn wait_ready(c: &Coord, want: u16, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = ready(c).await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz did not answer {want} within {within:?}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Disk full under a running coordinator: joins and token creation fail with 503 `unavailable` while it is full,
/// `/readyz` says 503 and `/healthz` stays 200 (alive) with `writable: false`; once space is freed the next join and
/// token succeed with no restart, and every write that answered 2xx is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_full() {
    let Some(tmpfs) = Tmpfs::mount() else { return };
    let db = TestDb::sqlite_at(tmpfs.path());
    let c = Coord::start(&db).await;
    let token = c.token(json!({"reusable": true})).await;
    let first = c.join(&token, &key(1), "before").await;

    let filler = tmpfs.fill();
    let mut refused = 0;
    // Several writes while full: the first failure must not poison the ones after it once space is back.
    for i in 0..3 {
        let r = c.join_raw(&token, &key(10 + i), &format!("full{i}")).await;
        let (status, code) = error_code(r).await;
        assert_eq!((status, code.as_str()), (503, "unavailable"), "a join on a full disk");
        refused += 1;
    }
    let r = c.admin_send(Method::POST, "/api/v1/tokens", Some(json!({}))).await;
    assert_eq!(
        error_code(r).await,
        (503, "unavailable".into()),
        "a token on a full disk"
    );
    let body = wait_ready(&c, 503, Duration::from_secs(10)).await;
    assert!(
        body["write_error"].as_str().is_some_and(|e| e.contains("full")),
        "readiness says why: {body}"
    );
    let health: Value = c
        .client
        .get(c.url("/healthz"))
        .send()
        .await
        .expect("healthz")
        .json()
        .await
        .expect("json");
    assert_eq!(health["status"], "ok", "alive: {health}");
    assert_eq!(health["writable"], false, "but not writable: {health}");

    std::fs::remove_file(&filler).expect("free the space");
    // No restart, no waiting: the very next write succeeds.
    let after = c.join(&token, &key(2), "after").await;
    let more = c.token(json!({})).await;
    assert!(!more.is_empty());
    wait_ready(&c, 200, Duration::from_secs(5)).await;
    let nodes: Vec<Value> = c.admin_json(Method::GET, "/api/v1/nodes").await;
    let ids: Vec<i64> = nodes.iter().filter_map(|n| n["id"].as_i64()).collect();
    for joined in [&first, &after] {
        assert!(
            ids.contains(&joined.node_id),
            "node {} answered 200 and is stored",
            joined.node_id
        );
    }
    assert_eq!(nodes.len(), 2, "no refused join left a node behind: {nodes:?}");
    c.stop().await;
    drop(db);
    drop(tmpfs);
    survived(
        "disk full",
        &format!("{refused} joins refused with 503 while full, next join 200 without restart"),
    );
}

/// The data directory is read-only when the coordinator starts (a volume mounted `ro`, or a file system the
/// kernel remounted read-only after I/O errors, then a restart). Linux refuses to remount a file system read-only
/// while a file on it is open for writing (EBUSY), so a running SQLite database cannot be made read-only under the
/// coordinator; this is the form the fault takes. The coordinator must refuse to start with a message saying what
/// to do, and start with its data intact once the directory is writable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_only_directory() {
    let Some(tmpfs) = Tmpfs::mount() else { return };
    let db = TestDb::sqlite_at(tmpfs.path());
    let c = Coord::start(&db).await;
    let token = c.token(json!({"reusable": true})).await;
    let joined = c.join(&token, &key(1), "before").await;
    c.stop().await;

    tmpfs.set_read_only(true);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let config = meshd_coordinator::config::ServeConfig::for_tests(&db.data_dir(), Some(db.url.clone()));
    let started = tokio::time::timeout(
        Duration::from_secs(30),
        meshd_coordinator::run(config, listener, std::future::pending()),
    )
    .await
    .expect("a coordinator on a read-only directory does not hang");
    let message = format!("{:#}", started.expect_err("it refuses to serve"));
    assert!(
        message.contains("read-only") && message.contains("--data-dir"),
        "the error says what is wrong and what to do: {message}"
    );

    tmpfs.set_read_only(false);
    let c = Coord::start(&db).await;
    let nodes: Vec<Value> = c.admin_json(Method::GET, "/api/v1/nodes").await;
    assert_eq!(nodes.len(), 1, "the data is intact");
    assert_eq!(nodes[0]["id"].as_i64(), Some(joined.node_id));
    c.join(&token, &key(2), "after").await;
    c.stop().await;
    drop(db);
    drop(tmpfs);
    survived(
        "read-only directory",
        "refused to start saying so, started with its data once writable",
    );
}

/// A damaged page that start-up does not read (a leaf of the token table): the coordinator must not serve from the
/// file, and must say to restore from a backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupted_page() {
    use sqlx::Connection;
    let db = TestDb::new(&crate::harness::Backend::Sqlite).await;
    let c = Coord::start(&db).await;
    // Enough rows that the token table and the audit log span many pages beyond what start-up reads.
    for _ in 0..300 {
        c.token(json!({"tags": ["padding-to-fill-pages"]})).await;
    }
    c.stop().await;
    let file = db.data_dir().join("meshd.db");
    {
        let mut conn = sqlx::SqliteConnection::connect(&db.url).await.expect("open");
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut conn)
            .await
            .expect("checkpoint");
        conn.close().await.expect("close");
    }
    let bytes = std::fs::read(&file).expect("read db");
    let page = 4096;
    let pages = bytes.len() / page;
    assert!(pages > 20, "the database spans {pages} pages");
    // The last page: written last (a leaf of the tokens or audit table), never read at start-up.
    let mut damaged = bytes.clone();
    let start = (pages - 1) * page;
    for (i, byte) in damaged[start..start + page].iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    std::fs::write(&file, &damaged).expect("damage a page");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let config = meshd_coordinator::config::ServeConfig::for_tests(&db.data_dir(), Some(db.url.clone()));
    let started = tokio::time::timeout(
        Duration::from_secs(60),
        meshd_coordinator::run(config, listener, std::future::pending()),
    )
    .await
    .expect("the check is bounded in time");
    let message = format!("{:#}", started.expect_err("a damaged database is not served"));
    assert!(
        message.contains("damaged") && message.contains("backup"),
        "the error says what is wrong and what to do: {message}"
    );

    // The same file undamaged starts (the check does not refuse a healthy database).
    std::fs::write(&file, &bytes).expect("restore");
    let c = Coord::start(&db).await;
    c.stop().await;
    survived("corrupted page", "refused to serve, error says restore from backup");
}

/// A PostgreSQL server of this test's own: initdb + pg_ctl as the `postgres` user in a temp dir, on a free port of
/// 127.0.0.1. Stopped (immediately) and removed on drop.
struct PrivatePostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl PrivatePostgres {
    /// `None` (after saying why) when the server binaries or the `postgres` user are missing; with
    /// `MESHD_TEST_REQUIRE_POSTGRES=1` that is a failure instead.
    fn start() -> Option<Self> {
        let skip = |why: String| {
            if std::env::var("MESHD_TEST_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
                panic!("cannot run a private PostgreSQL but MESHD_TEST_REQUIRE_POSTGRES=1: {why}");
            }
            eprintln!("SKIPPED: cannot run a private PostgreSQL ({why}); install postgresql and run as root");
            None
        };
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|dir| dir.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
            .unwrap_or_default();
        versions.retain(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists());
        versions.sort();
        let Some(bin) = versions.pop() else {
            return skip("no /usr/lib/postgresql/*/bin/initdb".into());
        };
        let dir = tempfile::Builder::new().prefix("meshd-pg-").tempdir().expect("tempdir");
        let chown = Command::new("chown").arg("postgres:postgres").arg(dir.path()).output();
        if !chown.as_ref().is_ok_and(|o| o.status.success()) {
            return skip(format!("cannot give a temp dir to the postgres user: {chown:?}"));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let server = Self { bin, dir, port };
        let data = server.data();
        let init = server.as_postgres(
            &server.bin.join("initdb"),
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        if !init.status.success() {
            return skip(format!("initdb failed: {}", String::from_utf8_lossy(&init.stderr)));
        }
        if !server.pg_ctl_start() {
            return skip(format!("pg_ctl start failed: {}", server.log()));
        }
        Some(server)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn as_postgres(&self, program: &Path, args: &[&str]) -> std::process::Output {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(program)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run runuser")
    }

    fn pg_ctl_start(&self) -> bool {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        let out = self.as_postgres(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        out.status.success()
    }

    /// `fast`: connections are closed, in-flight transactions rolled back (what a service restart does).
    fn pg_ctl_stop(&self, mode: &str) -> bool {
        let out = self.as_postgres(
            &self.bin.join("pg_ctl"),
            &["-D", &self.data(), "-m", mode, "-w", "-t", "30", "stop"],
        );
        out.status.success()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl_stop("immediate");
    }
}

/// PostgreSQL stops and starts again under a running coordinator while joins keep coming: during the outage joins
/// fail with 503 and `/readyz` says 503; afterwards the pool recovers by itself (no restart), the map stream gets
/// the next change, and every join that answered 200 is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restart() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let Some(pg) = PrivatePostgres::start() else { return };
    let db = TestDb::existing(&pg.url());
    let c = Arc::new(Coord::start(&db).await);
    let token = c.token(json!({"reusable": true})).await;
    let first = c.join(&token, &key(1), "first").await;
    let mut stream = c.stream(&first.credential, None, None).await;
    stream.next(Duration::from_secs(5)).await;

    // A writer that joins a new node every 50 ms through the whole outage, keeping what answered 200.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (c, token, stop) = (c.clone(), token.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (Vec::new(), 0u32);
            for i in 100..10_000u32 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = c.join_raw(&token, &key(i), &format!("w{i}")).await;
                if r.status() == 200 {
                    let joined: meshd_protocol::api::JoinResponse = r.json().await.expect("join body");
                    ok.push(joined.node_id);
                } else {
                    let (status, _) = error_code(r).await;
                    assert!(status == 503, "a join during the outage answers 503, not {status}");
                    failed += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(pg.pg_ctl_stop("fast"), "stop the private server: {}", pg.log());
    let stopped = Instant::now();
    wait_ready(&c, 503, Duration::from_secs(15)).await;
    // Longer than the pool's acquire timeout (10 s), so joins waiting for a connection give up with 503 instead of
    // all of them riding the outage out.
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(stopped.elapsed())).await;
    assert!(pg.pg_ctl_start(), "start the private server again: {}", pg.log());
    let restarted = Instant::now();
    wait_ready(&c, 200, Duration::from_secs(30)).await;
    let recovered_in = restarted.elapsed();
    let after = c.join(&token, &key(2), "after").await;
    // The broker reconnects too: open streams see changes again.
    stream
        .until(
            Duration::from_secs(20),
            |m| matches!(m, meshd_protocol::MapMessage::PeerAdded { peer, .. } if peer.id == after.node_id),
        )
        .await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("the writer stops")
        .expect("writer task");
    assert!(failed > 0, "some joins fell into the outage");
    let nodes: Vec<Value> = c.admin_json(Method::GET, "/api/v1/nodes").await;
    let stored: Vec<i64> = nodes.iter().filter_map(|n| n["id"].as_i64()).collect();
    for id in &ok {
        assert!(stored.contains(id), "node {id} answered 200 and is stored");
    }
    drop(stream);
    let c = Arc::try_unwrap(c).unwrap_or_else(|_| panic!("the writer released the coordinator"));
    c.stop().await;
    drop(db);
    drop(pg);
    survived(
        "database restart",
        &format!(
            "{} joins answered 200 and are all stored, {failed} answered 503 during the outage, ready {:.1} s \
             after the server came back",
            ok.len(),
            recovered_in.as_secs_f64()
        ),
    );
}

/// Where Debian's `faketime` package puts the preload library (multi-threaded variant).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// A `meshd-coordinator serve` process whose wall clock follows a file (libfaketime): writing `+1d` to the file
/// steps its wall clock a day ahead, as an NTP step or a wrong hardware clock corrected at run time would. The
/// monotonic clock is left alone (it never jumps on a real machine either). Killed by PID on drop.
struct JumpingClockCoordinator {
    child: std::process::Child,
    clock: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl JumpingClockCoordinator {
    fn set_offset(&self, offset: &str) {
        std::fs::write(&self.clock, offset).expect("write the clock file");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for JumpingClockCoordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The wall clock jumps a day ahead and then two days back under a running coordinator. What must hold: it keeps
/// serving and writing, an open map stream keeps receiving changes, a connected node stays online (presence, the
/// relay and every timeout run on the monotonic clock), and token expiry follows the wall clock (a token valid for
/// an hour is expired a day later, valid again once the clock is back: expiry is a date, by design).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clock_jump() {
    if !Path::new(LIBFAKETIME).exists() {
        if std::env::var("MESHD_LAB_REQUIRED").is_ok_and(|v| v == "1") {
            panic!("{LIBFAKETIME} is missing (apt-get install faketime) but MESHD_LAB_REQUIRED=1");
        }
        eprintln!("SKIPPED: the clock-jump fault needs libfaketime (apt-get install faketime)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let clock = dir.path().join("clock");
    std::fs::write(&clock, "+0").expect("clock file");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let bin = env!("CARGO_BIN_EXE_meshd-coordinator");
    let apikey = Command::new(bin)
        .args(["--data-dir", data.to_str().expect("utf8"), "apikey", "create"])
        .env_remove("MESHD_DATABASE_URL")
        .output()
        .expect("apikey create");
    assert!(apikey.status.success(), "{}", String::from_utf8_lossy(&apikey.stderr));
    let admin_key = String::from_utf8_lossy(&apikey.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let log = dir.path().join("serve.log");
    let child = Command::new(bin)
        .args([
            "--data-dir",
            data.to_str().expect("utf8"),
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--no-tls", "--no-stun", "--no-gateway", "--public-url", &base])
        .env_remove("MESHD_DATABASE_URL")
        .env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME_TIMESTAMP_FILE", &clock)
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn serve");
    let coordinator = JumpingClockCoordinator {
        child,
        clock,
        log,
        _dir: dir,
    };
    let c = Coord::external(&base, &admin_key);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c
        .client
        .get(c.url("/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(Instant::now() < deadline, "serve did not start: {}", coordinator.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = c.token(json!({"reusable": true})).await;
    let hourly = c.token(json!({"reusable": true, "expires": "1h"})).await;
    let a = c.join(&token, &key(1), "a").await;
    let mut stream = c.stream(&a.credential, None, None).await;
    stream.next(Duration::from_secs(5)).await;
    let peer_added = |id: i64| move |m: &meshd_protocol::MapMessage| matches!(m, meshd_protocol::MapMessage::PeerAdded { peer, .. } if peer.id == id);
    let a_online = |nodes: &Vec<Value>| {
        nodes
            .iter()
            .any(|n| n["id"].as_i64() == Some(a.node_id) && n["online"] == true)
    };

    coordinator.set_offset("+1d");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    wait_ready(&c, 200, Duration::from_secs(10)).await;
    let b = c.join(&token, &key(2), "b").await;
    stream.until(Duration::from_secs(10), peer_added(b.node_id)).await;
    let r = c.join_raw(&hourly, &key(3), "late").await;
    assert_eq!(
        error_code(r).await,
        (403, "token_expired".into()),
        "a day later the 1 h token has expired"
    );
    let nodes: Vec<Value> = c.admin_json(Method::GET, "/api/v1/nodes").await;
    assert!(
        a_online(&nodes),
        "a connected node stays online across the jump: {nodes:?}"
    );

    coordinator.set_offset("-1d");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    wait_ready(&c, 200, Duration::from_secs(10)).await;
    let d = c.join(&token, &key(4), "d").await;
    stream.until(Duration::from_secs(10), peer_added(d.node_id)).await;
    let e = c.join(&hourly, &key(5), "e").await;
    stream.until(Duration::from_secs(10), peer_added(e.node_id)).await;
    let nodes: Vec<Value> = c.admin_json(Method::GET, "/api/v1/nodes").await;
    assert!(a_online(&nodes), "and across the jump back: {nodes:?}");
    drop(stream);
    drop(coordinator);
    survived(
        "clock jump",
        "wall clock +1 day then -2 days: kept serving and writing, stream and presence unaffected, token expiry \
         followed the wall clock",
    );
}

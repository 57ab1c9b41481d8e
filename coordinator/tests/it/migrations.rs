//! Migrations on a fresh SQLite database run once even when two processes start at the same moment (the first
//! `serve` and a CLI command such as `token create`): sqlx's migrator locks on PostgreSQL but not on SQLite.

use meshd_coordinator::store::{Store, default_url};

/// Rounds of the race, each on a fresh database file (one round alone hits the window only sometimes).
const ROUNDS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_on_a_fresh_sqlite_file_both_succeed() {
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = default_url(dir.path());
        let (a, b) = tokio::join!(
            tokio::spawn({
                let url = url.clone();
                async move { Store::connect(&url).await }
            }),
            tokio::spawn({
                let url = url.clone();
                async move { Store::connect(&url).await }
            }),
        );
        let a = a
            .expect("task")
            .unwrap_or_else(|e| panic!("round {round}: first store: {e}"));
        let b = b
            .expect("task")
            .unwrap_or_else(|e| panic!("round {round}: second store: {e}"));
        // Both see one migrated schema, usable by both.
        a.set_setting("race", "a").await.expect("write through the first store");
        assert_eq!(b.setting("race").await.expect("read").as_deref(), Some("a"));
        a.close().await;
        b.close().await;
    }
}

/// The same across real processes: several `meshd-coordinator apikey create` started together on a fresh data
/// directory (each opens the database and migrates it) all succeed.
#[test]
fn concurrent_cli_processes_on_a_fresh_data_dir_all_succeed() {
    const PROCESSES: usize = 4;
    for round in 0..5 {
        let dir = tempfile::tempdir().expect("tempdir");
        let children: Vec<_> = (0..PROCESSES)
            .map(|_| {
                std::process::Command::new(env!("CARGO_BIN_EXE_meshd-coordinator"))
                    .args(["--data-dir", dir.path().to_str().expect("utf8"), "apikey", "create"])
                    .env_remove("MESHD_DATABASE_URL")
                    .env_remove("MESHD_DATA_DIR")
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("spawn the coordinator binary")
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().expect("wait");
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

//! The coordinator under test: a real `meshd-coordinator serve` child process on 127.0.0.1, its database (SQLite in a
//! temp dir, or a fresh PostgreSQL database created for the run and dropped after), the CLI commands that create the
//! admin API key and the join token, restarts, and its memory (VmRSS). The child is killed by PID when dropped, so
//! no failure path leaves it running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::Connection;

/// How long the coordinator may take to answer `/healthz` after start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped coordinator may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Which database the coordinator runs on.
#[derive(Debug, Clone)]
pub enum Database {
    Sqlite,
    /// A server URL; a fresh database is created on it for the run.
    Postgres(String),
}

/// A database prepared for one run.
#[derive(Debug)]
pub struct RunDatabase {
    pub url: String,
    /// (admin URL, database name) to drop at the end.
    postgres: Option<(String, String)>,
}

impl RunDatabase {
    pub async fn create(database: &Database, data_dir: &Path) -> anyhow::Result<Self> {
        match database {
            Database::Sqlite => Ok(Self {
                url: format!("sqlite://{}?mode=rwc", data_dir.join("meshd.db").display()),
                postgres: None,
            }),
            Database::Postgres(admin) => {
                let name = format!("meshd_loadgen_{}", std::process::id());
                let mut conn = sqlx::PgConnection::connect(admin).await.with_context(|| {
                    format!("connecting to PostgreSQL at {admin} (is it running? `service postgresql start`)")
                })?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .context("creating the run's database")?;
                let (base, _) = admin.rsplit_once('/').context("a PostgreSQL URL ends in /DATABASE")?;
                Ok(Self {
                    url: format!("{base}/{name}"),
                    postgres: Some((admin.clone(), name)),
                })
            }
        }
    }

    /// Drops the run's PostgreSQL database (nothing to do for SQLite: the temp dir goes away).
    pub async fn drop_database(&self) -> anyhow::Result<()> {
        if let Some((admin, name)) = &self.postgres {
            let mut conn = sqlx::PgConnection::connect(admin).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await
            .context("dropping the run's database")?;
        }
        Ok(())
    }
}

/// A running coordinator process.
#[derive(Debug)]
pub struct Coordinator {
    binary: PathBuf,
    data_dir: PathBuf,
    database_url: String,
    port: u16,
    tls: bool,
    child: Option<Child>,
    /// Incremented per start: each start logs to its own file.
    starts: u32,
}

impl Coordinator {
    pub fn new(binary: PathBuf, data_dir: PathBuf, database_url: String, tls: bool) -> anyhow::Result<Self> {
        // A free port, reused across restarts (nodes keep the URL of their token).
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Ok(Self {
            binary,
            data_dir,
            database_url,
            port,
            tls,
            child: None,
            starts: 0,
        })
    }

    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--database-url")
            .arg(&self.database_url)
            .env_remove("MESHD_CONFIG");
        command
    }

    /// Starts `serve` and waits until `/healthz` answers.
    pub async fn start(&mut self, client: &reqwest::Client) -> anyhow::Result<()> {
        self.starts += 1;
        let log_path = self.data_dir.join(format!("coordinator-{}.log", self.starts));
        let log = std::fs::File::create(&log_path)?;
        let mut command = self.command();
        command
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--public-url")
            .arg(self.base_url())
            .env(
                "RUST_LOG",
                std::env::var("LOADGEN_COORDINATOR_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if !self.tls {
            command.arg("--no-tls");
        }
        if self.knows_flag("--max-connections-per-ip") {
            // Every simulated node connects from 127.0.0.1: the per-address cap would refuse most of them.
            command.args(["--max-connections-per-ip", "0"]);
        }
        if self.knows_flag("--no-stun") {
            // STUN listens on fixed UDP ports by default: not needed here, and runs must not collide.
            command.arg("--no-stun");
        }
        if self.knows_flag("--no-gateway") {
            // The device gateway listens on a fixed UDP port by default: not needed here either.
            command.arg("--no-gateway");
        }
        let child = command.spawn().with_context(|| {
            format!(
                "starting {} (build it: cargo build --release -p meshd-coordinator)",
                self.binary.display()
            )
        })?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("the coordinator exited at start ({status}):\n{log}");
            }
            let healthy = client
                .get(format!("{}/healthz", self.base_url()))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if healthy {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the coordinator did not answer /healthz within {START_TIMEOUT:?} (log: {})",
                    log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether `serve` of this binary takes `flag` (older builds, measured for comparison, lack newer flags).
    fn knows_flag(&self, flag: &str) -> bool {
        Command::new(&self.binary)
            .args(["serve", "--help"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
    }

    /// SIGTERM, then waits (bounded) for the exit; SIGKILL if it does not come.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the coordinator did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs a CLI command against the same database and returns the last line of its stdout (where secrets go).
    pub fn cli_last_line(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self
            .command()
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running meshd-coordinator {}", args.join(" ")))?;
        if !output.status.success() {
            bail!(
                "meshd-coordinator {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let stdout = String::from_utf8(output.stdout)?;
        stdout
            .lines()
            .last()
            .map(|l| l.trim().to_string())
            .context("the command printed nothing")
    }

    /// Resident set size of the coordinator process, from /proc/<pid>/status (VmRSS).
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let pid = self.pid().context("the coordinator is not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .context("no VmRSS in /proc/<pid>/status")?;
        let kib: u64 = line.split_whitespace().nth(1).context("VmRSS value")?.parse()?;
        Ok(kib * 1024)
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends `signal` to one process we started.
#[allow(unsafe_code)]
fn signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; `pid` is our own child, not yet reaped.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Raises this process's soft limit of open files to the hard limit (one socket per simulated node); as root, first
/// the hard limit itself to the kernel's maximum (`fs.nr_open`). The coordinator child inherits the limits.
#[allow(unsafe_code)]
pub fn raise_nofile_limit() -> u64 {
    let kernel_max: Option<libc::rlim_t> = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    if let Some(max) = kernel_max {
        let wanted = libc::rlimit {
            rlim_cur: max,
            rlim_max: max,
        };
        // SAFETY: setrlimit only reads the struct passed; without the privilege it fails and nothing changes.
        unsafe {
            libc::setrlimit(libc::RLIMIT_NOFILE, &wanted);
        }
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass, which lives on this stack frame.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

//! `meshd-loadgen`: drives a real `meshd-coordinator serve` process over HTTP(S) as N simulated nodes (no TUN) and
//! prints one table per run. Scenarios, in order, on one coordinator and database:
//! 1. join storm: N joins with real join proofs, `--concurrency` at a time: rate, latency, errors;
//! 2. fan-out: all N nodes open their map stream (everyone sees everyone); then one join, one endpoint change and one
//!    deletion, each timed from its HTTP response to its arrival on every stream, with the bytes each stream received;
//! 3. memory: the coordinator's VmRSS before the streams and with N connected nodes, per node beyond the base;
//! 4. mass reconnect: the coordinator process restarts; every stream reconnects (resuming with `Last-Event-ID`)
//!    and is proven current by a change that must reach all of them.
//!
//! See the README section "Benchmarks: the control plane". Every wait is bounded; the coordinator child is killed by
//! PID on every exit path.

mod coordinator;
mod nodes;
mod sse;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use meshd_protocol::api::CoordinatorInfo;
use meshd_protocol::{JoinToken, NodeId};
use tokio::sync::{Semaphore, mpsc};

use crate::coordinator::{Coordinator, Database, RunDatabase};
use crate::nodes::{Arrival, Probe, Shared, StreamState};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Db {
    Sqlite,
    Postgres,
}

#[derive(Debug, Parser)]
#[command(
    name = "meshd-loadgen",
    about = "Load generator for meshd-coordinator: N simulated nodes over HTTP(S)"
)]
struct Args {
    /// Simulated nodes.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    nodes: u32,
    /// Joins in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, value_enum, default_value_t = Db::Sqlite)]
    db: Db,
    /// PostgreSQL server URL for --db postgres (a fresh database is created on it and dropped afterwards).
    #[arg(
        long,
        env = "MESHD_LOADGEN_POSTGRES_URL",
        default_value = "postgres://meshd_test:meshd_test@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
    /// The coordinator binary.
    #[arg(long, default_value = "target/release/meshd-coordinator")]
    coordinator: PathBuf,
    /// Plain HTTP instead of HTTPS with the pinned self-signed certificate (for comparison).
    #[arg(long)]
    no_tls: bool,
    /// Streams connecting at once (the fan-out's setup; each first receives a full map).
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Bound on setup phases (joins, all streams connected with their full map).
    #[arg(long, default_value = "600s", value_parser = humantime_secs)]
    setup_timeout: Duration,
    /// Bound on one change reaching every stream.
    #[arg(long, default_value = "30s", value_parser = humantime_secs)]
    change_timeout: Duration,
    /// Bound on the mass reconnect (the target is 60 s).
    #[arg(long, default_value = "120s", value_parser = humantime_secs)]
    reconnect_timeout: Duration,
    /// Skip scenarios after the join storm.
    #[arg(long)]
    joins_only: bool,
}

/// Below this many nodes the per-node memory figure is reported but not checked.
const MEMORY_CHECK_MIN_NODES: u64 = 1000;

fn humantime_secs(s: &str) -> Result<Duration, String> {
    let n = s.strip_suffix('s').unwrap_or(s);
    n.parse::<f64>()
        .map(Duration::from_secs_f64)
        .map_err(|e| format!("`{s}`: {e} (write e.g. 30s)"))
}

/// One row of the result table.
struct Row {
    scenario: &'static str,
    metric: String,
    value: String,
    target: String,
    met: Option<bool>,
}

#[derive(Default)]
struct Table {
    rows: Vec<Row>,
}

impl Table {
    fn add(&mut self, scenario: &'static str, metric: impl Into<String>, value: impl Into<String>) {
        self.rows.push(Row {
            scenario,
            metric: metric.into(),
            value: value.into(),
            target: String::new(),
            met: None,
        });
    }

    fn check(
        &mut self,
        scenario: &'static str,
        metric: impl Into<String>,
        value: impl Into<String>,
        target: impl Into<String>,
        met: bool,
    ) {
        self.rows.push(Row {
            scenario,
            metric: metric.into(),
            value: value.into(),
            target: target.into(),
            met: Some(met),
        });
    }

    fn print(&self, title: &str) {
        println!("\n{title}\n");
        println!("| scenario | metric | value | target | met |");
        println!("| --- | --- | --- | --- | --- |");
        for r in &self.rows {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            };
            println!(
                "| {} | {} | {} | {} | {} |",
                r.scenario, r.metric, r.value, r.target, met
            );
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nofile = coordinator::raise_nofile_limit();
    if u64::from(args.nodes) + 256 > nofile {
        eprintln!(
            "warning: the open-files limit is {nofile}; {} streams may not fit (raise the hard limit: ulimit -Hn)",
            args.nodes
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("meshd-loadgen-").tempdir()?;
    let database = match args.db {
        Db::Sqlite => Database::Sqlite,
        Db::Postgres => Database::Postgres(args.postgres_url.clone()),
    };
    let db = RunDatabase::create(&database, dir.path()).await?;
    let mut coordinator = Coordinator::new(
        args.coordinator.clone(),
        dir.path().to_path_buf(),
        db.url.clone(),
        !args.no_tls,
    )?;
    let mut table = Table::default();
    let started = Instant::now();
    let result = scenarios(&args, &mut coordinator, &mut table).await;
    // Stop the child before dropping the database (PostgreSQL refuses to drop a database in use).
    let stopped = coordinator.stop().await;
    let dropped = db.drop_database().await;
    let title = format!(
        "meshd-loadgen: N = {} nodes, {}, {}; load average at the end {} ({} CPUs); {:.0} s",
        args.nodes,
        match args.db {
            Db::Sqlite => "SQLite",
            Db::Postgres => "PostgreSQL",
        },
        if args.no_tls {
            "plain HTTP"
        } else {
            "HTTPS (pinned self-signed certificate)"
        },
        load_average(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started.elapsed().as_secs_f64()
    );
    table.print(&title);
    if let Err(e) = &result {
        println!("\nstopped early: {e:#}");
        let log = dir.path().join("coordinator-1.log");
        if let Ok(text) = std::fs::read_to_string(&log) {
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            eprintln!("last lines of the coordinator log:");
            for line in tail.iter().rev() {
                eprintln!("  {line}");
            }
        }
    }
    stopped?;
    dropped?;
    result?;
    let missed: Vec<&str> = table
        .rows
        .iter()
        .filter(|r| r.met == Some(false))
        .map(|r| r.scenario)
        .collect();
    if !missed.is_empty() {
        // A non-zero exit, so CI's smoke run (scripts/test-all.sh) fails when a target or an error check does.
        bail!("targets not met: {}", missed.join(", "));
    }
    Ok(())
}

/// An HTTP client like the agent's: HTTP/1.1, TLS pinned to the token's certificate fingerprint.
fn client(token: Option<&JoinToken>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(30));
    if let Some(fingerprint) = token.and_then(|t| t.fingerprint) {
        let verifier = std::sync::Arc::new(meshd_node::tls::PinnedCertVerifier::new(fingerprint));
        builder = builder.use_preconfigured_tls(meshd_node::tls::pinned_config(verifier)?);
    } else {
        // Before the token exists (health checks): the certificate is not known yet; nothing secret is sent.
        builder = builder.danger_accept_invalid_certs(true);
    }
    Ok(builder.build()?)
}

async fn scenarios(args: &Args, coordinator: &mut Coordinator, table: &mut Table) -> anyhow::Result<()> {
    let bootstrap = client(None)?;
    coordinator.start(&bootstrap).await?;
    let admin = coordinator.cli_last_line(&["apikey", "create", "--description", "loadgen"])?;
    let token_text = coordinator.cli_last_line(&["token", "create", "--reusable"])?;
    let token = JoinToken::parse(&token_text).context("the token printed by `token create`")?;
    if !args.no_tls && token.fingerprint.is_none() {
        bail!("the token pins no certificate although the coordinator serves HTTPS");
    }
    let http = client(Some(&token))?;
    let base = coordinator.base_url();
    let info: CoordinatorInfo = http
        .get(format!("{base}/api/v1/info"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;

    // 1. Join storm.
    let n = args.nodes;
    let bodies: Vec<serde_json::Value> = (0..n)
        .map(|i| nodes::join_body(i, &format!("host{i}"), &token_text, &token.id, &info.join_key))
        .collect();
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let storm = Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for body in bodies {
        let (http, base, permits) = (http.clone(), base.clone(), permits.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.expect("the semaphore is never closed");
            nodes::join(&http, &base, &body).await
        }));
    }
    let mut joined = Vec::with_capacity(n as usize);
    let mut latencies = Vec::with_capacity(n as usize);
    let mut errors = 0u32;
    let mut first_error = None;
    for task in tasks {
        match tokio::time::timeout(args.setup_timeout, task).await {
            Ok(Ok(Ok((response, latency)))) => {
                joined.push(response);
                latencies.push(latency);
            }
            Ok(Ok(Err(e))) => {
                errors += 1;
                first_error.get_or_insert(format!("{e:#}"));
            }
            Ok(Err(e)) => bail!("a join task failed: {e}"),
            Err(_) => bail!("the join storm did not finish within {:?}", args.setup_timeout),
        }
    }
    let elapsed = storm.elapsed();
    latencies.sort();
    table.check(
        "join storm",
        format!("{n} joins, concurrency {}", args.concurrency),
        format!(
            "{:.0} joins/s ({:.1} s)",
            f64::from(n) / elapsed.as_secs_f64(),
            elapsed.as_secs_f64()
        ),
        "",
        true,
    );
    table.add(
        "join storm",
        "latency p50 / p99",
        format!(
            "{} / {}",
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.99))
        ),
    );
    table.check(
        "join storm",
        "errors",
        match &first_error {
            Some(e) => format!("{errors} (first: {e})"),
            None => "0".into(),
        },
        "0",
        errors == 0,
    );
    if args.joins_only || joined.is_empty() {
        return Ok(());
    }

    // 3a. Memory before the streams.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_base = coordinator.rss_bytes()?;

    // 2. Fan-out: every node opens its stream.
    let (shared, mut arrivals) = Shared::new(http.clone(), base.clone());
    let states: Vec<Arc<StreamState>> = joined.iter().map(|_| Arc::new(StreamState::default())).collect();
    let connect = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    for (node, state) in joined.iter().zip(&states) {
        // Open streams `connect_concurrency` at a time: a permit is held until the stream has its first map.
        let permit = gate
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        tokio::spawn(nodes::follow(shared.clone(), node.credential.clone(), state.clone()));
        let state = state.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while state.full_maps.load(Ordering::Acquire) == 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            drop(permit);
        });
        if connect.elapsed() > args.setup_timeout {
            bail!("opening {n} streams took longer than {:?}", args.setup_timeout);
        }
    }
    let total_nodes = joined.len() as u64;
    wait_until(args.setup_timeout, "every stream has a full map of all nodes", || {
        states
            .iter()
            .all(|s| s.full_maps.load(Ordering::Acquire) > 0 && s.full_nodes.load(Ordering::Acquire) == total_nodes)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; {}", stream_summary(&states)))?;
    let connected_after = connect.elapsed();
    let settled = quiesce(&states, args.setup_timeout).await?;
    table.add(
        "fan-out",
        format!("{} streams connected, full maps of {total_nodes} nodes", states.len()),
        format!(
            "{:.1} s (+{:.1} s until the online changes settled)",
            connected_after.as_secs_f64(),
            settled.as_secs_f64()
        ),
    );

    // 3b. Memory with every node connected.
    let rss_connected = coordinator.rss_bytes()?;
    let per_node = rss_connected.saturating_sub(rss_base) / total_nodes.max(1);
    table.add(
        "memory",
        "coordinator RSS: base (after joins) / N streams connected",
        format!(
            "{:.1} MiB / {:.1} MiB",
            rss_base as f64 / 1048576.0,
            rss_connected as f64 / 1048576.0
        ),
    );
    let per_node_text = format!("{:.1} KiB", per_node as f64 / 1024.0);
    if total_nodes >= MEMORY_CHECK_MIN_NODES {
        table.check(
            "memory",
            "bytes per connected node beyond the base",
            per_node_text,
            "< 20 KiB",
            per_node < 20 * 1024,
        );
    } else {
        // A few MiB of allocator noise would decide the figure (CI's smoke run uses 200 nodes).
        table.add(
            "memory",
            format!("bytes per connected node beyond the base (checked from {MEMORY_CHECK_MIN_NODES} nodes)"),
            per_node_text,
        );
    }

    // 2b. One change of each kind reaches every stream.
    let probe_index = n + 1;
    let hostname = "loadgen-probe";
    let body = nodes::join_body(probe_index, hostname, &token_text, &token.id, &info.join_key);
    let (probe_node, p99) = change(
        args,
        &shared,
        &states,
        &mut arrivals,
        Probe::Added(hostname.into()),
        || async {
            let (response, _) = nodes::join(&http, &base, &body).await?;
            Ok(response.node_id)
        },
    )
    .await
    .map(|(id, p99, row)| {
        table.push_change("join (peer_added)", &row);
        (id, p99)
    })?;
    let mut worst = p99;
    let endpoint_node = joined[0].node_id;
    let port = 40_000;
    let (_, p99, row) = change(
        args,
        &shared,
        &states,
        &mut arrivals,
        Probe::Endpoint(endpoint_node, port),
        || report_endpoint(&http, &base, &joined[0].credential, port, endpoint_node),
    )
    .await?;
    table.push_change("endpoint change (peer_changed)", &row);
    worst = worst.max(p99);
    let (_, p99, row) = change(
        args,
        &shared,
        &states,
        &mut arrivals,
        Probe::Removed(probe_node),
        || async {
            http.delete(format!("{base}/api/v1/nodes/{probe_node}"))
                .bearer_auth(&admin)
                .send()
                .await?
                .error_for_status()?;
            Ok(probe_node)
        },
    )
    .await?;
    table.push_change("deletion (peer_removed)", &row);
    worst = worst.max(p99);
    table.check(
        "fan-out",
        "worst p99 of the three changes",
        ms(worst),
        "< 1 s",
        worst < Duration::from_secs(1),
    );

    // 4. Mass reconnect: restart the coordinator.
    let connects_before: Vec<u32> = states.iter().map(|s| s.connects.load(Ordering::Acquire)).collect();
    let full_before: u32 = states.iter().map(|s| s.full_maps.load(Ordering::Acquire)).sum();
    let bytes_before: u64 = states.iter().map(|s| s.bytes.load(Ordering::Acquire)).sum();
    let restart = Instant::now();
    coordinator.stop().await?;
    coordinator.start(&bootstrap).await?;
    let up_after = restart.elapsed();
    let back = wait_until(args.reconnect_timeout, "every stream reconnected", || {
        states
            .iter()
            .zip(&connects_before)
            .all(|(s, before)| s.connects.load(Ordering::Acquire) > *before && s.connected.load(Ordering::Acquire))
    })
    .await;
    let back_after = restart.elapsed();
    let reconnected = states
        .iter()
        .zip(&connects_before)
        .filter(|(s, before)| s.connects.load(Ordering::Acquire) > **before)
        .count();
    if let Err(e) = back {
        table.check(
            "mass reconnect",
            "streams back after a coordinator restart",
            format!(
                "{reconnected} of {} after {:.1} s ({e})",
                states.len(),
                back_after.as_secs_f64()
            ),
            "all within 60 s",
            false,
        );
        return Ok(());
    }
    // Current: a change made now reaches every stream (each is at the newest version).
    let port = 40_001;
    let (_, _, row) = change(
        args,
        &shared,
        &states,
        &mut arrivals,
        Probe::Endpoint(endpoint_node, port),
        || report_endpoint(&http, &base, &joined[0].credential, port, endpoint_node),
    )
    .await?;
    let current_after = restart.elapsed();
    let full_after: u32 = states.iter().map(|s| s.full_maps.load(Ordering::Acquire)).sum();
    let bytes_after: u64 = states.iter().map(|s| s.bytes.load(Ordering::Acquire)).sum();
    table.add(
        "mass reconnect",
        "coordinator restarted and serving",
        format!("{:.1} s", up_after.as_secs_f64()),
    );
    table.check(
        "mass reconnect",
        format!("all {} streams back (Last-Event-ID) / and current", states.len()),
        format!(
            "{:.1} s / {:.1} s (probe reached {}/{}, p99 {})",
            back_after.as_secs_f64(),
            current_after.as_secs_f64(),
            row.arrived,
            row.streams,
            ms(row.p99)
        ),
        "< 60 s",
        row.arrived == row.streams && current_after < Duration::from_secs(60),
    );
    table.add(
        "mass reconnect",
        "full maps resent / bytes received per stream",
        format!(
            "{} / {:.0} B",
            full_after - full_before,
            (bytes_after - bytes_before) as f64 / states.len() as f64
        ),
    );
    shared.stop();
    Ok(())
}

async fn report_endpoint(
    http: &reqwest::Client,
    base: &str,
    credential: &str,
    port: u16,
    node: NodeId,
) -> anyhow::Result<NodeId> {
    http.put(format!("{base}/api/v1/node/endpoints"))
        .bearer_auth(credential)
        .json(&serde_json::json!({"endpoints": [format!("198.18.0.1:{port}")]}))
        .send()
        .await?
        .error_for_status()?;
    Ok(node)
}

/// What one change measured.
struct ChangeRow {
    arrived: usize,
    streams: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    bytes_mean: f64,
    bytes_max: u64,
}

impl Table {
    fn push_change(&mut self, what: &str, row: &ChangeRow) {
        self.check(
            "fan-out",
            format!(
                "{what}: reached {}/{} streams, latency p50 / p99 / max",
                row.arrived, row.streams
            ),
            format!("{} / {} / {}", ms(row.p50), ms(row.p99), ms(row.max)),
            "p99 < 1 s",
            row.arrived == row.streams && row.p99 < Duration::from_secs(1),
        );
        self.check(
            "fan-out",
            format!("{what}: bytes received per stream (mean / max)"),
            format!("{:.0} B / {} B", row.bytes_mean, row.bytes_max),
            "O(1): one delta",
            row.bytes_max < 4096,
        );
    }
}

/// Makes one change (`act`, which returns the node it concerns) and measures its arrival on every stream: latency
/// from the HTTP response, and the bytes each stream received meanwhile.
async fn change<F, Fut>(
    args: &Args,
    shared: &Shared,
    states: &[Arc<StreamState>],
    arrivals: &mut mpsc::UnboundedReceiver<Arrival>,
    probe: Probe,
    act: F,
) -> anyhow::Result<(NodeId, Duration, ChangeRow)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<NodeId>>,
{
    while arrivals.try_recv().is_ok() {}
    let bytes_before: Vec<u64> = states.iter().map(|s| s.bytes.load(Ordering::Acquire)).collect();
    shared.set_probe(Some(probe));
    let node = act().await?;
    let responded = Instant::now();
    let mut latencies = Vec::with_capacity(states.len());
    let deadline = responded + args.change_timeout;
    while latencies.len() < states.len() {
        match tokio::time::timeout_at(deadline.into(), arrivals.recv()).await {
            Ok(Some(arrival)) => latencies.push(arrival.at.saturating_duration_since(responded)),
            Ok(None) | Err(_) => break,
        }
    }
    shared.set_probe(None);
    // Let anything sent right behind the change arrive, so it is counted (it must be nothing).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deltas: Vec<u64> = states
        .iter()
        .zip(&bytes_before)
        .map(|(s, before)| s.bytes.load(Ordering::Acquire) - before)
        .collect();
    latencies.sort();
    let row = ChangeRow {
        arrived: latencies.len(),
        streams: states.len(),
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or_default(),
        bytes_mean: deltas.iter().sum::<u64>() as f64 / deltas.len().max(1) as f64,
        bytes_max: deltas.iter().copied().max().unwrap_or(0),
    };
    let p99 = if row.arrived == row.streams {
        row.p99
    } else {
        args.change_timeout
    };
    Ok((node, p99, row))
}

/// Polls `done` every 50 ms until it holds or `timeout` passes.
async fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("not reached within {timeout:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Waits until no stream has received an event for a second (the online changes of the connect storm are through).
async fn quiesce(states: &[Arc<StreamState>], timeout: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let total = || states.iter().map(|s| s.events.load(Ordering::Acquire)).sum::<u64>();
    let mut last = total();
    let mut quiet_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = total();
        if now != last {
            last = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= Duration::from_secs(1) {
            return Ok(started.elapsed().saturating_sub(Duration::from_secs(1)));
        }
        if started.elapsed() > timeout {
            bail!("the streams never went quiet within {timeout:?}");
        }
    }
}

fn stream_summary(states: &[Arc<StreamState>]) -> String {
    let connected = states.iter().filter(|s| s.connected.load(Ordering::Acquire)).count();
    let with_map = states
        .iter()
        .filter(|s| s.full_maps.load(Ordering::Acquire) > 0)
        .count();
    let failures: u32 = states.iter().map(|s| s.failures.load(Ordering::Acquire)).sum();
    format!("{connected} connected, {with_map} with a full map, {failures} failed attempts")
}

//! Benchmark (not a test): joins per second, and how long an admin change takes to reach open map streams.
//!
//! ```text
//! cargo run --release --example join_bench -p meshd-coordinator -- [--database-url URL] [--joins 1000]
//!     [--concurrency 64] [--streams 50] [--changes 200]
//! ```
//! Starts the coordinator in-process on 127.0.0.1:0 (plain HTTP) against SQLite in a temp dir, or, with a
//! `postgres://` URL, against a fresh database `meshd_bench_<pid>` created through that URL (dropped afterwards).
//! Then: `--joins` joins with one reusable token (each with its proof of key possession, checked by the coordinator), `--concurrency` at a time (joins/s); `--streams` nodes open their
//! map stream; `--changes` admin renames, one after another, each timed from sending the PATCH until the change has
//! arrived on the first and on every open stream (median and p99).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clap::Parser;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use meshd_protocol::api::{CoordinatorInfo, JoinResponse, join_proof};
use meshd_protocol::{JoinToken, MapMessage, PublicKey};
use serde_json::json;
use sqlx::Connection;
use tokio::sync::{Semaphore, mpsc};
use x25519_dalek::StaticSecret;

#[derive(Debug, Parser)]
struct Args {
    /// sqlite://... or postgres://... (a server URL: a fresh database is created on it). Default: SQLite in a temp dir.
    #[arg(long)]
    database_url: Option<String>,
    #[arg(long, default_value_t = 1000)]
    joins: u32,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 50)]
    streams: usize,
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Every node joins with hostname `bench` (names `bench`, `bench-2`, ...: the worst case for name picking).
    #[arg(long)]
    same_hostname: bool,
}

/// A node's key pair (real X25519, so that its join can prove possession of the private key).
fn key(n: u32) -> (StaticSecret, PublicKey) {
    let mut bytes = [7u8; 32];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    let secret = StaticSecret::from(bytes);
    let public = PublicKey::from_bytes(x25519_dalek::PublicKey::from(&secret).to_bytes());
    (secret, public)
}

/// The join proof a node sends (what `meshd` computes), base64.
fn proof(secret: &StaticSecret, join_key: &PublicKey, token_id: &str, public: &PublicKey, hostname: &str) -> String {
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*join_key.as_bytes()));
    STANDARD.encode(join_proof(shared.as_bytes(), token_id, public, hostname))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let (url, pg_cleanup) = match args.database_url.as_deref() {
        None => (meshd_coordinator::store::default_url(dir.path()), None),
        Some(u) if u.starts_with("sqlite:") => (u.to_string(), None),
        Some(admin) => {
            let name = format!("meshd_bench_{}", std::process::id());
            let mut conn = sqlx::PgConnection::connect(admin)
                .await
                .context("connecting to PostgreSQL")?;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut conn)
                .await?;
            let base = admin.rsplit_once('/').map_or(admin, |(b, _)| b);
            (format!("{base}/{name}"), Some((admin.to_string(), name)))
        }
    };
    let result = bench(&args, dir.path(), &url).await;
    if let Some((admin, name)) = pg_cleanup {
        let mut conn = sqlx::PgConnection::connect(&admin).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await?;
    }
    result
}

async fn bench(args: &Args, data_dir: &std::path::Path, url: &str) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let base = format!("http://{addr}");
    let mut config = meshd_coordinator::config::ServeConfig::for_tests(data_dir, Some(url.to_string()));
    config.public_url = Some(base.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(meshd_coordinator::run(config, listener, async move {
        let _ = stop_rx.await;
    }));
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > deadline {
            bail!("coordinator did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = meshd_coordinator::store::Store::connect(url).await?;
    let (_, admin) = meshd_coordinator::ops::issue_api_key(&store, "bench", "bench").await?;
    store.close().await;
    let backend = if url.starts_with("sqlite:") {
        "SQLite"
    } else {
        "PostgreSQL"
    };
    let token: serde_json::Value = client
        .post(format!("{base}/api/v1/tokens"))
        .bearer_auth(&admin)
        .json(&json!({"reusable": true}))
        .send()
        .await?
        .json()
        .await?;
    let token = token["token"].as_str().context("token")?.to_string();
    let token_id = JoinToken::parse(&token)?.id;
    let info: CoordinatorInfo = client.get(format!("{base}/api/v1/info")).send().await?.json().await?;

    // Joins.
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.joins {
        let (client, token, base, permits) = (client.clone(), token.clone(), base.clone(), permits.clone());
        let hostname = if args.same_hostname {
            "bench".to_string()
        } else {
            format!("host{i}")
        };
        // The node's side of the proof is computed outside the timed request, as each node does it on its own.
        let (secret, public) = key(i);
        let proof = proof(&secret, &info.join_key, &token_id, &public, &hostname);
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore open");
            let r = client
                .post(format!("{base}/api/v1/join"))
                .json(&json!({"token": token, "public_key": public.to_string(), "hostname": hostname, "proof": proof}))
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "join failed: {}", r.status());
            Ok::<JoinResponse, anyhow::Error>(r.json().await?)
        }));
    }
    let mut joined = Vec::new();
    for t in tasks {
        joined.push(t.await??);
    }
    let elapsed = started.elapsed();
    println!(
        "[{backend}] {} joins, concurrency {}{}: {:.2} s, {:.0} joins/s",
        args.joins,
        args.concurrency,
        if args.same_hostname { ", all named `bench`" } else { "" },
        elapsed.as_secs_f64(),
        f64::from(args.joins) / elapsed.as_secs_f64()
    );

    // Streams.
    let streams = args.streams.min(joined.len().saturating_sub(1));
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel::<(String, Instant)>();
    for node in joined.iter().skip(1).take(streams) {
        let r = client
            .get(format!("{base}/api/v1/map"))
            .bearer_auth(&node.credential)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "stream: {}", r.status());
        let tx = arrivals_tx.clone();
        tokio::spawn(async move {
            let mut events = r.bytes_stream().eventsource();
            while let Some(Ok(event)) = events.next().await {
                if let Ok(MapMessage::PeerChanged { peer, .. }) = serde_json::from_str(&event.data)
                    && peer.name.starts_with("bench-renamed-")
                    && tx.send((peer.name, Instant::now())).is_err()
                {
                    return;
                }
            }
        });
    }
    // Let every stream receive its full map and the online changes settle.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let target = joined[0].node_id;
    let mut first = Vec::new();
    let mut all = Vec::new();
    for i in 0..args.changes {
        let name = format!("bench-renamed-{i}");
        let t0 = Instant::now();
        let r = client
            .patch(format!("{base}/api/v1/nodes/{target}"))
            .bearer_auth(&admin)
            .json(&json!({"name": name}))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "rename: {}", r.status());
        let mut got = 0;
        let mut first_at = None;
        let mut last_at = t0;
        while got < streams {
            let (n, at) = tokio::time::timeout(Duration::from_secs(10), arrivals.recv())
                .await
                .context("a change did not reach every stream within 10 s")?
                .context("streams ended")?;
            if n == name {
                got += 1;
                first_at.get_or_insert(at);
                last_at = at;
            }
        }
        first.push(first_at.unwrap_or(last_at) - t0);
        all.push(last_at - t0);
    }
    first.sort();
    all.sort();
    if !first.is_empty() {
        println!(
            "[{backend}] admin change -> open streams ({} changes, {streams} streams): first stream median {:.2} ms, p99 {:.2} ms; all streams median {:.2} ms, p99 {:.2} ms",
            args.changes,
            percentile(&first, 0.5).as_secs_f64() * 1e3,
            percentile(&first, 0.99).as_secs_f64() * 1e3,
            percentile(&all, 0.5).as_secs_f64() * 1e3,
            percentile(&all, 0.99).as_secs_f64() * 1e3,
        );
    }
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(15), server)
        .await
        .context("shutdown")???;
    Ok(())
}

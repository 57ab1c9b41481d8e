//! Benchmark (not a test): relay throughput and fairness between pairs.
//!
//! ```text
//! cargo run --release --example relay_bench -p meshd-coordinator -- [--seconds 3] [--size 1400] [--plain]
//! ```
//! Starts the coordinator in-process on 127.0.0.1:0 (HTTPS with its self-signed certificate, or plain HTTP with
//! `--plain`) against SQLite in a temp dir, joins 8 nodes, and opens one relay connection per node (HTTP/1.1 upgrade,
//! as the agent does). Then, for 1, 2 and 4 pairs at once, each pair's sender pushes `--size`-byte datagrams through
//! the relay to its receiver as fast as it can for `--seconds` (after a 0.5 s warm-up that is not counted). Printed per
//! scenario: per-pair delivered MB/s and packets/s, the total, the share the relay dropped (queue full: senders
//! outrun the receivers, by design it drops instead of blocking), and Jain's fairness index over the pairs
//! ((sum x)^2 / (n * sum x^2); 1.0 = perfectly fair).
//!
//! Note: sender, relay and receiver share this machine's cores, so the figures are a lower bound of what a dedicated
//! coordinator does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clap::Parser;
use meshd_protocol::api::{CoordinatorInfo, JoinResponse, join_proof};
use meshd_protocol::relay::{self, RelayFrame};
use meshd_protocol::{JoinToken, PublicKey, paths};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use x25519_dalek::StaticSecret;

#[derive(Debug, Parser)]
struct Args {
    /// Measured seconds per scenario (after a 0.5 s warm-up).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Datagram size in bytes (WireGuard packets of a 1420-MTU tunnel are at most ~1480; 1400 is typical).
    #[arg(long, default_value_t = 1400)]
    size: usize,
    /// Serve plain HTTP instead of TLS.
    #[arg(long)]
    plain: bool,
}

const NODES: usize = 8;
const WARM_UP: Duration = Duration::from_millis(500);
/// Frames per write of a sender (the agent's relay client batches the same way).
const SEND_BATCH: usize = 32;

fn key(n: u32) -> (StaticSecret, PublicKey) {
    let mut bytes = [9u8; 32];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    let secret = StaticSecret::from(bytes);
    let public = PublicKey::from_bytes(x25519_dalek::PublicKey::from(&secret).to_bytes());
    (secret, public)
}

struct Node {
    key: PublicKey,
    reader: Option<ReadHalf<reqwest::Upgraded>>,
    writer: Option<WriteHalf<reqwest::Upgraded>>,
}

#[derive(Debug, Clone, Copy)]
struct PairResult {
    sent: u64,
    received: u64,
    received_bytes: u64,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.size == 0 || args.size > relay::MAX_DATAGRAM_LEN {
        bail!("--size must be 1..={}", relay::MAX_DATAGRAM_LEN);
    }
    let dir = tempfile::tempdir()?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let scheme = if args.plain { "http" } else { "https" };
    let mut config = meshd_coordinator::config::ServeConfig::for_tests(dir.path(), None);
    config.public_url = Some(format!("{scheme}://{addr}"));
    if !args.plain {
        config.tls = meshd_coordinator::config::TlsMode::SelfSigned;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(meshd_coordinator::run(config, listener, async move {
        let _ = stopped.await;
    }));
    let base = format!("{scheme}://{addr}");
    let mut builder = reqwest::Client::builder().http1_only().timeout(Duration::from_secs(30));
    let cert = dir.path().join("tls/cert.pem");
    let deadline = Instant::now() + Duration::from_secs(20);
    if !args.plain {
        while !cert.exists() {
            if Instant::now() > deadline || server.is_finished() {
                bail!("the coordinator did not start");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&cert)?)?);
    }
    let client = builder.build()?;
    while !client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > deadline || server.is_finished() {
            bail!("the coordinator did not become healthy");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let store = meshd_coordinator::store::Store::connect(&meshd_coordinator::store::default_url(dir.path())).await?;
    let (_, admin) = meshd_coordinator::ops::issue_api_key(&store, "bench", "bench").await?;
    store.close().await;
    let token: serde_json::Value = client
        .post(format!("{base}/api/v1/tokens"))
        .bearer_auth(&admin)
        .json(&json!({"reusable": true}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = token["token"].as_str().context("token in the answer")?.to_string();
    let token_id = JoinToken::parse(&token)?.id;
    let info: CoordinatorInfo = client
        .get(format!("{base}{}", paths::INFO))
        .send()
        .await?
        .json()
        .await?;

    let mut nodes = Vec::new();
    for n in 0..NODES as u32 {
        let (secret, public) = key(n);
        let hostname = format!("bench{n}");
        let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*info.join_key.as_bytes()));
        let proof = STANDARD.encode(join_proof(shared.as_bytes(), &token_id, &public, &hostname));
        let joined: JoinResponse = client
            .post(format!("{base}{}", paths::JOIN))
            .json(&json!({"token": token, "public_key": public.to_string(), "hostname": hostname, "proof": proof}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let response = client
            .get(format!("{base}{}", paths::RELAY))
            .bearer_auth(&joined.credential)
            .header("Connection", "Upgrade")
            .header("Upgrade", relay::UPGRADE_PROTOCOL)
            .send()
            .await?;
        if response.status() != 101 {
            bail!("relay upgrade answered {}", response.status());
        }
        let (mut reader, writer) = tokio::io::split(response.upgrade().await?);
        let mut hello = [0u8; relay::FRAME_HEADER_LEN + relay::KEY_LEN];
        reader.read_exact(&mut hello).await?;
        nodes.push(Node {
            key: public,
            reader: Some(reader),
            writer: Some(writer),
        });
    }

    println!(
        "relay_bench: {}-byte datagrams, {:.1} s per scenario, relay over {} on 127.0.0.1",
        args.size,
        args.seconds,
        if args.plain {
            "plain HTTP/1.1"
        } else {
            "HTTPS (TLS 1.3)"
        }
    );
    println!(
        "{:<8} {:>5} {:>10} {:>12} {:>9} {:>8}",
        "pairs", "pair", "MB/s", "packets/s", "dropped", "Jain"
    );
    for pairs in [1usize, 2, 4] {
        let results = run_scenario(&mut nodes, pairs, args.size, args.seconds).await?;
        let rates: Vec<f64> = results
            .iter()
            .map(|r| r.received_bytes as f64 / args.seconds / 1e6)
            .collect();
        let sum: f64 = rates.iter().sum();
        let squares: f64 = rates.iter().map(|x| x * x).sum();
        let jain = if squares > 0.0 {
            sum * sum / (rates.len() as f64 * squares)
        } else {
            0.0
        };
        for (i, (r, rate)) in results.iter().zip(&rates).enumerate() {
            println!(
                "{:<8} {:>5} {:>10.1} {:>12.0} {:>8.1}% {:>8}",
                pairs,
                i + 1,
                rate,
                r.received as f64 / args.seconds,
                drop_share(r.sent, r.received),
                ""
            );
        }
        let sent: u64 = results.iter().map(|r| r.sent).sum();
        let received: u64 = results.iter().map(|r| r.received).sum();
        println!(
            "{:<8} {:>5} {:>10.1} {:>12.0} {:>8.1}% {:>8.3}",
            pairs,
            "all",
            sum,
            received as f64 / args.seconds,
            drop_share(sent, received),
            jain
        );
    }
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    Ok(())
}

fn drop_share(sent: u64, received: u64) -> f64 {
    if sent == 0 {
        0.0
    } else {
        100.0 * sent.saturating_sub(received) as f64 / sent as f64
    }
}

/// Runs `pairs` pairs (node 2i sends to node 2i+1) at once; counts only the measured window.
async fn run_scenario(nodes: &mut [Node], pairs: usize, size: usize, seconds: f64) -> anyhow::Result<Vec<PairResult>> {
    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for p in 0..pairs {
        let dst = nodes[2 * p + 1].key;
        let mut writer = nodes[2 * p].writer.take().context("sender in use")?;
        let mut reader = nodes[2 * p + 1].reader.take().context("receiver in use")?;
        let sent = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let received_bytes = Arc::new(AtomicU64::new(0));
        let sender = {
            let (measuring, done, sent) = (measuring.clone(), done.clone(), sent.clone());
            tokio::spawn(async move {
                let datagram = vec![0x42u8; size];
                let mut batch = Vec::new();
                for _ in 0..SEND_BATCH {
                    RelayFrame::Send {
                        dst,
                        datagram: &datagram,
                    }
                    .encode(&mut batch);
                }
                while !done.load(Ordering::Relaxed) {
                    writer.write_all(&batch).await?;
                    if measuring.load(Ordering::Relaxed) {
                        sent.fetch_add(SEND_BATCH as u64, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(writer)
            })
        };
        let receiver = {
            let (measuring, done, received, received_bytes) = (
                measuring.clone(),
                done.clone(),
                received.clone(),
                received_bytes.clone(),
            );
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let (mut start, mut end) = (0usize, 0usize);
                loop {
                    while let Some(frame) = relay::split_frame(&buf[start..end])? {
                        start += frame.consumed;
                        if let Ok(RelayFrame::Recv { datagram, .. }) = frame.decode()
                            && measuring.load(Ordering::Relaxed)
                        {
                            received.fetch_add(1, Ordering::Relaxed);
                            received_bytes.fetch_add(datagram.len() as u64, Ordering::Relaxed);
                        }
                    }
                    buf.copy_within(start..end, 0);
                    (start, end) = (0, end - start);
                    // Drain until the senders stopped and the relay went quiet, so the next scenario starts clean.
                    let wait = if done.load(Ordering::Relaxed) {
                        Duration::from_millis(300)
                    } else {
                        Duration::from_secs(5)
                    };
                    match tokio::time::timeout(wait, reader.read(&mut buf[end..])).await {
                        Ok(Ok(0)) => bail!("relay closed the connection"),
                        Ok(Ok(n)) => end += n,
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) if done.load(Ordering::Relaxed) => return Ok(reader),
                        Err(_) => bail!("receiver got nothing for 5 s"),
                    }
                }
            })
        };
        tasks.push((p, sender, receiver, sent, received, received_bytes));
    }
    tokio::time::sleep(WARM_UP).await;
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    done.store(true, Ordering::Relaxed);
    let mut results = Vec::new();
    for (p, sender, receiver, sent, received, received_bytes) in tasks {
        nodes[2 * p].writer = Some(sender.await??);
        nodes[2 * p + 1].reader = Some(receiver.await??);
        results.push(PairResult {
            sent: sent.load(Ordering::Relaxed),
            received: received.load(Ordering::Relaxed),
            received_bytes: received_bytes.load(Ordering::Relaxed),
        });
    }
    Ok(results)
}

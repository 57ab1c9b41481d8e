//! Runs one meshd data-plane engine from command-line arguments, to try the engine on its own (see
//! `engine_netns_test.sh` next to this file, which runs two of them in network namespaces).
//!
//! ```text
//! engine_pair genkey                      # prints a new private key (base64)
//! engine_pair pubkey <PRIVATE_KEY>        # prints its public key
//! engine_pair run --private-key K --address 10.77.0.1 --network 10.77.0.0/16 --listen-port 51820 \
//!     --interface eng0 --peer 'PUBKEY,10.77.0.2/32,198.18.0.2:51820' [--peer ...] [--keepalive 25] \
//!     [--no-offload] [--status-every 5] [--status-file PATH] [--agent]
//! ```
//! `--agent` makes every peer an agent peer (disco path probes; no relay here, so the direct fallback until a pong
//! confirms a path); without it they are device peers (classic WireGuard).
//! A `--peer` is `PUBLIC_KEY,ALLOWED_IP[+ALLOWED_IP...][,ENDPOINT[+ENDPOINT...]]`; without an endpoint the engine
//! waits for that peer to send first. SIGUSR1 removes every peer (reconfigure with an empty list), SIGUSR2 puts them
//! back. Runs until SIGINT/SIGTERM, then shuts the engine down (the device disappears).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::{Parser, Subcommand};
use ipnet::Ipv4Net;
use meshd_node::engine::{Engine, EngineConfig, EngineOptions, NodeKind, PeerConfig};
use meshd_protocol::PublicKey;
use x25519_dalek::StaticSecret;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a new private key.
    Genkey,
    /// Print the public key of a private key.
    Pubkey { private_key: String },
    /// Run one engine until SIGINT/SIGTERM.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long)]
    private_key: String,
    #[arg(long)]
    address: Ipv4Addr,
    #[arg(long)]
    network: Ipv4Net,
    #[arg(long, default_value_t = 0)]
    listen_port: u16,
    #[arg(long, default_value = "eng0")]
    interface: String,
    #[arg(long, default_value_t = 1420)]
    mtu: u16,
    /// PUBLIC_KEY,ALLOWED_IP[+...][,ENDPOINT[+...]]
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// Persistent keepalive for every peer, seconds.
    #[arg(long)]
    keepalive: Option<u16>,
    /// Create the TUN device without TSO/GRO offload.
    #[arg(long)]
    no_offload: bool,
    /// Print the status as JSON to stdout this often (seconds); 0: never.
    #[arg(long, default_value_t = 0)]
    status_every: u64,
    /// Also write the latest status JSON to this file (replaced atomically) every second.
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// Peers are agents (disco path selection) instead of plain WireGuard devices.
    #[arg(long)]
    agent: bool,
}

fn parse_private_key(text: &str) -> Result<StaticSecret> {
    let bytes = STANDARD.decode(text.trim()).context("private key is not base64")?;
    let bytes: [u8; 32] = bytes.as_slice().try_into().context("private key must be 32 bytes")?;
    Ok(StaticSecret::from(bytes))
}

fn parse_peer(spec: &str, keepalive: Option<u16>, kind: NodeKind) -> Result<PeerConfig> {
    let mut fields = spec.split(',');
    let key: PublicKey = fields.next().unwrap_or_default().parse().context("peer public key")?;
    let allowed_ips = fields
        .next()
        .context("peer needs an allowed IP")?
        .split('+')
        .map(|net| net.parse::<Ipv4Net>().with_context(|| format!("allowed ip {net:?}")))
        .collect::<Result<Vec<_>>>()?;
    let endpoints = match fields.next() {
        Some(list) if !list.is_empty() => list
            .split('+')
            .map(|ep| ep.parse::<SocketAddr>().with_context(|| format!("endpoint {ep:?}")))
            .collect::<Result<Vec<_>>>()?,
        _ => Vec::new(),
    };
    if fields.next().is_some() {
        bail!("too many fields in --peer {spec:?}");
    }
    Ok(PeerConfig {
        public_key: key,
        name: format!("peer-{}", &key.to_base64()[..6]),
        allowed_ips,
        endpoints,
        persistent_keepalive: keepalive,
        kind,
        preshared_key: None,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Genkey => {
            let secret = StaticSecret::random();
            println!("{}", STANDARD.encode(secret.to_bytes()));
        }
        Command::Pubkey { private_key } => {
            let secret = parse_private_key(&private_key)?;
            let public = x25519_dalek::PublicKey::from(&secret);
            println!("{}", STANDARD.encode(public.as_bytes()));
        }
        Command::Run(args) => run(args).await?,
    }
    Ok(())
}

async fn run(args: RunArgs) -> Result<()> {
    let peers = args
        .peers
        .iter()
        .map(|p| {
            let kind = if args.agent { NodeKind::Agent } else { NodeKind::Device };
            parse_peer(p, args.keepalive, kind)
        })
        .collect::<Result<Vec<_>>>()?;
    let config = EngineConfig {
        interface: args.interface.clone(),
        mtu: args.mtu,
        listen_port: args.listen_port,
        private_key: parse_private_key(&args.private_key)?,
        address: args.address,
        network: args.network,
    };
    let engine = Engine::start_with(
        config,
        EngineOptions {
            tun_offload: !args.no_offload,
        },
    )
    .await
    .context("starting the engine")?;
    engine.reconfigure(peers.clone());
    eprintln!(
        "engine up: interface {} port {} offload {}",
        args.interface,
        engine.listen_port(),
        engine.tun_offload()
    );

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut remove_all = signal(SignalKind::user_defined1())?;
    let mut restore = signal(SignalKind::user_defined2())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut seconds = 0u64;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = remove_all.recv() => {
                engine.reconfigure(Vec::new());
                eprintln!("all peers removed");
            }
            _ = restore.recv() => {
                engine.reconfigure(peers.clone());
                eprintln!("peers restored");
            }
            _ = tick.tick() => {
                seconds += 1;
                let status = serde_json::to_string(&engine.status())?;
                if args.status_every > 0 && seconds.is_multiple_of(args.status_every) {
                    println!("{status}");
                }
                if let Some(path) = &args.status_file {
                    let tmp = path.with_extension("tmp");
                    std::fs::write(&tmp, &status)?;
                    std::fs::rename(&tmp, path)?;
                }
            }
        }
    }
    engine.shutdown().await;
    eprintln!("engine down");
    Ok(())
}

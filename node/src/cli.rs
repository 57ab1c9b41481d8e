//! Runs each subcommand and presents the result: readable tables for people, `--json` and exit statuses for scripts.
//!
//! Exit statuses: 0 success; 1 failure (the message on stderr says what to do); 2 bad command line (clap);
//! 3 the agent is not running (`status`, `ping`; `netcheck` then runs a standalone check instead and says so); 4 this node is not joined, or was removed by an admin (restarting
//! `meshd up` will not help: systemd's unit does not restart on it). Logs and errors go to stderr, results to stdout.

use std::time::Duration;

use anyhow::{Context, anyhow};
use meshd_protocol::PublicKey;

use crate::config::{Cli, Command, LeaveArgs, NetcheckArgs, PingArgs, StatusArgs};
use crate::control::{ControlClient, ControlError};
use crate::ctl::{CtlClient, CtlError, Reply, Request, StatusReport};
use crate::daemon::{self, DaemonError};
use crate::netcheck::{self, CheckSource, NetcheckReport};
use crate::state::{StateDir, StateError};

/// A failed subcommand: what to print and which exit status to use.
#[derive(Debug)]
pub struct Failure {
    pub error: anyhow::Error,
    pub code: u8,
}

impl From<DaemonError> for Failure {
    fn from(error: DaemonError) -> Self {
        let code = error.exit_code();
        Self {
            error: error.into(),
            code,
        }
    }
}

impl From<CtlError> for Failure {
    fn from(error: CtlError) -> Self {
        let code = if matches!(error, CtlError::NotRunning { .. }) {
            3
        } else {
            1
        };
        Self {
            error: error.into(),
            code,
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self { error, code: 1 }
    }
}

pub async fn run(cli: Cli) -> Result<(), Failure> {
    let state = StateDir::new(cli.state_dir);
    match cli.command {
        Command::Join(args) => Ok(daemon::join(state, &args.token, args.hostname, args.run).await?),
        Command::Up(args) => Ok(daemon::up(state, args.run).await?),
        Command::Status(args) => status(&state, &args).await,
        Command::Ping(args) => ping(&state, &args).await,
        Command::Netcheck(args) => netcheck(&state, &args).await,
        Command::Down => down(&state).await,
        Command::Leave(args) => leave(&state, &args).await,
    }
}

async fn status(state: &StateDir, args: &StatusArgs) -> Result<(), Failure> {
    let report = CtlClient::new(state).status().await?;
    if args.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| anyhow!("encoding status: {e}"))?;
        println!("{json}");
    } else if args.prometheus {
        print!("{}", crate::exposition::render(&report));
    } else {
        print!("{}", status_table(&report));
    }
    Ok(())
}

/// The human-readable `meshd status`.
pub fn status_table(report: &StatusReport) -> String {
    let me = &report.self_node;
    let mut out = format!(
        "{} {} {} ({}, {} port {}, map v{}, coordinator {})\n",
        me.name,
        me.ip,
        short_key(&me.public_key),
        serde_json::to_value(me.state)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        me.interface,
        me.listen_port,
        me.map_version.map_or_else(|| "-".to_string(), |v| v.to_string()),
        me.coordinator,
    );
    if report.peers.is_empty() {
        out.push_str("no peers yet; ");
        out.push_str(&relay_state(report));
        out.push('\n');
        return out;
    }
    let rows: Vec<[String; 7]> = report
        .peers
        .iter()
        .map(|p| {
            [
                p.name.clone(),
                p.ip.to_string(),
                short_key(&p.public_key),
                path_cell(p),
                p.last_handshake
                    .map_or_else(|| "never".into(), |s| format!("{}s ago", s)),
                human_bytes(p.rx_bytes),
                human_bytes(p.tx_bytes),
            ]
        })
        .collect();
    let header = ["NAME", "IP", "KEY", "PATH", "HANDSHAKE", "RX", "TX"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row.iter().zip(widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&totals_line(report));
    out.push_str(&names_line(report));
    out
}

/// `names: gpu, gpu.mesh.internal, ... via /etc/hosts; DNS responder 10.77.0.2:53`, and why not when they do not
/// resolve.
fn names_line(report: &StatusReport) -> String {
    let Some(dns) = &report.self_node.dns else {
        return String::new();
    };
    let mut line = match (dns.mode.as_str(), &dns.domain) {
        ("off", _) => "names: not resolved on this host (--dns off)".to_string(),
        (_, None) => "names: the coordinator sends no DNS domain (it predates names)".to_string(),
        (mode, Some(domain)) => {
            let via = match (mode, &dns.hosts_file) {
                ("resolved", _) => "systemd-resolved".to_string(),
                (_, Some(path)) => path.clone(),
                (other, None) => other.to_string(),
            };
            format!("names: NAME and NAME.{domain} resolve via {via}")
        }
    };
    if let Some(resolver) = &dns.resolver {
        line.push_str(&format!("; DNS responder {resolver}"));
    }
    if let Some(note) = &dns.note {
        line.push_str(&format!(" ({note})"));
    }
    if let Some(error) = &dns.error {
        line.push_str(&format!("; last update failed: {error}"));
    }
    line.push('\n');
    line
}

/// `direct 198.18.1.2:51820 (0.4 ms)`, `relay`, or the engine's word for no path.
fn path_cell(peer: &crate::ctl::PeerReport) -> String {
    match (peer.path.as_str(), &peer.endpoint) {
        ("direct", Some(endpoint)) => match peer.latency_ms {
            Some(ms) => format!("direct {endpoint} ({ms:.1} ms)"),
            None => format!("direct {endpoint}"),
        },
        (path, _) => path.to_string(),
    }
}

/// `2 peers: 1 direct, 1 relayed (3.2 KiB through the relay); relay connected (12.0 ms)`.
fn totals_line(report: &StatusReport) -> String {
    let totals = &report.self_node.totals;
    let relay = relay_state(report);
    format!(
        "{} peers: {} direct, {} relayed ({} through the relay); {relay}\n",
        report.peers.len(),
        totals.direct_peers,
        totals.relayed_peers,
        human_bytes(totals.relayed_bytes),
    )
}

/// `relay connected (12.0 ms)` / `relay not connected`.
fn relay_state(report: &StatusReport) -> String {
    match &report.self_node.relay {
        Some(r) if r.connected => match r.latency_ms {
            Some(ms) => format!("relay connected ({ms:.1} ms)"),
            None => "relay connected".to_string(),
        },
        Some(_) => "relay not connected".to_string(),
        None => "relay unknown".to_string(),
    }
}

async fn netcheck(state: &StateDir, args: &NetcheckArgs) -> Result<(), Failure> {
    let report = match CtlClient::new(state).netcheck().await {
        Ok(report) => report,
        Err(CtlError::NotRunning { .. }) => standalone_netcheck(state).await?,
        Err(e) => return Err(e.into()),
    };
    if args.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| anyhow!("encoding netcheck: {e}"))?;
        println!("{json}");
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

/// No agent runs: STUN from a fresh UDP socket to the coordinator of the saved identity.
async fn standalone_netcheck(state: &StateDir) -> Result<NetcheckReport, Failure> {
    let (identity, _) = state.load_identity().map_err(DaemonError::from)?;
    let pin = identity.pinned().map_err(DaemonError::from)?;
    let client = ControlClient::new(&identity.coordinator_url, pin).map_err(DaemonError::from)?;
    let mut notes = Vec::new();
    let servers = match netcheck::stun_servers(&client).await {
        Ok(servers) => servers,
        Err(e) => {
            notes.push(format!("no STUN check: {e}"));
            Vec::new()
        }
    };
    let probes = netcheck::standalone_probes(&servers, netcheck::STUN_TIMEOUT)
        .await
        .context("opening a UDP socket for the check (is this machine's network up?)")?;
    Ok(NetcheckReport::new(CheckSource::Standalone, probes, None, notes))
}

fn short_key(key: &str) -> String {
    key.parse::<PublicKey>()
        .map_or_else(|_| key.to_string(), |k| format!("{k:?}"))
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

async fn ping(state: &StateDir, args: &PingArgs) -> Result<(), Failure> {
    let request = Request::Ping {
        target: args.target.clone(),
        count: args.count,
        timeout_secs: args.timeout,
    };
    // Each line comes within one echo timeout plus the pause between echoes; allow slack for a busy machine.
    let line_timeout = Duration::from_secs(u64::from(args.timeout) + 5);
    let mut summary = None;
    let mut peer = String::new();
    CtlClient::new(state)
        .call(&request, line_timeout, |reply| {
            match reply {
                Reply::PingStart { name, ip } => {
                    println!("PING {name} ({ip}) over the mesh");
                    peer = format!("{name} ({ip})");
                }
                Reply::PingReply(r) => match r.rtt_ms {
                    Some(ms) => println!("reply from {peer}: seq={} time={ms:.2} ms via {}", r.seq, via(&r)),
                    None => println!("no reply from {peer}: seq={} timeout", r.seq),
                },
                Reply::PingDone(s) => {
                    println!("{} sent, {} received", s.sent, s.received);
                    summary = Some(s);
                }
                other => return Err(CtlError::Protocol(format!("{other:?}"))),
            }
            Ok(())
        })
        .await?;
    match summary {
        Some(s) if s.received > 0 => Ok(()),
        Some(_) => Err(anyhow!("no reply from {}", args.target).into()),
        None => Err(anyhow!("the agent ended the ping early").into()),
    }
}

/// `direct 198.18.1.2:51820` or `relay`: the path the peer was on when the reply arrived.
fn via(reply: &crate::ctl::PingReply) -> String {
    match (reply.path.as_str(), &reply.endpoint) {
        ("direct", Some(endpoint)) => format!("direct {endpoint}"),
        (path, _) => path.to_string(),
    }
}

async fn down(state: &StateDir) -> Result<(), Failure> {
    if CtlClient::new(state).down().await? {
        eprintln!("meshd stopped");
    } else {
        eprintln!("meshd is not running for state dir {}", state.root().display());
    }
    Ok(())
}

async fn leave(state: &StateDir, args: &LeaveArgs) -> Result<(), Failure> {
    let (identity, credential) = match state.load_identity() {
        Ok(found) => found,
        Err(StateError::NotJoined { .. }) if args.force => {
            state.forget().map_err(DaemonError::from)?;
            eprintln!("nothing to leave: this node has not joined; local state removed");
            return Ok(());
        }
        Err(e) => return Err(DaemonError::from(e).into()),
    };
    if CtlClient::new(state).down().await? {
        eprintln!("meshd stopped");
    }
    // Hold the lock so no agent starts while the identity is being removed.
    let _lock = crate::ctl::lock_state_dir_within(state, Duration::from_secs(10)).await?;
    let told = async {
        let client = ControlClient::new(&identity.coordinator_url, identity.pinned()?)?;
        match client.leave(&credential).await {
            Ok(()) | Err(ControlError::Unauthorized { .. }) => Ok(()),
            Err(e) => Err(DaemonError::from(e)),
        }
    }
    .await;
    match told {
        Ok(()) => {}
        Err(e) if args.force => eprintln!("warning: {e}; removing the local state anyway (--force)"),
        Err(e) => {
            return Err(anyhow!(
                "{e}\nthe node is still a member; retry when the coordinator is reachable, or run `sudo meshd leave --force` to forget it locally (an admin can delete it later)"
            )
            .into());
        }
    }
    state.forget().map_err(DaemonError::from)?;
    eprintln!(
        "left the network: {} ({}) removed, identity and key deleted",
        identity.name, identity.ip
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_bytes() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn table_has_one_row_per_peer() {
        let report = crate::ctl::sample_status();
        let table = status_table(&report);
        assert!(table.starts_with("laptop 10.77.0.2 pk:"), "{table}");
        assert!(table.contains("degraded") && table.contains("map v7"), "{table}");
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 6, "{table}");
        assert!(
            lines[2].contains("gpu") && lines[2].contains("12s ago") && lines[2].contains("2.0 KiB"),
            "{table}"
        );
        assert!(lines[2].contains("direct 198.18.2.2:51820 (0.4 ms)"), "{table}");
        assert!(lines[3].contains("laptop2") && lines[3].contains("relay"), "{table}");
        assert!(
            !lines[3].contains("198.18.3.3"),
            "a relayed peer shows no direct endpoint: {table}"
        );
        assert_eq!(
            lines[4], "2 peers: 1 direct, 1 relayed (3.0 KiB through the relay); relay connected (12.0 ms)",
            "{table}"
        );
        assert_eq!(
            lines[5], "names: NAME and NAME.mesh.internal resolve via /etc/hosts; DNS responder 10.77.0.2:53",
            "{table}"
        );
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["self"]["fqdn"], "laptop.mesh.internal");
        assert_eq!(json["peers"][0]["fqdn"], "gpu.mesh.internal");
        assert_eq!(json["self"]["dns"]["mode"], "hosts");
        assert_eq!(json["self"]["name"], "laptop");
        assert_eq!(json["peers"][0]["last_handshake"], 12);
        assert_eq!(json["peers"][0]["path"], "direct");
        assert_eq!(json["peers"][0]["latency_ms"], 0.42);
        assert_eq!(json["peers"][1]["path"], "relay");
        assert_eq!(json["self"]["totals"]["relayed_peers"], 1);
        assert_eq!(json.as_object().expect("object").len(), 2, "exactly self and peers");
    }
}

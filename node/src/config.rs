//! The command line: one typed [`Cli`] from clap flags and `MESHD_*` environment variables.
//!
//! Owns parsing and defaults only; it does no IO. Every subcommand takes `--state-dir`, and everything the agent
//! touches on disk (identity, key, cached map, control socket) derives from it, so several agents can run side by
//! side on one machine (one per network namespace) without colliding.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Default state directory, as the systemd unit uses it.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshd";

/// meshd: the node agent of the meshd WireGuard mesh VPN.
///
/// Join once with a token from your admin (`sudo meshd join <token>`); after a reboot `sudo meshd up` starts again
/// from the saved state. `meshd status`, `meshd ping` and `meshd down` talk to the running agent over a local control
/// socket in the state directory. Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more detail.
#[derive(Debug, Parser)]
#[command(name = "meshd", version, propagate_version = true)]
pub struct Cli {
    /// Directory holding this node's identity, private key, cached network map and control socket.
    #[arg(long, global = true, env = "MESHD_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a key pair, enrol with the coordinator using a join token, then run the agent until stopped.
    Join(JoinArgs),
    /// Start the agent from the saved state (after a reboot), without a token. Runs until stopped.
    Up(UpArgs),
    /// Show this node and every peer: name, overlay IP, endpoint, path, last handshake, rx/tx bytes.
    Status(StatusArgs),
    /// Measure the round trip to a peer over the overlay and show which path it took.
    Ping(PingArgs),
    /// Check what the network allows: UDP to the coordinator, the NAT-mapped address and mapping, the relay.
    Netcheck(NetcheckArgs),
    /// Stop the running agent (removes the interface; the node stays a member of the network).
    Down,
    /// Remove this node from the network: tell the coordinator, stop the agent, delete identity, key and cache.
    Leave(LeaveArgs),
}

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The join token printed by `meshd-coordinator token create` (starts with `meshd1_`).
    #[arg(env = "MESHD_JOIN_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Name to ask for: one DNS label (a-z, 0-9, `-`); the coordinator adds `-2`, `-3`, ... when it is taken.
    /// Default: this machine's hostname, made DNS-safe.
    #[arg(long, env = "MESHD_HOSTNAME")]
    pub hostname: Option<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub run: RunArgs,
}

/// How the running agent brings up its interface and control socket.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Name of the TUN interface to create.
    #[arg(long, env = "MESHD_INTERFACE", default_value = "mesh0")]
    pub interface: String,
    /// UDP port for WireGuard traffic (0 picks a free one).
    #[arg(long, env = "MESHD_LISTEN_PORT", default_value_t = 51820)]
    pub listen_port: u16,
    /// MTU of the TUN interface (1420 leaves room for IPv4 + UDP + WireGuard headers on a 1500 link).
    #[arg(long, env = "MESHD_MTU", default_value_t = 1420, value_parser = clap::value_parser!(u16).range(576..=9000))]
    pub mtu: u16,
    /// Unix group whose members may use the control socket (`meshd status`, `ping`, `down`) without root.
    #[arg(long, env = "MESHD_CONTROL_GROUP")]
    pub control_group: Option<String>,
    /// How peers' names resolve on this host: systemd-resolved per-link DNS when the host uses it, else a managed
    /// block in the hosts file (auto); one of them; or off (no DNS responder, no hosts block).
    #[arg(long, env = "MESHD_DNS", value_enum, default_value_t = crate::dns::DnsMode::Auto)]
    pub dns: crate::dns::DnsMode,
    /// The hosts file that gets the block of mesh names (hosts mode).
    #[arg(long, env = "MESHD_HOSTS_FILE", default_value = "/etc/hosts")]
    pub hosts_file: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print one JSON object (`self` and `peers`) instead of a table.
    #[arg(long, conflicts_with = "prometheus")]
    pub json: bool,
    /// Print Prometheus text exposition (peers by path, relayed bytes, per-peer traffic) for node_exporter's
    /// textfile collector.
    #[arg(long)]
    pub prometheus: bool,
}

#[derive(Debug, Args)]
pub struct NetcheckArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PingArgs {
    /// Peer name (as in `meshd status`) or overlay IPv4 address.
    pub target: String,
    /// Number of echo requests to send (1 to 100).
    #[arg(short = 'c', long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub count: u16,
    /// Seconds to wait for each reply (1 to 30).
    #[arg(short = 'W', long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=30))]
    pub timeout: u16,
}

#[derive(Debug, Args)]
pub struct LeaveArgs {
    /// Delete the local identity even if the coordinator cannot be told (it will keep listing this node until an
    /// admin deletes it).
    #[arg(long)]
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_and_global_state_dir() {
        let cli = Cli::try_parse_from(["meshd", "up"]).expect("parses");
        assert_eq!(cli.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        let Command::Up(up) = cli.command else { panic!("up") };
        assert_eq!(
            (up.run.interface.as_str(), up.run.listen_port, up.run.mtu),
            ("mesh0", 51820, 1420)
        );
        assert_eq!(up.run.dns, crate::dns::DnsMode::Auto);
        assert_eq!(up.run.hosts_file, PathBuf::from("/etc/hosts"));
        let cli = Cli::try_parse_from(["meshd", "up", "--dns", "hosts", "--hosts-file", "/tmp/h"]).expect("parses");
        let Command::Up(up) = cli.command else { panic!("up") };
        assert_eq!(
            (up.run.dns, up.run.hosts_file),
            (crate::dns::DnsMode::Hosts, PathBuf::from("/tmp/h"))
        );
        assert!(Cli::try_parse_from(["meshd", "up", "--dns", "magic"]).is_err());

        let cli = Cli::try_parse_from(["meshd", "status", "--json", "--state-dir", "/tmp/x"]).expect("parses");
        assert_eq!(cli.state_dir, PathBuf::from("/tmp/x"));
        assert!(matches!(
            cli.command,
            Command::Status(StatusArgs {
                json: true,
                prometheus: false
            })
        ));
        let cli = Cli::try_parse_from(["meshd", "status", "--prometheus"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Status(StatusArgs { prometheus: true, .. })
        ));
        assert!(
            Cli::try_parse_from(["meshd", "status", "--json", "--prometheus"]).is_err(),
            "one output format at a time"
        );

        let cli = Cli::try_parse_from(["meshd", "ping", "gpu", "-c", "2"]).expect("parses");
        let Command::Ping(p) = cli.command else { panic!("ping") };
        assert_eq!((p.target.as_str(), p.count), ("gpu", 2));
        assert!(Cli::try_parse_from(["meshd", "ping", "gpu", "-c", "0"]).is_err());
    }
}

//! A stock WireGuard peer: Debian's `wireguard-go` configured with `wg setconf`, plain `ip` for address and routes.
//!
//! wg-quick is avoided on purpose: it may touch host state (resolvconf, firewall marks). The UAPI socket directory
//! /var/run/wireguard is shared by all namespaces, so the interface name carries the lab id; the socket we created
//! is removed on drop.

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::lab::{Host, Lab};
use crate::process::Process;
use crate::wait;

/// A key pair made by `wg genkey | wg pubkey`.
pub struct WgKeys {
    pub private_key: String,
    pub public_key: String,
}

/// Generates a key pair with the `wg` tool on `host`.
pub fn generate_keys(host: &Host, dir: &Path) -> Result<WgKeys> {
    let private_key = host
        .run_ok("wg", &["genkey"], Duration::from_secs(10))?
        .trim()
        .to_owned();
    let key_file = dir.join("private.key");
    fs::write(&key_file, format!("{private_key}\n")).context("writing the private key")?;
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).context("chmod private key")?;
    let input = fs::File::open(&key_file).context("opening the private key")?;
    let out = crate::cmd::run_with_stdin(host.command("wg").arg("pubkey"), input, Duration::from_secs(10))?;
    if !out.success() {
        bail!("wg pubkey failed: {}", out.stderr);
    }
    Ok(WgKeys {
        private_key,
        public_key: out.stdout.trim().to_owned(),
    })
}

/// A wg-quick config turned into what `wg setconf` accepts, plus what plain `ip` must do.
#[derive(Debug, PartialEq)]
pub struct SetConf {
    /// `[Interface]`/`[Peer]` text with only the keys `wg setconf` knows.
    pub text: String,
    /// `Address = ` values (with prefix length).
    pub addresses: Vec<String>,
    /// Every peer's `AllowedIPs`, to route through the interface.
    pub allowed_ips: Vec<String>,
    pub mtu: Option<String>,
}

/// Strips the wg-quick-only keys (Address, DNS, MTU, Table, Pre/PostUp/Down, SaveConfig) and puts `private_key`
/// where the config has its `PrivateKey` (placeholder) line.
pub fn to_setconf(wg_quick: &str, private_key: &str) -> Result<SetConf> {
    let mut text = String::new();
    let mut addresses = Vec::new();
    let mut allowed_ips = Vec::new();
    let mut mtu = None;
    let mut saw_private_key = false;
    for line in wg_quick.lines() {
        let trimmed = line.trim();
        let Some((key, value)) = trimmed.split_once('=') else {
            text.push_str(trimmed);
            text.push('\n');
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key.to_ascii_lowercase().as_str() {
            "address" => addresses.extend(value.split(',').map(|v| v.trim().to_owned())),
            "mtu" => mtu = Some(value.to_owned()),
            "dns" | "table" | "preup" | "postup" | "predown" | "postdown" | "saveconfig" => {}
            "privatekey" => {
                saw_private_key = true;
                text.push_str(&format!("PrivateKey = {private_key}\n"));
            }
            "allowedips" => {
                allowed_ips.extend(value.split(',').map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()));
                text.push_str(trimmed);
                text.push('\n');
            }
            _ => {
                text.push_str(trimmed);
                text.push('\n');
            }
        }
    }
    if !saw_private_key {
        bail!("the wireguard-config has no PrivateKey line to fill in:\n{wg_quick}");
    }
    Ok(SetConf {
        text,
        addresses,
        allowed_ips,
        mtu,
    })
}

/// A running wireguard-go interface.
pub struct WgDevice {
    pub host: Host,
    pub interface: String,
    pub address: Ipv4Addr,
    socket: PathBuf,
    process: Process,
}

impl WgDevice {
    /// Brings up `interface` on `host` from a wg-quick config (with the real private key substituted).
    pub fn start(lab: &Lab, host: &Host, interface: &str, wg_quick: &str, keys: &WgKeys) -> Result<Self> {
        let conf = to_setconf(wg_quick, &keys.private_key)?;
        let dir = lab.subdir(&format!("wg-{}", host.name))?;
        let conf_file = dir.join("setconf.conf");
        fs::write(&conf_file, &conf.text).context("writing the setconf file")?;
        fs::set_permissions(&conf_file, fs::Permissions::from_mode(0o600)).context("chmod setconf file")?;
        let socket = PathBuf::from(format!("/var/run/wireguard/{interface}.sock"));
        if socket.exists() {
            bail!(
                "{} exists already: another run uses interface name {interface}",
                socket.display()
            );
        }
        let wireguard_go = crate::env::tool_path("wireguard-go");
        let mut process = lab.spawn(
            host,
            "wireguard-go",
            &wireguard_go.to_string_lossy(),
            &["-f", interface],
            &[("WG_PROCESS_FOREGROUND", "1"), ("LOG_LEVEL", "verbose")],
        )?;
        wait::until(
            "wireguard-go's UAPI socket and interface",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                process.ensure_running()?;
                Ok((socket.exists()
                    && host
                        .run("ip", &["link", "show", interface], Duration::from_secs(5))?
                        .success())
                .then_some(()))
            },
        )?;
        let mut device = Self {
            host: host.clone(),
            interface: interface.to_owned(),
            address: Ipv4Addr::UNSPECIFIED,
            socket,
            process,
        };
        host.run_ok(
            "wg",
            &["setconf", interface, &conf_file.to_string_lossy()],
            Duration::from_secs(10),
        )
        .context("wg setconf")?;
        let mut address = None;
        for cidr in &conf.addresses {
            if let Some(ip) = cidr.split('/').next().and_then(|ip| ip.parse::<Ipv4Addr>().ok()) {
                crate::lab::assert_lab_address(ip)?;
                host.run_ok("ip", &["addr", "add", cidr, "dev", interface], Duration::from_secs(5))?;
                address.get_or_insert(ip);
            }
        }
        let address = address.with_context(|| format!("no IPv4 Address in the config: {:?}", conf.addresses))?;
        let mtu = conf.mtu.clone().unwrap_or_else(|| "1420".to_owned());
        host.run_ok(
            "ip",
            &["link", "set", interface, "mtu", &mtu, "up"],
            Duration::from_secs(5),
        )?;
        for cidr in &conf.allowed_ips {
            // Only overlay routes; anything else in a config would be a bug we must not act on.
            let ip: Ipv4Addr = cidr
                .split('/')
                .next()
                .unwrap_or("")
                .parse()
                .with_context(|| format!("AllowedIPs {cidr}"))?;
            crate::lab::assert_lab_address(ip)?;
            if !ip.octets().starts_with(&[10, 77]) {
                bail!("AllowedIPs {cidr} is outside the overlay network");
            }
            host.run_ok(
                "ip",
                &["route", "replace", cidr, "dev", interface],
                Duration::from_secs(5),
            )?;
        }
        device.address = address;
        Ok(device)
    }

    /// `wg show <interface>` output, for diagnostics.
    pub fn show(&self) -> String {
        self.host
            .run("wg", &["show", &self.interface], Duration::from_secs(5))
            .map(|o| format!("{}{}", o.stdout, o.stderr))
            .unwrap_or_else(|e| format!("{e:#}"))
    }
}

impl Drop for WgDevice {
    fn drop(&mut self) {
        self.process.stop(crate::process::STOP_GRACE);
        // wireguard-go removes its socket on a clean exit; after a kill it may stay. It is ours (unique name).
        let _ = fs::remove_file(&self.socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setconf_keeps_only_what_wg_accepts() {
        let quick = "[Interface]\nPrivateKey = <PRIVATE KEY>\nAddress = 10.77.0.9/16\nDNS = 10.77.0.1\nMTU = 1380\n\n\
                     [Peer]\nPublicKey = abc=\nAllowedIPs = 10.77.0.1/32, 10.77.0.2/32\nEndpoint = 198.18.2.2:51820\n\
                     PersistentKeepalive = 25\n";
        let conf = to_setconf(quick, "secret=").expect("valid config");
        assert_eq!(conf.addresses, vec!["10.77.0.9/16"]);
        assert_eq!(conf.allowed_ips, vec!["10.77.0.1/32", "10.77.0.2/32"]);
        assert_eq!(conf.mtu.as_deref(), Some("1380"));
        assert!(conf.text.contains("PrivateKey = secret=\n"));
        assert!(!conf.text.contains("DNS") && !conf.text.contains("Address") && !conf.text.contains("MTU"));
        assert!(conf.text.contains("Endpoint = 198.18.2.2:51820"));
    }

    #[test]
    fn setconf_requires_a_private_key_line() {
        assert!(to_setconf("[Interface]\nAddress = 10.77.0.9/32\n", "k").is_err());
    }
}

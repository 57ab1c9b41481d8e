//! The coordinator's WireGuard gateway: a stock WireGuard device (wireguard-go, configured only from the file the
//! coordinator exports plus its own private key) behind an endpoint-dependent NAT reaches a meshd agent through
//! the gateway (`meshd-coordinator serve --gateway-port`, the device's `Endpoint`), which forwards its datagrams
//! over the agent's relay connection.
//!
//! Topology: the coordinator on the "internet"; the agent "gpu-server" behind an endpoint-independent NAT; the
//! laptop behind `MASQUERADE --random-fully`; an attacker host on the internet for the flood.
//!
//! a) pings both ways, `ssh root@<gpu overlay ip>`, 50 MB up (the laptop's NAT remaps it to a new port half way)
//!    and back down intact, and the agent reports the laptop's path as `gateway`;
//! b) the same with the gpu-server's site letting UDP through only to and from the coordinator;
//! c) a capture in the coordinator's namespace holds WireGuard datagrams to the gateway port and a plaintext
//!    control string, but never the marker an HTTP server on the gpu-server sent the laptop through the tunnel;
//! d) a flood of the gateway port (wrong lengths, random receiver indexes, garbage types, replayed captured
//!    initiations) leaves `/healthz` and a running ping alone; deleting the device stops its pings within 2 s.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use meshd_lab::capture::{self, Capture};
use meshd_lab::gateway::{ExportedConfig, Flood, RegisteredDevice, XorShift, redact, register_device};
use meshd_lab::lab::{Host, Lab};
use meshd_lab::mesh::{COORDINATOR_PORT, Coordinator, MeshNode};
use meshd_lab::natlab::{NatKind, NatSite, nat_scenario};
use meshd_lab::path::{self, PeerPath, PingProbe};
use meshd_lab::ssh::SshServer;
use meshd_lab::wait;
use meshd_lab::wireguard::{WgDevice, generate_keys};
use sha2::{Digest, Sha256};

const TOOL: &str = env!("CARGO_BIN_EXE_meshd-lab-udp");
const TOOLS: &[&str] = &[
    "wg",
    "wireguard-go",
    "conntrack",
    "sshd",
    "ssh",
    "ssh-keygen",
    "tcpdump",
    "python3",
];
/// The gateway's UDP port, asked for explicitly (it is also the default).
const GATEWAY_PORT: u16 = 51820;
const TRANSFER_SIZE: usize = 50 * 1024 * 1024;
/// Bound of one 50 MB transfer through the gateway (the relay path on a loaded 2-core machine).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(300);
/// The ports the laptop's NAT maps UDP to after its "reboot" (before: random over the whole range).
const NEW_PORTS: (u16, u16) = (20000, 29999);
/// How soon a deleted device's traffic must stop.
const REVOKE_BOUND: f64 = 2.0;
/// The ping probe's interval: how finely "the last reply" is measured.
const PING_INTERVAL: Duration = Duration::from_millis(100);
const FLOOD_TIME: Duration = Duration::from_secs(10);
/// Datagrams per second of the flood: far more than a device sends, well within one core of the attacker.
const FLOOD_RATE: u32 = 20_000;
/// Longest the laptop's ping may go unanswered during the flood, and longest `/healthz` may take.
const FLOOD_GAP: f64 = 2.0;
const HEALTHZ_BOUND: Duration = Duration::from_secs(2);

/// What the gpu-server's NAT site lets through.
#[derive(Clone, Copy, PartialEq, Eq)]
enum GpuSite {
    /// Endpoint-independent NAT, outbound UDP allowed.
    Open,
    /// The same NAT, but UDP only to and from the coordinator.
    UdpOnlyToCoordinator,
}

/// The coordinator, the gpu-server agent and the laptop device, each on its site.
struct GatewayLab {
    // Dropped first: the device, then the agent, then the coordinator.
    laptop: WgDevice,
    gpu: MeshNode,
    coordinator: Coordinator,
    gpu_site: NatSite,
    laptop_site: NatSite,
    device: RegisteredDevice,
    gateway: SocketAddrV4,
    /// A capture in the coordinator's namespace started before the device came up (when asked for).
    capture: Option<Capture>,
}

impl GatewayLab {
    /// Builds the sites, starts the coordinator with its gateway and the gpu-server agent, registers the laptop
    /// with a preshared key, checks the exported config against the gateway's contract and brings the laptop up
    /// from it. `capture`: a tcpdump filter for a capture in the coordinator's namespace, started before the
    /// laptop's first handshake.
    fn start(lab: &Lab, mode: GpuSite, capture: Option<&[&str]>) -> Result<Self> {
        let coord = lab.add_host("coord")?;
        let gpu_site = lab.add_nat_site("gpu", NatKind::EndpointIndependent)?;
        let gpu_host = gpu_site.add_host(lab, "gpu-server")?;
        let laptop_site = lab.add_nat_site("lap", NatKind::EndpointDependent)?;
        let laptop_host = laptop_site.add_host(lab, "laptop")?;
        if mode == GpuSite::UdpOnlyToCoordinator {
            gpu_site.block_udp_except(coord.underlay)?;
        }
        eprintln!(
            "coordinator {}; gpu-server behind {} ({}){}; laptop behind {} ({})",
            coord.underlay,
            NatKind::EndpointIndependent.label(),
            gpu_site.outside,
            if mode == GpuSite::UdpOnlyToCoordinator {
                ", UDP only to the coordinator"
            } else {
                ""
            },
            NatKind::EndpointDependent.label(),
            laptop_site.outside
        );
        let port = GATEWAY_PORT.to_string();
        let coordinator = Coordinator::start_with_args(lab, coord, &["--gateway-port", &port])?;
        let gateway = SocketAddrV4::new(coordinator.host.underlay, gateway_port(&coordinator)?);

        let token = coordinator.create_token(false)?;
        let mut gpu = MeshNode::spawn_join(lab, gpu_host, &token, "gpu-server", 1)?;
        gpu.wait_joined(Duration::from_secs(30))?;

        let keys = generate_keys(&laptop_host, &lab.subdir("laptop-keys")?)?;
        let device = register_device(&coordinator, "laptop", &keys.public_key)?;
        eprintln!("exported config of the laptop:\n{}", redact(&device.config));
        let exported = ExportedConfig::parse(&device.config);
        exported.check_gateway_contract(SocketAddr::V4(gateway))?;
        let gpu_route = format!("{}/32", gpu.ip());
        ensure!(
            exported.peers.iter().any(|p| p.allowed_ips.contains(&gpu_route)),
            "no peer of the exported config routes the gpu-server ({gpu_route}):\n{}",
            redact(&device.config)
        );

        let capture = match capture {
            Some(filter) => Some(Capture::start(lab, &coordinator.host, "coordinator", filter)?),
            None => None,
        };
        let laptop = WgDevice::start(lab, &laptop_host, &lab.ifname("wg", 9), &device.config, &keys)?;
        gpu.wait_peers(1, Duration::from_secs(15))
            .context("the laptop never reached the gpu-server's map")?;
        Ok(Self {
            laptop,
            gpu,
            coordinator,
            gpu_site,
            laptop_site,
            device,
            gateway,
            capture,
        })
    }

    /// Everything that explains a failure: the device's view, the agent's, the laptop NAT's mappings.
    fn diagnostics(&self) -> String {
        let status = self.gpu.status().map_or_else(|e| format!("{e:#}"), |s| s.to_string());
        let mappings = |site: &NatSite| site.udp_mappings().map_or_else(|e| format!("{e:#}"), |m| m.join("\n"));
        format!(
            "wg show on the laptop:\n{}\ngpu-server status: {status}\nUDP mappings of the laptop's NAT:\n{}\n\
             UDP mappings of the gpu-server's NAT:\n{}",
            self.laptop.show(),
            mappings(&self.laptop_site),
            mappings(&self.gpu_site)
        )
    }

    /// Pings laptop -> gpu-server and gpu-server -> laptop over the overlay.
    fn wait_connected(&self, timeout: Duration) -> Result<()> {
        self.laptop
            .host
            .wait_ping(self.gpu.ip(), timeout)
            .with_context(|| format!("laptop -> gpu-server through the gateway\n{}", self.diagnostics()))?;
        self.gpu
            .host
            .wait_ping(self.laptop.address, timeout)
            .with_context(|| format!("gpu-server -> laptop through the gateway\n{}", self.diagnostics()))
    }

    /// Waits until the gpu-server reports its path to the laptop as `gateway`.
    fn wait_gateway_path(&self, timeout: Duration) -> Result<PeerPath> {
        let mut last = None;
        let result = wait::until(
            "the gpu-server to report the laptop's path as gateway",
            timeout,
            Duration::from_millis(200),
            || {
                let path = path::peer_path(&self.gpu, self.laptop.address)?;
                let done = path.is_gateway();
                last = Some(path.clone());
                Ok(done.then_some(path))
            },
        );
        result.map_err(|e| match last {
            Some(path) => e.context(format!("last path seen: {path}")),
            None => e,
        })
    }

    /// The ports the laptop's NAT maps its WireGuard flow to the gateway to (two-way flows only).
    fn laptop_mapped_ports(&self) -> Result<Vec<u16>> {
        Ok(self
            .laptop_site
            .two_way_flows(self.laptop.host.underlay, *self.gateway.ip())?
            .into_iter()
            .map(|(mapping, _)| mapping.mapped_port)
            .collect())
    }
}

/// The gateway port `GET /api/v1/info` reports.
fn gateway_port(coordinator: &Coordinator) -> Result<u16> {
    let info = coordinator.info()?;
    let port = info["gateway_port"]
        .as_u64()
        .ok_or_else(|| anyhow!("GET /api/v1/info reports no gateway_port (is the gateway built in?): {info}"))?;
    ensure!(
        port == u64::from(GATEWAY_PORT),
        "the gateway is on port {port}, --gateway-port asked for {GATEWAY_PORT}"
    );
    Ok(GATEWAY_PORT)
}

/// Writes `TRANSFER_SIZE` pseudo-random bytes; returns their SHA-256 (hex).
fn write_payload(path: &Path) -> Result<String> {
    let mut out = BufWriter::new(File::create(path).context("creating the payload")?);
    let mut hasher = Sha256::new();
    let mut rng = XorShift::new(0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id()));
    let mut block = vec![0u8; 1 << 16];
    for _ in 0..TRANSFER_SIZE / block.len() {
        rng.fill(&mut block);
        hasher.update(&block);
        out.write_all(&block).context("writing the payload")?;
    }
    out.flush().context("flushing the payload")?;
    Ok(hex::encode(hasher.finalize()))
}

/// A random lowercase hex string of `bytes` bytes.
fn random_hex(bytes: usize) -> String {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut rng = XorShift::new(seed ^ u64::from(std::process::id()));
    let mut buf = vec![0u8; bytes];
    rng.fill(&mut buf);
    hex::encode(buf)
}

/// Scenarios a and b.
fn laptop_reaches_gpu_server(lab: &Lab, mode: GpuSite) -> Result<()> {
    let gw = GatewayLab::start(lab, mode, None)?;
    gw.wait_connected(Duration::from_secs(30))?;
    let path = gw.wait_gateway_path(Duration::from_secs(10))?;
    eprintln!("pings both ways; the gpu-server's path to the laptop: {path}");

    let sshd = SshServer::start(lab, &gw.gpu.host, gw.gpu.ip())?;
    sshd.wait_ready(&gw.laptop.host, Duration::from_secs(30))
        .with_context(|| gw.diagnostics())?;
    let out = sshd.run(&gw.laptop.host, "echo ssh-through-the-gateway", Duration::from_secs(20))?;
    ensure!(
        out.stdout.trim() == "ssh-through-the-gateway",
        "ssh root@{} printed {:?} ({})",
        gw.gpu.ip(),
        out.stdout,
        out.stderr.trim()
    );

    // 50 MB up, the laptop's NAT remapping it to a new port half way.
    let payload = lab.dir().join("payload.bin");
    let expected = write_payload(&payload)?;
    let received = lab.dir().join("received-on-gpu.bin");
    let before = gw.laptop_mapped_ports()?;
    ensure!(
        !before.is_empty(),
        "the laptop's NAT holds no two-way flow to the gateway {}\n{}",
        gw.gateway,
        gw.diagnostics()
    );
    let started = Instant::now();
    let remote = format!("cat > {0} && sha256sum {0}", received.display());
    let (reader, writer) = std::io::pipe().context("creating the transfer pipe")?;
    let (half_sent, half) = mpsc::channel();
    let (upload, at_change) = thread::scope(|scope| -> Result<_> {
        let transfer = scope.spawn(|| sshd.run_with_stdin(&gw.laptop.host, &remote, reader, TRANSFER_TIMEOUT));
        let feeder = scope.spawn(move || -> Result<()> {
            let mut writer = writer;
            let mut file = File::open(&payload).context("opening the payload")?;
            let mut first = (&mut file).take((TRANSFER_SIZE / 2) as u64);
            std::io::copy(&mut first, &mut writer).context("feeding the first half")?;
            let _ = half_sent.send(());
            std::io::copy(&mut file, &mut writer).context("feeding the second half")?;
            Ok(())
        });
        half.recv_timeout(TRANSFER_TIMEOUT)
            .context("the first half of the payload was never taken by ssh")?;
        let at_change = fs::metadata(&received).map_or(0, |m| m.len());
        gw.laptop_site
            .reboot_with_new_ports(&format!("{}-{}", NEW_PORTS.0, NEW_PORTS.1))?;
        eprintln!(
            "the laptop's NAT rebooted with new ports after {:.1} s, {:.1} MB received so far",
            started.elapsed().as_secs_f64(),
            at_change as f64 / 1e6
        );
        let fed = feeder.join().map_err(|_| anyhow!("the feeder thread panicked"))?;
        let upload = transfer.join().map_err(|_| anyhow!("the transfer thread panicked"))?;
        fed?;
        Ok((upload?, at_change))
    })?;
    let elapsed = started.elapsed();
    ensure!(
        upload.success(),
        "the upload failed after {:.1} s: {}\n{}",
        elapsed.as_secs_f64(),
        upload.stderr.trim(),
        gw.diagnostics()
    );
    let got = upload.stdout.split_whitespace().next().unwrap_or("");
    ensure!(
        got == expected,
        "SHA-256 mismatch: sent {expected}, the gpu-server got {got}"
    );
    ensure!(
        (at_change as usize) < TRANSFER_SIZE,
        "the transfer was complete before the NAT changed: nothing was tested across the change"
    );
    let after = gw.laptop_mapped_ports()?;
    let in_new_range = |p: &u16| (NEW_PORTS.0..=NEW_PORTS.1).contains(p);
    ensure!(
        !after.is_empty() && after.iter().all(in_new_range) && after.iter().all(|p| !before.contains(p)),
        "the laptop's mapping to the gateway did not move to a new port: before {before:?}, after {after:?}"
    );
    eprintln!(
        "50 MB up in {:.1} s ({:.0} Mbit/s) across a NAT remap (mapped port {before:?} -> {after:?})",
        elapsed.as_secs_f64(),
        TRANSFER_SIZE as f64 * 8.0 / elapsed.as_secs_f64() / 1e6
    );

    // And back down: the checksum is taken on the laptop, of what came through the tunnel.
    let started = Instant::now();
    let pipeline = format!(
        "{} | sha256sum",
        sshd.shell_command(&format!("cat {}", received.display()))
    );
    let down = gw.laptop.host.run("sh", &["-c", &pipeline], TRANSFER_TIMEOUT)?;
    let got = down.stdout.split_whitespace().next().unwrap_or("");
    ensure!(
        down.success() && got == expected,
        "download: SHA-256 {got:?}, expected {expected} ({})",
        down.stderr.trim()
    );
    eprintln!("50 MB down in {:.1} s, intact", started.elapsed().as_secs_f64());

    let path = gw.wait_gateway_path(Duration::from_secs(5))?;
    eprintln!("after the transfers the gpu-server's path to the laptop is still {path}");
    Ok(())
}

#[test]
fn stock_laptop_behind_random_nat_reaches_gpu_server_through_gateway() {
    nat_scenario("gateway-a-open", TOOLS, |lab| {
        laptop_reaches_gpu_server(lab, GpuSite::Open)
    });
}

#[test]
fn stock_laptop_reaches_gpu_server_whose_site_allows_udp_only_to_the_coordinator() {
    nat_scenario("gateway-b-udp-to-coord", TOOLS, |lab| {
        laptop_reaches_gpu_server(lab, GpuSite::UdpOnlyToCoordinator)
    });
}

#[test]
fn gateway_never_sees_plaintext() {
    nat_scenario("gateway-c-plaintext", TOOLS, |lab| {
        let mut gw = GatewayLab::start(lab, GpuSite::Open, Some(&[]))?;
        gw.wait_connected(Duration::from_secs(30))?;
        let marker = format!("meshd-secret-marker-{}", random_hex(16));
        let www = lab.subdir("www")?;
        fs::write(www.join("marker.txt"), &marker).context("writing the marker")?;
        let python = meshd_lab::env::tool_path("python3");
        let (gpu_ip, www_dir) = (gw.gpu.ip().to_string(), www.to_string_lossy().into_owned());
        let _http = lab.spawn(
            &gw.gpu.host,
            "http-server",
            &python.to_string_lossy(),
            &["-m", "http.server", "--bind", &gpu_ip, "--directory", &www_dir, "8080"],
            &[],
        )?;
        let url = format!("http://{gpu_ip}:8080/marker.txt");
        let fetch = |host: &Host| -> Result<String> {
            let out = host.run_ok(
                "curl",
                &["-sS", "--noproxy", "*", "-m", "5", &url],
                Duration::from_secs(10),
            )?;
            Ok(out.trim().to_owned())
        };
        let fetched = wait::until(
            "the laptop to fetch the marker from the gpu-server through the tunnel",
            Duration::from_secs(30),
            Duration::from_millis(300),
            || Ok(fetch(&gw.laptop.host).ok().filter(|body| *body == marker)),
        )?;
        for _ in 0..4 {
            ensure!(
                fetch(&gw.laptop.host)? == fetched,
                "a later fetch of the marker differed"
            );
        }
        // Positive control: plaintext sent to the coordinator does show up in this capture (an HTTP request to
        // its TLS port: the request line goes out in the clear before the handshake fails).
        let control = format!("meshd-capture-control-{}", random_hex(16));
        let control_url = format!("http://{}:{COORDINATOR_PORT}/{control}", gw.coordinator.host.underlay);
        let _ = gw.laptop.host.run(
            "curl",
            &["-s", "--noproxy", "*", "-m", "3", &control_url],
            Duration::from_secs(10),
        )?;
        thread::sleep(Duration::from_millis(500));
        let capture = gw.capture.take().context("the capture was started")?;
        let file = capture.path().to_path_buf();
        let pcap = capture.stop()?;
        let datagrams = capture::udp_datagrams(&pcap)?;
        let to_gateway = datagrams
            .iter()
            .filter(|d| d.destination == gw.gateway && d.payload.len() >= 32)
            .count();
        eprintln!(
            "capture in the coordinator's namespace: {} bytes, {} UDP datagrams, {to_gateway} of 32+ bytes to the \
             gateway {}",
            pcap.len(),
            datagrams.len(),
            gw.gateway
        );
        ensure!(
            to_gateway >= 10,
            "the capture ({}) holds {to_gateway} WireGuard datagrams to the gateway {}: it did not see the \
             laptop's traffic, so its silence about the marker proves nothing",
            file.display(),
            gw.gateway
        );
        ensure!(
            capture::contains(&pcap, control.as_bytes()),
            "the capture ({}) misses the plaintext control string sent to the coordinator: it could not have \
             shown the marker either",
            file.display()
        );
        ensure!(
            !capture::contains(&pcap, marker.as_bytes()),
            "the marker the gpu-server sent through the tunnel appears in plaintext in the coordinator's capture \
             ({}; MESHD_LAB_KEEP_FAILED=1 keeps it)",
            file.display()
        );
        Ok(())
    });
}

#[test]
fn revoked_device_stops_within_2s_and_flood_does_not_hurt() {
    nat_scenario("gateway-d-flood-revoke", TOOLS, |lab| {
        let port = GATEWAY_PORT.to_string();
        let mut gw = GatewayLab::start(lab, GpuSite::Open, Some(&["udp", "port", &port]))?;
        gw.wait_connected(Duration::from_secs(30))?;
        gw.wait_gateway_path(Duration::from_secs(10))?;
        let pcap = gw.capture.take().context("the capture was started")?.stop()?;
        let initiation = capture::udp_datagrams(&pcap)?
            .into_iter()
            .find(|d| d.destination == gw.gateway && d.payload.len() == 148 && d.payload[0] == 1)
            .map(|d| d.payload)
            .ok_or_else(|| {
                anyhow!(
                    "no handshake initiation from the laptop to the gateway {} in the capture of its port",
                    gw.gateway
                )
            })?;
        let attacker = lab.add_host("attacker")?;

        let mut probe = PingProbe::start(
            lab,
            &gw.laptop.host,
            gw.gpu.ip(),
            PING_INTERVAL,
            Duration::from_secs(90),
        )?;
        probe.wait_reply_after(probe.started(), Duration::from_secs(10))?;
        let flood_started = probe.now();
        let mut flood = Flood::start(
            lab,
            &attacker,
            Path::new(TOOL),
            gw.gateway,
            FLOOD_TIME,
            FLOOD_RATE,
            Some(&initiation),
        )?;
        let mut worst = Duration::ZERO;
        let mut checks = 0;
        let deadline = Instant::now() + FLOOD_TIME;
        while Instant::now() < deadline {
            flood.ensure_running()?;
            let asked = Instant::now();
            let (code, body) = gw.coordinator.request("GET", "/healthz", None)?;
            worst = worst.max(asked.elapsed());
            checks += 1;
            ensure!(code == 200, "/healthz answered {code} during the flood: {body}");
            thread::sleep(Duration::from_millis(500));
        }
        let summary = flood.wait_done(Duration::from_secs(20))?;
        let flood_ended = probe.now();
        gw.coordinator.ensure_running()?;
        let replies = probe.replies();
        let during = replies
            .iter()
            .filter(|&&t| t >= flood_started && t <= flood_ended)
            .count();
        let gap = path::longest_gap(&replies, flood_started, flood_ended);
        eprintln!(
            "flood ({summary}): {checks} /healthz checks, slowest {:.0} ms; the laptop's ping got {during} replies \
             in {:.1} s, longest gap {gap:.2} s",
            worst.as_secs_f64() * 1e3,
            flood_ended - flood_started
        );
        ensure!(
            worst <= HEALTHZ_BOUND,
            "/healthz took {worst:?} during the flood (bound {HEALTHZ_BOUND:?})"
        );
        ensure!(
            gap <= FLOOD_GAP,
            "the laptop's ping went {gap:.2} s without a reply during the flood (bound {FLOOD_GAP} s)\n{}",
            gw.diagnostics()
        );

        // Revocation: the ping runs until the device is deleted, and must stop within 2 s of it.
        probe.wait_reply_after(probe.now(), Duration::from_secs(5))?;
        let asked = probe.now();
        gw.coordinator
            .admin("DELETE", &format!("/api/v1/nodes/{}", gw.device.id), None)?;
        let deleted = probe.now();
        thread::sleep(Duration::from_secs_f64(REVOKE_BOUND) + Duration::from_secs(3));
        let replies = probe.replies();
        let last = replies
            .iter()
            .copied()
            .filter(|&t| t >= asked - 1.0)
            .fold(f64::NAN, f64::max);
        ensure!(
            last.is_finite(),
            "no ping reply in the second before the DELETE: nothing to stop"
        );
        let stopped_after = (last - deleted).max(0.0);
        eprintln!(
            "DELETE took {:.0} ms; the last reply came {stopped_after:.2} s after it answered",
            (deleted - asked) * 1e3
        );
        let margin = PING_INTERVAL.as_secs_f64();
        ensure!(
            stopped_after <= REVOKE_BOUND + margin,
            "the deleted device's pings were answered for {stopped_after:.2} s after the DELETE (bound \
             {REVOKE_BOUND} s + {margin} s ping interval)\n{}",
            gw.diagnostics()
        );
        Ok(())
    });
}

/// The scenario's tools checked without the gateway: a capture in one namespace sees a flood from another (every
/// kind of datagram, the replayed one byte for byte) and the pcap reader reads what this tcpdump writes.
#[test]
fn harness_capture_sees_every_kind_of_flood_datagram() {
    meshd_lab::lab::harness_scenario("gateway-harness-flood", &["tcpdump"], |lab| {
        let target = lab.add_host("target")?;
        let attacker = lab.add_host("attacker")?;
        let port = GATEWAY_PORT.to_string();
        let capture = Capture::start(lab, &target, "target", &["udp", "dst", "port", &port])?;
        let replay: Vec<u8> = (0..148u8).map(|b| b.wrapping_mul(7) | 1).collect();
        let destination = SocketAddrV4::new(target.underlay, GATEWAY_PORT);
        let flood = Flood::start(
            lab,
            &attacker,
            Path::new(TOOL),
            destination,
            Duration::from_secs(1),
            2_000,
            Some(&replay),
        )?;
        let summary = flood.wait_done(Duration::from_secs(15))?;
        thread::sleep(Duration::from_millis(300));
        let datagrams = capture::udp_datagrams(&capture.stop()?)?;
        let seen: Vec<&[u8]> = datagrams
            .iter()
            .filter(|d| d.destination == destination)
            .map(|d| d.payload.as_slice())
            .collect();
        eprintln!("flood: {summary}; captured {} datagrams to {destination}", seen.len());
        ensure!(
            seen.len() >= 1_000,
            "the capture holds {} datagrams of a 2,000-datagram flood",
            seen.len()
        );
        let has = |what: &str, test: &dyn Fn(&[u8]) -> bool| -> Result<()> {
            ensure!(seen.iter().any(|d| test(d)), "no {what} in the capture");
            Ok(())
        };
        has("replayed initiation", &|d| d == replay.as_slice())?;
        has("random initiation", &|d| {
            d.len() == 148 && d[0] == 1 && d != replay.as_slice()
        })?;
        has("data message", &|d| d[0] == 4 && d.len() >= 32)?;
        has("cookie reply", &|d| d.len() == 64 && d[0] == 3)?;
        has("garbage type", &|d| d[0] == 0 || d[0] >= 5)?;
        Ok(())
    });
}

/// Scenario c's instruments checked without the gateway: the HTTP server and client it uses work in the lab, and
/// a capture does show a marker sent in plaintext (so the scenario's "not in the capture" can mean something).
#[test]
fn harness_capture_shows_a_plaintext_marker() {
    meshd_lab::lab::harness_scenario("gateway-harness-plaintext", &["tcpdump", "python3"], |lab| {
        let server = lab.add_host("server")?;
        let client = lab.add_host("client")?;
        let capture = Capture::start(lab, &server, "server", &[])?;
        let marker = format!("meshd-harness-marker-{}", random_hex(16));
        let www = lab.subdir("www")?;
        fs::write(www.join("marker.txt"), &marker).context("writing the marker")?;
        let python = meshd_lab::env::tool_path("python3");
        let (ip, dir) = (server.underlay.to_string(), www.to_string_lossy().into_owned());
        let _http = lab.spawn(
            &server,
            "http-server",
            &python.to_string_lossy(),
            &["-m", "http.server", "--bind", &ip, "--directory", &dir, "8080"],
            &[],
        )?;
        let url = format!("http://{ip}:8080/marker.txt");
        wait::until(
            "the client to fetch the marker",
            Duration::from_secs(20),
            Duration::from_millis(200),
            || {
                let out = client.run(
                    "curl",
                    &["-sS", "--noproxy", "*", "-m", "5", &url],
                    Duration::from_secs(10),
                )?;
                Ok((out.success() && out.stdout.trim() == marker).then_some(()))
            },
        )?;
        let pcap = capture.stop()?;
        ensure!(
            capture::contains(&pcap, marker.as_bytes()),
            "a marker served in plaintext is not in the server's capture ({} bytes)",
            pcap.len()
        );
        Ok(())
    });
}

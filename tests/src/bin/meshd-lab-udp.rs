//! `meshd-lab-udp`: a tiny reflector and prober the NAT lab runs inside its namespaces to check its own topology
//! (which mapped address a NAT gives, whether a filter passes UDP or TCP), without the binaries under test.
//!
//! - `serve ADDR...`: on each ADDR, answers every UDP datagram and every TCP connection with the sender's
//!   address as seen here (`ip:port`), like a STUN server. Runs until killed.
//! - `probe [--tcp] --bind ADDR --timeout-ms N TARGET...`: from ONE socket bound to ADDR (UDP), or one
//!   connection per target (TCP; `--bind` is ignored), asks each TARGET and prints `TARGET OBSERVED` or
//!   `TARGET timeout`. Exit 0 if every target answered, 1 otherwise.
//! - `flood --target ADDR --duration-ms N --rate PPS [--replay-hex HEX]`: sends WireGuard-shaped garbage to ADDR
//!   (`meshd_lab::gateway::flood_datagram`) at about PPS datagrams per second for N ms (at most 2 minutes), then
//!   prints `sent COUNT datagrams in S s`.
//! - `dns-upstream ADDR IP`: a fake upstream resolver on ADDR (`meshd_lab::fakedns`): every A query is answered
//!   with IP. Runs until killed.
//!
//! It only talks to the addresses it is given, and only the lab's ranges (198.18.0.0/15) are accepted; the fake
//! resolver may also bind loopback (inside a namespace, where the lab's `resolv.conf` points).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

fn lab_address(addr: &SocketAddr) -> Result<()> {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => Ok(()),
        IpAddr::V4(ip) if matches!(ip.octets(), [198, 18 | 19, ..]) => Ok(()),
        _ => bail!("refusing {addr}: not a lab address (198.18.0.0/15)"),
    }
}

fn parse_addr(text: &str) -> Result<SocketAddr> {
    let addr: SocketAddr = text.parse().with_context(|| format!("bad address {text:?}"))?;
    lab_address(&addr)?;
    Ok(addr)
}

fn serve(addrs: &[SocketAddr]) -> Result<()> {
    let mut workers = Vec::new();
    for &addr in addrs {
        let udp = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
        let tcp = TcpListener::bind(addr).with_context(|| format!("binding TCP {addr}"))?;
        println!("serving {addr}");
        workers.push(thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((_, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(from.to_string().as_bytes(), from);
            }
        }));
        workers.push(thread::spawn(move || {
            for mut stream in tcp.incoming().flatten() {
                if let Ok(peer) = stream.peer_addr() {
                    let _ = stream.write_all(peer.to_string().as_bytes());
                }
            }
        }));
    }
    for worker in workers {
        let _ = worker.join();
    }
    Ok(())
}

fn probe_udp(bind: SocketAddr, targets: &[SocketAddr], timeout: Duration) -> Result<Vec<Option<String>>> {
    let socket = UdpSocket::bind(bind).with_context(|| format!("binding UDP {bind}"))?;
    let mut answers: Vec<Option<String>> = vec![None; targets.len()];
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    // Resend every 200 ms until each target answered (a lossy path may eat one datagram).
    while Instant::now() < deadline && answers.iter().any(Option::is_none) {
        for (target, answer) in targets.iter().zip(&answers) {
            if answer.is_none() {
                socket
                    .send_to(b"probe", target)
                    .with_context(|| format!("sending to {target}"))?;
            }
        }
        let round_end = (Instant::now() + Duration::from_millis(200)).min(deadline);
        while let Some(left) = round_end
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            socket.set_read_timeout(Some(left)).context("setting a read timeout")?;
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Some(i) = targets.iter().position(|t| *t == from) {
                        answers[i] = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
                    }
                }
                Err(_) => break,
            }
        }
    }
    Ok(answers)
}

fn probe_tcp(target: SocketAddr, timeout: Duration) -> Option<String> {
    let socket = TcpStream::connect_timeout(&target, timeout).ok()?;
    read_all(socket, timeout)
}

fn read_all(mut stream: TcpStream, timeout: Duration) -> Option<String> {
    stream.set_read_timeout(Some(timeout)).ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

/// Longest flood accepted: every process of the lab is bounded in time.
const MAX_FLOOD: Duration = Duration::from_secs(120);

fn flood(target: SocketAddr, duration: Duration, rate: u32, replay: Option<&[u8]>) -> Result<()> {
    if duration > MAX_FLOOD {
        bail!("a flood lasts at most {MAX_FLOOD:?}");
    }
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("binding the flood socket")?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id());
    let mut rng = meshd_lab::gateway::XorShift::new(seed);
    let started = Instant::now();
    let mut sent: u64 = 0;
    // Paced per millisecond: the count due by now is sent, then a short sleep.
    while started.elapsed() < duration {
        let due = (started.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        while sent < due {
            let datagram = meshd_lab::gateway::flood_datagram(sent, &mut rng, replay);
            // The target may answer with ICMP errors (port closed): they are no reason to stop.
            let _ = socket.send_to(&datagram, target);
            sent += 1;
        }
        thread::sleep(Duration::from_millis(1));
    }
    println!(
        "sent {sent} datagrams in {:.1} s to {target}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn dns_upstream(bind: SocketAddr, address: Ipv4Addr) -> Result<()> {
    let socket = UdpSocket::bind(bind).with_context(|| format!("binding UDP {bind}"))?;
    println!("serving DNS on {bind}");
    let mut buf = [0u8; 1500];
    while let Ok((len, from)) = socket.recv_from(&mut buf) {
        if let Some(reply) = meshd_lab::fakedns::answer(&buf[..len], address) {
            let _ = socket.send_to(&reply, from);
        }
    }
    Ok(())
}

fn run(args: &[String]) -> Result<bool> {
    let Some(command) = args.first() else {
        bail!(
            "usage: meshd-lab-udp serve ADDR... | probe [--tcp] --bind ADDR --timeout-ms N TARGET... | flood \
             --target ADDR --duration-ms N --rate PPS [--replay-hex HEX] | dns-upstream ADDR IP"
        );
    };
    match command.as_str() {
        "serve" => {
            let addrs = args[1..].iter().map(|a| parse_addr(a)).collect::<Result<Vec<_>>>()?;
            serve(&addrs)?;
            Ok(true)
        }
        "probe" => {
            let mut tcp = false;
            let mut bind = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
            let mut timeout = Duration::from_secs(2);
            let mut targets = Vec::new();
            let mut rest = args[1..].iter();
            while let Some(arg) = rest.next() {
                match arg.as_str() {
                    "--tcp" => tcp = true,
                    "--bind" => bind = parse_addr(rest.next().context("--bind needs an address")?)?,
                    "--timeout-ms" => {
                        let ms: u64 = rest.next().context("--timeout-ms needs a value")?.parse()?;
                        timeout = Duration::from_millis(ms);
                    }
                    target => targets.push(parse_addr(target)?),
                }
            }
            let answers = if tcp {
                targets.iter().map(|t| probe_tcp(*t, timeout)).collect()
            } else {
                probe_udp(bind, &targets, timeout)?
            };
            for (target, answer) in targets.iter().zip(&answers) {
                println!("{target} {}", answer.as_deref().unwrap_or("timeout"));
            }
            Ok(answers.iter().all(Option::is_some))
        }
        "flood" => {
            let (mut target, mut duration, mut rate, mut replay) = (None, None, None, None);
            let mut rest = args[1..].iter();
            while let Some(arg) = rest.next() {
                let mut value = || rest.next().with_context(|| format!("{arg} needs a value"));
                match arg.as_str() {
                    "--target" => target = Some(parse_addr(value()?)?),
                    "--duration-ms" => duration = Some(Duration::from_millis(value()?.parse()?)),
                    "--rate" => rate = Some(value()?.parse()?),
                    "--replay-hex" => replay = Some(hex::decode(value()?).context("--replay-hex")?),
                    other => bail!("unknown flood option {other:?}"),
                }
            }
            flood(
                target.context("--target is required")?,
                duration.context("--duration-ms is required")?,
                rate.context("--rate is required")?,
                replay.as_deref(),
            )?;
            Ok(true)
        }
        "dns-upstream" => {
            let [bind, address] = &args[1..] else {
                bail!("usage: meshd-lab-udp dns-upstream ADDR IP");
            };
            let bind: SocketAddr = bind.parse().with_context(|| format!("bad address {bind:?}"))?;
            if !bind.ip().is_loopback() {
                lab_address(&bind)?;
            }
            let address: Ipv4Addr = address.parse().with_context(|| format!("bad IP {address:?}"))?;
            dns_upstream(bind, address)?;
            Ok(true)
        }
        other => bail!("unknown command {other:?}"),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("meshd-lab-udp: {e:#}");
            ExitCode::from(2)
        }
    }
}

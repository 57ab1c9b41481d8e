//! Sends a flood of valid-looking WireGuard handshake initiations (fresh, unknown static keys; correct mac1 for the
//! target) to one address and counts the cookie replies that come back. Used by `engine_netns_test.sh` to check that
//! a flood gets cookie replies while live tunnels keep working. Only for the test namespaces.
//!
//! ```text
//! handshake_flood <TARGET_ADDR:PORT> <TARGET_PUBLIC_KEY> <COUNT> <SECONDS>
//! ```

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use meshd_protocol::PublicKey;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [target, key, count, seconds] = args.as_slice() else {
        bail!("usage: handshake_flood <TARGET_ADDR:PORT> <TARGET_PUBLIC_KEY> <COUNT> <SECONDS>");
    };
    let target: SocketAddr = target.parse().context("target address")?;
    let key: PublicKey = key.parse().context("target public key")?;
    let count: u32 = count.parse().context("count")?;
    let seconds: f64 = seconds.parse().context("seconds")?;
    let peer = x25519::PublicKey::from(*key.as_bytes());

    let socket = UdpSocket::bind("0.0.0.0:0").context("bind")?;
    socket.set_nonblocking(true)?;
    let mut tunn = Tunn::new(x25519::StaticSecret::random(), peer, None, None, 1, None);
    let (mut buf, mut reply) = (vec![0u8; 256], vec![0u8; 256]);
    let (mut sent, mut cookies) = (0u32, 0u32);
    let start = Instant::now();
    let gap = Duration::from_secs_f64(seconds / f64::from(count.max(1)));
    while sent < count && start.elapsed() < Duration::from_secs_f64(seconds * 2.0 + 1.0) {
        if let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut buf, true) {
            socket.send_to(init, target).context("send")?;
            sent += 1;
        }
        let next = start + gap * sent;
        // Drain replies until the next send is due.
        loop {
            match socket.recv_from(&mut reply) {
                Ok((64, _)) if reply[0] == 3 => cookies += 1,
                Ok(_) => {}
                Err(_) => {}
            }
            if Instant::now() >= next {
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    let drain_until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < drain_until {
        match socket.recv_from(&mut reply) {
            Ok((64, _)) if reply[0] == 3 => cookies += 1,
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    println!(
        "sent {sent} initiations in {:.1}s, got {cookies} cookie replies",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

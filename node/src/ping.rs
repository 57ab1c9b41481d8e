//! ICMP echo over the overlay, for `meshd ping`.
//!
//! Owns one raw ICMPv4 socket bound to this node's overlay address, so the kernel routes the echo requests through
//! the mesh TUN like any other overlay traffic (this measures the real path, not a side channel). Blocking IO with a
//! timeout: callers run it on a blocking thread. Needs root (CAP_NET_RAW), which the agent has.

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
/// Payload bytes after the 8-byte ICMP header (56, like ping(8)).
const PAYLOAD_LEN: usize = 56;

/// A raw ICMP socket sending from one overlay address.
#[derive(Debug)]
pub struct Pinger {
    socket: Socket,
    ident: u16,
}

impl Pinger {
    pub fn new(source: Ipv4Addr) -> io::Result<Self> {
        let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).map_err(|e| {
            if e.kind() == io::ErrorKind::PermissionDenied {
                io::Error::new(e.kind(), "opening a raw ICMP socket needs root (CAP_NET_RAW)")
            } else {
                e
            }
        })?;
        socket.bind(&SocketAddr::V4(SocketAddrV4::new(source, 0)).into())?;
        let ident = rand::random::<u16>();
        Ok(Self { socket, ident })
    }

    /// Sends one echo request to `dest` and waits up to `timeout` for its reply. `Ok(None)`: no reply in time.
    pub fn echo(&self, dest: Ipv4Addr, seq: u16, timeout: Duration) -> io::Result<Option<Duration>> {
        let request = echo_request(self.ident, seq);
        let start = Instant::now();
        self.socket
            .send_to(&request, &SocketAddr::V4(SocketAddrV4::new(dest, 0)).into())?;
        let deadline = start + timeout;
        let mut buf = [0u8; 1500];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.socket.set_read_timeout(Some(left))?;
            let n = match (&self.socket).read(&mut buf) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            // A raw socket sees every ICMP packet for this host: keep only our reply from `dest`.
            if is_reply_to(&buf[..n], dest, self.ident, seq) {
                return Ok(Some(start.elapsed()));
            }
        }
    }
}

/// An ICMP echo request with a valid checksum.
fn echo_request(ident: u16, seq: u16) -> Vec<u8> {
    let mut packet = vec![0u8; 8 + PAYLOAD_LEN];
    packet[0] = ICMP_ECHO_REQUEST;
    packet[4..6].copy_from_slice(&ident.to_be_bytes());
    packet[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, byte) in packet[8..].iter_mut().enumerate() {
        *byte = i as u8;
    }
    let checksum = internet_checksum(&packet);
    packet[2..4].copy_from_slice(&checksum.to_be_bytes());
    packet
}

/// RFC 1071 one's complement sum.
fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether `packet` (an IPv4 packet as a raw socket delivers it) is the echo reply to (`ident`, `seq`) from `from`.
fn is_reply_to(packet: &[u8], from: Ipv4Addr, ident: u16, seq: u16) -> bool {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return false;
    }
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    let Some(icmp) = packet.get(header_len..) else {
        return false;
    };
    if icmp.len() < 8 || Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]) != from {
        return false;
    }
    icmp[0] == ICMP_ECHO_REPLY
        && icmp[1] == 0
        && u16::from_be_bytes([icmp[4], icmp[5]]) == ident
        && u16::from_be_bytes([icmp[6], icmp[7]]) == seq
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_checksum_verifies() {
        let packet = echo_request(0x1234, 7);
        assert_eq!(packet.len(), 64);
        assert_eq!(internet_checksum(&packet), 0, "a packet with its checksum sums to zero");
        assert_eq!(&packet[4..8], &[0x12, 0x34, 0, 7]);
    }

    #[test]
    fn recognises_only_the_matching_reply() {
        let from = Ipv4Addr::new(10, 77, 0, 2);
        let mut packet = vec![0u8; 20];
        packet[0] = 0x45;
        packet[12..16].copy_from_slice(&from.octets());
        let mut icmp = echo_request(9, 3);
        icmp[0] = ICMP_ECHO_REPLY;
        packet.extend_from_slice(&icmp);
        assert!(is_reply_to(&packet, from, 9, 3));
        assert!(!is_reply_to(&packet, from, 9, 4), "other sequence");
        assert!(!is_reply_to(&packet, from, 8, 3), "other identifier");
        assert!(!is_reply_to(&packet, Ipv4Addr::new(10, 77, 0, 3), 9, 3), "other source");
        assert!(!is_reply_to(&packet[..22], from, 9, 3), "truncated");
        packet[20] = ICMP_ECHO_REQUEST;
        assert!(!is_reply_to(&packet, from, 9, 3), "our own request");
    }
}

//! Pure per-packet decisions: what a TUN packet is and where it goes, which peer an incoming WireGuard message
//! belongs to.
//!
//! Owns: header parsing that must never panic on hostile input, and the receiver-index / static-key dispatch rules.
//! Does no IO and takes no lock, so it is unit-tested directly; the tasks in `outbound`/`inbound` only act on what it
//! decides.

use std::net::Ipv4Addr;
use std::sync::Arc;

use boringtun::noise::Packet;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::x25519;
use meshd_protocol::PublicKey;

use super::peers::{Peer, PeerTable};

/// WireGuard message types (first byte of a datagram; the next three are zero).
pub(crate) const MSG_HANDSHAKE_INIT: u8 = 1;
pub(crate) const MSG_COOKIE_REPLY: u8 = 3;
pub(crate) const MSG_DATA: u8 = 4;

/// The WireGuard message type of a datagram boringtun produced or accepted (0 if empty).
pub(crate) fn message_type(datagram: &[u8]) -> u8 {
    datagram.first().copied().unwrap_or(0)
}

/// Why a packet read from the TUN device is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TunDrop {
    /// IPv6 (the kernel's own link-local chatter, router solicitations...) or anything not IPv4: the overlay is IPv4.
    NotIpv4,
    /// Too short or inconsistent header.
    Malformed,
}

const IPV4_MIN_HEADER: usize = 20;

/// The destination of an IPv4 packet read from the TUN device, after checking that its header is self-consistent
/// (boringtun's `Tunn::dst_address` checks only the length; we also reject a header length or total length that does
/// not fit, so that a garbage packet is counted here rather than encrypted).
pub(crate) fn tun_destination(packet: &[u8]) -> Result<Ipv4Addr, TunDrop> {
    let first = *packet.first().ok_or(TunDrop::Malformed)?;
    match first >> 4 {
        4 => {}
        6 => return Err(TunDrop::NotIpv4),
        _ => return Err(TunDrop::Malformed),
    }
    if packet.len() < IPV4_MIN_HEADER {
        return Err(TunDrop::Malformed);
    }
    let header_len = usize::from(first & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if header_len < IPV4_MIN_HEADER || total_len < header_len || total_len > packet.len() {
        return Err(TunDrop::Malformed);
    }
    Ok(Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]))
}

/// The local index a receiver index on the wire refers to: boringtun puts our 24-bit peer index in the top bits and a
/// session counter in the low 8 (`(index << 8) | session`).
pub(crate) fn local_index(receiver_idx: u32) -> u32 {
    receiver_idx >> 8
}

/// The peer an incoming (already MAC-checked) message belongs to, without trying every peer:
/// data, handshake responses and cookie replies carry our receiver index; an initiation names its sender only inside
/// the encrypted static key, which `parse_handshake_anon` opens with our private key (one DH, like boringtun's device).
pub(crate) fn peer_for<'t>(
    table: &'t PeerTable,
    packet: &Packet<'_>,
    our_secret: &x25519::StaticSecret,
    our_public: &x25519::PublicKey,
) -> Option<&'t Arc<Peer>> {
    match packet {
        Packet::HandshakeInit(init) => {
            let half = parse_handshake_anon(our_secret, our_public, init).ok()?;
            table.by_key(&PublicKey::from_bytes(half.peer_static_public))
        }
        Packet::HandshakeResponse(p) => table.by_local_index(local_index(p.receiver_idx)),
        Packet::PacketCookieReply(p) => table.by_local_index(local_index(p.receiver_idx)),
        Packet::PacketData(p) => table.by_local_index(local_index(p.receiver_idx)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_packet(dst: [u8; 4], total: u16, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[12..16].copy_from_slice(&[10, 77, 0, 1]);
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn tun_destination_accepts_ipv4() {
        let p = ipv4_packet([10, 77, 0, 2], 84, 84);
        assert_eq!(tun_destination(&p), Ok(Ipv4Addr::new(10, 77, 0, 2)));
    }

    #[test]
    fn tun_destination_rejects_garbage_without_panicking() {
        assert_eq!(tun_destination(&[]), Err(TunDrop::Malformed));
        assert_eq!(tun_destination(&[0x45, 0, 0]), Err(TunDrop::Malformed));
        assert_eq!(tun_destination(&[0x60; 48]), Err(TunDrop::NotIpv4));
        assert_eq!(tun_destination(&[0x00; 40]), Err(TunDrop::Malformed));
        // Total length larger than what was read.
        assert_eq!(
            tun_destination(&ipv4_packet([10, 77, 0, 2], 200, 84)),
            Err(TunDrop::Malformed)
        );
        // Header length below 20.
        let mut p = ipv4_packet([10, 77, 0, 2], 84, 84);
        p[0] = 0x44;
        assert_eq!(tun_destination(&p), Err(TunDrop::Malformed));
        for len in 0..64 {
            let _ = tun_destination(&vec![0x4f; len]);
        }
    }

    #[test]
    fn receiver_index_keeps_the_24_bit_peer_index() {
        assert_eq!(local_index(0xABCD_EF01), 0x00AB_CDEF);
        assert_eq!(local_index(0x0000_0105), 1);
    }
}

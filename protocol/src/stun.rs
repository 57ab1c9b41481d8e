//! STUN (RFC 8489), the binding method only: how a node learns the address and port its NAT maps it to.
//!
//! Owns the byte layout of a binding request and a binding response with XOR-MAPPED-ADDRESS, and the cheap test
//! that tells a STUN message from WireGuard and disco on the shared UDP socket ([`is_stun`]). Pure: no IO, no
//! randomness (the caller makes the [`TransactionId`] bytes), no allocation. Everything that reads bytes off the
//! network checks every bound and returns [`StunError`]; it never panics.
//!
//! Not here: authentication (MESSAGE-INTEGRITY, FINGERPRINT are neither written nor verified: the binding method
//! between a node and its own coordinator needs neither, and a forged answer only costs a wrong candidate that disco
//! then fails to confirm), other methods, TURN.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The fixed value at bytes 4..8 of every RFC 5389/8489 message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the STUN message header.
pub const HEADER_LEN: usize = 20;
/// Longest binding response [`write_binding_response`] writes (header + XOR-MAPPED-ADDRESS of an IPv6 address).
pub const MAX_BINDING_RESPONSE_LEN: usize = HEADER_LEN + 4 + 20;

const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS_RESPONSE: u16 = 0x0101;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const FAMILY_IPV4: u8 = 0x01;
const FAMILY_IPV6: u8 = 0x02;

/// The 96-bit transaction id that pairs a response with its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransactionId(pub [u8; 12]);

/// Why bytes are not the STUN message expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    #[error("shorter than a STUN header ({0} bytes)")]
    TooShort(usize),
    #[error("not a STUN message (first two bits or magic cookie wrong)")]
    NotStun,
    #[error("STUN message type {0:#06x} is not the one expected")]
    UnexpectedType(u16),
    #[error("STUN length field {declared} does not match the {actual} bytes after the header")]
    BadLength { declared: usize, actual: usize },
    #[error("a STUN attribute runs past the end of the message")]
    TruncatedAttribute,
    #[error("malformed (XOR-)MAPPED-ADDRESS attribute")]
    BadAddress,
    #[error("the binding response carries no mapped address")]
    NoMappedAddress,
}

/// True when `packet` looks like a STUN message: at least a header, the top two bits zero, the magic cookie at 4..8.
/// WireGuard messages (first byte 1..4 then three zero bytes) and disco (`MESHD!`) never match.
pub fn is_stun(packet: &[u8]) -> bool {
    packet.len() >= HEADER_LEN && packet[0] & 0xC0 == 0 && packet[4..8] == MAGIC_COOKIE.to_be_bytes()
}

/// A binding request without attributes.
pub fn binding_request(tx: TransactionId) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    write_header(&mut out, BINDING_REQUEST, 0, tx);
    out
}

/// Checks `packet` is a well-formed binding request and returns its transaction id. Attributes are walked with
/// bounds checks and otherwise ignored (a server that answers binding requests needs none of them).
pub fn parse_binding_request(packet: &[u8]) -> Result<TransactionId, StunError> {
    let (tx, attributes) = parse_message(packet, BINDING_REQUEST)?;
    for attribute in Attributes(attributes) {
        attribute?;
    }
    Ok(tx)
}

/// Writes a binding success response carrying `mapped` as XOR-MAPPED-ADDRESS into `out` and returns its length
/// (32 bytes for IPv4, 44 for IPv6). Returns 0 and writes nothing when `out` is shorter than that; a buffer of
/// [`MAX_BINDING_RESPONSE_LEN`] bytes always fits.
pub fn write_binding_response(tx: TransactionId, mapped: SocketAddr, out: &mut [u8]) -> usize {
    // An IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 client) is answered as IPv4, the way the
    // client sees itself.
    let mapped = SocketAddr::new(mapped.ip().to_canonical(), mapped.port());
    let address_len = if mapped.is_ipv4() { 4 } else { 16 };
    let attribute_len = 4 + address_len;
    let total = HEADER_LEN + 4 + attribute_len;
    let Some(out) = out.get_mut(..total) else {
        return 0;
    };
    write_header(out, BINDING_SUCCESS_RESPONSE, 4 + attribute_len as u16, tx);
    let attribute = &mut out[HEADER_LEN..];
    attribute[0..2].copy_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    attribute[2..4].copy_from_slice(&(attribute_len as u16).to_be_bytes());
    let value = &mut attribute[4..];
    value[0] = 0;
    value[1] = if mapped.is_ipv4() { FAMILY_IPV4 } else { FAMILY_IPV6 };
    value[2..4].copy_from_slice(&(mapped.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    let mask = xor_mask(tx);
    match mapped.ip() {
        IpAddr::V4(ip) => {
            for (i, byte) in ip.octets().iter().enumerate() {
                value[4 + i] = byte ^ mask[i];
            }
        }
        IpAddr::V6(ip) => {
            for (i, byte) in ip.octets().iter().enumerate() {
                value[4 + i] = byte ^ mask[i];
            }
        }
    }
    total
}

/// Parses a binding success response: its transaction id and the mapped address. XOR-MAPPED-ADDRESS is preferred;
/// the classic MAPPED-ADDRESS (RFC 3489 servers) is accepted when it is the only one.
pub fn parse_binding_response(packet: &[u8]) -> Result<(TransactionId, SocketAddr), StunError> {
    let (tx, attributes) = parse_message(packet, BINDING_SUCCESS_RESPONSE)?;
    let mut plain = None;
    for attribute in Attributes(attributes) {
        let (kind, value) = attribute?;
        match kind {
            ATTR_XOR_MAPPED_ADDRESS => return Ok((tx, decode_address(value, Some(tx))?)),
            ATTR_MAPPED_ADDRESS if plain.is_none() => plain = Some(decode_address(value, None)?),
            _ => {}
        }
    }
    plain.map(|addr| (tx, addr)).ok_or(StunError::NoMappedAddress)
}

fn write_header(out: &mut [u8], message_type: u16, length: u16, tx: TransactionId) {
    out[0..2].copy_from_slice(&message_type.to_be_bytes());
    out[2..4].copy_from_slice(&length.to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out[8..20].copy_from_slice(&tx.0);
}

/// Checks the header of a message of type `expected` and returns its transaction id and attribute bytes.
fn parse_message(packet: &[u8], expected: u16) -> Result<(TransactionId, &[u8]), StunError> {
    if packet.len() < HEADER_LEN {
        return Err(StunError::TooShort(packet.len()));
    }
    if !is_stun(packet) {
        return Err(StunError::NotStun);
    }
    let message_type = u16::from_be_bytes([packet[0], packet[1]]);
    if message_type != expected {
        return Err(StunError::UnexpectedType(message_type));
    }
    let declared = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let actual = packet.len() - HEADER_LEN;
    if declared != actual || declared % 4 != 0 {
        return Err(StunError::BadLength { declared, actual });
    }
    let mut tx = [0u8; 12];
    tx.copy_from_slice(&packet[8..20]);
    Ok((TransactionId(tx), &packet[HEADER_LEN..]))
}

/// The 16 bytes an address is XORed with: the cookie, then the transaction id (only the first 4 apply to IPv4).
fn xor_mask(tx: TransactionId) -> [u8; 16] {
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    mask[4..].copy_from_slice(&tx.0);
    mask
}

/// Decodes a (XOR-)MAPPED-ADDRESS value; `xor` carries the transaction id for the XOR form.
fn decode_address(value: &[u8], xor: Option<TransactionId>) -> Result<SocketAddr, StunError> {
    if value.len() < 4 {
        return Err(StunError::BadAddress);
    }
    let family = value[1];
    let mut port = u16::from_be_bytes([value[2], value[3]]);
    let mask = xor.map(xor_mask).unwrap_or([0u8; 16]);
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let address = &value[4..];
    let ip = match (family, address.len()) {
        (FAMILY_IPV4, 4) => {
            let mut octets = [0u8; 4];
            for (i, octet) in octets.iter_mut().enumerate() {
                *octet = address[i] ^ mask[i];
            }
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        (FAMILY_IPV6, 16) => {
            let mut octets = [0u8; 16];
            for (i, octet) in octets.iter_mut().enumerate() {
                *octet = address[i] ^ mask[i];
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return Err(StunError::BadAddress),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Iterates over `(type, value)` of the attributes of a message body, each padded to a multiple of 4 bytes.
struct Attributes<'a>(&'a [u8]);

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<(u16, &'a [u8]), StunError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let rest = self.0;
        if rest.len() < 4 {
            self.0 = &[];
            return Some(Err(StunError::TruncatedAttribute));
        }
        let kind = u16::from_be_bytes([rest[0], rest[1]]);
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let padded = len.div_ceil(4) * 4;
        // The last attribute's padding may be missing in the wild; the value itself must be there.
        let (Some(value), next) = (rest.get(4..4 + len), rest.get(4 + padded..).unwrap_or(&[])) else {
            self.0 = &[];
            return Some(Err(StunError::TruncatedAttribute));
        };
        self.0 = next;
        Some(Ok((kind, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RFC5769_TX: [u8; 12] = [0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae];

    /// RFC 5769 2.1 sample request (SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME, MESSAGE-INTEGRITY, FINGERPRINT).
    const RFC5769_REQUEST: [u8; 108] = [
        0x00, 0x01, 0x00, 0x58, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87,
        0xdf, 0xae, 0x80, 0x22, 0x00, 0x10, 0x53, 0x54, 0x55, 0x4e, 0x20, 0x74, 0x65, 0x73, 0x74, 0x20, 0x63, 0x6c,
        0x69, 0x65, 0x6e, 0x74, 0x00, 0x24, 0x00, 0x04, 0x6e, 0x00, 0x01, 0xff, 0x80, 0x29, 0x00, 0x08, 0x93, 0x2f,
        0xf9, 0xb1, 0x51, 0x26, 0x3b, 0x36, 0x00, 0x06, 0x00, 0x09, 0x65, 0x76, 0x74, 0x6a, 0x3a, 0x68, 0x36, 0x76,
        0x59, 0x20, 0x20, 0x20, 0x00, 0x08, 0x00, 0x14, 0x9a, 0xea, 0xa7, 0x0c, 0xbf, 0xd8, 0xcb, 0x56, 0x78, 0x1e,
        0xf2, 0xb5, 0xb2, 0xd3, 0xf2, 0x49, 0xc1, 0xb5, 0x71, 0xa2, 0x80, 0x28, 0x00, 0x04, 0xe5, 0x7a, 0x3b, 0xcf,
    ];

    /// RFC 5769 2.2 sample IPv4 response: 192.0.2.1:32853.
    const RFC5769_RESPONSE_V4: [u8; 80] = [
        0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87,
        0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63, 0x74, 0x6f, 0x72, 0x20,
        0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43, 0x00, 0x08, 0x00, 0x14, 0x2b, 0x91,
        0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3, 0x8c, 0x74, 0x89, 0xf9, 0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7,
        0x80, 0x28, 0x00, 0x04, 0xc0, 0x7d, 0x4c, 0x96,
    ];

    /// RFC 5769 2.3 sample IPv6 response: [2001:db8:1234:5678:11:2233:4455:6677]:32853 (integrity bytes are not
    /// checked by this module).
    const RFC5769_RESPONSE_V6: [u8; 92] = [
        0x01, 0x01, 0x00, 0x48, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87,
        0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63, 0x74, 0x6f, 0x72, 0x20,
        0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01, 0x13, 0xa9, 0xfa, 0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25,
        0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9, 0x00, 0x08, 0x00, 0x14, 0xa3, 0x82, 0x95, 0x4e, 0x4b, 0xe6, 0x7b, 0xf1,
        0x17, 0x84, 0xc9, 0x7c, 0x82, 0x92, 0xc2, 0x75, 0xbf, 0xe3, 0xed, 0x41, 0x80, 0x28, 0x00, 0x04, 0xc8, 0xfb,
        0x0b, 0x4c,
    ];

    #[test]
    fn parses_rfc5769_sample_request() {
        assert!(is_stun(&RFC5769_REQUEST));
        assert_eq!(parse_binding_request(&RFC5769_REQUEST), Ok(TransactionId(RFC5769_TX)));
    }

    #[test]
    fn parses_rfc5769_sample_responses() {
        let (tx, addr) = parse_binding_response(&RFC5769_RESPONSE_V4).expect("valid sample");
        assert_eq!(tx, TransactionId(RFC5769_TX));
        assert_eq!(addr, "192.0.2.1:32853".parse().expect("literal"));
        let (tx, addr) = parse_binding_response(&RFC5769_RESPONSE_V6).expect("valid sample");
        assert_eq!(tx, TransactionId(RFC5769_TX));
        assert_eq!(
            addr,
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse().expect("literal")
        );
    }

    #[test]
    fn writes_the_rfc5769_xor_mapped_address_bytes() {
        let mut out = [0u8; MAX_BINDING_RESPONSE_LEN];
        let n = write_binding_response(
            TransactionId(RFC5769_TX),
            "192.0.2.1:32853".parse().expect("lit"),
            &mut out,
        );
        assert_eq!(n, 32);
        assert_eq!(&out[..8], &[0x01, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42]);
        // The attribute is byte-identical to the one in the RFC sample.
        assert_eq!(&out[20..32], &RFC5769_RESPONSE_V4[36..48]);
        let n = write_binding_response(
            TransactionId(RFC5769_TX),
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse().expect("lit"),
            &mut out,
        );
        assert_eq!(n, 44);
        assert_eq!(&out[20..44], &RFC5769_RESPONSE_V6[36..60]);
    }

    #[test]
    fn answers_a_v4_mapped_v6_client_as_v4_and_refuses_a_short_buffer() {
        let tx = TransactionId([9; 12]);
        let mut out = [0u8; MAX_BINDING_RESPONSE_LEN];
        let n = write_binding_response(tx, "[::ffff:198.18.0.7]:4000".parse().expect("lit"), &mut out);
        assert_eq!(n, 32);
        assert_eq!(
            parse_binding_response(&out[..n]),
            Ok((tx, "198.18.0.7:4000".parse().expect("lit")))
        );
        let mut short = [0u8; 31];
        assert_eq!(
            write_binding_response(tx, "198.18.0.7:4000".parse().expect("lit"), &mut short),
            0
        );
        assert_eq!(short, [0u8; 31]);
    }

    #[test]
    fn accepts_plain_mapped_address_but_prefers_xor() {
        let tx = TransactionId([1; 12]);
        let mut msg = vec![0x01, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42];
        msg.extend_from_slice(&tx.0);
        msg.extend_from_slice(&[0x00, 0x01, 0x00, 0x08, 0x00, 0x01, 0x1f, 0x90, 198, 18, 0, 1]);
        assert_eq!(
            parse_binding_response(&msg),
            Ok((tx, "198.18.0.1:8080".parse().expect("lit")))
        );
        // Add an XOR-MAPPED-ADDRESS after it: that one wins.
        let mut xor = [0u8; MAX_BINDING_RESPONSE_LEN];
        let n = write_binding_response(tx, "198.18.0.2:9".parse().expect("lit"), &mut xor);
        msg.extend_from_slice(&xor[HEADER_LEN..n]);
        msg[3] = 0x18;
        assert_eq!(
            parse_binding_response(&msg),
            Ok((tx, "198.18.0.2:9".parse().expect("lit")))
        );
    }

    #[test]
    fn rejects_malformed_messages() {
        let tx = TransactionId([3; 12]);
        let request = binding_request(tx);
        assert_eq!(parse_binding_request(&request[..19]), Err(StunError::TooShort(19)));
        let mut bad = request;
        bad[0] = 0x40;
        assert_eq!(parse_binding_request(&bad), Err(StunError::NotStun));
        let mut bad = request;
        bad[5] = 0;
        assert_eq!(parse_binding_request(&bad), Err(StunError::NotStun));
        let mut bad = request;
        bad[1] = 0x11; // an indication
        assert_eq!(parse_binding_request(&bad), Err(StunError::UnexpectedType(0x0011)));
        assert_eq!(parse_binding_response(&request), Err(StunError::UnexpectedType(0x0001)));
        let mut long = request.to_vec();
        long.extend_from_slice(&[0; 4]);
        assert_eq!(
            parse_binding_request(&long),
            Err(StunError::BadLength { declared: 0, actual: 4 })
        );
        // Length 4 with an attribute header announcing 8 bytes of value.
        long[3] = 4;
        long[22..24].copy_from_slice(&8u16.to_be_bytes());
        assert_eq!(parse_binding_request(&long), Err(StunError::TruncatedAttribute));
        // A response with no address attribute.
        let mut empty = request;
        empty[1] = 0x01;
        empty[0] = 0x01;
        assert_eq!(parse_binding_response(&empty), Err(StunError::NoMappedAddress));
        // WireGuard handshake initiation and a disco datagram are not STUN.
        let mut wireguard = [0u8; 148];
        wireguard[0] = 1;
        assert!(!is_stun(&wireguard));
        assert!(!is_stun(b"MESHD!aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"));
    }

    fn socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| {
                let ip = Ipv6Addr::from(ip);
                SocketAddr::new(IpAddr::V6(ip).to_canonical(), port)
            }),
        ]
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = is_stun(&bytes);
            let _ = parse_binding_request(&bytes);
            let _ = parse_binding_response(&bytes);
        }

        #[test]
        fn parsers_never_panic_on_stun_shaped_input(
            body in proptest::collection::vec(any::<u8>(), 0..120),
            response in any::<bool>(),
            tx in any::<[u8; 12]>(),
        ) {
            // Valid header with the right length, arbitrary attributes: reaches the attribute walker.
            let mut msg = vec![0x00, 0x01];
            if response { msg[0] = 0x01; msg[1] = 0x01; }
            msg.extend_from_slice(&(body.len() as u16).to_be_bytes());
            msg.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
            msg.extend_from_slice(&tx);
            msg.extend_from_slice(&body);
            prop_assert!(is_stun(&msg));
            let _ = parse_binding_request(&msg);
            let _ = parse_binding_response(&msg);
        }

        #[test]
        fn request_round_trips(tx in any::<[u8; 12]>()) {
            let request = binding_request(TransactionId(tx));
            prop_assert!(is_stun(&request));
            prop_assert_eq!(parse_binding_request(&request), Ok(TransactionId(tx)));
        }

        #[test]
        fn response_round_trips(tx in any::<[u8; 12]>(), mapped in socket_addr()) {
            let mut out = [0u8; MAX_BINDING_RESPONSE_LEN];
            let n = write_binding_response(TransactionId(tx), mapped, &mut out);
            prop_assert!(n > 0);
            prop_assert!(is_stun(&out[..n]));
            prop_assert_eq!(parse_binding_response(&out[..n]), Ok((TransactionId(tx), mapped)));
        }
    }
}

//! WireGuard messages as seen from outside the tunnel: the type and the session indexes a forwarder needs, nothing
//! encrypted. Used by the coordinator's gateway for stock devices, which routes ciphertext it cannot read.
//!
//! Every message starts with a little-endian `u32` type (1 initiation, 2 response, 3 cookie reply, 4 data) whose
//! three upper bytes are zero. Initiations and responses carry the sender's index; responses, cookie replies and data
//! the receiver's (an index the receiver chose, so it can find the session without trying keys). Handshake messages
//! have fixed lengths; a data message is a 16-byte header plus at least the 16-byte tag (a keepalive is exactly 32).
//! Anything else is refused: a forwarder must never pass on what no WireGuard peer would send. Pure; fuzzed.

/// Length of a handshake initiation.
pub const INITIATION_LEN: usize = 148;
/// Length of a handshake response.
pub const RESPONSE_LEN: usize = 92;
/// Length of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = 64;
/// Shortest data message: header (16) + Poly1305 tag (16), i.e. a keepalive.
pub const MIN_DATA_LEN: usize = 32;

const TYPE_INITIATION: u8 = 1;
const TYPE_RESPONSE: u8 = 2;
const TYPE_COOKIE_REPLY: u8 = 3;
const TYPE_DATA: u8 = 4;

/// The routing-relevant header of one WireGuard message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// Handshake initiation; the responder is only known from its `mac1` (keyed by the responder's public key).
    Initiation { sender: u32 },
    /// Handshake response to the initiation whose sender index was `receiver`.
    Response { sender: u32, receiver: u32 },
    /// Cookie reply to a handshake message whose sender index was `receiver` (the responder is under load).
    CookieReply { receiver: u32 },
    /// Transport data (or a keepalive) for the session `receiver` chose.
    Data { receiver: u32 },
}

impl Message {
    /// The index the *receiver* of this message chose, which is how it is routed (None for an initiation).
    pub fn receiver(&self) -> Option<u32> {
        match *self {
            Message::Initiation { .. } => None,
            Message::Response { receiver, .. } | Message::CookieReply { receiver } | Message::Data { receiver } => {
                Some(receiver)
            }
        }
    }
}

/// Why bytes are not a WireGuard message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("too short for a WireGuard message ({0} bytes)")]
    TooShort(usize),
    #[error("not a WireGuard message type")]
    UnknownType,
    #[error("a WireGuard message of type {message_type} cannot be {len} bytes long")]
    BadLength { message_type: u8, len: usize },
}

fn index_at(datagram: &[u8], offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&datagram[offset..offset + 4]);
    u32::from_le_bytes(bytes)
}

/// Reads the type and indexes of `datagram`, checking its length against its type.
pub fn parse(datagram: &[u8]) -> Result<Message, WireError> {
    if datagram.len() < 4 {
        return Err(WireError::TooShort(datagram.len()));
    }
    if datagram[1..4] != [0, 0, 0] {
        return Err(WireError::UnknownType);
    }
    let message_type = datagram[0];
    let len = datagram.len();
    let expected = match message_type {
        TYPE_INITIATION => len == INITIATION_LEN,
        TYPE_RESPONSE => len == RESPONSE_LEN,
        TYPE_COOKIE_REPLY => len == COOKIE_REPLY_LEN,
        TYPE_DATA => len >= MIN_DATA_LEN,
        _ => return Err(WireError::UnknownType),
    };
    if !expected {
        return Err(WireError::BadLength { message_type, len });
    }
    Ok(match message_type {
        TYPE_INITIATION => Message::Initiation {
            sender: index_at(datagram, 4),
        },
        TYPE_RESPONSE => Message::Response {
            sender: index_at(datagram, 4),
            receiver: index_at(datagram, 8),
        },
        TYPE_COOKIE_REPLY => Message::CookieReply {
            receiver: index_at(datagram, 4),
        },
        _ => Message::Data {
            receiver: index_at(datagram, 4),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message(message_type: u8, len: usize, first: u32, second: u32) -> Vec<u8> {
        let mut bytes = vec![0xAAu8; len];
        bytes[..4].copy_from_slice(&[message_type, 0, 0, 0]);
        bytes[4..8].copy_from_slice(&first.to_le_bytes());
        if len >= 12 {
            bytes[8..12].copy_from_slice(&second.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn reads_each_message_type() {
        assert_eq!(
            parse(&message(1, INITIATION_LEN, 7, 0)),
            Ok(Message::Initiation { sender: 7 })
        );
        assert_eq!(
            parse(&message(2, RESPONSE_LEN, 8, 7)),
            Ok(Message::Response { sender: 8, receiver: 7 })
        );
        assert_eq!(
            parse(&message(3, COOKIE_REPLY_LEN, 7, 0)),
            Ok(Message::CookieReply { receiver: 7 })
        );
        assert_eq!(parse(&message(4, 32, 9, 0)), Ok(Message::Data { receiver: 9 }));
        assert_eq!(parse(&message(4, 1500, 9, 0)), Ok(Message::Data { receiver: 9 }));
        assert_eq!(Message::Data { receiver: 9 }.receiver(), Some(9));
        assert_eq!(Message::Initiation { sender: 1 }.receiver(), None);
    }

    #[test]
    fn refuses_what_no_peer_sends() {
        assert_eq!(parse(&[1, 0, 0]), Err(WireError::TooShort(3)));
        assert_eq!(parse(&message(5, 64, 0, 0)), Err(WireError::UnknownType));
        assert_eq!(parse(&message(0, 64, 0, 0)), Err(WireError::UnknownType));
        let mut reserved = message(4, 64, 0, 0);
        reserved[2] = 1;
        assert_eq!(parse(&reserved), Err(WireError::UnknownType));
        assert_eq!(
            parse(&message(1, INITIATION_LEN + 1, 0, 0)),
            Err(WireError::BadLength {
                message_type: 1,
                len: INITIATION_LEN + 1
            })
        );
        assert!(matches!(parse(&message(2, 91, 0, 0)), Err(WireError::BadLength { .. })));
        assert!(matches!(parse(&message(3, 65, 0, 0)), Err(WireError::BadLength { .. })));
        assert!(matches!(parse(&message(4, 31, 0, 0)), Err(WireError::BadLength { .. })));
        // The disco magic and STUN never parse as WireGuard.
        assert!(parse(b"MESHD!\x01\x00 and more bytes than that....").is_err());
        assert!(parse(&[0, 1, 0, 8, 0x21, 0x12, 0xA4, 0x42]).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_accepted_lengths_match_types(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(message) = parse(&bytes) {
                let expected = match message {
                    Message::Initiation { .. } => bytes.len() == INITIATION_LEN,
                    Message::Response { .. } => bytes.len() == RESPONSE_LEN,
                    Message::CookieReply { .. } => bytes.len() == COOKIE_REPLY_LEN,
                    Message::Data { .. } => bytes.len() >= MIN_DATA_LEN,
                };
                prop_assert!(expected);
                prop_assert_eq!(&bytes[1..4], &[0u8, 0, 0][..]);
            }
        }
    }
}

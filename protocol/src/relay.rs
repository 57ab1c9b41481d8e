//! The relay's frame codec: what flows over `GET /api/v1/relay` after the HTTP upgrade to `meshd-relay`.
//!
//! ```text
//! frame = type 1 B | length 4 B (big endian, payload only, <= MAX_FRAME_PAYLOAD) | payload
//! 0x01 ServerHello  server->client  32 B: the public key the server authenticated
//! 0x02 Send         client->server  dst key 32 B | datagram
//! 0x03 Recv         server->client  src key 32 B | datagram
//! 0x04 PeerGone     server->client  key 32 B: that destination has no connection on this relay
//! 0x05 Ping         either          8 B opaque; answered by a Pong with the same 8 B
//! 0x06 Pong         either          8 B
//! ```
//! Datagrams are WireGuard or disco bytes, opaque to the relay (it holds no key that decrypts them). Unknown frame
//! types decode to [`RelayFrame::Unknown`] so a reader skips them (forward compatible); a length above
//! [`MAX_FRAME_PAYLOAD`] is an error after which the connection must be closed (the stream cannot be resynchronised).
//!
//! Pure: no IO, no runtime. Decoding borrows from the caller's buffer; encoding appends to a `Vec` so a writer can
//! batch many frames into one write. Every decoder checks its bounds and never panics.

use crate::PublicKey;

/// Value of the `Upgrade` header of the relay route (request and `101` answer).
pub const UPGRADE_PROTOCOL: &str = "meshd-relay";
/// Length of a frame header (type + length).
pub const FRAME_HEADER_LEN: usize = 5;
/// Largest payload a frame may carry: a maximum-size UDP datagram plus room for the key and future fields.
pub const MAX_FRAME_PAYLOAD: usize = 65_535 + 64;
/// Length of a public key on the wire.
pub const KEY_LEN: usize = 32;
/// Longest datagram a Send or Recv frame can carry.
pub const MAX_DATAGRAM_LEN: usize = MAX_FRAME_PAYLOAD - KEY_LEN;
/// Length of the opaque Ping/Pong payload.
/// The source key of a `Recv` that the coordinator's device gateway forwards from a stock device it cannot name yet
/// (a handshake initiation hides the initiator's key; the agent finds the peer by decrypting). Not a real key: 32
/// ASCII bytes, so it can never be a registered node's.
pub const GATEWAY_UNKNOWN_DEVICE: PublicKey = PublicKey::from_bytes(*b"meshd gateway: device not known!");

pub const PING_LEN: usize = 8;

/// The frame types this version knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    ServerHello = 0x01,
    Send = 0x02,
    Recv = 0x03,
    PeerGone = 0x04,
    Ping = 0x05,
    Pong = 0x06,
}

impl FrameType {
    /// The known type with this byte, `None` for a type from a later version.
    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0x01 => Self::ServerHello,
            0x02 => Self::Send,
            0x03 => Self::Recv,
            0x04 => Self::PeerGone,
            0x05 => Self::Ping,
            0x06 => Self::Pong,
            _ => return None,
        })
    }
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    #[error("relay frame payload of {0} bytes exceeds the maximum of {MAX_FRAME_PAYLOAD}")]
    TooLong(usize),
    #[error("relay frame of type {frame_type:#04x} has a payload of {len} bytes, which is not valid for it")]
    BadLength { frame_type: u8, len: usize },
    #[error("relay frame carries an invalid public key (all zero)")]
    BadKey,
}

/// The 5-byte header in front of every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Raw type byte (may be a type this version does not know).
    pub frame_type: u8,
    /// Payload length in bytes, at most [`MAX_FRAME_PAYLOAD`].
    pub len: usize,
}

impl FrameHeader {
    /// Parses a header; a length above [`MAX_FRAME_PAYLOAD`] is an error (close the connection).
    pub fn parse(bytes: &[u8; FRAME_HEADER_LEN]) -> Result<Self, RelayError> {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        if len > MAX_FRAME_PAYLOAD {
            return Err(RelayError::TooLong(len));
        }
        Ok(Self {
            frame_type: bytes[0],
            len,
        })
    }
}

/// One decoded frame, borrowing its datagram from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayFrame<'a> {
    /// The key the server authenticated this connection as (the client checks it is its own).
    ServerHello {
        key: PublicKey,
    },
    /// Client asks the server to deliver `datagram` to the connection of `dst`.
    Send {
        dst: PublicKey,
        datagram: &'a [u8],
    },
    /// Server delivers `datagram` that the node `src` sent.
    Recv {
        src: PublicKey,
        datagram: &'a [u8],
    },
    /// `key` has no connection on this relay: what was sent to it was dropped.
    PeerGone {
        key: PublicKey,
    },
    Ping {
        data: [u8; PING_LEN],
    },
    Pong {
        data: [u8; PING_LEN],
    },
    /// A frame type from a later version: skip it.
    Unknown {
        frame_type: u8,
        payload: &'a [u8],
    },
}

impl<'a> RelayFrame<'a> {
    /// Decodes the payload of a frame whose header carried `frame_type`.
    pub fn decode(frame_type: u8, payload: &'a [u8]) -> Result<Self, RelayError> {
        if payload.len() > MAX_FRAME_PAYLOAD {
            return Err(RelayError::TooLong(payload.len()));
        }
        let bad_length = || RelayError::BadLength {
            frame_type,
            len: payload.len(),
        };
        let Some(known) = FrameType::from_byte(frame_type) else {
            return Ok(Self::Unknown { frame_type, payload });
        };
        Ok(match known {
            // A later version may append fields to the hello: only the key is read.
            FrameType::ServerHello => Self::ServerHello {
                key: read_key(payload).ok_or_else(bad_length)??,
            },
            FrameType::PeerGone if payload.len() == KEY_LEN => Self::PeerGone {
                key: read_key(payload).ok_or_else(bad_length)??,
            },
            FrameType::Send => Self::Send {
                dst: read_key(payload).ok_or_else(bad_length)??,
                datagram: &payload[KEY_LEN..],
            },
            FrameType::Recv => Self::Recv {
                src: read_key(payload).ok_or_else(bad_length)??,
                datagram: &payload[KEY_LEN..],
            },
            FrameType::Ping => Self::Ping {
                data: payload.try_into().map_err(|_| bad_length())?,
            },
            FrameType::Pong => Self::Pong {
                data: payload.try_into().map_err(|_| bad_length())?,
            },
            FrameType::PeerGone => return Err(bad_length()),
        })
    }

    /// The type byte of this frame.
    pub fn frame_type(&self) -> u8 {
        match self {
            Self::ServerHello { .. } => FrameType::ServerHello as u8,
            Self::Send { .. } => FrameType::Send as u8,
            Self::Recv { .. } => FrameType::Recv as u8,
            Self::PeerGone { .. } => FrameType::PeerGone as u8,
            Self::Ping { .. } => FrameType::Ping as u8,
            Self::Pong { .. } => FrameType::Pong as u8,
            Self::Unknown { frame_type, .. } => *frame_type,
        }
    }

    /// Payload length of this frame (without the header).
    pub fn payload_len(&self) -> usize {
        match self {
            Self::ServerHello { .. } | Self::PeerGone { .. } => KEY_LEN,
            Self::Send { datagram, .. } | Self::Recv { datagram, .. } => KEY_LEN + datagram.len(),
            Self::Ping { .. } | Self::Pong { .. } => PING_LEN,
            Self::Unknown { payload, .. } => payload.len(),
        }
    }

    /// Appends header + payload to `out`. A datagram longer than [`MAX_DATAGRAM_LEN`] (larger than any UDP
    /// datagram) cannot be framed: nothing is appended and `false` is returned, the way an oversized datagram is
    /// dropped on any other path.
    pub fn encode(&self, out: &mut Vec<u8>) -> bool {
        let len = self.payload_len();
        if len > MAX_FRAME_PAYLOAD {
            return false;
        }
        out.reserve(FRAME_HEADER_LEN + len);
        out.push(self.frame_type());
        out.extend_from_slice(&(len as u32).to_be_bytes());
        match self {
            Self::ServerHello { key } | Self::PeerGone { key } => out.extend_from_slice(key.as_bytes()),
            Self::Send { dst: key, datagram } | Self::Recv { src: key, datagram } => {
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(datagram);
            }
            Self::Ping { data } | Self::Pong { data } => out.extend_from_slice(data),
            Self::Unknown { payload, .. } => out.extend_from_slice(payload),
        }
        true
    }
}

/// A complete frame found at the start of a buffer by [`split_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    /// Raw type byte; decode with [`RelayFrame::decode`].
    pub frame_type: u8,
    pub payload: &'a [u8],
    /// Bytes the whole frame (header + payload) took: advance the buffer by this much.
    pub consumed: usize,
}

impl<'a> RawFrame<'a> {
    pub fn decode(&self) -> Result<RelayFrame<'a>, RelayError> {
        RelayFrame::decode(self.frame_type, self.payload)
    }
}

/// Splits the first complete frame off `buf`: `Ok(None)` when more bytes are needed. Lets a reader decode every
/// complete frame of one read without copying. An error (length above the maximum) means: close the connection.
pub fn split_frame(buf: &[u8]) -> Result<Option<RawFrame<'_>>, RelayError> {
    let Some(header) = buf.first_chunk::<FRAME_HEADER_LEN>() else {
        return Ok(None);
    };
    let header = FrameHeader::parse(header)?;
    let end = FRAME_HEADER_LEN + header.len;
    Ok(buf.get(FRAME_HEADER_LEN..end).map(|payload| RawFrame {
        frame_type: header.frame_type,
        payload,
        consumed: end,
    }))
}

/// The key at the start of `payload`: `None` when too short, `Some(Err)` for the all-zero key.
fn read_key(payload: &[u8]) -> Option<Result<PublicKey, RelayError>> {
    let bytes: [u8; KEY_LEN] = *payload.first_chunk::<KEY_LEN>()?;
    Some(if bytes == [0u8; KEY_LEN] {
        Err(RelayError::BadKey)
    } else {
        Ok(PublicKey::from_bytes(bytes))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(byte: u8) -> PublicKey {
        PublicKey::from_bytes([byte; 32])
    }

    fn round_trip(frame: RelayFrame<'_>) {
        let mut out = Vec::new();
        assert!(frame.encode(&mut out));
        assert_eq!(out.len(), FRAME_HEADER_LEN + frame.payload_len());
        let RawFrame {
            frame_type,
            payload,
            consumed: used,
        } = split_frame(&out).expect("valid").expect("complete");
        assert_eq!(used, out.len());
        assert_eq!(RelayFrame::decode(frame_type, payload), Ok(frame));
    }

    #[test]
    fn every_frame_round_trips() {
        round_trip(RelayFrame::ServerHello { key: key(1) });
        round_trip(RelayFrame::Send {
            dst: key(2),
            datagram: b"wireguard bytes",
        });
        round_trip(RelayFrame::Recv {
            src: key(3),
            datagram: b"",
        });
        round_trip(RelayFrame::PeerGone { key: key(4) });
        round_trip(RelayFrame::Ping { data: *b"12345678" });
        round_trip(RelayFrame::Pong { data: *b"abcdefgh" });
        round_trip(RelayFrame::Unknown {
            frame_type: 0x7f,
            payload: b"later",
        });
    }

    #[test]
    fn header_layout_is_type_then_big_endian_length() {
        let mut out = Vec::new();
        assert!(RelayFrame::Ping { data: [9; 8] }.encode(&mut out));
        assert_eq!(&out[..5], &[0x05, 0, 0, 0, 8]);
        assert_eq!(
            FrameHeader::parse(&[0x02, 0, 1, 0, 0]),
            Ok(FrameHeader {
                frame_type: 2,
                len: 65_536
            })
        );
    }

    #[test]
    fn rejects_bad_frames() {
        assert_eq!(
            FrameHeader::parse(&[0x02, 0, 1, 0, 0x3f]),
            Ok(FrameHeader {
                frame_type: 2,
                len: MAX_FRAME_PAYLOAD
            })
        );
        assert_eq!(
            FrameHeader::parse(&[0x02, 0, 1, 0, 0x40]),
            Err(RelayError::TooLong(MAX_FRAME_PAYLOAD + 1))
        );
        assert_eq!(
            FrameHeader::parse(&[0x02, 0xff, 0xff, 0xff, 0xff]),
            Err(RelayError::TooLong(u32::MAX as usize))
        );
        assert_eq!(
            split_frame(&[0x02, 0xff, 0, 0, 0]),
            Err(RelayError::TooLong(0xff00_0000))
        );
        assert_eq!(
            RelayFrame::decode(0x02, &[1; 31]),
            Err(RelayError::BadLength { frame_type: 2, len: 31 })
        );
        assert_eq!(
            RelayFrame::decode(0x04, &[1; 33]),
            Err(RelayError::BadLength { frame_type: 4, len: 33 })
        );
        assert_eq!(
            RelayFrame::decode(0x05, &[1; 7]),
            Err(RelayError::BadLength { frame_type: 5, len: 7 })
        );
        assert_eq!(RelayFrame::decode(0x03, &[0; 40]), Err(RelayError::BadKey));
        let huge = vec![0u8; MAX_FRAME_PAYLOAD];
        let mut out = Vec::new();
        assert!(
            !RelayFrame::Send {
                dst: key(1),
                datagram: &huge
            }
            .encode(&mut out)
        );
        assert!(out.is_empty());
        assert!(
            RelayFrame::Send {
                dst: key(1),
                datagram: &huge[..MAX_DATAGRAM_LEN]
            }
            .encode(&mut out)
        );
    }

    #[test]
    fn hello_tolerates_appended_fields_and_split_frame_waits_for_more() {
        let mut payload = [7u8; 40].to_vec();
        payload[32..].copy_from_slice(b"newfield");
        assert_eq!(
            RelayFrame::decode(0x01, &payload),
            Ok(RelayFrame::ServerHello { key: key(7) })
        );
        let mut out = Vec::new();
        assert!(
            RelayFrame::Send {
                dst: key(2),
                datagram: b"x"
            }
            .encode(&mut out)
        );
        assert!(RelayFrame::Ping { data: [1; 8] }.encode(&mut out));
        for cut in 0..FRAME_HEADER_LEN + 33 {
            assert_eq!(split_frame(&out[..cut]), Ok(None), "cut at {cut}");
        }
        let used = split_frame(&out).expect("valid").expect("complete").consumed;
        let second = split_frame(&out[used..]).expect("valid").expect("complete");
        assert_eq!(second.decode(), Ok(RelayFrame::Ping { data: [1; 8] }));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(frame_type in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = RelayFrame::decode(frame_type, &payload);
            let mut framed = vec![frame_type];
            framed.extend_from_slice(&payload);
            let _ = split_frame(&framed);
            let _ = split_frame(&payload);
        }

        #[test]
        fn decoded_frames_reencode_to_the_same_bytes(
            frame_type in 1u8..=8,
            payload in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            if let Ok(frame) = RelayFrame::decode(frame_type, &payload) {
                let mut out = Vec::new();
                prop_assert!(frame.encode(&mut out));
                let RawFrame { frame_type: t, payload: p, consumed: used } = split_frame(&out).expect("valid").expect("complete");
                prop_assert_eq!(used, out.len());
                prop_assert_eq!(t, frame_type);
                prop_assert_eq!(RelayFrame::decode(t, p), Ok(frame));
                // Only the hello may drop appended bytes.
                if frame_type != 0x01 {
                    prop_assert_eq!(p, &payload[..]);
                }
            }
        }

        #[test]
        fn datagrams_round_trip(key_bytes in any::<[u8; 32]>(), datagram in proptest::collection::vec(any::<u8>(), 0..1500), send in any::<bool>()) {
            prop_assume!(key_bytes != [0; 32]);
            let peer = PublicKey::from_bytes(key_bytes);
            let frame = if send { RelayFrame::Send { dst: peer, datagram: &datagram } } else { RelayFrame::Recv { src: peer, datagram: &datagram } };
            let mut out = Vec::new();
            assert!(frame.encode(&mut out));
            let RawFrame { frame_type: t, payload: p, .. } = split_frame(&out).expect("valid").expect("complete");
            prop_assert_eq!(RelayFrame::decode(t, p), Ok(frame));
        }
    }
}

//! Disco probes: the small authenticated messages two agents exchange on the WireGuard UDP socket (and over the
//! relay) to find and keep a direct path.
//!
//! Owns: the wire format, sealing and opening. Pure: no IO, no clock, no randomness (the caller supplies nonces and
//! transaction ids). Must not do the X25519 itself per packet: the caller computes the DH once per peer and keeps a
//! [`DiscoKey`].
//!
//! ```text
//! magic   6 B  b"MESHD!"            (0x4D: not WireGuard (byte 0 in 1..4 + three zero bytes), not STUN (top bits 01))
//! sender 32 B  sender's WireGuard public key
//! nonce  24 B  random
//! sealed      XChaCha20-Poly1305(key, nonce, plaintext, aad = magic || sender || recipient), tag 16 B
//! plaintext:  type 1 B | payload
//!   0x01 Ping        tx_id 12 B                       (trailing padding allowed and ignored)
//!   0x02 Pong        tx_id 12 B | observed 18 B       (16 B IPv6 or v4-mapped address + 2 B port, big endian)
//!   0x03 CallMeMaybe n x 18 B endpoints (n <= 16)    (sent over the relay only)
//! key = HKDF-SHA256(salt = b"meshd disco v1", ikm = X25519(my static secret, peer static public), info = b"")
//! ```
//!
//! The key is the same on both sides of a pair; the recipient in the AAD stops a message from being reflected back
//! to its sender, and the static keys stop a third party (or the relay) from forging one.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use sha2::Sha256;

use crate::PublicKey;

/// First bytes of every disco datagram.
pub const MAGIC: [u8; 6] = *b"MESHD!";
/// HKDF salt: names the protocol and its version, so the key is useless for anything else.
const KDF_SALT: &[u8] = b"meshd disco v1";
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// magic + sender + nonce.
pub const HEADER_LEN: usize = MAGIC.len() + KEY_LEN + NONCE_LEN;
/// The smallest datagram that can be disco: a header, a type byte and a tag.
pub const MIN_LEN: usize = HEADER_LEN + 1 + TAG_LEN;
/// The largest disco datagram accepted (a padded ping fits an Ethernet MTU); larger ones are refused unopened.
pub const MAX_LEN: usize = 1500;
const MAX_PLAINTEXT: usize = MAX_LEN - HEADER_LEN - TAG_LEN;
/// Encoded size of one address (16 B IPv6 or IPv4-mapped, 2 B port).
const ADDR_LEN: usize = 18;
/// Most endpoints one CallMeMaybe may carry.
pub const MAX_CALL_ME_MAYBE_ENDPOINTS: usize = 16;
/// The largest message [`DiscoKey::seal_into`] writes (a full CallMeMaybe).
pub const MAX_SEALED_LEN: usize = HEADER_LEN + 1 + MAX_CALL_ME_MAYBE_ENDPOINTS * ADDR_LEN + TAG_LEN;

const TYPE_PING: u8 = 0x01;
const TYPE_PONG: u8 = 0x02;
const TYPE_CALL_ME_MAYBE: u8 = 0x03;
const TX_LEN: usize = 12;

/// A probe's transaction id: a pong names the ping it answers.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TxId(pub [u8; TX_LEN]);

impl fmt::Debug for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tx:")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// One disco message (the plaintext).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoMessage {
    /// "Are you there on this path?"; answered with a [`DiscoMessage::Pong`] to the ping's source.
    Ping { tx: TxId },
    /// Answer to a ping: `observed` is the source address the ping arrived from (like a STUN response).
    Pong { tx: TxId, observed: SocketAddr },
    /// "Ping me at these endpoints now" (sent over the relay so both sides probe within the same second).
    CallMeMaybe { endpoints: Vec<SocketAddr> },
}

/// Why a datagram was not accepted as a disco message. Every variant means "drop it".
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DiscoError {
    #[error("not a disco datagram (no magic, or too short)")]
    NotDisco,
    #[error("disco datagram larger than {MAX_LEN} bytes")]
    TooLarge,
    #[error("disco datagram failed authentication (wrong key, wrong recipient or tampered)")]
    Unauthenticated,
    #[error("unknown disco message type {0:#04x}")]
    UnknownType(u8),
    #[error("malformed disco payload")]
    Malformed,
    #[error("CallMeMaybe with more than {MAX_CALL_ME_MAYBE_ENDPOINTS} endpoints")]
    TooManyEndpoints,
    #[error("output buffer too small for the sealed message")]
    BufferTooSmall,
}

/// True if `datagram` starts like a disco message (magic and minimum length). Cheap: the first check on the socket.
pub fn is_disco(datagram: &[u8]) -> bool {
    datagram.len() >= MIN_LEN && datagram.starts_with(&MAGIC)
}

/// The sender key a disco datagram claims, unauthenticated: it picks the [`DiscoKey`] to open it with.
pub fn peek_sender(datagram: &[u8]) -> Option<PublicKey> {
    if !is_disco(datagram) {
        return None;
    }
    let bytes: [u8; KEY_LEN] = datagram[MAGIC.len()..MAGIC.len() + KEY_LEN]
        .try_into()
        .expect("slice of KEY_LEN bytes");
    Some(PublicKey::from_bytes(bytes))
}

/// The symmetric key of one pair of nodes. Derive once per peer; `Debug` never prints it.
#[derive(Clone)]
pub struct DiscoKey {
    cipher: XChaCha20Poly1305,
}

impl fmt::Debug for DiscoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DiscoKey(..)")
    }
}

impl DiscoKey {
    /// Derives the pair's key from the X25519 shared secret of the two WireGuard static keys.
    pub fn from_shared_secret(shared_secret: [u8; 32]) -> Self {
        let hkdf = Hkdf::<Sha256>::new(Some(KDF_SALT), &shared_secret);
        let mut key = [0u8; KEY_LEN];
        hkdf.expand(&[], &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let cipher = XChaCha20Poly1305::new((&key).into());
        key.fill(0);
        Self { cipher }
    }

    /// Seals `message` from `sender` to `recipient` into `out`; returns the datagram's length. Allocates nothing.
    pub fn seal_into(
        &self,
        message: &DiscoMessage,
        sender: &PublicKey,
        recipient: &PublicKey,
        nonce: [u8; NONCE_LEN],
        out: &mut [u8],
    ) -> Result<usize, DiscoError> {
        let plaintext_len = encoded_len(message)?;
        let total = HEADER_LEN + plaintext_len + TAG_LEN;
        if out.len() < total {
            return Err(DiscoError::BufferTooSmall);
        }
        out[..MAGIC.len()].copy_from_slice(&MAGIC);
        out[MAGIC.len()..MAGIC.len() + KEY_LEN].copy_from_slice(sender.as_bytes());
        out[MAGIC.len() + KEY_LEN..HEADER_LEN].copy_from_slice(&nonce);
        let (header, rest) = out.split_at_mut(HEADER_LEN);
        let (plaintext, tail) = rest.split_at_mut(plaintext_len);
        encode(message, plaintext);
        let aad = aad(sender, recipient);
        let tag = self
            .cipher
            .encrypt_in_place_detached(XNonce::from_slice(&header[MAGIC.len() + KEY_LEN..]), &aad, plaintext)
            .map_err(|_| DiscoError::BufferTooSmall)?;
        tail[..TAG_LEN].copy_from_slice(&tag);
        Ok(total)
    }

    /// [`DiscoKey::seal_into`] into a new `Vec`.
    pub fn seal(
        &self,
        message: &DiscoMessage,
        sender: &PublicKey,
        recipient: &PublicKey,
        nonce: [u8; NONCE_LEN],
    ) -> Vec<u8> {
        let mut out = vec![0u8; MAX_SEALED_LEN];
        let len = self
            .seal_into(message, sender, recipient, nonce, &mut out)
            .expect("MAX_SEALED_LEN fits every message we build; a too-long CallMeMaybe is truncated by the caller");
        out.truncate(len);
        out
    }

    /// Authenticates and decodes a datagram addressed to `expected_recipient` (ourselves). Never panics, whatever
    /// the bytes; allocates only for a CallMeMaybe's endpoint list.
    pub fn open(&self, datagram: &[u8], expected_recipient: &PublicKey) -> Result<DiscoMessage, DiscoError> {
        let sender = peek_sender(datagram).ok_or(DiscoError::NotDisco)?;
        if datagram.len() > MAX_LEN {
            return Err(DiscoError::TooLarge);
        }
        let nonce = XNonce::from_slice(&datagram[MAGIC.len() + KEY_LEN..HEADER_LEN]);
        let sealed = &datagram[HEADER_LEN..];
        let (ciphertext, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let mut plaintext = [0u8; MAX_PLAINTEXT];
        let plaintext = &mut plaintext[..ciphertext.len()];
        plaintext.copy_from_slice(ciphertext);
        self.cipher
            .decrypt_in_place_detached(
                nonce,
                &aad(&sender, expected_recipient),
                plaintext,
                Tag::from_slice(tag),
            )
            .map_err(|_| DiscoError::Unauthenticated)?;
        decode(plaintext)
    }
}

fn aad(sender: &PublicKey, recipient: &PublicKey) -> [u8; MAGIC.len() + 2 * KEY_LEN] {
    let mut aad = [0u8; MAGIC.len() + 2 * KEY_LEN];
    aad[..MAGIC.len()].copy_from_slice(&MAGIC);
    aad[MAGIC.len()..MAGIC.len() + KEY_LEN].copy_from_slice(sender.as_bytes());
    aad[MAGIC.len() + KEY_LEN..].copy_from_slice(recipient.as_bytes());
    aad
}

fn encoded_len(message: &DiscoMessage) -> Result<usize, DiscoError> {
    Ok(1 + match message {
        DiscoMessage::Ping { .. } => TX_LEN,
        DiscoMessage::Pong { .. } => TX_LEN + ADDR_LEN,
        DiscoMessage::CallMeMaybe { endpoints } => {
            if endpoints.len() > MAX_CALL_ME_MAYBE_ENDPOINTS {
                return Err(DiscoError::TooManyEndpoints);
            }
            endpoints.len() * ADDR_LEN
        }
    })
}

/// Writes the plaintext; `out` is exactly [`encoded_len`] bytes.
fn encode(message: &DiscoMessage, out: &mut [u8]) {
    match message {
        DiscoMessage::Ping { tx } => {
            out[0] = TYPE_PING;
            out[1..1 + TX_LEN].copy_from_slice(&tx.0);
        }
        DiscoMessage::Pong { tx, observed } => {
            out[0] = TYPE_PONG;
            out[1..1 + TX_LEN].copy_from_slice(&tx.0);
            encode_addr(*observed, &mut out[1 + TX_LEN..1 + TX_LEN + ADDR_LEN]);
        }
        DiscoMessage::CallMeMaybe { endpoints } => {
            out[0] = TYPE_CALL_ME_MAYBE;
            for (addr, chunk) in endpoints.iter().zip(out[1..].chunks_exact_mut(ADDR_LEN)) {
                encode_addr(*addr, chunk);
            }
        }
    }
}

/// The plaintext decoder, for the fuzz targets (behind authentication it is unreachable with random bytes).
#[cfg(feature = "fuzzing")]
pub fn decode_plaintext(plaintext: &[u8]) -> Result<DiscoMessage, DiscoError> {
    decode(plaintext)
}

fn decode(plaintext: &[u8]) -> Result<DiscoMessage, DiscoError> {
    let (&kind, payload) = plaintext.split_first().ok_or(DiscoError::Malformed)?;
    let tx = || -> Result<TxId, DiscoError> {
        let bytes = payload.get(..TX_LEN).ok_or(DiscoError::Malformed)?;
        Ok(TxId(bytes.try_into().expect("TX_LEN bytes")))
    };
    match kind {
        TYPE_PING => Ok(DiscoMessage::Ping { tx: tx()? }),
        TYPE_PONG => {
            let addr = payload.get(TX_LEN..TX_LEN + ADDR_LEN).ok_or(DiscoError::Malformed)?;
            Ok(DiscoMessage::Pong {
                tx: tx()?,
                observed: decode_addr(addr),
            })
        }
        TYPE_CALL_ME_MAYBE => {
            if payload.len() % ADDR_LEN != 0 {
                return Err(DiscoError::Malformed);
            }
            if payload.len() / ADDR_LEN > MAX_CALL_ME_MAYBE_ENDPOINTS {
                return Err(DiscoError::TooManyEndpoints);
            }
            Ok(DiscoMessage::CallMeMaybe {
                endpoints: payload.chunks_exact(ADDR_LEN).map(decode_addr).collect(),
            })
        }
        other => Err(DiscoError::UnknownType(other)),
    }
}

fn encode_addr(addr: SocketAddr, out: &mut [u8]) {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out[..16].copy_from_slice(&ip.octets());
    out[16..18].copy_from_slice(&addr.port().to_be_bytes());
}

/// Decodes 18 bytes; an IPv4-mapped address comes back as IPv4.
fn decode_addr(bytes: &[u8]) -> SocketAddr {
    let octets: [u8; 16] = bytes[..16].try_into().expect("16 address bytes");
    let ip = Ipv6Addr::from(octets).to_canonical();
    SocketAddr::new(ip, u16::from_be_bytes([bytes[16], bytes[17]]))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key(seed: u8) -> DiscoKey {
        DiscoKey::from_shared_secret([seed; 32])
    }

    fn pk(seed: u8) -> PublicKey {
        PublicKey::from_bytes([seed; 32])
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn messages() -> Vec<DiscoMessage> {
        vec![
            DiscoMessage::Ping { tx: TxId([7; 12]) },
            DiscoMessage::Pong {
                tx: TxId([9; 12]),
                observed: addr("198.18.1.2:51820"),
            },
            DiscoMessage::Pong {
                tx: TxId([1; 12]),
                observed: addr("[2001:db8::5]:4000"),
            },
            DiscoMessage::CallMeMaybe { endpoints: vec![] },
            DiscoMessage::CallMeMaybe {
                endpoints: vec![addr("198.18.0.1:1"), addr("[2001:db8::1]:2"), addr("10.0.0.3:51820")],
            },
        ]
    }

    #[test]
    fn round_trip_every_message() {
        let k = key(1);
        for message in messages() {
            let sealed = k.seal(&message, &pk(1), &pk(2), [3; 24]);
            assert!(is_disco(&sealed));
            assert_eq!(peek_sender(&sealed), Some(pk(1)));
            assert_eq!(k.open(&sealed, &pk(2)), Ok(message));
        }
    }

    #[test]
    fn layout_matches_the_spec() {
        let sealed = key(1).seal(&DiscoMessage::Ping { tx: TxId([7; 12]) }, &pk(1), &pk(2), [3; 24]);
        assert_eq!(&sealed[..6], b"MESHD!");
        assert_eq!(&sealed[6..38], pk(1).as_bytes());
        assert_eq!(&sealed[38..62], &[3; 24]);
        assert_eq!(sealed.len(), 62 + 1 + 12 + 16);
        // Neither WireGuard (type 1..4 then three zeros) nor STUN (top two bits zero).
        assert!(!(1..=4).contains(&sealed[0]));
        assert_ne!(sealed[0] & 0xC0, 0);
    }

    #[test]
    fn both_sides_of_a_pair_derive_the_same_key_from_x25519() {
        use x25519_dalek::{PublicKey as XPublic, StaticSecret};
        let a = StaticSecret::from([1u8; 32]);
        let b = StaticSecret::from([2u8; 32]);
        let (pa, pb) = (XPublic::from(&a), XPublic::from(&b));
        let ka = DiscoKey::from_shared_secret(a.diffie_hellman(&pb).to_bytes());
        let kb = DiscoKey::from_shared_secret(b.diffie_hellman(&pa).to_bytes());
        let (a_key, b_key) = (
            PublicKey::from_bytes(pa.to_bytes()),
            PublicKey::from_bytes(pb.to_bytes()),
        );
        let ping = DiscoMessage::Ping { tx: TxId([5; 12]) };
        let sealed = ka.seal(&ping, &a_key, &b_key, [8; 24]);
        assert_eq!(kb.open(&sealed, &b_key), Ok(ping));
    }

    #[test]
    fn tampering_wrong_key_and_reflection_are_rejected() {
        let k = key(1);
        let ping = DiscoMessage::Ping { tx: TxId([7; 12]) };
        let sealed = k.seal(&ping, &pk(1), &pk(2), [3; 24]);
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(k.open(&bad, &pk(2)).is_err(), "flipping byte {i} must be detected");
        }
        assert_eq!(key(9).open(&sealed, &pk(2)), Err(DiscoError::Unauthenticated));
        // Reflected back to its sender: the recipient in the AAD does not match.
        assert_eq!(k.open(&sealed, &pk(1)), Err(DiscoError::Unauthenticated));
        // Truncated.
        assert!(k.open(&sealed[..sealed.len() - 1], &pk(2)).is_err());
    }

    #[test]
    fn trailing_padding_on_a_ping_is_ignored_and_malformed_payloads_refused() {
        let k = key(1);
        // A padded ping (path-MTU probes may pad): the padding is ignored.
        assert_eq!(
            decode(&[TYPE_PING, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 0, 0]),
            Ok(DiscoMessage::Ping {
                tx: TxId([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
            })
        );
        assert_eq!(decode(&[TYPE_PING, 1, 2]), Err(DiscoError::Malformed));
        assert_eq!(decode(&[TYPE_PONG; 20]), Err(DiscoError::Malformed));
        assert_eq!(decode(&[TYPE_CALL_ME_MAYBE, 0, 0]), Err(DiscoError::Malformed));
        assert_eq!(decode(&[0x09]), Err(DiscoError::UnknownType(9)));
        assert_eq!(decode(&[]), Err(DiscoError::Malformed));
        let mut many = vec![TYPE_CALL_ME_MAYBE];
        many.extend(std::iter::repeat_n(0u8, 17 * ADDR_LEN));
        assert_eq!(decode(&many), Err(DiscoError::TooManyEndpoints));
        let too_many = DiscoMessage::CallMeMaybe {
            endpoints: vec![addr("198.18.0.1:1"); 17],
        };
        assert_eq!(
            k.seal_into(&too_many, &pk(1), &pk(2), [0; 24], &mut [0u8; 2000]),
            Err(DiscoError::TooManyEndpoints)
        );
        let ping = DiscoMessage::Ping { tx: TxId([0; 12]) };
        assert_eq!(
            k.seal_into(&ping, &pk(1), &pk(2), [0; 24], &mut [0u8; 80]),
            Err(DiscoError::BufferTooSmall)
        );
    }

    #[test]
    fn non_disco_datagrams_are_not_peeked() {
        assert!(!is_disco(b"MESHD!"));
        assert!(!is_disco(&[1, 0, 0, 0, 0, 0, 0]));
        let mut wireguard_like = vec![4u8, 0, 0, 0];
        wireguard_like.resize(148, 0);
        assert_eq!(peek_sender(&wireguard_like), None);
        let mut huge = MAGIC.to_vec();
        huge.resize(MAX_LEN + 1, 0);
        assert_eq!(key(1).open(&huge, &pk(2)), Err(DiscoError::TooLarge));
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| { SocketAddr::new(Ipv6Addr::from(ip).to_canonical(), port) }),
        ]
    }

    fn arb_message() -> impl Strategy<Value = DiscoMessage> {
        prop_oneof![
            any::<[u8; 12]>().prop_map(|tx| DiscoMessage::Ping { tx: TxId(tx) }),
            (any::<[u8; 12]>(), arb_addr()).prop_map(|(tx, observed)| DiscoMessage::Pong { tx: TxId(tx), observed }),
            proptest::collection::vec(arb_addr(), 0..=MAX_CALL_ME_MAYBE_ENDPOINTS)
                .prop_map(|endpoints| DiscoMessage::CallMeMaybe { endpoints }),
        ]
    }

    proptest! {
        #[test]
        fn open_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
            let _ = key(1).open(&bytes, &pk(2));
            let _ = peek_sender(&bytes);
        }

        #[test]
        fn open_never_panics_on_magic_prefixed_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut datagram = MAGIC.to_vec();
            datagram.extend_from_slice(&bytes);
            prop_assert!(key(1).open(&datagram, &pk(2)).is_err());
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn seal_open_round_trip(message in arb_message(), nonce in any::<[u8; 24]>(), seed in any::<u8>()) {
            let k = key(seed);
            let sealed = k.seal(&message, &pk(1), &pk(2), nonce);
            prop_assert_eq!(k.open(&sealed, &pk(2)), Ok(message));
        }

        #[test]
        fn any_single_bit_flip_is_rejected(message in arb_message(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let k = key(3);
            let mut sealed = k.seal(&message, &pk(1), &pk(2), [4; 24]);
            let i = at.index(sealed.len());
            sealed[i] ^= 1 << bit;
            prop_assert!(k.open(&sealed, &pk(2)).is_err());
        }
    }
}

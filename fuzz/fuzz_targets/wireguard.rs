//! WireGuard message headers: the coordinator's gateway reads one from every datagram a stock device (or anyone on
//! the internet) sends to its UDP port, and from every datagram an agent sends a device. Parsing may not panic, what
//! parses has the length its type requires, and the indexes are read from where the type puts them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd_protocol::wireguard::{self, Message};

fn le(data: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
}

fuzz_target!(|data: &[u8]| {
    let Ok(message) = wireguard::parse(data) else {
        return;
    };
    assert_eq!(&data[1..4], &[0, 0, 0]);
    match message {
        Message::Initiation { sender } => {
            assert_eq!(data.len(), wireguard::INITIATION_LEN);
            assert_eq!(sender, le(data, 4));
        }
        Message::Response { sender, receiver } => {
            assert_eq!(data.len(), wireguard::RESPONSE_LEN);
            assert_eq!((sender, receiver), (le(data, 4), le(data, 8)));
        }
        Message::CookieReply { receiver } => {
            assert_eq!(data.len(), wireguard::COOKIE_REPLY_LEN);
            assert_eq!(receiver, le(data, 4));
        }
        Message::Data { receiver } => {
            assert!(data.len() >= wireguard::MIN_DATA_LEN);
            assert_eq!(receiver, le(data, 4));
        }
    }
});

//! Disco: every datagram starting with the magic is opened (header checks, then AEAD), and the plaintext decoder
//! runs on what authenticated. Neither may panic; a decoded message must survive seal -> open unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd_protocol::PublicKey;
use meshd_protocol::disco::{self, DiscoKey};

fuzz_target!(|data: &[u8]| {
    let key = DiscoKey::from_shared_secret([7; 32]);
    let (me, peer) = (PublicKey::from_bytes([1; 32]), PublicKey::from_bytes([2; 32]));
    let _ = disco::peek_sender(data);
    let _ = key.open(data, &me);
    if let Ok(message) = disco::decode_plaintext(data) {
        let mut sealed = [0u8; 2048];
        // Messages too large to seal (a CallMeMaybe over the endpoint limit) are refused, never truncated here.
        if let Ok(len) = key.seal_into(&message, &peer, &me, [3; 24], &mut sealed) {
            assert_eq!(key.open(&sealed[..len], &me), Ok(message.clone()));
            assert!(
                key.open(&sealed[..len], &peer).is_err(),
                "opened for the wrong recipient"
            );
        }
    }
});

//! Relay frames: the coordinator reads a byte stream from every connected node, and nodes read one from the
//! coordinator. Splitting and decoding may not panic, every split stays within the buffer, and a decoded frame
//! re-encodes to a frame that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd_protocol::relay::{RelayFrame, split_frame};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // At most one frame per header-sized step: bounded by the input length.
    while let Ok(Some(raw)) = split_frame(rest) {
        assert!(raw.consumed > 0 && raw.consumed <= rest.len());
        if let Ok(frame) = raw.decode() {
            let mut out = Vec::new();
            if frame.encode(&mut out) {
                let again = split_frame(&out).expect("our frame splits").expect("complete");
                assert_eq!(again.consumed, out.len());
                assert_eq!(RelayFrame::decode(again.frame_type, again.payload), Ok(frame));
            }
        }
        rest = &rest[raw.consumed..];
    }
});

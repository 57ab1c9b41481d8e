//! STUN: the coordinator parses binding requests from anyone on the internet; agents parse responses arriving on
//! their WireGuard socket. Neither parser may panic; a request that parses must round-trip through a response.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use meshd_protocol::stun;

fuzz_target!(|data: &[u8]| {
    let _ = stun::is_stun(data);
    let _ = stun::parse_binding_response(data);
    if let Ok(tx) = stun::parse_binding_request(data) {
        let mapped: SocketAddr = "198.18.0.7:40000".parse().expect("address");
        let mut out = [0u8; 128];
        let len = stun::write_binding_response(tx, mapped, &mut out);
        let (answered, seen) = stun::parse_binding_response(&out[..len]).expect("our own response parses");
        assert_eq!((answered, seen), (tx, mapped));
    }
});

//! DNS: the agent's responder parses queries from any overlay peer (and stock devices). It may not panic, must not
//! answer anything but a query, and its answer is never much larger than the query (no amplifier); what it answers
//! must parse.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshd_protocol::dns::{NameTable, answer};
use meshd_protocol::netmap::fixtures::{map, node};

/// What an answer may add to a query: the question re-encoded (a compression pointer in the query may stand for
/// a whole name, at most 255 bytes), one record (an A, or a PTR to a name of at most 255 bytes) and an OPT.
const MAX_GROWTH: usize = 600;

fn table() -> &'static NameTable {
    static TABLE: OnceLock<NameTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let long = "a-very-long-name-of-sixty-three-characters-for-the-ptr-answers";
        NameTable::from_map(&map(vec![node(2, "gpu-server"), node(3, long)])).expect("dns on")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Some(reply) = answer(Some(table()), data) {
        assert!(reply.len() <= data.len() + MAX_GROWTH, "{} bytes answered to {}", reply.len(), data.len());
        assert!(answer(Some(table()), &reply).is_none(), "a response is never answered");
    }
    let _ = answer(None, data);
});

//! A byte-counting Server-Sent Events reader for the map stream. Small events (deltas) are kept whole for parsing;
//! a `data` line longer than [`SMALL_EVENT`] (a full map: megabytes at 10,000 nodes) is only counted: its bytes and
//! the number of nodes in it (occurrences of `"public_key"`), so thousands of streams can receive full maps without
//! the generator buffering or parsing them.

use memchr::memmem;

/// Longest line kept in memory; longer `data` lines are counted, not stored.
pub const SMALL_EVENT: usize = 16 * 1024;
const NODE_MARKER: &[u8] = b"\"public_key\"";

/// One complete event.
#[derive(Debug, Default)]
pub struct Event {
    /// `id:` (the map version).
    pub id: Option<u64>,
    /// The data of a small event.
    pub data: Option<Vec<u8>>,
    /// For a large event: nodes counted in it (self included).
    pub large_nodes: Option<u64>,
}

#[derive(Debug, Default)]
pub struct Reader {
    line: Vec<u8>,
    /// The current line is a large `data` line being counted.
    large: bool,
    /// Last bytes of the previous chunk of a large line (a marker may straddle chunks).
    carry: Vec<u8>,
    event: Event,
    nodes: u64,
}

impl Reader {
    /// Feeds received bytes; calls `on_event` for every event completed by them.
    pub fn feed(&mut self, mut chunk: &[u8], mut on_event: impl FnMut(Event)) {
        while !chunk.is_empty() {
            match memchr::memchr(b'\n', chunk) {
                Some(i) => {
                    self.push(&chunk[..i]);
                    self.end_line(&mut on_event);
                    chunk = &chunk[i + 1..];
                }
                None => {
                    self.push(chunk);
                    break;
                }
            }
        }
    }

    fn push(&mut self, part: &[u8]) {
        if self.large {
            self.count(part);
            return;
        }
        self.line.extend_from_slice(part);
        if self.line.len() > SMALL_EVENT && self.line.starts_with(b"data:") {
            self.large = true;
            self.nodes = 0;
            self.carry.clear();
            let line = std::mem::take(&mut self.line);
            self.count(&line);
        }
    }

    fn count(&mut self, part: &[u8]) {
        // Markers entirely inside `part`, plus one that straddles the previous chunk and this one.
        self.nodes += memmem::find_iter(part, NODE_MARKER).count() as u64;
        let tail = NODE_MARKER.len() - 1;
        let carried = self.carry.len();
        if carried > 0 {
            self.carry.extend_from_slice(&part[..part.len().min(tail)]);
            // Only matches that start in the carried bytes and end in this part are new.
            self.nodes += memmem::find_iter(&self.carry, NODE_MARKER)
                .filter(|&at| at < carried && at + NODE_MARKER.len() > carried)
                .count() as u64;
            self.carry.truncate(carried);
        }
        // Keep the last `tail` bytes of everything seen so far.
        if part.len() >= tail {
            self.carry.clear();
            self.carry.extend_from_slice(&part[part.len() - tail..]);
        } else {
            self.carry.extend_from_slice(part);
            let excess = self.carry.len().saturating_sub(tail);
            self.carry.drain(..excess);
        }
    }

    fn end_line(&mut self, on_event: &mut impl FnMut(Event)) {
        if self.large {
            self.large = false;
            self.carry.clear();
            self.event.large_nodes = Some(self.nodes);
            return;
        }
        let line = std::mem::take(&mut self.line);
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        if line.is_empty() {
            let event = std::mem::take(&mut self.event);
            if event.data.is_some() || event.large_nodes.is_some() {
                on_event(event);
            }
        } else if let Some(value) = field(line, b"data") {
            self.event.data = Some(value.to_vec());
        } else if let Some(value) = field(line, b"id") {
            self.event.id = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
        }
        // `event:` (always `map`) and `:` comments (keep-alives) need nothing.
        self.line = Vec::new();
    }
}

fn field<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let rest = line.strip_prefix(name)?.strip_prefix(b":")?;
    Some(rest.strip_prefix(b" ").unwrap_or(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(input: &[u8], chunk: usize) -> Vec<Event> {
        let mut reader = Reader::default();
        let mut out = Vec::new();
        for part in input.chunks(chunk) {
            reader.feed(part, |e| out.push(e));
        }
        out
    }

    #[test]
    fn small_and_large_events_across_chunk_boundaries() {
        let mut big = String::from("{\"type\":\"full\",\"map\":{\"peers\":[");
        for i in 0..2000 {
            big.push_str(&format!("{{\"id\":{i},\"public_key\":\"k\"}},"));
        }
        big.push_str("]}}");
        let input = format!(
            ": keep-alive\n\nevent: map\nid: 7\ndata: {big}\n\nevent: map\r\nid: 8\r\ndata: {{\"type\":\"peer_removed\",\"version\":8,\"id\":3}}\r\n\r\n"
        );
        for chunk in [1, 5, 11, 4096, input.len()] {
            let got = events(input.as_bytes(), chunk);
            assert_eq!(got.len(), 2, "chunk {chunk}");
            assert_eq!(got[0].id, Some(7));
            assert_eq!(got[0].large_nodes, Some(2000), "chunk {chunk}");
            assert!(got[0].data.is_none());
            assert_eq!(got[1].id, Some(8));
            assert_eq!(
                got[1].data.as_deref(),
                Some(&br#"{"type":"peer_removed","version":8,"id":3}"#[..])
            );
        }
    }
}

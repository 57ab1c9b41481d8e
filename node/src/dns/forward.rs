//! What the DNS responder does with one datagram: answer it from the mesh's names, forward it to the host's upstream
//! resolvers, or ignore it. Pure: no IO (the sockets are in [`super::resolver`]).
//!
//! Why forward at all: stock WireGuard apps (macOS, Windows, iOS, Android) configured with `DNS = <overlay ip>,
//! mesh.internal` send *every* DNS query of the device to that address, so a responder that refused other names would
//! break the device's internet names. Forwarding is only for sources inside the overlay network: WireGuard peers,
//! authenticated by their keys. Loopback clients are this host, which has its own resolver, and keep getting REFUSED;
//! anyone else gets no answer at all (`meshd_protocol::dns::accepts`). So the responder is never an open resolver.
//!
//! The mesh's own zone (the domain, bare node names, the overlay's reverse names) is always answered here and never
//! leaves the node. Upstreams are the `nameserver` lines of `/etc/resolv.conf` read when the responder starts; with
//! none, names outside the mesh are REFUSED as before (SERVFAIL would tell clients to retry a server that can never
//! answer).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use meshd_protocol::dns::{Lookup, NameTable, accepts, answer};

/// Upstreams used at most, in file order: glibc's resolver reads no more than three `nameserver` lines either.
pub const MAX_UPSTREAMS: usize = 3;

/// What to do with one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send these bytes back to the client: an answer about the mesh, REFUSED, or FORMERR/NOTIMP.
    Answer(Vec<u8>),
    /// Relay the datagram unchanged to the upstream resolvers and their answer unchanged back to the client.
    Forward,
    /// Send nothing: a source that may not ask, or a datagram that is no query.
    Ignore,
}

/// Decides for one datagram `request` from `source`. `forwarding` says whether there are upstreams to forward to.
pub fn decide(table: Option<&NameTable>, source: IpAddr, request: &[u8], forwarding: bool) -> Decision {
    let network = table.and_then(NameTable::network);
    if !accepts(source, network) {
        return Decision::Ignore;
    }
    let from_overlay = match (source, network) {
        (IpAddr::V4(ip), Some(net)) => !ip.is_loopback() && net.contains(&ip),
        _ => false,
    };
    if forwarding
        && from_overlay
        && let Some(table) = table
        && forwardable(table, request)
    {
        return Decision::Forward;
    }
    answer(table, request).map_or(Decision::Ignore, Decision::Answer)
}

/// Whether `request` is a standard query with one question about a name outside the mesh's zone. Responses are never
/// forwarded (two resolvers could loop), nor anything `answer` would reject as malformed.
fn forwardable(table: &NameTable, request: &[u8]) -> bool {
    let Ok(query) = Message::from_vec(request) else {
        return false;
    };
    query.metadata.message_type == MessageType::Query
        && query.metadata.op_code == OpCode::Query
        && query.queries.len() == 1
        && !is_ours(table, &query.queries[0].name().to_ascii())
}

/// Whether a query name belongs to the zone this responder is authoritative for: the mesh domain, a node's bare
/// name, or a reverse name under the overlay network's reverse zone.
fn is_ours(table: &NameTable, name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let name = name.strip_suffix('.').unwrap_or(&name);
    if name == "in-addr.arpa" || name.ends_with(".in-addr.arpa") {
        let Some(network) = table.network() else {
            return false;
        };
        if let Some(ip) = reverse_address(name) {
            return network.contains(&ip);
        }
        // Not one address (a zone, or a malformed name): ours when under the zone that covers the overlay
        // (`77.10.in-addr.arpa` for 10.77.0.0/16), so nothing about the overlay is ever asked upstream.
        let octets = network.network().octets();
        let whole = usize::from(network.prefix_len() / 8);
        let zone = octets[..whole]
            .iter()
            .rev()
            .map(|o| format!("{o}."))
            .chain(std::iter::once("in-addr.arpa".to_string()))
            .collect::<String>();
        return name == zone || name.ends_with(&format!(".{zone}"));
    }
    table.lookup(name) != Lookup::NotOurs
}

/// `d.c.b.a.in-addr.arpa` as the address a.b.c.d; `None` unless exactly four decimal octets.
fn reverse_address(name: &str) -> Option<Ipv4Addr> {
    let labels: Vec<&str> = name.strip_suffix(".in-addr.arpa")?.split('.').collect();
    if labels.len() != 4 {
        return None;
    }
    let mut octets = [0u8; 4];
    for (slot, label) in octets.iter_mut().rev().zip(labels) {
        if label.is_empty() || label.len() > 3 || !label.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *slot = label.parse().ok()?;
    }
    Some(Ipv4Addr::from(octets))
}

/// A SERVFAIL answer to `request` (same ID and question): what a client gets when no upstream answered, or when too
/// many forwards are in flight. `None` for a datagram that is no query.
pub fn servfail(request: &[u8]) -> Option<Vec<u8>> {
    let query = Message::from_vec(request).ok()?;
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.response_code = ResponseCode::ServFail;
    for question in &query.queries {
        response.add_query(question.clone());
    }
    if query.edns.is_some() {
        response.set_edns(Edns::new());
    }
    response.to_vec().ok()
}

/// The upstream resolvers named by `resolv_conf` (the text of `/etc/resolv.conf`), port 53, in file order, at most
/// [`MAX_UPSTREAMS`]. Left out: `own` (this node's responder: forwarding to ourselves would loop), unspecified
/// addresses, duplicates, and IPv6 addresses with a zone (`fe80::1%eth0`: not a plain address).
pub fn upstreams(resolv_conf: &str, own: Ipv4Addr) -> Vec<SocketAddr> {
    let mut found = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        let address = SocketAddr::new(ip, 53);
        if ip == IpAddr::V4(own) || ip.is_unspecified() || found.contains(&address) {
            continue;
        }
        found.push(address);
        if found.len() == MAX_UPSTREAMS {
            break;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::{Name, RecordType};
    use meshd_protocol::netmap::fixtures::{map, node};

    fn table() -> NameTable {
        NameTable::from_map(&map(vec![node(2, "gpu-server")])).expect("dns on")
    }

    fn query(name: &str) -> Vec<u8> {
        let mut q = Message::new(4242, MessageType::Query, OpCode::Query);
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).expect("name"), RecordType::A));
        q.to_vec().expect("encode")
    }

    fn code(decision: Decision) -> ResponseCode {
        match decision {
            Decision::Answer(bytes) => Message::from_vec(&bytes).expect("decode").metadata.response_code,
            other => panic!("expected a local answer, got {other:?}"),
        }
    }

    const PEER: &str = "10.77.0.2";

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn overlay_clients_get_other_names_forwarded() {
        let t = table();
        for name in [
            "example.com.",
            "gpu-server.example.com.",
            "internal.",
            "xmesh.internal.",
            "nope.", // a bare label that is no node is someone else's
            "1.1.168.192.in-addr.arpa.",
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.",
        ] {
            assert_eq!(
                decide(Some(&t), ip(PEER), &query(name), true),
                Decision::Forward,
                "{name}"
            );
        }
    }

    #[test]
    fn the_mesh_zone_is_always_answered_here() {
        let t = table();
        for (name, expected) in [
            ("gpu-server.mesh.internal.", ResponseCode::NoError),
            ("GPU-Server.Mesh.Internal.", ResponseCode::NoError),
            ("gpu-server.", ResponseCode::NoError),
            ("nope.mesh.internal.", ResponseCode::NXDomain),
            ("mesh.internal.", ResponseCode::NXDomain),
            ("2.0.77.10.in-addr.arpa.", ResponseCode::NoError),
            ("99.0.77.10.in-addr.arpa.", ResponseCode::NXDomain),
            ("x.0.77.10.in-addr.arpa.", ResponseCode::Refused),
            ("0.77.10.in-addr.arpa.", ResponseCode::Refused),
            ("77.10.in-addr.arpa.", ResponseCode::Refused),
        ] {
            assert_eq!(code(decide(Some(&t), ip(PEER), &query(name), true)), expected, "{name}");
        }
    }

    #[test]
    fn loopback_and_hosts_without_upstreams_get_refused_outsiders_nothing() {
        let t = table();
        let outside = query("example.com.");
        for source in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(
                code(decide(Some(&t), ip(source), &outside, true)),
                ResponseCode::Refused,
                "loopback {source} is this host: it has its own resolver"
            );
        }
        assert_eq!(
            code(decide(Some(&t), ip(PEER), &outside, false)),
            ResponseCode::Refused,
            "no upstreams: REFUSED, not SERVFAIL"
        );
        for source in ["198.18.0.5", "10.78.0.1", "192.168.1.10", "2001:db8::1", "0.0.0.0"] {
            assert_eq!(
                decide(Some(&t), ip(source), &outside, true),
                Decision::Ignore,
                "{source}"
            );
        }
        // Without a table (names off, no map yet) there is no overlay, so nobody is forwarded to.
        assert_eq!(decide(None, ip(PEER), &outside, true), Decision::Ignore);
        assert_eq!(
            code(decide(None, ip("127.0.0.1"), &outside, true)),
            ResponseCode::Refused
        );
    }

    #[test]
    fn only_well_formed_queries_are_forwarded() {
        let t = table();
        assert_eq!(decide(Some(&t), ip(PEER), b"", true), Decision::Ignore);
        assert_eq!(decide(Some(&t), ip(PEER), &[0xff; 40], true), Decision::Ignore);
        let mut response = Message::response(7, OpCode::Query);
        response.add_query(Query::query(
            Name::from_ascii("example.com.").expect("name"),
            RecordType::A,
        ));
        let response = response.to_vec().expect("encode");
        assert_eq!(
            decide(Some(&t), ip(PEER), &response, true),
            Decision::Ignore,
            "a response is never forwarded nor answered"
        );
        let mut update = Message::new(1, MessageType::Query, OpCode::Update);
        update.add_query(Query::query(
            Name::from_ascii("example.com.").expect("name"),
            RecordType::SOA,
        ));
        assert_eq!(
            code(decide(Some(&t), ip(PEER), &update.to_vec().expect("encode"), true)),
            ResponseCode::NotImp
        );
        let mut two = Message::new(2, MessageType::Query, OpCode::Query);
        for name in ["example.com.", "example.org."] {
            two.add_query(Query::query(Name::from_ascii(name).expect("name"), RecordType::A));
        }
        assert_eq!(
            code(decide(Some(&t), ip(PEER), &two.to_vec().expect("encode"), true)),
            ResponseCode::FormErr
        );
    }

    #[test]
    fn servfail_keeps_the_id_and_question() {
        let reply = servfail(&query("example.com.")).expect("a query");
        let reply = Message::from_vec(&reply).expect("decode");
        assert_eq!(reply.metadata.id, 4242);
        assert_eq!(reply.metadata.message_type, MessageType::Response);
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(reply.queries[0].name().to_ascii(), "example.com.");
        assert!(servfail(b"junk").is_none());
    }

    #[test]
    fn upstreams_come_from_nameserver_lines() {
        let own = Ipv4Addr::new(10, 77, 0, 1);
        let conf = "# generated\nsearch mesh.internal example.com\nnameserver 10.77.0.1\n\
                    nameserver 192.0.2.53 # office\n  nameserver   2001:db8::53\nnameserver fe80::1%eth0\n\
                    nameserver 0.0.0.0\nnameserver 192.0.2.53\nnameserver bogus\noptions edns0\n\
                    nameserver 198.51.100.1\nnameserver 198.51.100.2\n";
        let expected: Vec<SocketAddr> = ["192.0.2.53:53", "[2001:db8::53]:53", "198.51.100.1:53"]
            .iter()
            .map(|a| a.parse().expect("addr"))
            .collect();
        assert_eq!(upstreams(conf, own), expected);
        assert!(
            upstreams("nameserver 10.77.0.1\n", own).is_empty(),
            "only ourselves: none"
        );
        assert!(upstreams("", own).is_empty());
        assert_eq!(
            upstreams("nameserver 127.0.0.53\n", own),
            ["127.0.0.53:53".parse::<SocketAddr>().expect("addr")],
            "systemd-resolved's stub is the host's resolver: a fine upstream"
        );
    }
}

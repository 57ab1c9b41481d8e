//! Mesh names as DNS: the name table built from a network map, and the answer to a DNS query about it. Pure: no IO.
//!
//! The node agent's responder (on its overlay address) answers with [`answer`]; a responder of the coordinator's
//! would answer the same way. Every consumer of names (responder, hosts-file block, `meshd ping NAME`) reads them
//! from one [`NameTable`], so they agree. Only names that pass [`crate::names::validate`] enter the table, whatever
//! the map says: names end up in files other programs read, and an agent does not trust even its coordinator to
//! keep them harmless.
//!
//! The responder is authoritative for one zone only, the network's domain (`gpu-server.mesh.internal`, and a bare
//! `gpu-server` for stock devices without a search domain), plus the reverse names of the overlay network (PTR).
//! `answer` itself never recurses: any other name is REFUSED (the agent forwards such queries, from overlay clients
//! only, to its host's resolvers; see the agent's `dns::forward`), so it is no open resolver. Answers carry at
//! most one record more than the query, so it is no amplifier. Messages are parsed and built by `hickory-proto`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use crate::NetworkMap;
use crate::names;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use ipnet::Ipv4Net;

/// Names and addresses of every node in the map (this node included), in one DNS domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameTable {
    domain: String,
    network: Option<Ipv4Net>,
    /// Sorted by name, so renderings (the hosts block) are stable.
    by_name: BTreeMap<String, Ipv4Addr>,
    by_ip: HashMap<Ipv4Addr, String>,
    /// Names of the map that failed [`names::validate`] and were left out.
    rejected: usize,
}

/// What a query name stands for in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A node's address.
    Node(Ipv4Addr),
    /// A name in our domain that no node has (NXDOMAIN).
    Unknown,
    /// Not ours: outside the domain (a resolver that answers it would be an open resolver; we refuse).
    NotOurs,
}

impl NameTable {
    /// The table for `map`, or `None` when the map carries no DNS settings (a coordinator without names).
    pub fn from_map(map: &NetworkMap) -> Option<Self> {
        let domain = map.dns.as_ref()?.domain.to_ascii_lowercase();
        if names::normalize_domain(&domain).as_deref() != Ok(domain.as_str()) {
            return None;
        }
        let mut table = Self {
            domain,
            network: Some(map.network),
            ..Self::default()
        };
        for node in std::iter::once(&map.self_node).chain(&map.peers) {
            if names::validate(&node.name).is_err() {
                table.rejected += 1;
                continue;
            }
            // Names are unique in the network; if a map ever held one twice, the first (self, then by id) wins.
            if table.by_name.contains_key(&node.name) {
                continue;
            }
            table.by_name.insert(node.name.clone(), node.ip);
            table.by_ip.insert(node.ip, node.name.clone());
        }
        Some(table)
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The overlay network (the reverse zone the resolver answers for).
    pub fn network(&self) -> Option<Ipv4Net> {
        self.network
    }

    /// How many of the map's names were invalid and left out (a coordinator that should have refused them).
    pub fn rejected(&self) -> usize {
        self.rejected
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// `(name, address)` sorted by name.
    pub fn entries(&self) -> impl Iterator<Item = (&str, Ipv4Addr)> {
        self.by_name.iter().map(|(name, ip)| (name.as_str(), *ip))
    }

    /// The fully qualified name of a node name.
    pub fn fqdn(&self, name: &str) -> String {
        names::fqdn(name, &self.domain)
    }

    /// Looks up a name as typed or queried: `gpu-server`, `gpu-server.mesh.internal` or with a trailing dot, in any
    /// case. A bare label is looked up as a node name too (stock devices without a search domain type it), but a
    /// bare label that is no node is not ours: other single-label names belong to whoever else resolves them.
    pub fn lookup(&self, query: &str) -> Lookup {
        let query = query.strip_suffix('.').unwrap_or(query).to_ascii_lowercase();
        let label = if query == self.domain {
            // The domain itself (the zone apex) exists but is no node.
            return Lookup::Unknown;
        } else if let Some(label) = query
            .strip_suffix(self.domain.as_str())
            .and_then(|rest| rest.strip_suffix('.'))
        {
            label
        } else if !query.contains('.') {
            return self
                .by_name
                .get(query.as_str())
                .map_or(Lookup::NotOurs, |ip| Lookup::Node(*ip));
        } else {
            return Lookup::NotOurs;
        };
        match self.by_name.get(label) {
            Some(ip) => Lookup::Node(*ip),
            None => Lookup::Unknown,
        }
    }

    /// The node name of an overlay address.
    pub fn name_of(&self, ip: Ipv4Addr) -> Option<&str> {
        self.by_ip.get(&ip).map(String::as_str)
    }
}

/// Seconds an answer may be cached. Short, because a rename or a deletion must stop resolving everywhere within
/// about two seconds (systemd-resolved's cache is also flushed on every change).
pub const ANSWER_TTL: u32 = 1;
/// Whether a query from `source` gets an answer: only the overlay network and loopback may ask.
pub fn accepts(source: IpAddr, network: Option<Ipv4Net>) -> bool {
    match source {
        IpAddr::V4(ip) => ip.is_loopback() || network.is_some_and(|net| net.contains(&ip)),
        IpAddr::V6(ip) => ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// The response to the DNS message `request`, or `None` when it deserves none (not a parseable query, or itself a
/// response: answering responses lets two resolvers loop).
pub fn answer(table: Option<&NameTable>, request: &[u8]) -> Option<Vec<u8>> {
    let query = Message::from_vec(request).ok()?;
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = false;
    if query.edns.is_some() {
        response.set_edns(Edns::new());
    }
    let code = if query.metadata.op_code != OpCode::Query {
        ResponseCode::NotImp
    } else if query.queries.len() != 1 {
        ResponseCode::FormErr
    } else {
        let question = &query.queries[0];
        response.add_query(question.clone());
        match table {
            None => ResponseCode::Refused,
            Some(_) if question.query_class() != DNSClass::IN => ResponseCode::Refused,
            Some(table) => resolve(table, question.name(), question.query_type(), &mut response),
        }
    };
    response.metadata.response_code = code;
    response.to_vec().ok()
}

/// Fills in the answer for one question; returns the response code.
fn resolve(table: &NameTable, name: &Name, kind: RecordType, response: &mut Message) -> ResponseCode {
    let text = name.to_ascii().to_ascii_lowercase();
    let text = text.strip_suffix('.').unwrap_or(&text);
    if let Some(reversed) = text.strip_suffix(".in-addr.arpa") {
        let Some(ip) = parse_reverse(reversed) else {
            return ResponseCode::Refused;
        };
        if !table.network().is_some_and(|net| net.contains(&ip)) {
            return ResponseCode::Refused;
        }
        response.metadata.authoritative = true;
        let Some(node) = table.name_of(ip) else {
            return ResponseCode::NXDomain;
        };
        if matches!(kind, RecordType::PTR | RecordType::ANY) {
            let Ok(target) = Name::from_ascii(format!("{}.", table.fqdn(node))) else {
                return ResponseCode::ServFail;
            };
            response.add_answer(Record::from_rdata(name.clone(), ANSWER_TTL, RData::PTR(PTR(target))));
        }
        return ResponseCode::NoError;
    }
    match table.lookup(text) {
        Lookup::NotOurs => ResponseCode::Refused,
        Lookup::Unknown => {
            response.metadata.authoritative = true;
            ResponseCode::NXDomain
        }
        Lookup::Node(ip) => {
            response.metadata.authoritative = true;
            // AAAA and other types get an empty answer (the name exists, the overlay is IPv4 only): NODATA, so
            // clients asking for A and AAAA at once do not treat the name as missing.
            if matches!(kind, RecordType::A | RecordType::ANY) {
                response.add_answer(Record::from_rdata(name.clone(), ANSWER_TTL, RData::A(A(ip))));
            }
            ResponseCode::NoError
        }
    }
}

/// `d.c.b.a` (the labels before `.in-addr.arpa`) as the address a.b.c.d; `None` unless exactly four octets.
fn parse_reverse(reversed: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut labels = reversed.split('.');
    for slot in octets.iter_mut().rev() {
        let label = labels.next()?;
        if label.is_empty() || label.len() > 3 || !label.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *slot = label.parse().ok()?;
    }
    labels.next().is_none().then_some(Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DnsConfig;
    use crate::netmap::fixtures::{map, node};
    use hickory_proto::op::Query;

    #[test]
    fn resolves_bare_and_qualified_names_in_any_case() {
        let table = NameTable::from_map(&map(vec![node(2, "gpu-server")])).expect("dns on");
        let gpu = Lookup::Node(Ipv4Addr::new(10, 77, 0, 2));
        for query in [
            "gpu-server",
            "GPU-Server",
            "gpu-server.mesh.internal",
            "gpu-server.mesh.internal.",
        ] {
            assert_eq!(table.lookup(query), gpu, "{query}");
        }
        assert_eq!(
            table.lookup("laptop"),
            Lookup::Node(Ipv4Addr::new(10, 77, 0, 1)),
            "self too"
        );
        assert_eq!(table.lookup("nope.mesh.internal"), Lookup::Unknown);
        assert_eq!(
            table.lookup("nope"),
            Lookup::NotOurs,
            "an unknown bare label is someone else's"
        );
        assert_eq!(table.lookup("mesh.internal"), Lookup::Unknown);
        assert_eq!(table.lookup("a.b.mesh.internal"), Lookup::Unknown);
        assert_eq!(table.lookup("gpu-server.example.com"), Lookup::NotOurs);
        assert_eq!(table.lookup("xmesh.internal"), Lookup::NotOurs);
        assert_eq!(table.name_of(Ipv4Addr::new(10, 77, 0, 2)), Some("gpu-server"));
        assert_eq!(table.fqdn("gpu-server"), "gpu-server.mesh.internal");
        assert_eq!(
            table.entries().map(|(n, _)| n).collect::<Vec<_>>(),
            ["gpu-server", "laptop"]
        );
    }

    #[test]
    fn hostile_names_never_enter_the_table() {
        let hostile = ["localhost", "a b", "../x", "10.77.0.9", "x\n10.0.0.1 bank", "ünï", ""];
        let peers = hostile
            .iter()
            .enumerate()
            .map(|(i, name)| node(i as i64 + 2, name))
            .collect();
        let table = NameTable::from_map(&map(peers)).expect("dns on");
        assert_eq!(table.len(), 1, "only the valid self name: {table:?}");
        let mut no_dns = map(vec![]);
        no_dns.dns = None;
        assert!(NameTable::from_map(&no_dns).is_none());
        no_dns.dns = Some(DnsConfig {
            domain: "evil\nhost".into(),
        });
        assert!(NameTable::from_map(&no_dns).is_none());
    }

    fn table() -> NameTable {
        NameTable::from_map(&map(vec![node(2, "gpu-server")])).expect("dns on")
    }

    fn ask(table: Option<&NameTable>, name: &str, kind: RecordType) -> Message {
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(Name::from_ascii(name).expect("name"), kind));
        let reply = answer(table, &query.to_vec().expect("encode")).expect("an answer");
        let reply = Message::from_vec(&reply).expect("decode");
        assert_eq!(reply.metadata.id, query.metadata.id);
        assert!(!reply.metadata.recursion_available, "never a recursive resolver");
        reply
    }

    fn addresses(reply: &Message) -> Vec<Ipv4Addr> {
        reply
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn answers_names_of_the_mesh() {
        let t = table();
        let gpu = Ipv4Addr::new(10, 77, 0, 2);
        for name in ["gpu-server.mesh.internal.", "GPU-SERVER.mesh.internal", "gpu-server"] {
            let reply = ask(Some(&t), name, RecordType::A);
            assert_eq!(reply.metadata.response_code, ResponseCode::NoError, "{name}");
            assert!(reply.metadata.authoritative);
            assert_eq!(addresses(&reply), [gpu], "{name}");
            assert_eq!(reply.answers[0].ttl, ANSWER_TTL);
        }
        let aaaa = ask(Some(&t), "gpu-server.mesh.internal.", RecordType::AAAA);
        assert_eq!(
            aaaa.metadata.response_code,
            ResponseCode::NoError,
            "NODATA, not NXDOMAIN"
        );
        assert!(aaaa.answers.is_empty());
        let missing = ask(Some(&t), "gone.mesh.internal.", RecordType::A);
        assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn answers_reverse_lookups_of_the_overlay() {
        let t = table();
        let reply = ask(Some(&t), "2.0.77.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        match &reply.answers[0].data {
            RData::PTR(ptr) => assert_eq!(ptr.0.to_ascii(), "gpu-server.mesh.internal."),
            other => panic!("not a PTR: {other:?}"),
        }
        let unknown = ask(Some(&t), "99.0.77.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(unknown.metadata.response_code, ResponseCode::NXDomain);
        for outside in [
            "1.1.168.192.in-addr.arpa.",
            "77.10.in-addr.arpa.",
            "x.0.77.10.in-addr.arpa.",
        ] {
            let reply = ask(Some(&t), outside, RecordType::PTR);
            assert_eq!(reply.metadata.response_code, ResponseCode::Refused, "{outside}");
        }
    }

    #[test]
    fn refuses_everything_else_and_never_answers_garbage() {
        let t = table();
        for name in ["example.com.", "gpu-server.example.com.", "internal."] {
            let reply = ask(Some(&t), name, RecordType::A);
            assert_eq!(reply.metadata.response_code, ResponseCode::Refused, "{name}");
            assert!(reply.answers.is_empty());
        }
        let off = ask(None, "gpu-server.mesh.internal.", RecordType::A);
        assert_eq!(off.metadata.response_code, ResponseCode::Refused, "names off: refuse");
        assert!(answer(Some(&t), b"").is_none());
        assert!(answer(Some(&t), &[0xff; 40]).is_none());
        // A response is never answered (two resolvers must not loop).
        let mut response = Message::response(7, OpCode::Query);
        response.add_query(Query::query(
            Name::from_ascii("gpu-server.").expect("name"),
            RecordType::A,
        ));
        assert!(answer(Some(&t), &response.to_vec().expect("encode")).is_none());
    }

    #[test]
    fn only_the_overlay_and_loopback_may_ask() {
        let net: Ipv4Net = "10.77.0.0/16".parse().expect("cidr");
        assert!(accepts("10.77.3.4".parse().expect("ip"), Some(net)));
        assert!(accepts("127.0.0.1".parse().expect("ip"), Some(net)));
        assert!(accepts("::1".parse().expect("ip"), Some(net)));
        assert!(!accepts("10.78.0.1".parse().expect("ip"), Some(net)));
        assert!(!accepts("198.18.0.5".parse().expect("ip"), Some(net)));
        assert!(!accepts("2001:db8::1".parse().expect("ip"), Some(net)));
        assert!(!accepts("10.77.3.4".parse().expect("ip"), None));
    }

    #[test]
    fn reverse_names_parse_strictly() {
        assert_eq!(parse_reverse("4.3.2.1"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        for bad in ["3.2.1", "5.4.3.2.1", "256.1.1.1", "a.1.1.1", "", "1..1.1", "0001.1.1.1"] {
            assert_eq!(parse_reverse(bad), None, "{bad}");
        }
    }
}

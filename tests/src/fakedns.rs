//! A fake upstream DNS server for the agents' forwarding: `meshd-lab-udp dns-upstream ADDR IP` answers every A
//! query with one record, IP, and every other query with an empty NOERROR answer. It stands in for the ISP's
//! resolver in a namespace's `resolv.conf` (the lab's is `nameserver 127.0.0.1`), so a scenario can see that a
//! query went through an agent's responder to its upstream and back, without any packet leaving the lab.
//!
//! [`answer`] is pure; the binary only binds and loops.

use std::net::Ipv4Addr;

/// TTL of the fake answers (seconds).
const TTL: u32 = 60;

/// The answer to the DNS query `query`: the same ID, question and RD flag, RA set, one A record `address` for an
/// A question; `None` for anything that is no query with exactly one question (EDNS records are dropped).
pub fn answer(query: &[u8], address: Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || query[4..6] != [0, 1] {
        return None;
    }
    // The question name: labels up to the root label (queries carry no compression pointers).
    let mut at = 12;
    loop {
        let len = usize::from(*query.get(at)?);
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        at += 1 + len;
    }
    let question_end = at + 1 + 4;
    let question = query.get(12..question_end)?;
    let is_a = question[question.len() - 4..question.len() - 2] == [0, 1];
    let mut out = Vec::with_capacity(question_end + 16);
    out.extend_from_slice(&query[..2]);
    // QR, the query's opcode and RD; RA; NOERROR.
    out.push(0x80 | (query[2] & 0x79));
    out.push(0x80);
    out.extend_from_slice(&[0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
    out.extend_from_slice(question);
    if is_a {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&[0, 4]);
        out.extend_from_slice(&address.octets());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `example.com. IN <qtype>` with ID 0x1234 and RD.
    fn query(qtype: u8) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x07example\x03com\x00");
        q.extend_from_slice(&[0, qtype, 0, 1]);
        q
    }

    #[test]
    fn answers_a_queries_with_the_address_and_others_empty() {
        let ip = Ipv4Addr::new(198, 18, 250, 1);
        let a = answer(&query(1), ip).expect("an answer");
        assert_eq!(&a[..2], [0x12, 0x34], "same ID");
        assert_eq!(a[2], 0x81, "response, RD kept");
        assert_eq!(a[3], 0x80, "RA, NOERROR");
        assert_eq!(&a[6..8], [0, 1], "one answer");
        assert_eq!(&a[a.len() - 4..], ip.octets());
        let aaaa = answer(&query(28), ip).expect("an answer");
        assert_eq!(&aaaa[6..8], [0, 0], "no record for AAAA");
        assert_eq!(aaaa.len(), query(28).len());
    }

    #[test]
    fn ignores_what_is_no_single_question_query() {
        let ip = Ipv4Addr::new(198, 18, 250, 1);
        assert!(answer(b"short", ip).is_none());
        let mut response = query(1);
        response[2] |= 0x80;
        assert!(answer(&response, ip).is_none(), "a response is never answered");
        let mut two = query(1);
        two[5] = 2;
        assert!(answer(&two, ip).is_none());
        let cut = &query(1)[..20];
        assert!(answer(cut, ip).is_none());
    }
}

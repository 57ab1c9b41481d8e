//! Overlay address allocation: pure functions, no IO (the store calls them inside its write transaction).
//!
//! Policy: a node gets the lowest free address of the network. The network address and the broadcast address are
//! never handed out, and neither is the first host address (`10.77.0.1` in the default network): it is reserved for an
//! in-mesh service (DNS, the coordinator itself) so that adding one later never renumbers a node. An address is stable
//! for the lifetime of its node; after a node is deleted its address may be given to a later node (lowest free first).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Smallest network we accept: network + reserved + one node + broadcast.
pub const MAX_PREFIX_LEN: u8 = 30;

/// Why a network cannot be used as the overlay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    #[error("network {0} is too small: use a prefix of /{MAX_PREFIX_LEN} or shorter, e.g. 10.77.0.0/16")]
    TooSmall(Ipv4Net),
    #[error("{0} has host bits set: did you mean {1}?")]
    HostBits(Ipv4Net, Ipv4Net),
}

/// Checks that `net` can serve as the overlay network.
pub fn validate_network(net: Ipv4Net) -> Result<(), NetworkError> {
    if net.prefix_len() > MAX_PREFIX_LEN {
        return Err(NetworkError::TooSmall(net));
    }
    if net.addr() != net.network() {
        return Err(NetworkError::HostBits(net, net.trunc()));
    }
    Ok(())
}

/// The first and last address a node may get.
pub fn assignable_range(net: Ipv4Net) -> (u32, u32) {
    let first = u32::from(net.network()) + 2; // skip the network address and the reserved first host
    let last = u32::from(net.broadcast()) - 1;
    (first, last)
}

/// Lowest assignable address not in `used`, which must be sorted ascending (duplicates and addresses outside the
/// network are ignored). `None` when the network is full.
pub fn lowest_free(net: Ipv4Net, used: impl IntoIterator<Item = u32>) -> Option<Ipv4Addr> {
    let (first, last) = assignable_range(net);
    let mut candidate = first;
    for ip in used {
        if ip < candidate {
            continue;
        }
        if ip > candidate {
            break;
        }
        // ip == candidate: taken, try the next one.
        candidate = candidate.checked_add(1)?;
    }
    (candidate <= last).then(|| Ipv4Addr::from(candidate))
}

/// The answer from two aggregates over the assignable range, when they suffice: with `count` nodes in the range and
/// the highest at `max`, the range is densely packed from the first address iff `max - first + 1 == count`, and the
/// lowest free address is then `max + 1`. `None`: there are gaps (nodes were deleted); search with [`lowest_free`].
/// This keeps a join O(1) in the common case instead of reading every address.
pub fn allocate_dense(net: Ipv4Net, count: u64, max: Option<u32>) -> Option<Option<Ipv4Addr>> {
    let (first, last) = assignable_range(net);
    match max {
        None => Some(Some(Ipv4Addr::from(first))),
        Some(max) if max >= first && u64::from(max - first) + 1 == count => {
            Some((max < last).then(|| Ipv4Addr::from(max + 1)))
        }
        Some(_) => None,
    }
}

/// Whether `ip` may belong to a node of `net` (used when checking stored rows against the configured network).
pub fn is_assignable(net: Ipv4Net, ip: Ipv4Addr) -> bool {
    let (first, last) = assignable_range(net);
    (first..=last).contains(&u32::from(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("cidr")
    }

    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().expect("ip"))
    }

    #[test]
    fn skips_network_reserved_and_broadcast() {
        let n = net("10.77.0.0/16");
        assert_eq!(lowest_free(n, []), Some("10.77.0.2".parse().expect("ip")));
        assert!(!is_assignable(n, "10.77.0.0".parse().expect("ip")));
        assert!(!is_assignable(n, "10.77.0.1".parse().expect("ip")));
        assert!(!is_assignable(n, "10.77.255.255".parse().expect("ip")));
        assert!(is_assignable(n, "10.77.255.254".parse().expect("ip")));
    }

    #[test]
    fn fills_gaps_lowest_first() {
        let n = net("10.77.0.0/16");
        let used = [ip("10.77.0.2"), ip("10.77.0.3"), ip("10.77.0.5")];
        assert_eq!(lowest_free(n, used), Some("10.77.0.4".parse().expect("ip")));
        let used = [ip("10.77.0.1"), ip("10.77.0.2"), ip("10.77.0.2"), ip("10.77.0.3")];
        assert_eq!(lowest_free(n, used), Some("10.77.0.4".parse().expect("ip")));
    }

    #[test]
    fn dense_fast_path_agrees_with_the_search() {
        let n = net("10.77.0.0/16");
        assert_eq!(allocate_dense(n, 0, None), Some(Some("10.77.0.2".parse().expect("ip"))));
        let dense = [ip("10.77.0.2"), ip("10.77.0.3"), ip("10.77.0.4")];
        assert_eq!(allocate_dense(n, 3, Some(ip("10.77.0.4"))), Some(lowest_free(n, dense)));
        // .3 was deleted: a gap, so the fast path declines.
        assert_eq!(allocate_dense(n, 2, Some(ip("10.77.0.4"))), None);
        let small = net("10.0.0.0/30");
        assert_eq!(allocate_dense(small, 1, Some(ip("10.0.0.2"))), Some(None), "full");
    }

    #[test]
    fn reports_full() {
        let n = net("10.0.0.0/30"); // .0 network, .1 reserved, .2 node, .3 broadcast
        assert_eq!(lowest_free(n, []), Some("10.0.0.2".parse().expect("ip")));
        assert_eq!(lowest_free(n, [ip("10.0.0.2")]), None);
    }

    #[test]
    fn validates_networks() {
        assert!(validate_network(net("10.77.0.0/16")).is_ok());
        assert_eq!(
            validate_network(net("10.0.0.0/31")),
            Err(NetworkError::TooSmall(net("10.0.0.0/31")))
        );
        assert!(matches!(
            validate_network(net("10.77.3.0/16")),
            Err(NetworkError::HostBits(..))
        ));
    }
}

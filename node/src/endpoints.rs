//! Discovery of this host's candidate UDP endpoints: its IPv4 interface addresses with the WireGuard listen port,
//! plus the STUN-mapped address ([`merge_endpoints`]).
//!
//! Owns the policy of which local addresses peers should try: every IPv4 address of an interface that is up,
//! except loopback, link-local, the mesh TUN itself and anything inside the overlay network (a peer reaching us
//! through the overlay to carry the overlay would loop). Reads interfaces only; reporting is the daemon's job.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use getifaddrs::{InterfaceFilter, InterfaceFlags};
use ipnet::Ipv4Net;
use meshd_protocol::api::MAX_ENDPOINTS;

/// One IPv4 address of a local interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAddress {
    pub interface: String,
    pub address: Ipv4Addr,
    pub up: bool,
    pub loopback: bool,
}

/// The endpoints to report: sorted, deduplicated, at most [`MAX_ENDPOINTS`].
pub fn candidate_endpoints(
    addresses: &[LocalAddress],
    mesh_interface: &str,
    overlay: Ipv4Net,
    port: u16,
) -> Vec<SocketAddr> {
    let mut endpoints: Vec<SocketAddr> = addresses
        .iter()
        .filter(|a| a.up && !a.loopback && a.interface != mesh_interface)
        .map(|a| a.address)
        .filter(|ip| {
            !ip.is_loopback()
                && !ip.is_link_local()
                && !ip.is_unspecified()
                && !ip.is_multicast()
                && !overlay.contains(ip)
        })
        .map(|ip| SocketAddr::V4(SocketAddrV4::new(ip, port)))
        .collect();
    endpoints.sort();
    endpoints.dedup();
    endpoints.truncate(MAX_ENDPOINTS);
    endpoints
}

/// The endpoint set to report and to hand the data plane: the STUN-mapped address (what peers outside our NAT can
/// reach) first, then the local candidates; deduplicated, at most [`MAX_ENDPOINTS`] (the mapped one always kept).
/// Stable order, so an unchanged set compares equal and is not reported again.
pub fn merge_endpoints(local: &[SocketAddr], mapped: Option<SocketAddr>) -> Vec<SocketAddr> {
    let mut endpoints: Vec<SocketAddr> = mapped.into_iter().collect();
    for endpoint in local {
        if !endpoints.contains(endpoint) {
            endpoints.push(*endpoint);
        }
    }
    endpoints.truncate(MAX_ENDPOINTS);
    endpoints
}

/// This host's IPv4 interface addresses (in the agent's network namespace).
pub fn local_addresses() -> std::io::Result<Vec<LocalAddress>> {
    let interfaces = InterfaceFilter::new().v4().get()?;
    Ok(interfaces
        .filter_map(|iface| {
            let IpAddr::V4(address) = iface.address.ip_addr()? else {
                return None;
            };
            Some(LocalAddress {
                interface: iface.name.clone(),
                address,
                up: iface.flags.contains(InterfaceFlags::UP),
                loopback: iface.flags.contains(InterfaceFlags::LOOPBACK),
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(interface: &str, ip: [u8; 4], up: bool) -> LocalAddress {
        LocalAddress {
            interface: interface.into(),
            address: ip.into(),
            up,
            loopback: interface == "lo",
        }
    }

    #[test]
    fn keeps_only_useful_underlay_addresses() {
        let addresses = [
            addr("lo", [127, 0, 0, 1], true),
            addr("mesh0", [10, 77, 0, 5], true),
            addr("docker0", [10, 77, 3, 1], true), // inside the overlay: would loop
            addr("eth1", [169, 254, 1, 1], true),
            addr("eth2", [198, 18, 7, 2], false),
            addr("eth0", [198, 18, 1, 2], true),
            addr("eth0", [198, 18, 1, 2], true),
            addr("wlan0", [192, 168, 1, 20], true),
        ];
        let got = candidate_endpoints(&addresses, "mesh0", "10.77.0.0/16".parse().expect("cidr"), 51820);
        let want: Vec<SocketAddr> = vec![
            "192.168.1.20:51820".parse().expect("addr"),
            "198.18.1.2:51820".parse().expect("addr"),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn mapped_address_comes_first_and_survives_truncation() {
        let local: Vec<SocketAddr> = (0..20u8).map(|i| SocketAddr::from(([192, 168, 1, i], 51820))).collect();
        let mapped: SocketAddr = "198.18.5.5:40000".parse().expect("addr");
        let merged = merge_endpoints(&local, Some(mapped));
        assert_eq!(merged.len(), MAX_ENDPOINTS);
        assert_eq!(merged[0], mapped);
        assert_eq!(merged[1..], local[..MAX_ENDPOINTS - 1]);
        // A mapped address equal to a local one (no NAT) is listed once.
        let merged = merge_endpoints(&local[..2], Some(local[1]));
        assert_eq!(merged, vec![local[1], local[0]]);
        assert_eq!(merge_endpoints(&local[..2], None), local[..2]);
        assert!(merge_endpoints(&[], None).is_empty());
    }

    #[test]
    fn reads_the_host_interfaces() {
        let addresses = local_addresses().expect("getifaddrs works");
        // Every Linux network namespace has a loopback interface, though it may be down in a fresh one.
        assert!(addresses.iter().all(|a| !a.interface.is_empty()));
    }
}

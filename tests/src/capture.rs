//! Packet captures inside a lab host: `tcpdump -i any -w FILE` as a guard that stops it by PID, and a reader of
//! the pcap file it writes (the UDP datagrams in it, and a plain byte search for "does this appear anywhere").
//!
//! The capture runs in the host's own namespace (`ip netns exec`), so it sees only that host's interfaces; it
//! writes into the lab's directory (`-Z root`: tcpdump would otherwise drop to a user that cannot write there).
//! The reader is pure and understands what tcpdump writes on Linux: classic pcap in either byte order, micro- or
//! nanosecond stamps, link types Linux cooked v1/v2 (`-i any`), Ethernet and raw IP.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::lab::{Host, Lab};
use crate::process::{Process, STOP_GRACE};
use crate::wait;

/// A running `tcpdump`; [`Capture::stop`] (or drop) ends it by PID.
pub struct Capture {
    pub file: PathBuf,
    process: Process,
}

impl Capture {
    /// Starts `tcpdump -i any -n -U --immediate-mode -w <lab dir>/captures/<label>.pcap FILTER...` on `host` and
    /// waits until it listens.
    /// `-U` writes every packet as it comes, so the file is complete once tcpdump has exited.
    pub fn start(lab: &Lab, host: &Host, label: &str, filter: &[&str]) -> Result<Self> {
        let file = lab.subdir("captures")?.join(format!("{label}.pcap"));
        let path = file.to_string_lossy().into_owned();
        // --immediate-mode: without it libpcap hands packets over in blocks (or after a timeout), and a capture
        // stopped soon after the traffic loses what was still in the kernel's ring.
        let mut args = vec!["-i", "any", "-n", "-U", "--immediate-mode", "-Z", "root", "-w", &path];
        args.extend(filter);
        let tcpdump = crate::env::tool_path("tcpdump");
        let mut process = lab.spawn(
            host,
            &format!("tcpdump-{label}"),
            &tcpdump.to_string_lossy(),
            &args,
            &[],
        )?;
        wait::until(
            &format!("tcpdump on {} to listen", host.name),
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                process.ensure_running()?;
                Ok(process.log_text().contains("listening on").then_some(()))
            },
        )?;
        Ok(Self { file, process })
    }

    /// Stops tcpdump (SIGTERM: it finishes the file) and returns the file's bytes.
    pub fn stop(mut self) -> Result<Vec<u8>> {
        self.process.stop(STOP_GRACE);
        fs::read(&self.file).with_context(|| format!("reading the capture {}", self.file.display()))
    }

    /// The bytes written so far (tcpdump keeps running).
    pub fn read_now(&self) -> Result<Vec<u8>> {
        fs::read(&self.file).with_context(|| format!("reading the capture {}", self.file.display()))
    }

    pub fn path(&self) -> &Path {
        &self.file
    }
}

/// One UDP datagram of a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDatagram {
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
    pub payload: Vec<u8>,
}

const LINKTYPE_ETHERNET: u32 = 1;
const LINKTYPE_RAW: u32 = 101;
const LINKTYPE_LINUX_SLL: u32 = 113;
const LINKTYPE_LINUX_SLL2: u32 = 276;

/// The IPv4 UDP datagrams of a pcap file (not fragmented ones' later pieces), in capture order. Packets of other
/// protocols are skipped; a file that is no pcap, or is cut inside a record header, is an error.
pub fn udp_datagrams(pcap: &[u8]) -> Result<Vec<UdpDatagram>> {
    if pcap.len() < 24 {
        bail!("a pcap file has a 24-byte header; this one has {} bytes", pcap.len());
    }
    let magic = [pcap[0], pcap[1], pcap[2], pcap[3]];
    let little = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => bail!("not a pcap file (magic {magic:02x?}; pcapng is not read here: tcpdump -w writes pcap)"),
    };
    let u32_at = |at: usize| -> u32 {
        let b = [pcap[at], pcap[at + 1], pcap[at + 2], pcap[at + 3]];
        if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let link = u32_at(20);
    let mut datagrams = Vec::new();
    let mut at = 24;
    while at < pcap.len() {
        if at + 16 > pcap.len() {
            bail!("the capture ends inside a record header at byte {at}");
        }
        let captured = u32_at(at + 8) as usize;
        let start = at + 16;
        // tcpdump may be stopped while writing the last record: a cut record is simply the end.
        let Some(frame) = pcap.get(start..start + captured) else {
            break;
        };
        at = start + captured;
        let ip = match link {
            LINKTYPE_LINUX_SLL if frame.len() >= 16 && frame[14..16] == [0x08, 0x00] => &frame[16..],
            LINKTYPE_LINUX_SLL2 if frame.len() >= 20 && frame[0..2] == [0x08, 0x00] => &frame[20..],
            LINKTYPE_ETHERNET if frame.len() >= 14 && frame[12..14] == [0x08, 0x00] => &frame[14..],
            LINKTYPE_RAW => frame,
            LINKTYPE_LINUX_SLL | LINKTYPE_LINUX_SLL2 | LINKTYPE_ETHERNET => continue,
            other => bail!("pcap link type {other} is not read here"),
        };
        if let Some(datagram) = parse_udp(ip) {
            datagrams.push(datagram);
        }
    }
    Ok(datagrams)
}

/// An IPv4 packet carrying (the first fragment of) a UDP datagram.
fn parse_udp(ip: &[u8]) -> Option<UdpDatagram> {
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 17 {
        return None;
    }
    let header = usize::from(ip[0] & 0x0f) * 4;
    let fragment_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if fragment_offset != 0 || ip.len() < header + 8 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let udp = &ip[header..total.max(header + 8)];
    let port = |at: usize| u16::from_be_bytes([udp[at], udp[at + 1]]);
    let length = usize::from(port(4)).clamp(8, udp.len());
    Some(UdpDatagram {
        source: SocketAddrV4::new(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), port(0)),
        destination: SocketAddrV4::new(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]), port(2)),
        payload: udp[8..length].to_vec(),
    })
}

/// Whether `needle` occurs anywhere in `haystack` (headers, payloads, record boundaries: the whole file).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let total = (20 + 8 + payload.len()) as u16;
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    fn pcap(little: bool, link: u32, frames: &[Vec<u8>]) -> Vec<u8> {
        let w = |v: u32| if little { v.to_le_bytes() } else { v.to_be_bytes() };
        let mut out = Vec::new();
        out.extend_from_slice(&w(0xa1b2_c3d4));
        out.extend_from_slice(&[2, 0, 4, 0][..]); // version (byte order does not matter for the reader)
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&w(262_144));
        out.extend_from_slice(&w(link));
        for frame in frames {
            out.extend_from_slice(&w(1));
            out.extend_from_slice(&w(2));
            out.extend_from_slice(&w(frame.len() as u32));
            out.extend_from_slice(&w(frame.len() as u32));
            out.extend_from_slice(frame);
        }
        out
    }

    fn sll2(ip: Vec<u8>) -> Vec<u8> {
        let mut frame = vec![0x08, 0x00, 0, 0, 0, 0, 0, 2, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0];
        frame.extend(ip);
        frame
    }

    fn sll(ip: Vec<u8>) -> Vec<u8> {
        let mut frame = vec![0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x00];
        frame.extend(ip);
        frame
    }

    #[test]
    fn reads_udp_datagrams_from_cooked_captures_in_both_byte_orders() {
        let wg = ipv4_udp([198, 19, 4, 2], [198, 18, 1, 2], 40000, 51820, &[1, 0, 0, 0, 7, 7]);
        let other = ipv4_udp([198, 18, 1, 2], [198, 19, 4, 2], 51820, 40000, b"back");
        let mut tcp = ipv4_udp([198, 18, 1, 2], [198, 18, 2, 2], 1, 2, b"tcp");
        tcp[9] = 6;
        for little in [true, false] {
            for (link, wrap) in [
                (LINKTYPE_LINUX_SLL2, sll2 as fn(Vec<u8>) -> Vec<u8>),
                (LINKTYPE_LINUX_SLL, sll),
            ] {
                let file = pcap(
                    little,
                    link,
                    &[wrap(wg.clone()), wrap(tcp.clone()), wrap(other.clone())],
                );
                let got = udp_datagrams(&file).expect("a pcap");
                assert_eq!(got.len(), 2, "the TCP packet is skipped");
                assert_eq!(got[0].destination, "198.18.1.2:51820".parse().expect("addr"));
                assert_eq!(got[0].source, "198.19.4.2:40000".parse().expect("addr"));
                assert_eq!(got[0].payload, [1, 0, 0, 0, 7, 7]);
                assert_eq!(got[1].payload, b"back");
            }
        }
    }

    #[test]
    fn rejects_what_is_no_pcap_and_tolerates_a_cut_last_record() {
        assert!(udp_datagrams(b"").is_err());
        assert!(udp_datagrams(&[0u8; 40]).is_err(), "a wrong magic");
        let wg = ipv4_udp([198, 19, 4, 2], [198, 18, 1, 2], 40000, 51820, b"x");
        let mut file = pcap(true, LINKTYPE_RAW, &[wg.clone(), wg]);
        file.truncate(file.len() - 5);
        assert_eq!(udp_datagrams(&file).expect("cut at the end").len(), 1);
        assert!(
            udp_datagrams(&pcap(true, 228, &[])).is_ok(),
            "no records, any link type"
        );
    }

    #[test]
    fn finds_bytes_anywhere() {
        assert!(contains(b"..GET /x HTTP..marker-123..", b"marker-123"));
        assert!(!contains(b"..marker-12..", b"marker-123"));
        assert!(!contains(b"abc", b""), "an empty needle proves nothing");
    }
}

//! The namespace lab: real `meshd` and `meshd-coordinator` binaries on hosts built from Linux network namespaces.
//!
//! # Layout
//! - [`env`]: what the lab needs from the machine (root, `/dev/net/tun`, tools, built binaries) and the
//!   skip-or-fail decision when something is missing.
//! - [`cmd`]: running one short command with a deadline.
//! - [`wait`]: bounded poll loops that say what they waited for.
//! - [`process`]: long-running processes kept by their `Child`, logged to files, killed by PID on drop.
//! - [`netns`]: one network namespace as a guard deleted on drop.
//! - [`lab`]: the topology (a router, hosts in their own subnets, NAT sites, loss) and the scenario runner that
//!   prints every log when a scenario fails.
//! - [`natlab`]: NAT sites (endpoint-independent, endpoint-dependent, 1:1) in front of private segments, with
//!   runtime changes (UDP blocked, mappings flushed) and their conntrack view; [`path`]: the peer paths
//!   `meshd status --json` reports, and waits on them.
//! - [`mesh`]: a coordinator host and node hosts running the real binaries; the admin API through `curl`.
//! - [`ssh`]: an `sshd` from Debian's openssh-server inside a node's namespace, and its client.
//! - [`wireguard`]: a stock `wireguard-go` + `wg` peer; [`gateway`]: a device registered for the coordinator's
//!   WireGuard gateway (exported config and its contract) and a UDP flood of the gateway port.
//! - [`capture`]: `tcpdump` inside a host as a guard, and a reader of its pcap files.
//! - [`fakedns`]: a fake upstream resolver (inside a namespace) for the agents' DNS forwarding.
//!
//! # Safety invariants (DEVELOPERS.md, "Network tests")
//! - Every namespace, interface and socket name carries the lab's unique id (PID + counter).
//! - Underlay addresses come from 198.18.0.0/15 only; overlay traffic stays on the nodes' own TUN devices. No
//!   namespace ever gets a default route or a route to the host, and [`lab::Lab::assert_isolated`] checks it.
//! - Nothing is sent from the root namespace: every client runs through `ip netns exec`, and every address a
//!   helper targets is checked by [`lab::assert_lab_address`] first.
//! - Processes are killed by the PID of a `Child` we have not reaped yet (so it cannot be recycled), never by
//!   name; namespaces and processes go away on drop, also when a scenario panics.

pub mod capture;
pub mod cmd;
pub mod env;
pub mod fakedns;
pub mod gateway;
pub mod lab;
pub mod mesh;
pub mod natlab;
pub mod netns;
pub mod path;
pub mod process;
pub mod ssh;
pub mod wait;
pub mod wireguard;

pub use lab::{Host, Lab, scenario};
pub use mesh::{Coordinator, Mesh, MeshNode};

//! End-to-end scenarios in network namespaces, one module per scenario (one test binary keeps link times down).
//!
//! Each test builds its own lab (unique names), so they run in parallel. They need root, /dev/net/tun, the tools
//! `scripts/test-all.sh` installs and the built binaries; without them they are skipped with a message, unless
//! `MESHD_LAB_REQUIRED=1` (CI) makes that a failure. On failure every process log of the lab is printed.

mod admin_delete;
mod connectivity;
mod coordinator_outage;
mod gateway;
mod harness;
mod long_session;
mod names;
mod nat;
mod nat_bench;
mod nat_harness;
mod nat_traversal;
mod rekey_under_load;
mod restart;
mod ssh_session;
mod transfer;
mod wireguard_interop;

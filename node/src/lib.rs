//! The meshd node agent: joins a meshd network, brings up a userspace WireGuard interface and keeps it in step with
//! the coordinator's network map, even while the coordinator is away.
//!
//! # Layout
//! - [`config`]: the command line (clap flags + `MESHD_*` variables); no IO.
//! - [`cli`]: runs each subcommand and prints for people (tables) or scripts (`--json`, exit codes).
//! - [`state`]: the state directory and the names of its files (identity, credential, key, cache, socket, lock).
//! - [`keys`]: the X25519 key pair; the private key stays in a 0600 file and never leaves the machine.
//! - [`cache`]: the last applied network map on disk, so `meshd up` works with the coordinator down.
//! - [`tls`]: certificate pinning by SHA-256 (the fingerprint in the join token), or CA roots for an https URL
//!   without one; rustls + ring.
//! - [`control`]: HTTP client of the coordinator (join, map stream, endpoints, leave) and reconnect backoff;
//!   knows nothing of WireGuard.
//! - [`reconcile`]: pure: network map -> desired peer list for the engine.
//! - [`agent`]: the running agent's shared state (map, phase) and the small [`agent::DataPlane`] trait in front of
//!   the engine; the one path by which a map message reaches the data plane.
//! - [`follow`]: the control loop: map stream with resume and backoff, cache, endpoint reports, removal.
//! - [`daemon`]: the agent's life (joining -> running <-> degraded -> stopped): join, up, startup from the cache,
//!   signals and clean shutdown.
//! - [`endpoints`]: which local addresses to report as UDP endpoints.
//! - [`ctl`]: the local control socket (server in the agent, client in the CLI) for status, ping and down.
//! - [`ping`]: ICMP echo over the overlay from the agent.
//! - [`dns`]: mesh names on this host: the name table (pure), the DNS responder on the overlay address, and the
//!   host integration (systemd-resolved per-link DNS, or a managed block in the hosts file).
//! - [`relay`]: the relay client: one upgraded HTTPS connection to the coordinator carrying datagrams for peers no
//!   direct path reaches; reconnects with backoff; tells the engine whether it is up.
//! - [`netcheck`]: STUN servers, probes and the NAT mapping classification (`meshd netcheck`).
//! - [`engine`]: the data plane (TUN, UDP, boringtun); configured only through `Engine::reconfigure`.
//!
//! Invariants: the private key is never sent or logged; `control` knows nothing of WireGuard and `engine` nothing of
//! HTTP; `reconcile` and `dns::table` do no IO; the agent changes no
//! resolver setting outside its own hosts-file block and its own link in systemd-resolved, and removes both on stop; every path derives from `--state-dir`, so agents in different network namespaces
//! on one machine never collide; the mesh keeps forwarding from the cached map while the coordinator is away.

pub mod agent;
pub mod cache;
pub mod cli;
pub mod config;
pub mod control;
pub mod ctl;
pub mod daemon;
pub mod dns;
pub mod endpoints;
pub mod engine;
pub mod exposition;
pub mod follow;
pub mod keys;
pub mod netcheck;
pub mod ping;
pub mod reconcile;
pub mod relay;
pub mod state;
pub mod tls;

//! Integration tests of the node agent against the real coordinator, without root and without a TUN device (but
//! [`flood`]).
//!
//! One test binary (link time) with modules: [`harness`] spawns `meshd-coordinator` on 127.0.0.1 and drives agents
//! whose data plane is a fake; [`agent`] checks join, map following, resume, degraded mode and removal;
//! [`errors`] checks what a person sees when something is wrong; [`tls`] checks CA-verified https without a pin;
//! [`cli`] runs the `meshd` binary itself; [`relay`] checks the relay client and STUN discovery; [`flood`] floods a
//! real engine (root and a TUN device, else skipped) and checks that its drop counters add up.

mod agent;
mod cli;
mod errors;
mod flood;
mod harness;
mod relay;
mod tls;

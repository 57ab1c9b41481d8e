//! Integration tests of the coordinator over real HTTP against real databases (one test binary, several modules).
//! Every test in a `both_backends!` block runs on SQLite and, with `MESHD_TEST_POSTGRES_URL` set, on PostgreSQL.

mod harness;

mod admin;
mod cli;
mod devices;
mod faults;
mod gateway;
mod joins;
mod limits;
mod migrations;
mod persistence;
mod proofs;
mod relay;
mod replicas;
mod stream;
mod tls;

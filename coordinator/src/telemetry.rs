//! Prometheus metrics: names, the recorder, and the text served at `GET /metrics`.
//!
//! Counters and histograms go through the `metrics` facade into one process-wide recorder (installed once; several
//! coordinators in one test process share it). The node gauges are read from the database at scrape time instead, so
//! they are exact for this coordinator's database and need no bookkeeping on every change.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Histogram: seconds to answer a request (to the response head, for streams), by method, route and status.
pub const HTTP_DURATION: &str = "meshd_http_request_duration_seconds";
/// Counter: successful joins (`rejoin` label: a known key joined again).
pub const JOINS: &str = "meshd_joins_total";
/// Counter: refused joins, by error code.
pub const JOINS_REFUSED: &str = "meshd_joins_refused_total";
/// Counter: map messages written to streams (full maps and deltas).
pub const MAP_UPDATES: &str = "meshd_map_updates_sent_total";
/// Gauge: map streams open in this process.
pub const MAP_STREAMS: &str = "meshd_map_streams";
/// Counter: STUN binding requests answered.
pub const STUN_REQUESTS: &str = "meshd_stun_requests_total";
/// Gauge: relay connections open in this process.
pub const RELAY_CONNECTIONS: &str = "meshd_relay_connections";
/// Counter: datagrams the relay delivered to a receiver's queue.
pub const RELAY_PACKETS: &str = "meshd_relay_packets_total";
/// Counter: bytes of those datagrams.
pub const RELAY_BYTES: &str = "meshd_relay_bytes_total";
/// Counter: datagrams the relay dropped, by `reason` (`no_peer`: the destination has no connection here;
/// `queue_full`: the receiver reads too slowly).
pub const RELAY_DROPPED: &str = "meshd_relay_dropped_packets_total";
/// Counter: datagrams the device gateway forwarded, by `direction` (`to_agent`, `to_device`).
pub const GATEWAY_PACKETS: &str = "meshd_gateway_packets_total";
/// Counter: bytes of those datagrams, by `direction`.
pub const GATEWAY_BYTES: &str = "meshd_gateway_bytes_total";
/// Counter: datagrams the gateway dropped, by `reason` (`malformed`, `unknown_index`, `no_agent_matches_mac1`,
/// `cookie_required`, `agent_not_connected`, ...).
pub const GATEWAY_DROPPED: &str = "meshd_gateway_dropped_packets_total";
/// Counter: cookie replies the gateway sent for agents under handshake load.
pub const GATEWAY_COOKIE_REPLIES: &str = "meshd_gateway_cookie_replies_total";
/// Gauge: sessions (and handshakes in progress) between devices and agents the gateway knows.
pub const GATEWAY_SESSIONS: &str = "meshd_gateway_sessions";
/// Counter: connections closed at accept, by `reason` (`per_ip_limit`: the source address has too many open).
pub const CONNECTIONS_REFUSED: &str = "meshd_connections_refused_total";
/// Counter: connections closed because their TLS handshake or first request head did not complete in time, by
/// `phase` (`handshake`, `header`).
pub const CONNECTIONS_TIMED_OUT: &str = "meshd_connections_timed_out_total";
/// Gauge: 1 when the last write (or write probe) committed, 0 when it failed (what `/readyz` answers).
pub const DATABASE_WRITABLE: &str = "meshd_database_writable";

/// Latency buckets in seconds: API calls take milliseconds; a slow database shows up in the upper buckets.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The process-wide recorder's handle (installed on first use).
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.to_string()), BUCKETS)
                .expect("the bucket list is not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed (an embedding program's); ours then just stays empty.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed; /metrics shows only the node gauges");
            }
            handle
        })
        .clone()
}

/// The `/metrics` body: the recorder's output plus the node gauges.
pub fn render(handle: &PrometheusHandle, nodes: i64, online: i64) -> String {
    let mut text = handle.render();
    text.push_str("# HELP meshd_nodes Nodes enrolled (meshd agents and registered WireGuard devices).\n");
    text.push_str("# TYPE meshd_nodes gauge\n");
    text.push_str(&format!("meshd_nodes {nodes}\n"));
    text.push_str("# HELP meshd_nodes_online Nodes with a connected map stream.\n");
    text.push_str("# TYPE meshd_nodes_online gauge\n");
    text.push_str(&format!("meshd_nodes_online {online}\n"));
    text
}

/// Registers descriptions so the output has HELP lines.
pub fn describe() {
    metrics::describe_histogram!(HTTP_DURATION, metrics::Unit::Seconds, "Time to answer an HTTP request.");
    metrics::describe_counter!(JOINS, "Successful joins.");
    metrics::describe_counter!(JOINS_REFUSED, "Refused joins, by error code.");
    metrics::describe_counter!(MAP_UPDATES, "Map messages (full maps and deltas) sent to nodes.");
    metrics::describe_gauge!(MAP_STREAMS, "Map streams open in this process.");
    metrics::describe_counter!(STUN_REQUESTS, "STUN binding requests answered.");
    metrics::describe_counter!(GATEWAY_PACKETS, "Datagrams the device gateway forwarded, by direction.");
    metrics::describe_counter!(GATEWAY_BYTES, "Bytes the device gateway forwarded, by direction.");
    metrics::describe_counter!(GATEWAY_DROPPED, "Datagrams the device gateway dropped, by reason.");
    metrics::describe_counter!(
        GATEWAY_COOKIE_REPLIES,
        "Cookie replies the gateway sent for agents under handshake load."
    );
    metrics::describe_gauge!(GATEWAY_SESSIONS, "Device sessions the gateway knows.");
    metrics::describe_gauge!(RELAY_CONNECTIONS, "Relay connections open in this process.");
    metrics::describe_counter!(RELAY_PACKETS, "Datagrams forwarded by the relay.");
    metrics::describe_counter!(
        RELAY_BYTES,
        metrics::Unit::Bytes,
        "Bytes of datagrams forwarded by the relay."
    );
    metrics::describe_counter!(
        RELAY_DROPPED,
        "Datagrams the relay dropped, by reason (no_peer, queue_full)."
    );
    metrics::describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed at accept, by reason (per_ip_limit)."
    );
    metrics::describe_counter!(
        CONNECTIONS_TIMED_OUT,
        "Connections closed for a TLS handshake or first request head not finished in time, by phase."
    );
    metrics::describe_gauge!(
        DATABASE_WRITABLE,
        "1 when the last database write or write probe committed, 0 when it failed."
    );
}

/// Counts a connection closed at accept.
pub fn connection_refused(reason: &'static str) {
    metrics::counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

/// Counts a connection closed for a handshake or head not finished in time.
pub fn connection_timed_out(phase: &'static str) {
    metrics::counter!(CONNECTIONS_TIMED_OUT, "phase" => phase).increment(1);
}

//! `meshd status --prometheus`: the agent's status as Prometheus text exposition (format 0.0.4).
//!
//! Owns the metric names and their rendering from a [`StatusReport`]. The agent serves no HTTP of its own (one
//! less listening port on every laptop); node_exporter's textfile collector picks this output up instead, e.g. from
//! a systemd timer: `meshd status --prometheus > /var/lib/node_exporter/meshd.prom.tmp && mv ... meshd.prom`.

use std::fmt::Write as _;

use crate::ctl::StatusReport;

/// Renders `report` as Prometheus text: path totals, relay state, per-peer traffic and the engine's counters.
pub fn render(report: &StatusReport) -> String {
    let me = &report.self_node;
    let mut out = String::new();

    family(
        &mut out,
        "meshd_peers",
        "gauge",
        "Peers by the path their packets take now.",
    );
    let none = report
        .peers
        .len()
        .saturating_sub(me.totals.direct_peers + me.totals.relayed_peers);
    for (path, count) in [
        ("direct", me.totals.direct_peers),
        ("relay", me.totals.relayed_peers),
        ("none", none),
    ] {
        let _ = writeln!(out, "meshd_peers{{path=\"{path}\"}} {count}");
    }
    family(
        &mut out,
        "meshd_relayed_bytes_total",
        "counter",
        "Bytes sent and received through the coordinator's relay, all peers.",
    );
    let _ = writeln!(out, "meshd_relayed_bytes_total {}", me.totals.relayed_bytes);
    family(
        &mut out,
        "meshd_relay_connected",
        "gauge",
        "1 while the relay connection is up.",
    );
    let connected = me.relay.as_ref().is_some_and(|r| r.connected);
    let _ = writeln!(out, "meshd_relay_connected {}", u8::from(connected));
    if let Some(ms) = me.relay.as_ref().and_then(|r| r.latency_ms) {
        family(
            &mut out,
            "meshd_relay_latency_seconds",
            "gauge",
            "Round trip to the relay.",
        );
        let _ = writeln!(out, "meshd_relay_latency_seconds {}", ms / 1000.0);
    }
    family(
        &mut out,
        "meshd_coordinator_connected",
        "gauge",
        "1 while the map stream from the coordinator is up (0: running from the cached map).",
    );
    let running = serde_json::to_value(me.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned));
    let _ = writeln!(
        out,
        "meshd_coordinator_connected {}",
        u8::from(running.as_deref() == Some("running"))
    );

    type PeerValue = fn(&crate::ctl::PeerReport) -> Option<f64>;
    let per_peer: [(&str, &str, &str, PeerValue); 6] = [
        (
            "meshd_peer_rx_bytes_total",
            "counter",
            "Bytes received from the peer (decrypted).",
            |p| Some(p.rx_bytes as f64),
        ),
        (
            "meshd_peer_tx_bytes_total",
            "counter",
            "Bytes sent to the peer (before encryption).",
            |p| Some(p.tx_bytes as f64),
        ),
        (
            "meshd_peer_relay_bytes_total",
            "counter",
            "Bytes exchanged with the peer through the relay.",
            |p| Some((p.relay_rx_bytes + p.relay_tx_bytes) as f64),
        ),
        (
            "meshd_peer_direct",
            "gauge",
            "1 if the peer is reached directly, 0 if through the relay or not at all.",
            |p| Some(if p.path == "direct" { 1.0 } else { 0.0 }),
        ),
        (
            "meshd_peer_last_handshake_age_seconds",
            "gauge",
            "Seconds since the last WireGuard handshake.",
            |p| p.last_handshake.map(|s| s as f64),
        ),
        (
            "meshd_peer_direct_rtt_seconds",
            "gauge",
            "Round trip of the last probe answered on the direct path.",
            |p| p.latency_ms.map(|ms| ms / 1000.0),
        ),
    ];
    for (name, kind, help, value) in per_peer {
        family(&mut out, name, kind, help);
        for peer in &report.peers {
            if let Some(v) = value(peer) {
                let _ = writeln!(
                    out,
                    "{name}{{peer=\"{}\",ip=\"{}\"}} {v}",
                    escape_label(&peer.name),
                    peer.ip
                );
            }
        }
    }

    if let Some(counters) = me.counters.as_object() {
        family(
            &mut out,
            "meshd_engine_events_total",
            "counter",
            "Data-plane events by kind (drops and their reasons, as `meshd status --json` names them).",
        );
        for (kind, value) in counters {
            if let Some(v) = value.as_u64() {
                let _ = writeln!(out, "meshd_engine_events_total{{kind=\"{}\"}} {v}", escape_label(kind));
            }
        }
    }
    out
}

/// The `# HELP` and `# TYPE` lines that announce a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the exposition format requires: backslash, double quote and newline escaped.
fn escape_label(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctl::sample_status;

    #[test]
    fn renders_path_totals_relay_and_per_peer_lines() {
        let mut report = sample_status();
        report.self_node.counters = serde_json::json!({"spoofed_source": 3, "note": "not a number"});
        let text = render(&report);
        for line in [
            "meshd_peers{path=\"direct\"} 1",
            "meshd_peers{path=\"relay\"} 1",
            "meshd_peers{path=\"none\"} 0",
            "meshd_relayed_bytes_total 3072",
            "meshd_relay_connected 1",
            "meshd_relay_latency_seconds 0.012",
            "meshd_coordinator_connected 0",
            "meshd_peer_rx_bytes_total{peer=\"gpu\",ip=\"10.77.0.3\"} 2048",
            "meshd_peer_relay_bytes_total{peer=\"laptop2\",ip=\"10.77.0.4\"} 3072",
            "meshd_peer_direct{peer=\"gpu\",ip=\"10.77.0.3\"} 1",
            "meshd_peer_direct{peer=\"laptop2\",ip=\"10.77.0.4\"} 0",
            "meshd_peer_last_handshake_age_seconds{peer=\"gpu\",ip=\"10.77.0.3\"} 12",
            "meshd_engine_events_total{kind=\"spoofed_source\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        // A peer with no handshake has no handshake-age sample (absent, not a made-up zero).
        assert!(
            !text.contains("meshd_peer_last_handshake_age_seconds{peer=\"laptop2\""),
            "{text}"
        );
        assert!(!text.contains("not a number"), "{text}");
        // Every sample belongs to a family announced before it.
        let mut announced = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                announced.insert(rest.split(' ').next().expect("name").to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().expect("name");
                assert!(announced.contains(name), "{name} has no TYPE line before it:\n{text}");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut report = sample_status();
        report.peers[0].name = "evil\"} 1\nmeshd_fake 9".into();
        let text = render(&report);
        assert!(!text.lines().any(|l| l.starts_with("meshd_fake")), "{text}");
    }
}

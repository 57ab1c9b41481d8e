#!/usr/bin/env bash
# Two meshd data-plane engines (the engine_pair example) in two network namespaces joined by a veth pair:
#   1. meshd <-> meshd: A knows two candidate endpoints for B (the first is dead), B knows none for A: the handshake
#      must rotate to the live candidate and B must learn A's endpoint. Then ping and a TCP transfer (iperf3) across
#      the overlay 10.77.0.0/16, counters sane; a handshake flood gets cookie replies while ping keeps working; peer
#      removal stops traffic within 2 s (and re-adding restores it); B changes its underlay address and A follows
#      (roaming); two agent engines (--agent) find and confirm the direct path with disco; optionally
#      (LONG_PING_SECONDS=150) a ping across the 120 s rekey;
#   2. interop: side B replaced by stock wireguard-go + wg, ping and TCP again;
#   3. baseline: both sides wireguard-go, TCP throughput in the same setup.
# Usage (as root, from the repository root): node/examples/engine_netns_test.sh [path/to/engine_pair]
#   Build first: cargo build --release -p meshd --example engine_pair (the default path is the release build).
#   IPERF_SECONDS=5 sets the transfer length; SKIP_INTEROP=1 skips steps 2-3.
#
# Safety (docs: the developers' guide): everything runs in two namespaces this script creates, named with its PID;
# the veth pair has both ends inside them (198.18.0.0/24 underlay) and there is no route to the host. Every wait is
# bounded, processes are killed by PID, and the trap removes namespaces, processes and the wireguard-go UAPI sockets
# (the /var/run/wireguard directory is shared by all namespaces, so the interface names carry the PID too).
set -euo pipefail

BIN=${1:-target/release/examples/engine_pair}
FLOOD=$(dirname "$BIN")/handshake_flood
SECS=${IPERF_SECONDS:-5}
ID=$$
NA="eng-$ID-a"; NB="eng-$ID-b"
VA="ev${ID}a"; VB="ev${ID}b"          # veth ends
TA="et${ID}a"; TB="et${ID}b"          # engine TUN devices
WA="wg${ID}a"; WB="wg${ID}b"          # wireguard-go devices
UA=198.18.0.1; UB=198.18.0.2          # underlay (B moves to 198.18.0.3 in the roaming step)
DEAD=198.18.0.99                      # a candidate endpoint nobody answers on
OA=10.77.0.1; OB=10.77.0.2            # overlay
PORT=51820
TMP=$(mktemp -d /tmp/eng-netns-$ID.XXXXXX)
PIDS=()
FAILED=0

cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    alive=0; for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break; sleep 0.2
  done
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  ip netns del "$NA" 2>/dev/null; ip netns del "$NB" 2>/dev/null
  rm -f "/var/run/wireguard/$WA.sock" "/var/run/wireguard/$WB.sock"
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; FAILED=1; }
ina() { ip netns exec "$NA" "$@"; }
inb() { ip netns exec "$NB" "$@"; }

# Waits (at most ~10 s) until interface $2 exists in namespace $1.
wait_link() {
  for _ in $(seq 1 50); do ip netns exec "$1" ip link show "$2" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "interface $2 did not appear in $1"; return 1
}

# ping from namespace $1 to $2: 10 probes; passes if at least 9 answer (the first may wait for the handshake).
check_ping() {
  local out; out=$(ip netns exec "$1" ping -c 10 -i 0.2 -W 2 "$2" 2>&1 || true)
  local got; got=$(echo "$out" | sed -n 's/.* \([0-9]*\) received.*/\1/p')
  local rtt; rtt=$(echo "$out" | sed -n 's/^rtt.* = \(.*\) ms$/\1/p')
  if [ "${got:-0}" -ge 9 ]; then pass "$3: ping $2 ($got/10, rtt min/avg/max/mdev $rtt ms)"; else fail "$3: ping $2 ($got/10)"; echo "$out"; fi
}

# iperf3 from namespace $1 to server address $2 in namespace $3; prints and records Gbit/s.
check_tcp() {
  ip netns exec "$3" timeout $((SECS + 20)) iperf3 -s -1 -B "$2" >/dev/null 2>&1 &
  local server=$!; PIDS+=("$server")
  sleep 0.5
  local json; json=$(ip netns exec "$1" timeout $((SECS + 15)) iperf3 -c "$2" -t "$SECS" -J 2>/dev/null || true)
  wait "$server" 2>/dev/null || true
  local bps; bps=$(echo "$json" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["end"]["sum_received"]["bits_per_second"])' 2>/dev/null || echo 0)
  local retr; retr=$(echo "$json" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["end"]["sum_sent"].get("retransmits","?"))' 2>/dev/null || echo "?")
  local gbps; gbps=$(python3 -c "print(f'{$bps/1e9:.2f}')")
  if python3 -c "import sys; sys.exit(0 if $bps > 1e6 else 1)"; then
    pass "$4: TCP single stream ${SECS}s: $gbps Gbit/s (retransmits $retr)"
  else
    fail "$4: TCP transfer"
  fi
}

# Waits (bounded: $3 seconds) for the first ping reply from namespace $1 to $2; prints how long it took.
wait_ping() {
  local start; start=$(date +%s.%N)
  for _ in $(seq 1 "$3"); do
    if ip netns exec "$1" ping -c 1 -W 1 "$2" >/dev/null 2>&1; then
      pass "$4 (first reply after $(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')") s)"; return 0
    fi
  done
  fail "$4 (no reply within $3 s)"; return 1
}

# Prints field $2 of the status JSON file $1 (a python expression over `s`).
status_field() { python3 -c "import json; s=json.load(open('$1')); print($2)"; }

start_engine() { # ns name tun addr key peer-spec logfile
  ip netns exec "$1" "$BIN" run --private-key "$4" --address "$3" --network 10.77.0.0/16 --listen-port $PORT \
    --interface "$2" --peer "$5" --status-file "$TMP/$2.json" ${ENGINE_ARGS:-} >"$6" 2>&1 &
  PIDS+=("$!")
  wait_link "$1" "$2"
}

start_wggo() { # ns ifname key addr peer-pub peer-allowed peer-endpoint
  ip netns exec "$1" env WG_PROCESS_FOREGROUND=1 WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 \
    wireguard-go -f "$2" >"$TMP/$2.log" 2>&1 &
  PIDS+=("$!")
  wait_link "$1" "$2"
  for _ in $(seq 1 50); do [ -S "/var/run/wireguard/$2.sock" ] && break; sleep 0.1; done
  echo "$3" >"$TMP/$2.key"
  ip netns exec "$1" wg set "$2" private-key "$TMP/$2.key" listen-port $PORT \
    peer "$5" allowed-ips "$6" endpoint "$7"
  ip netns exec "$1" ip addr add "$4/16" dev "$2"
  ip netns exec "$1" ip link set "$2" mtu 1420 up
}

stop_pid() { kill "$1" 2>/dev/null || true; for _ in $(seq 1 25); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.2; done; kill -9 "$1" 2>/dev/null || true; }

[ -x "$BIN" ] || { echo "build the example first: cargo build --release -p meshd --example engine_pair"; exit 2; }
command -v iperf3 >/dev/null || { echo "iperf3 is required (apt-get install -y iperf3)"; exit 2; }

ip netns add "$NA"; ip netns add "$NB"
ip link add "$VA" netns "$NA" type veth peer name "$VB" netns "$NB"
ina ip addr add "$UA/24" dev "$VA"; inb ip addr add "$UB/24" dev "$VB"
ina ip link set lo up; inb ip link set lo up
ina ip link set "$VA" up; inb ip link set "$VB" up

KA=$("$BIN" genkey); KB=$("$BIN" genkey)
PA=$("$BIN" pubkey "$KA"); PB=$("$BIN" pubkey "$KB")

echo "== meshd <-> meshd"
start_engine "$NA" "$TA" "$OA" "$KA" "$PB,$OB/32,$DEAD:$PORT+$UB:$PORT" "$TMP/a.log"
start_engine "$NB" "$TB" "$OB" "$KB" "$PA,$OA/32" "$TMP/b.log"
wait_ping "$NA" "$OB" 20 "handshake rotated past a dead candidate; B had no endpoint for A"
check_ping "$NA" "$OB" "meshd->meshd"
check_ping "$NB" "$OA" "meshd->meshd (reverse)"
check_tcp "$NA" "$OB" "$NB" "meshd->meshd"
sleep 1.2
python3 - "$TMP/$TA.json" "$TMP/$TB.json" <<'PY' && pass "status: handshake, rx/tx counted, no spoofed/malformed drops" || fail "status counters"
import json, sys
for path in sys.argv[1:]:
    s = json.load(open(path))
    p = s["peers"][0]
    c = s["counters"]
    print("  ", path.split("/")[-1], "peer endpoint", p["endpoint"], "last_handshake", p["last_handshake"],
          "rx", p["rx_bytes"], "tx", p["tx_bytes"], "counters", {k: v for k, v in c.items() if v})
    assert p["last_handshake"] is not None and p["rx_bytes"] > 0 and p["tx_bytes"] > 0
    assert c["spoofed_source_packets"] == 0 and c["malformed_datagrams"] == 0 and c["rejected_datagrams"] <= 2
PY

if [ -x "$FLOOD" ]; then
  inb "$FLOOD" "$UA:$PORT" "$PA" 3000 3 >"$TMP/flood.out" 2>&1 &
  flood=$!; PIDS+=("$flood")
  sleep 0.5
  check_ping "$NA" "$OB" "ping during a handshake flood"
  wait "$flood" || true
  sleep 1.2
  cookies=$(status_field "$TMP/$TA.json" 's["counters"]["cookie_replies_sent"]')
  if [ "$cookies" -gt 0 ]; then pass "flood answered with cookies: $(cat "$TMP/flood.out"); engine counted $cookies"; else fail "no cookie replies under a flood: $(cat "$TMP/flood.out")"; fi
fi

kill -USR1 "${PIDS[0]}"; sleep 1.5
if ina ping -c 3 -i 0.2 -W 1 "$OB" >/dev/null 2>&1 || inb ping -c 3 -i 0.2 -W 1 "$OA" >/dev/null 2>&1; then
  fail "traffic still flows 1.5 s after A removed B"
else
  pass "peer removal: no traffic either way 1.5 s after the reconfigure"
fi
kill -USR2 "${PIDS[0]}"
wait_ping "$NA" "$OB" 15 "peer re-added: traffic flows again"

# Roaming: B's underlay address changes; B keeps sending to A, A must follow B to the new address.
# (Delete first: removing a primary address also removes its secondaries.)
inb ip addr del "$UB/24" dev "$VB"; inb ip addr add 198.18.0.3/24 dev "$VB"; UB=198.18.0.3
wait_ping "$NB" "$OA" 10 "after B moved to $UB, B reaches A"
check_ping "$NA" "$OB" "after B moved, A reaches B"
sleep 1.2
ep=$(status_field "$TMP/$TA.json" 's["peers"][0]["endpoint"]')
if [ "$ep" = "$UB:$PORT" ]; then pass "roaming: A's endpoint for B is now $ep"; else fail "roaming: A's endpoint for B is $ep"; fi

# Agent peers: disco pings/pongs over the real socket pick and confirm the direct path (no relay here). A's first
# candidate for B is dead, B has none for A (it learns A from A's authenticated pings). A second pair of engines on
# another port and overlay, beside the first.
echo "== meshd agents (disco path selection)"
AP=51821; AA="ag${ID}a"; AB="ag${ID}b"
ina "$BIN" run --private-key "$KA" --address 10.78.0.1 --network 10.78.0.0/16 --listen-port $AP --interface "$AA" \
  --peer "$PB,10.78.0.2/32,$DEAD:$AP+$UB:$AP" --status-file "$TMP/$AA.json" --agent >"$TMP/agent-a.log" 2>&1 &
agent_a=$!; PIDS+=("$agent_a"); wait_link "$NA" "$AA"
inb "$BIN" run --private-key "$KB" --address 10.78.0.2 --network 10.78.0.0/16 --listen-port $AP --interface "$AB" \
  --peer "$PA,10.78.0.1/32" --status-file "$TMP/$AB.json" --agent >"$TMP/agent-b.log" 2>&1 &
agent_b=$!; PIDS+=("$agent_b"); wait_link "$NB" "$AB"
wait_ping "$NA" 10.78.0.2 20 "agents: A reaches B"
check_ping "$NB" 10.78.0.1 "agents: B reaches A"
sleep 1.5
python3 - "$TMP/$AA.json" "$UB:$AP" "$TMP/$AB.json" "$UA:$AP" <<'PY' && pass "agents: both paths direct, confirmed by disco (RTT known), no disco rejected" || fail "agents: status"
import json, sys
for path, want in ((sys.argv[1], sys.argv[2]), (sys.argv[3], sys.argv[4])):
    s = json.load(open(path))
    p = s["peers"][0]
    print("  ", path.split("/")[-1], "path", p["path"], "endpoint", p["endpoint"], "latency_ms", p["latency_ms"],
          "direct_peers", s["direct_peers"], "relayed_peers", s["relayed_peers"])
    assert p["path"] == "direct" and p["endpoint"] == want and p["latency_ms"] is not None, p
    assert s["direct_peers"] == 1 and s["relayed_peers"] == 0 and s["counters"]["rejected_disco"] == 0
PY
stop_pid "$agent_a"; stop_pid "$agent_b"

if [ "${LONG_PING_SECONDS:-0}" -gt 0 ]; then
  n=$((LONG_PING_SECONDS * 5))
  out=$(ina ping -c "$n" -i 0.2 -W 2 "$OB" 2>&1 | tail -2 | head -1)
  got=$(echo "$out" | sed -n 's/.* \([0-9]*\) received.*/\1/p')
  if [ "${got:-0}" -ge $((n * 99 / 100)) ]; then pass "long ping across rekey: $out"; else fail "long ping: $out"; fi
fi

if [ "${SKIP_INTEROP:-0}" != 1 ] && command -v wireguard-go >/dev/null && command -v wg >/dev/null; then
  echo "== meshd <-> wireguard-go"
  stop_pid "${PIDS[1]}"
  start_wggo "$NB" "$WB" "$KB" "$OB" "$PA" "$OA/32" "$UA:$PORT"
  check_ping "$NB" "$OA" "wireguard-go->meshd"
  check_ping "$NA" "$OB" "meshd->wireguard-go"
  check_tcp "$NA" "$OB" "$NB" "meshd->wireguard-go"
  check_tcp "$NB" "$OA" "$NA" "wireguard-go->meshd"
  inb wg show "$WB" | sed 's/^/   /'

  echo "== wireguard-go <-> wireguard-go (baseline)"
  stop_pid "${PIDS[0]}"
  start_wggo "$NA" "$WA" "$KA" "$OA" "$PB" "$OB/32" "$UB:$PORT"
  check_ping "$NA" "$OB" "wireguard-go->wireguard-go"
  check_tcp "$NA" "$OB" "$NB" "wireguard-go->wireguard-go"
else
  echo "skipping interop (SKIP_INTEROP=1 or wireguard-go/wg missing)"
fi

if [ "$FAILED" = 0 ]; then echo "ALL PASSED"; else echo "SOME CHECKS FAILED"; for f in "$TMP"/*.log; do echo "--- $f"; tail -20 "$f"; done; fi
exit "$FAILED"

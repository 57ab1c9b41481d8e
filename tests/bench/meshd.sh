# tests/bench/meshd.sh: adds `meshd` to the shared network-namespace benchmark (netns-bench.sh plugin).
#
#   cargo build --release -p meshd -p meshd-coordinator
#   NETNS_BENCH_PLUGINS=tests/bench/meshd.sh bash ../shared/bench/netns-bench.sh wireguard-go boringtun meshd
#
# Sourced by netns-bench.sh (see "Adding an implementation" in its header). impl_meshd_up starts a coordinator
# in $NS_A on its underlay address (a helper: its CPU does not count as the VPN's), joins both namespaces with
# one reusable token, waits until the two agents have a WireGuard session, and sets TARGET to lab-b's overlay
# address. Both agents are started with `spawn`, so their CPU is accounted and they are killed at teardown.
# Uses the release binaries (override with MESHD_BENCH_BIN / MESHD_BENCH_COORDINATOR_BIN).

_meshd_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
MESHD_BENCH_BIN=${MESHD_BENCH_BIN:-$_meshd_repo/target/release/meshd}
MESHD_BENCH_COORDINATOR_BIN=${MESHD_BENCH_COORDINATOR_BIN:-$_meshd_repo/target/release/meshd-coordinator}
MESHD_BENCH_PORT=${MESHD_BENCH_PORT:-8443}
MESHD_BENCH_RUST_LOG=${MESHD_BENCH_RUST_LOG:-warn}

impl_meshd_version() {
    "$MESHD_BENCH_BIN" --version 2>/dev/null | head -1
}

# meshd_bench_status NS SIDE: `meshd status --json` of the agent in NS (state dir $WORKDIR/meshd/SIDE)
meshd_bench_status() {
    in_ns "$1" "$MESHD_BENCH_BIN" --state-dir "$WORKDIR/meshd/$2" status --json 2>/dev/null
}

meshd_bench_has_peer() {
    meshd_bench_status "$1" "$2" | jq -e '(.peers | length) >= 1' >/dev/null
}
meshd_bench_has_handshake() {
    meshd_bench_status "$1" "$2" | jq -e '.peers[0].last_handshake != null' >/dev/null
}

impl_meshd_up() {
    local d="$WORKDIR/meshd" url token side ns
    [[ -x $MESHD_BENCH_BIN && -x $MESHD_BENCH_COORDINATOR_BIN ]] \
        || die "meshd: release binaries missing; run: cargo build --release -p meshd -p meshd-coordinator"
    rm -rf "$d"; mkdir -p "$d/coordinator" "$d/a" "$d/b"; chmod 700 "$d"
    url="https://$UL_A:$MESHD_BENCH_PORT"
    assert_lab_target "$UL_A"
    SPAWN_NOT_VPN=1 spawn "$NS_A" "$WORKDIR/$IMPL.coordinator.log" \
        env RUST_LOG="$MESHD_BENCH_RUST_LOG" NO_COLOR=1 "$MESHD_BENCH_COORDINATOR_BIN" serve \
        --data-dir "$d/coordinator" --listen "$UL_A:$MESHD_BENCH_PORT" --public-url "$url"
    wait_for in_ns "$NS_A" curl -sk --noproxy '*' -m 2 -o /dev/null -f "$url/healthz" \
        || die "meshd: coordinator did not answer $url/healthz (see $WORKDIR/$IMPL.coordinator.log)"
    "$MESHD_BENCH_COORDINATOR_BIN" apikey create --data-dir "$d/coordinator" >"$d/apikey.out" 2>&1 \
        || die "meshd: apikey create failed: $(tail -3 "$d/apikey.out")"
    token=$("$MESHD_BENCH_COORDINATOR_BIN" token create --reusable --data-dir "$d/coordinator" 2>>"$d/token.err" | tail -1)
    [[ -n $token ]] || die "meshd: token create printed nothing: $(tail -3 "$d/token.err")"
    # --dns off: the bench's namespaces have no hosts file of their own, and names play no part in the figures.
    for side in a b; do
        if [[ $side == a ]]; then ns=$NS_A; else ns=$NS_B; fi
        spawn "$ns" "$WORKDIR/$IMPL.$side.log" env RUST_LOG="$MESHD_BENCH_RUST_LOG" NO_COLOR=1 \
            "$MESHD_BENCH_BIN" --state-dir "$d/$side" join "$token" --hostname "lab-$side" \
            --interface "lab-ms$side" --listen-port 51820 --mtu "$OVERLAY_MTU" --dns off
    done
    # Both agents up, each listing the other as a peer (wait_for: ~10 s each).
    for side in a b; do
        if [[ $side == a ]]; then ns=$NS_A; else ns=$NS_B; fi
        wait_for meshd_bench_has_peer "$ns" "$side" \
            || die "meshd: agent in $ns has no peer (see $WORKDIR/$IMPL.$side.log)"
    done
    TARGET=$(meshd_bench_status "$NS_B" b | jq -r '.self.ip' | cut -d/ -f1)
    assert_lab_target "$TARGET"
    # One ping starts the handshake; then wait until lab-a reports it.
    in_ns "$NS_A" ping -c1 -W2 -q "$TARGET" >/dev/null 2>&1 || true
    wait_for meshd_bench_has_handshake "$NS_A" a \
        || die "meshd: no handshake between lab-a and lab-b (see $WORKDIR/$IMPL.a.log, $IMPL.b.log)"
    log "  meshd: lab-a $(meshd_bench_status "$NS_A" a | jq -r .self.ip) -> lab-b $TARGET, handshake done"
}

impl_meshd_down() {
    # The agents and the coordinator were started with spawn: netns-bench kills them and deletes the TUN links.
    # Keep the logs; drop the state (keys, database) of this run.
    rm -rf "$WORKDIR/meshd"
}

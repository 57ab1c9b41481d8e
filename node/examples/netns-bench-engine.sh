# node/examples/netns-bench-engine.sh: adds `meshd-engine` (the data plane alone, no coordinator: two engine_pair
# processes) to the shared network-namespace benchmark, to measure the engine apart from the rest of the agent.
#
#   cargo build --release -p meshd --example engine_pair
#   NETNS_BENCH_PLUGINS=node/examples/netns-bench-engine.sh bash ../shared/bench/netns-bench.sh wireguard-go meshd-engine
#
# Sourced by netns-bench.sh (see its header: spawn, in_ns, wait_for, $NS_A/$NS_B, $UL_A/$UL_B, TARGET). Both engines
# are started with `spawn`, so their CPU is accounted and they are killed at teardown; the TUN devices vanish with
# them. MESHD_ENGINE_ARGS adds flags (e.g. --no-offload).

_engine_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
MESHD_ENGINE_BIN=${MESHD_ENGINE_BIN:-$_engine_repo/target/release/examples/engine_pair}

impl_meshd_engine_version() {
    echo "meshd engine ($(git -C "$_engine_repo" rev-parse --short HEAD 2>/dev/null || echo unknown))${MESHD_ENGINE_ARGS:+ $MESHD_ENGINE_ARGS}"
}

impl_meshd_engine_up() {
    local d="$WORKDIR/meshd-engine" ka kb pa pb
    [[ -x $MESHD_ENGINE_BIN ]] || die "meshd-engine: run: cargo build --release -p meshd --example engine_pair"
    mkdir -p "$d"; chmod 700 "$d"
    ka=$("$MESHD_ENGINE_BIN" genkey); kb=$("$MESHD_ENGINE_BIN" genkey)
    pa=$("$MESHD_ENGINE_BIN" pubkey "$ka"); pb=$("$MESHD_ENGINE_BIN" pubkey "$kb")
    # shellcheck disable=SC2086
    RUST_LOG=warn spawn "$NS_A" "$WORKDIR/$IMPL.a.log" "$MESHD_ENGINE_BIN" run --private-key "$ka" \
        --address 10.77.0.1 --network 10.77.0.0/24 --listen-port 51820 --interface lab-mea --mtu "$OVERLAY_MTU" \
        --peer "$pb,10.77.0.2/32,$UL_B:51820" ${MESHD_ENGINE_ARGS:-}
    # shellcheck disable=SC2086
    RUST_LOG=warn spawn "$NS_B" "$WORKDIR/$IMPL.b.log" "$MESHD_ENGINE_BIN" run --private-key "$kb" \
        --address 10.77.0.2 --network 10.77.0.0/24 --listen-port 51820 --interface lab-meb --mtu "$OVERLAY_MTU" \
        --peer "$pa,10.77.0.1/32,$UL_A:51820" ${MESHD_ENGINE_ARGS:-}
    wait_for ip -n "$NS_A" link show lab-mea || die "meshd-engine: lab-mea not created"
    wait_for ip -n "$NS_B" link show lab-meb || die "meshd-engine: lab-meb not created"
    wait_for in_ns "$NS_A" ping -c 1 -W 1 10.77.0.2 || die "meshd-engine: no handshake"
    TARGET=10.77.0.2
}

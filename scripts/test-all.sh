#!/usr/bin/env bash
# scripts/test-all.sh: the one command that installs what the tests need and runs ALL of meshd's tests.
#
#   sudo bash scripts/test-all.sh
#
# On a fresh Debian 12 machine with the Rust toolchain (CI runs this through .ci/run, as root, no stdin):
#   1. installs the Debian packages the tests use (PostgreSQL, OpenSSH, iproute2, iptables, wireguard-go, ...);
#   2. starts PostgreSQL and creates a superuser role for the tests; exports MESHD_TEST_POSTGRES_URL so the
#      coordinator suite runs on PostgreSQL as well as SQLite (MESHD_TEST_REQUIRE_POSTGRES=1: it must);
#   3. builds the binaries (one profile: dev, which optimizes dependencies) and runs `cargo test --workspace`,
#      including the end-to-end scenarios in network namespaces (tests/), which must run, not skip
#      (MESHD_LAB_REQUIRED=1); then the fault-injection suite (disk full, read-only directory, database restart,
#      corrupted page, clock jump: one line per fault, survived or not); then a 200-node smoke run of the load
#      generator (meshd-loadgen) on both databases;
#   4. checks formatting and clippy (MESHD_LINT=strict: a problem fails the run; warn: reported only; skip).
# Idempotent: what is installed or running already is left as it is.
#
# Env: MESHD_TEST_POSTGRES_URL  use this database instead of the local cluster (no PostgreSQL setup then)
#      MESHD_SKIP_INSTALL=1     do not run apt-get (everything is installed already)
#      MESHD_LINT=strict|warn|skip   what cargo fmt --check / clippy problems do (default strict: fail)
#      CARGO_TEST_ARGS          what to test instead of --workspace (e.g. "-p meshd-lab")
#      MESHD_FUZZ_SECONDS       seconds of cargo fuzz per parser (default 15; 0 skips)
#      MESHD_FUZZ_TOOLCHAIN     the nightly toolchain cargo fuzz uses (default: a dated nightly known to work)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[test-all %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "FAILED: $*"; exit 1; }

PACKAGES=(
    postgresql                      # coordinator suite on PostgreSQL
    openssh-server openssh-client   # lab: ssh across the mesh
    iproute2 iptables iputils-ping procps curl ca-certificates   # lab: namespaces, NAT, loss, pings, admin API
    conntrack                       # NAT lab: inspect and flush a NAT router's mappings
    wireguard-go wireguard-tools    # lab: stock WireGuard interop
    iperf3 jq ethtool               # benchmarks (tests/bench/meshd.sh, the NAT lab's relay-vs-direct run)
    dnsutils                        # lab: dig against the agents' DNS responders (names scenario)
    tcpdump python3                 # lab: gateway scenario (capture at the coordinator, an HTTP server over the tunnel)
    faketime                        # fault suite: a wall-clock jump under a running coordinator
)

[[ $EUID -eq 0 ]] || die "run as root: the tests create network namespaces and TUN devices (sudo bash $0)"

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        log "all ${#PACKAGES[@]} packages installed already"
        return
    fi
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Another apt on the machine (a colleague's install) holds the lock for a while: wait for it, bounded.
    apt-get -o DPkg::Lock::Timeout=600 update -q
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
}

ensure_tun() {
    [[ -c /dev/net/tun ]] && return
    modprobe tun 2>/dev/null || true
    if [[ ! -c /dev/net/tun ]]; then
        mkdir -p /dev/net && mknod /dev/net/tun c 10 200 && chmod 0666 /dev/net/tun
    fi
    [[ -c /dev/net/tun ]] || die "/dev/net/tun is missing and could not be created"
}

start_postgres() {
    if [[ -n ${MESHD_TEST_POSTGRES_URL:-} ]]; then
        log "using MESHD_TEST_POSTGRES_URL from the environment"
        return
    fi
    local version port i
    version=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -1)
    [[ -n $version ]] || die "PostgreSQL is not installed"
    pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main"{f=1} END{exit !f}' || pg_createcluster "$version" main
    if ! pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" && $4 ~ /^online/{f=1} END{exit !f}'; then
        log "starting PostgreSQL $version"
        pg_ctlcluster "$version" main start
    fi
    port=$(pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main"{print $3}')
    for i in $(seq 1 60); do
        pg_isready -q -h 127.0.0.1 -p "$port" && break
        sleep 0.5
    done
    pg_isready -q -h 127.0.0.1 -p "$port" || die "PostgreSQL $version did not accept connections on 127.0.0.1:$port"
    # A superuser so the suite can create a database per test run; the password only guards a local test role.
    runuser -u postgres -- psql -q -p "$port" -v ON_ERROR_STOP=1 <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'meshd_test') THEN
    CREATE ROLE meshd_test LOGIN SUPERUSER PASSWORD 'meshd_test';
  END IF;
END $$;
SQL
    export MESHD_TEST_POSTGRES_URL="postgres://meshd_test:meshd_test@127.0.0.1:$port/postgres"
    log "PostgreSQL $version ready on 127.0.0.1:$port (MESHD_TEST_POSTGRES_URL set)"
}

[[ ${MESHD_SKIP_INSTALL:-0} == 1 ]] || install_packages
ensure_tun
start_postgres
# Nothing may pass by skipping: the lab and the PostgreSQL half of the coordinator suite must run.
export MESHD_LAB_REQUIRED=${MESHD_LAB_REQUIRED:-1}
export MESHD_TEST_REQUIRE_POSTGRES=${MESHD_TEST_REQUIRE_POSTGRES:-1}

# `sudo` resets PATH: find the rustup toolchain of the invoking user or root.
if ! command -v cargo >/dev/null; then
    for d in "${SUDO_USER:+$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo/bin}" "$HOME/.cargo/bin" /root/.cargo/bin; do
        [[ -n $d && -x $d/cargo ]] && { export PATH="$d:$PATH"; break; }
    done
fi
command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) and run again"

log "building (dev profile)"
cargo build --workspace --bins
log "running all tests"
# The fault suite runs on its own below (one line per fault), not twice.
# shellcheck disable=SC2086
cargo test ${CARGO_TEST_ARGS:---workspace} --no-fail-fast -- --skip faults::

# Fault injection against a running coordinator (coordinator/tests/it/faults.rs): each fault is one test that prints
# `FAULT <name>: survived (...)`; a fault that was not survived, or one that skipped, fails the run.
if [[ -z ${CARGO_TEST_ARGS:-} ]]; then
    log "fault-injection suite"
    faults_ok=1
    for fault in disk_full read_only_directory postgres_restart corrupted_page clock_jump; do
        out=$(cargo test -q -p meshd-coordinator --test it "faults::$fault" -- --exact --nocapture 2>&1) && passed=1 || passed=0
        line=$(grep -m1 '^FAULT ' <<<"$out" || true)
        if ((passed)) && [[ -n $line ]]; then
            log "$line"
        else
            faults_ok=0
            log "FAULT $fault: NOT survived"
            grep -E 'SKIPPED|panicked|assert|left|right' <<<"$out" | head -20 || true
        fi
    done
    ((faults_ok)) || die "the coordinator did not survive every injected fault (see above)"
fi

# The control-plane load generator against the debug coordinator, 200 nodes on each database (well under a minute):
# every scenario runs and a missed target or any error fails the run, so the generator cannot rot.
log "load generator smoke run (meshd-loadgen -n 200, SQLite and PostgreSQL)"
for db in sqlite postgres; do
    target/debug/meshd-loadgen -n 200 --db "$db" --coordinator target/debug/meshd-coordinator \
        --postgres-url "$MESHD_TEST_POSTGRES_URL" --setup-timeout 60s --change-timeout 10s --reconnect-timeout 60s \
        || die "meshd-loadgen -n 200 --db $db missed a target or failed (see its table above)"
done

# Fuzzing of the parsers of untrusted bytes (STUN, disco, relay frames; fuzz/): a short libFuzzer run per target.
# proptest covers the same parsers inside `cargo test`; this adds coverage-guided search. Needs a nightly toolchain
# and cargo-fuzz: installed here when missing; a machine that cannot get them skips with a warning (a crash found
# fails the run).
fuzz_seconds=${MESHD_FUZZ_SECONDS:-15}
# A dated nightly, so a new nightly cannot break CI; move it forward on purpose.
fuzz_toolchain=${MESHD_FUZZ_TOOLCHAIN:-nightly-2026-05-19}
if ((fuzz_seconds > 0)); then
    log "fuzzing each parser for ${fuzz_seconds} s (cargo fuzz; MESHD_FUZZ_SECONDS=0 skips)"
    fuzz_ready=1
    rustup run "$fuzz_toolchain" rustc --version >/dev/null 2>&1 \
        || rustup toolchain install "$fuzz_toolchain" --profile minimal >/dev/null 2>&1 || fuzz_ready=0
    if ((fuzz_ready)) && ! cargo fuzz --version >/dev/null 2>&1; then
        cargo install cargo-fuzz --locked >/dev/null 2>&1 || fuzz_ready=0
    fi
    if ((fuzz_ready)); then
        for target in stun disco relay_frames dns wireguard; do
            (cd fuzz && cargo "+$fuzz_toolchain" fuzz run "$target" -- -max_total_time="$fuzz_seconds" -max_len=2048 \
                > "/tmp/meshd-fuzz-$target.$$.log" 2>&1) \
                || { tail -40 "/tmp/meshd-fuzz-$target.$$.log"; die "fuzz target $target failed (input in fuzz/artifacts/$target/)"; }
            log "fuzz $target: $(grep -o 'Done [0-9]* runs' "/tmp/meshd-fuzz-$target.$$.log" || echo 'done')"
            rm -f "/tmp/meshd-fuzz-$target.$$.log"
        done
    else
        log "WARNING: no nightly toolchain or cargo-fuzz could be installed; fuzzing skipped (proptest still ran)"
    fi
fi

case ${MESHD_LINT:-strict} in
    strict|warn)
        log "checking formatting and clippy (MESHD_LINT=${MESHD_LINT:-strict})"
        lint_ok=1
        # The linters are rustup components; add them if missing (needs rustup's server, which not every machine reaches).
        if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
            rustup component add rustfmt clippy >/dev/null 2>&1 \
                || log "WARNING: rustfmt/clippy are not installed and could not be added; lint checks may fail"
        fi
        cargo fmt --all -- --check || lint_ok=0
        cargo clippy --workspace --all-targets -- -D warnings || lint_ok=0
        if ((lint_ok == 0)); then
            [[ ${MESHD_LINT:-strict} == warn ]] || die "cargo fmt / clippy found problems (see above)"
            log "WARNING: cargo fmt / clippy found problems (see above); MESHD_LINT=warn, so not failing"
        fi
        ;;
    skip) log "skipping cargo fmt / clippy (MESHD_LINT=skip)" ;;
    *) die "MESHD_LINT must be strict, warn or skip" ;;
esac
log "all tests passed in ${SECONDS} s"

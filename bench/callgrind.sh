#!/usr/bin/env bash
# Instructions holdfast executes for a fixed load, counted by valgrind's
# callgrind: repeatable on a busy machine (they do not depend on time), so
# before/after figures of an optimisation can be compared there.
#
#   bench/callgrind.sh MODE LOAD N [N2]
#
#   MODE  none | tcp | response | resume   (ack mode, or the resume protocol)
#   LOAD  bulk | rr | conns                (see `loadgen send`)
#   N     MiB for bulk, round trips for rr, connections for conns
#   N2    second, larger size (default 4 × N)
#
# It runs holdfast (target/release/holdfast, or $HOLDFAST) under callgrind
# twice, with N and N2, against `loadgen echo` (or `loadgen resume-echo`),
# and prints the difference per unit, so start-up and shutdown cancel:
# instructions per GiB carried (both directions: 2 × MiB sent) for bulk,
# per round trip for rr, per connection for conns. The second run's
# profile stays in target/callgrind/ for callgrind_annotate.
#
# HOLDFAST_LOG sets holdfast's RUST_LOG (default warn, as compare.sh).
# EXTRA_CONFIG='...' is appended to holdfast's config file (for example
# $'[runtime]\nworker_threads = 1').
#
# WHO=backend counts the backend instead (`loadgen echo`, or for `resume`
# the echo service on holdfast's server library, `loadgen resume-echo`):
# holdfast runs once, uninstrumented, and each run starts the backend under
# callgrind on the same port, dumps its counts after the load
# (callgrind_control) and kills it.
#
# Needs: valgrind, and `cargo build --release --bin holdfast --example loadgen`.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?MODE}; load=${2:?LOAD}; n1=${3:?N}; n2=${4:-$((4 * n1))}
holdfast=${HOLDFAST:-target/release/holdfast}
loadgen=${LOADGEN:-target/release/examples/loadgen}
out=target/callgrind
mkdir -p "$out"
tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -n "${KEEP:-}" ] && echo "kept $tmp" >&2 || rm -rf "$tmp"
}
trap cleanup EXIT

who=${WHO:-holdfast}
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
[ "$mode" = resume ] && head -c 32 /dev/urandom >"$tmp/key"
backend_cmd=("$loadgen" echo)
[ "$mode" = resume ] && backend_cmd=("$loadgen" resume-echo "$tmp/key")

# The backend, in its own process (not counted), unless it is what is counted.
if [ "$who" = backend ]; then
    echo_addr=127.0.0.1:$(free_port)
else
    "${backend_cmd[@]}" >"$tmp/echo.out" &
    pids+=($!)
    for _ in $(seq 100); do grep -q listening "$tmp/echo.out" && break; sleep 0.1; done
    echo_addr=$(sed -n 's/^listening //p' "$tmp/echo.out")
fi

addr=127.0.0.1:$(free_port)
case $mode in
    none|tcp) backend="ack = \"$mode\"" ;;
    response) backend=$'ack = "response"\nframing = "lines"' ;;
    resume) backend=$'protocol = "resume"\nresume = { secret_file = "'"$tmp/key"$'" }' ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
cat >"$tmp/holdfast.toml" <<EOF
[[listener]]
name = "bench"
listen = "$addr"
backend = "echo"

[[backend]]
name = "echo"
servers = ["$echo_addr"]
$backend
${EXTRA_CONFIG:-}
EOF

if [ "$who" = backend ]; then
    RUST_LOG=${HOLDFAST_LOG:-warn} "$holdfast" run --config "$tmp/holdfast.toml" 2>"$tmp/holdfast.log" &
    pids+=($!)
fi

# One warm-up round trip (retried until the instrumented process answers),
# then the load of size $1.
drive() {
    for _ in $(seq 300); do
        "$loadgen" send "$addr" rr 1 2>/dev/null && break
        sleep 0.1
    done
    "$loadgen" send "$addr" "$load" "$1" 2>>"$tmp/load.log"
}

# One run: holdfast under callgrind, one warm-up round trip, the load,
# SIGTERM (holdfast drains and exits). Prints the total instructions.
run() {
    local n=$1 file=$2
    if [ "$who" = backend ]; then
        LOADGEN_LISTEN=$echo_addr valgrind --tool=callgrind --callgrind-out-file="$file" \
            "${backend_cmd[@]}" >"$tmp/echo.out" 2>"$tmp/vg.log" &
        local vg=$!
        drive "$n"
        callgrind_control -d "$vg" >/dev/null
        kill -KILL "$vg"
        wait "$vg" 2>/dev/null || true
        # The dump is "$file.1"; its totals line is the count.
        grep -m1 -E '^(summary|totals):' "$file.1" | awk '{print $2}'
        mv "$file.1" "$file"
        return
    fi
    RUST_LOG=${HOLDFAST_LOG:-warn} valgrind --tool=callgrind --callgrind-out-file="$file" \
        "$holdfast" run --config "$tmp/holdfast.toml" 2>"$tmp/vg.log" &
    local vg=$!
    drive "$n"
    kill -TERM "$vg"
    wait "$vg" || true
    grep -m1 '^summary:' "$file" | awk '{print $2}'
}

i1=$(run "$n1" "$tmp/cg.1")
i2=$(run "$n2" "$out/callgrind.$mode.$load${WHO:+.$WHO}.out")
python3 - "$mode" "$load" "$n1" "$n2" "$i1" "$i2" <<'EOF'
import sys
mode, load, n1, n2, i1, i2 = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
per = (i2 - i1) / (n2 - n1)
if load == "bulk":
    # MiB sent; holdfast carries each byte up and back down.
    print(f"{mode} {load}: {per * 1024 / 2 / 1e9:.3f} G instructions per GiB carried "
          f"({per / 2 / 1024:.1f} per KiB; runs of {n1} and {n2} MiB: {i1} and {i2})")
else:
    unit = "round trip" if load == "rr" else "connection"
    print(f"{mode} {load}: {per:.0f} instructions per {unit} "
          f"(runs of {n1} and {n2}: {i1} and {i2})")
EOF

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

# The backend, in its own process (not counted).
if [ "$mode" = resume ]; then
    head -c 32 /dev/urandom >"$tmp/key"
    "$loadgen" resume-echo "$tmp/key" >"$tmp/echo.out" &
else
    "$loadgen" echo >"$tmp/echo.out" &
fi
pids+=($!)
for _ in $(seq 100); do grep -q listening "$tmp/echo.out" && break; sleep 0.1; done
echo_addr=$(sed -n 's/^listening //p' "$tmp/echo.out")

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
addr=127.0.0.1:$port
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
EOF

# One run: holdfast under callgrind, one warm-up round trip, the load,
# SIGTERM (holdfast drains and exits). Prints the total instructions.
run() {
    local n=$1 file=$2
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$file" \
        "$holdfast" run --config "$tmp/holdfast.toml" 2>"$tmp/vg.log" &
    local vg=$!
    for _ in $(seq 300); do
        "$loadgen" send "$addr" rr 1 2>/dev/null && break
        sleep 0.1
    done
    "$loadgen" send "$addr" "$load" "$n" 2>>"$tmp/load.log"
    kill -TERM "$vg"
    wait "$vg" || true
    grep -m1 '^summary:' "$file" | awk '{print $2}'
}

i1=$(run "$n1" "$tmp/cg.1")
i2=$(run "$n2" "$out/callgrind.$mode.$load.out")
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

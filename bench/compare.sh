#!/usr/bin/env bash
# holdfast side by side with direct connections, HAProxy (mode tcp), nginx
# stream and socat (fork), on loopback. holdfast runs with ack = "none",
# "tcp", "response" (lines) and with the resume protocol (its server is
# `loadgen resume-echo`, an echo service on holdfast's server library). Installs the peers from Debian's
# packages when run as root (or says which it skipped), builds holdfast and
# the load generator (examples/loadgen.rs) in release mode, waits for the
# machine to be free of cargo/rustc, and runs every target interleaved.
#
#   bench/compare.sh            # 3 rounds (about 4 minutes)
#   bench/compare.sh --quick    # 1 round
#   bench/compare.sh --rounds 5 --secs 1.5 --only direct,holdfast-none,haproxy
#   targets: direct, holdfast-none, holdfast-tcp, holdfast-response,
#            holdfast-resume, haproxy, nginx, socat
#   bench/compare.sh --rounds 0 --idle 5000 --only holdfast-none
#       (idle memory alone)
#   bench/compare.sh --rounds 5 --idle 0 --holdfast-b OTHER \
#       --only holdfast-none,holdfast-none-b,nginx
#       (A/B: rows holdfast-none-b / holdfast-tcp-b / holdfast-response-b run OTHER, a binary or a
#       wrapper script, interleaved with target/release/holdfast)
#
# Prints the table; JSON goes to target/compare.json.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null && [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] \
    || need+=(nginx-light libnginx-mod-stream)
command -v socat >/dev/null || need+=(socat)
command -v taskset >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing: ${need[*]}" >&2
        apt-get update -qq >&2 || echo "apt-get update failed" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2 \
            || echo "apt-get install failed; missing peers will be skipped" >&2
    else
        echo "not root or no apt-get: skipping install of ${need[*]} (those rows will be skipped)" >&2
    fi
fi
# Debian starts nginx and haproxy as services on install; the benchmark runs
# its own instances on free ports, the services only cost memory.
command -v systemctl >/dev/null && systemctl stop nginx haproxy 2>/dev/null || true

cargo build --release --bin holdfast --example loadgen >&2

# Other builds on the same cores skew every figure: wait (up to 10 min)
# until no cargo or rustc runs.
for _ in $(seq 1 20); do
    pgrep -x 'cargo|rustc' >/dev/null || break
    echo "waiting: cargo/rustc running ($(cut -d' ' -f1-3 /proc/loadavg))" >&2
    sleep 30
done
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "machine: nproc $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
echo "holdfast: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"

# 9,000 idle sessions are 18,000 sockets in the proxy and in the echo server.
ulimit -n 20000
exec target/release/examples/loadgen compare "$@"

#!/usr/bin/env bash
# Installs the programs holdfast's tests use from Debian's packages:
# redis-server (the RESP framing tests run against a real Redis),
# iproute2 (`ip`: the failover tests build their own network namespaces)
# and socat (the failover test's client that nobody on the team wrote).
# Safe to run repeatedly; skips what is already there.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v socat >/dev/null 2>&1 || need+=(socat)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: not root; cannot install ${need[*]} (tests that need them will fail or skip)" >&2
    exit 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
echo "install-test-deps: redis-server $(redis-server --version | awk '{print $3}')"
echo "install-test-deps: $(ip -V)"
echo "install-test-deps: $(socat -V 2>/dev/null | grep -m1 'socat version' || echo 'socat missing')"

#!/usr/bin/env bash
# Installs the programs holdfast's tests use from Debian's packages:
# redis-server (the RESP framing tests run against a real Redis) and
# iproute2 (`ip`: the failover tests build their own network namespaces).
# Safe to run repeatedly; skips what is already there.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
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

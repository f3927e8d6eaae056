#!/usr/bin/env bash
# Says whether this machine can run the failover tests, which build their own
# network namespaces (root and iproute2 needed). Prints one line and exits 0
# when they can run, 1 when they will be skipped.
set -u
why=""
if [ "$(id -u)" -ne 0 ]; then
  why="not root"
elif ! command -v ip >/dev/null 2>&1; then
  why="no ip (iproute2)"
else
  probe="hfprobe$$"
  if ip netns add "$probe" 2>/dev/null; then
    ip netns del "$probe"
  else
    why="ip netns add fails here"
  fi
fi
if [ -n "$why" ]; then
  echo "netns: SKIPPING the failover tests (network namespaces): $why"
  exit 1
fi
echo "netns: the failover tests run in network namespaces"

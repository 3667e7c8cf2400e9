#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine: system packages (etcd, HAProxy, iptables)
# and the project venv at .venv with the dispatcher and test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS="etcd-server etcd-client haproxy keepalived systemd iptables iproute2 openssl socat jq curl prometheus zsh"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    for attempt in 1 2 3; do
      if apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing; then
        break
      fi
      echo "apt-get failed (attempt $attempt); retrying" >&2
      sleep 5
    done
  else
    echo "warning: not root; cannot install:$missing (etcd/HAProxy tests will be skipped)" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e '.[test]'
# Byte-compile the project (PYTHONDONTWRITEBYTECODE may be set): `ced` starts ~50 ms faster.
.venv/bin/python -m compileall -q agent dispatcher cluster >/dev/null || true

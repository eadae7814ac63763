#!/usr/bin/env bash
# Prepare this machine (Debian 12, as root) to run imcloud and its tests:
# Debian packages for the lab and the throwaway test services, then .venv.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    # lab hosts: systemd-nspawn containers, bridge + netns, package cache
    debootstrap systemd-container iproute2 nftables apt-cacher-ng openssh-client
    # throwaway services for the IM server tests (started by the tests, not by apt)
    postgresql-15 redis-server
    # promtool, amtool and blackbox --config.check for the monitoring tests
    prometheus prometheus-alertmanager prometheus-blackbox-exporter
    # profile ha's monitoring tests run a real Patroni, etcd and Sentinel exporter
    patroni etcd-server prometheus-redis-exporter
    # controller side of TLS checks and pebble (ACME test server)
    openssl ca-certificates pebble
    python3-venv
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    # Packages must not start their services on the controller: tests start
    # their own instances on free ports.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.imcloud-setup
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    echo "setup: installing imcloud into .venv"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi
echo "setup: ready (.venv/bin/imcloud)"

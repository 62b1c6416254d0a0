#!/usr/bin/env bash
# Installs everything dataplane needs on a Debian machine, as root; idempotent.
# System packages from apt, Python packages into ./.venv (Debian's own Python
# refuses system-wide pip installs, and a venv keeps the machine clean).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (it installs Debian packages and programs nftables)" >&2
    exit 1
fi

packages=(
    nftables libnftables1 iptables conntrack iproute2 procps curl
    libnetfilter-queue-dev python3 python3-venv python3-dev gcc
    dnsutils dnsperf
    systemd  # systemd-analyze, which verifies deploy/systemd/dataplane.service
)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# pip's chatter goes to a log, shown only when it fails.
log=$(mktemp)
if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e '.[test,bench]'; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    exit 1
fi
rm -f "$log"

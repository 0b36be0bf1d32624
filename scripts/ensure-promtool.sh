#!/usr/bin/env bash
# Make sure the alert-rule tests (tests/e2e/test_deploy.py) have Prometheus'
# promtool. Usage: scripts/ensure-promtool.sh [DIR]  (default: .venv/bin)
#
# promtool comes from Debian's prometheus package, but only the promtool binary
# (static, it needs libc alone) is extracted from it into DIR: installing the
# package would also create a system user and enable and start a Prometheus
# server listening on port 9090 of every address, for a test tool.
# Never fails `make test`: when promtool cannot be had, it says why and exits 0,
# and the rule tests skip with that reason (pytest -ra prints it).
set -euo pipefail

dest=$(realpath -m "${1:-$(dirname "$0")/../.venv/bin}")
if command -v promtool >/dev/null 2>&1 || [ -x "$dest/promtool" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
  echo "no promtool, and no apt-get/dpkg-deb to get Debian's: the alert-rule tests will skip" \
    "(put Prometheus' promtool on PATH to run them)" >&2
  exit 0
fi

echo "extracting promtool from Debian's prometheus package into $dest" >&2
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# apt-get download needs no root, but a fresh machine may need the lists first.
if ! apt-get download -q prometheus >/dev/null 2>&1; then
  if ! { $SUDO apt-get update -q >/dev/null && apt-get download -q prometheus >/dev/null; }; then
    echo "cannot download Debian's prometheus package: the alert-rule tests will skip" >&2
    exit 0
  fi
fi
dpkg-deb -x prometheus_*.deb extracted
mkdir -p "$dest"
install -m 0755 extracted/usr/bin/promtool "$dest/promtool"
"$dest/promtool" --version 2>&1 | head -1 >&2

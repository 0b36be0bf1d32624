#!/usr/bin/env bash
# Make sure the test suite has a PostgreSQL server to use, in the order the
# fixtures try them: PGRELAY_TEST_DSN, local server binaries, a Docker engine.
# When none is there, install Debian's server packages (root or sudo needed).
set -euo pipefail

if [ -n "${PGRELAY_TEST_DSN:-}" ]; then
  exit 0
fi
bindir=$(pg_config --bindir 2>/dev/null || true)
if [ -n "$bindir" ] && [ -x "$bindir/initdb" ]; then
  exit 0
fi
for d in /usr/lib/postgresql/*/bin; do
  if [ -x "$d/initdb" ]; then exit 0; fi
done
if command -v docker >/dev/null 2>&1 && timeout 2 docker info >/dev/null 2>&1; then
  exit 0
fi

echo "no PostgreSQL server found: installing Debian's postgresql packages" >&2
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends postgresql postgresql-contrib

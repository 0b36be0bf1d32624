#!/usr/bin/env bash
# Make sure the reverse-proxy tests (tests/e2e/test_nginx.py) have Debian's nginx
# with its stream module (for the PROXY protocol): installs the packages nginx and
# libnginx-mod-stream when missing (root or sudo needed).
#
# The tests start an nginx of their own, on a free port, as a child process; the
# system service is never wanted. The package's postinst would start it (on port
# 80, with Debian's default site), so the install runs under a policy-rc.d that
# forbids every start (exit 101: the documented way, which Debian's invoke-rc.d and
# deb-systemd-invoke both obey). An existing policy-rc.d is the administrator's and
# is left alone; if it let the service start anyway, the service is stopped again,
# but only when it was not running before the install.
# Never fails `make test`: when nginx cannot be had, it says why and exits 0, and
# the nginx tests skip with that reason (pytest -ra prints it).
set -euo pipefail

NGINX=/usr/sbin/nginx
POLICY=/usr/sbin/policy-rc.d
SERVICE_PID=/run/nginx.pid # where Debian's nginx service keeps its pid

has_stream() {
  # Debian builds the stream module as a module of its own (--with-stream=dynamic).
  local v
  v=$("$NGINX" -V 2>&1) || return 1
  case "$v" in
    *--with-stream=dynamic*)
      local dir
      dir=$(printf '%s\n' "$v" | tr ' ' '\n' | sed -n 's/^--modules-path=//p')
      [ -f "${dir:-/usr/lib/nginx/modules}/ngx_stream_module.so" ]
      ;;
    *--with-stream*) return 0 ;;
    *) return 1 ;;
  esac
}

if [ -x "$NGINX" ] && has_stream; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "no $NGINX with the stream module and no apt-get: the nginx tests will skip" \
    "(install nginx with its stream module to run them)" >&2
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1; then
  SUDO="sudo"
else
  echo "installing nginx needs root or sudo: the nginx tests will skip" >&2
  exit 0
fi

out=$(mktemp)
ours=""
cleanup() {
  rm -f "$out"
  if [ -n "$ours" ]; then $SUDO rm -f "$POLICY"; fi
}
trap cleanup EXIT

was_running=""
if [ -e "$SERVICE_PID" ]; then was_running=1; fi
if [ ! -e "$POLICY" ]; then
  # Ours for the length of this install only; removed on every exit.
  ours=1
  printf '#!/bin/sh\n# scripts/ensure-nginx.sh (pgrelay): no service starts during its install.\nexit 101\n' |
    $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 0755 "$POLICY"
fi

echo "installing Debian's nginx and libnginx-mod-stream for the reverse-proxy tests" \
  "(the system service is not started)" >&2
apt_install() {
  $SUDO env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends nginx libnginx-mod-stream >"$out" 2>&1
}
# A fresh machine may need the package lists first.
if ! apt_install && ! { $SUDO apt-get update -q >"$out" 2>&1 && apt_install; }; then
  tail -n 5 "$out" >&2
  echo "apt-get could not install nginx and libnginx-mod-stream: the nginx tests will skip" >&2
  exit 0
fi

if [ -z "$ours" ] && [ -z "$was_running" ] && [ -e "$SERVICE_PID" ]; then
  # The existing policy-rc.d let the postinst start the service: stop what we started.
  echo "stopping the nginx service the package started" >&2
  $SUDO invoke-rc.d nginx stop || true
fi
"$NGINX" -v 2>&1 | head -1 >&2
if [ -d /run/systemd/system ] && systemctl is-enabled --quiet nginx 2>/dev/null; then
  # policy-rc.d forbids starts, not the enabling every install does.
  echo "note: the package enabled the nginx service for the next boot;" \
    "'sudo systemctl disable nginx' if this machine should not serve port 80" >&2
fi
if ! has_stream; then
  echo "nginx was installed but its stream module cannot be found: the PROXY protocol test will skip" >&2
fi

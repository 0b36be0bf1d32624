#!/usr/bin/env bash
# Autobahn|Testsuite against relay/ws, through the echo app beside this script.
# usage: tests/conformance/run.sh [CASES]   (default "all": 1-7, 9, 10; 9.* takes minutes)
# Exits with run-autobahn.sh's status; exits 0 with a message where no
# Python 2.7 exists (the testsuite is Python 2 code).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CASES=${1:-all}
AUTOBAHN=$ROOT/../shared/tools/run-autobahn.sh
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || PY=python3

if [ ! -x "$AUTOBAHN" ]; then
  echo "SKIP: $AUTOBAHN not found" >&2; exit 0
fi
have_py2() {
  local c
  for c in "${AB_PY2:-}" $(ls -d "$(pyenv root 2>/dev/null)"/versions/2.7*/bin/python 2>/dev/null) python2.7 python2; do
    [ -n "$c" ] && "$c" -c 'import sys; sys.exit(sys.version_info[0] != 2)' 2>/dev/null && return 0
  done
  return 1
}
if ! have_py2; then
  echo "SKIP: Autobahn|Testsuite needs Python 2.7 (set AB_PY2 or install pyenv 2.7.18)" >&2; exit 0
fi

WORK=$(mktemp -d)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

"$PY" "$ROOT/tests/conformance/echo_server.py" --port 0 --port-file "$WORK/port" \
  >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do [ -s "$WORK/port" ] && break; sleep 0.1; done
if [ ! -s "$WORK/port" ]; then
  echo "echo server did not start:" >&2; cat "$WORK/server.log" >&2; exit 2
fi
PORT=$(cat "$WORK/port")
echo "echo server pid $SERVER_PID on port $PORT" >&2

"$AUTOBAHN" "ws://127.0.0.1:$PORT" "$CASES"
STATUS=$?
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  echo "echo server died during the run:" >&2; tail -n 30 "$WORK/server.log" >&2
  [ "$STATUS" -eq 0 ] && STATUS=1
fi
exit "$STATUS"

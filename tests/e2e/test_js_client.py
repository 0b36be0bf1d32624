"""The web client SDK (clients/js) against the real `pgrelay serve` and a real
PostgreSQL: node's test runner drives Debian's Chromium (playwright-core over
the DevTools protocol: offline, page lifecycle) and runs a Node smoke test
with the `ws` package.

This file starts the relay (the `relay` fixture) and a small harness HTTP
server the node tests use: the test page and the SDK bundle that `pgrelay dev`
serves (relay/dev/static/pgrelay-client.js), tokens minted with the relay's
secret, `relay.emit` as the backend login, and the events table as the oracle.
It fails with node's output when node fails, and when node ran no test.

Localhost only; free ports; every wait has a deadline. The browser tests skip
only when /usr/bin/chromium is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import RelayProcess
from tests.pgharness import BACKEND

REPO = Path(__file__).resolve().parents[2]
JS = REPO / "clients" / "js"
BUNDLE = REPO / "relay" / "dev" / "static" / "pgrelay-client.js"
PAGE = JS / "test" / "e2e" / "page.html"
CHROMIUM = Path("/usr/bin/chromium")
#: One node test file may take this long (it bounds every wait itself).
NODE_TIMEOUT_S = 120


class Harness(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, relay: RelayProcess) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.relay = relay

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Harness

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.send_header("cache-control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, value: object) -> None:
        self._send(200, json.dumps(value).encode(), "application/json")

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        relay = self.server.relay
        if url.path == "/page":
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif url.path == "/pgrelay-client.js":
            self._send(200, BUNDLE.read_bytes(), "text/javascript")
        elif url.path == "/token":
            token = relay.token(
                [query["org"]],
                sub=query.get("sub", "user-1"),
                lifetime_s=int(query.get("life", "3600")),
            )
            self._send(200, token.encode(), "text/plain")
        elif url.path == "/ids":
            with relay.db.connect() as conn:
                rows = conn.execute(
                    "SELECT id FROM relay.events WHERE organization_id = %s ORDER BY id",
                    (query["org"],),
                ).fetchall()
            self._json([r[0] for r in rows])
        else:
            self._send(404, b"not found", "text/plain")

    def do_POST(self) -> None:
        """/emit {org, n, event_type?, entity_id?}: n events in one transaction, as the backend."""
        length = int(self.headers.get("content-length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        with self.server.relay.db.connect(BACKEND) as conn:
            rows = conn.execute(
                "SELECT relay.emit(%s, %s, 'job', coalesce(%s, i::text), '{}'::jsonb)"
                " FROM generate_series(1, %s) AS i",
                (
                    body["org"],
                    body.get("event_type", "job.updated"),
                    body.get("entity_id"),
                    int(body.get("n", 1)),
                ),
            ).fetchall()
        self._json([r[0] for r in rows])


@pytest.fixture
def harness(relay: RelayProcess) -> Iterator[Harness]:
    server = Harness(relay)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class NodeRun:
    tests: int
    passed: int
    output: str


def run_node(test_file: str, env: dict[str, str]) -> NodeRun:
    """Run one compiled node test file; fail with its output unless every test ran and passed."""
    node = shutil.which("node")
    assert node, "node is not installed (clients/js needs node >= 20)"
    compiled = JS / "build" / "test" / "e2e" / test_file
    assert compiled.exists(), f"{compiled} is missing: run `make js` (npm ci and the build) first"
    proc = subprocess.run(
        [node, "--test", "--test-concurrency=1", "--test-reporter=tap", str(compiled)],
        cwd=JS,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
        check=False,
    )
    output = proc.stdout + proc.stderr

    def count(name: str) -> int:
        match = re.search(rf"^# {name} (\d+)$", proc.stdout, re.MULTILINE)
        assert match, f"no '# {name}' line from node:\n{output[-6000:]}"
        return int(match.group(1))

    assert proc.returncode == 0, f"node {test_file} failed:\n{output[-12000:]}"
    run = NodeRun(count("tests"), count("pass"), output)
    assert run.tests > 0 and run.passed == run.tests, f"node ran no (or not every) test:\n{output}"
    assert count("skipped") == 0 and count("todo") == 0, output
    return run


def _env(relay: RelayProcess, harness: Harness) -> dict[str, str]:
    return {
        "PGRELAY_JS_HARNESS_URL": harness.url,
        "PGRELAY_JS_WS_URL": relay.ws_url,
        "PGRELAY_JS_ADMIN_URL": relay.admin_url,
        "PGRELAY_JS_CHROMIUM": str(CHROMIUM),
    }


def test_node_client_with_ws_against_the_real_relay(relay: RelayProcess, harness: Harness) -> None:
    run = run_node("node-smoke.test.js", _env(relay, harness))
    assert run.passed >= 1


def test_browser_client_against_the_real_relay(relay: RelayProcess, harness: Harness) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
    run = run_node("browser.test.js", _env(relay, harness))
    assert run.passed >= 5

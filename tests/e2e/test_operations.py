"""An operator's day one with the real `pgrelay serve`: it stops when told in
every start-up phase, fails with the fix, logs one JSON format, counts what it
refuses, and notices a LISTEN that went deaf.

Localhost only; free ports; every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from relay.dev.embedded import free_port
from tests.e2e.conftest import REPO, SECRET, Client, RelayProcess, connect, start_relay
from tests.pgharness import BACKEND, DAEMON, Database

ORG = uuid.UUID("00000000-0000-4000-8000-0000000000e1")


def spawn(env_extra: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`pgrelay serve` with these settings (admin port returned); JSON logs to a file."""
    admin = free_port()
    env = {
        **os.environ,
        "PGRELAY_LISTEN": f"127.0.0.1:{free_port()}",
        "PGRELAY_ADMIN_LISTEN": f"127.0.0.1:{admin}",
        "PGRELAY_JWT_SECRET": SECRET,
        "PGRELAY_LOG_FORMAT": "json",
        **env_extra,
    }
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve"],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return proc, admin


def http_status(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(errors="replace").splitlines()
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"a log line is not JSON: {line!r}") from None
    return parsed


def stop_within(proc: subprocess.Popen[bytes], seconds: float) -> tuple[int, float]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=seconds + 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, time.monotonic() - started


# -- stopping and failing during start-up ----------------------------------------------


def test_sigterm_while_the_database_is_unreachable_exits_0_within_a_second(
    tmp_path: Path,
) -> None:
    dead = f"postgresql://{DAEMON}@127.0.0.1:{free_port()}/nowhere"
    proc, admin = spawn({"PGRELAY_DATABASE_URL": dead}, tmp_path / "log")
    try:
        wait_for(lambda: http_status(admin, "/readyz") == 503, 20, "/readyz 503")
        assert http_status(admin, "/healthz") == 200
        time.sleep(1.5)  # a few connect attempts
    finally:
        code, took = stop_within(proc, 1.0)
    assert code == 0 and took < 1.0, (code, took)
    lines = json_lines(tmp_path / "log")
    attempts = [ln for ln in lines if ln.get("event") == "listener cannot connect"]
    assert 1 <= len(attempts) <= 8, "the cause once per backoff step, not every 0.5 s"


def test_sigterm_while_the_schema_is_missing_exits_0_and_the_log_says_migrate(
    pg_template: str, empty_db: Database, tmp_path: Path
) -> None:
    # pg_template: the cluster's login roles exist (the daemon's among them).
    proc, admin = spawn({"PGRELAY_DATABASE_URL": empty_db.dsn(DAEMON)}, tmp_path / "log")
    try:
        wait_for(
            lambda: "pgrelay migrate" in (tmp_path / "log").read_text(), 20, "the migrate hint"
        )
        assert http_status(admin, "/readyz") == 503
    finally:
        code, took = stop_within(proc, 1.0)
    assert code == 0 and took < 1.0, (code, took)
    hints = [ln.get("hint") for ln in json_lines(tmp_path / "log") if ln.get("hint")]
    assert any("the relay schema is missing: run `pgrelay migrate`" in h for h in hints), hints


def test_sigint_during_start_up_stops_too(tmp_path: Path) -> None:
    dead = f"postgresql://{DAEMON}@127.0.0.1:{free_port()}/nowhere"
    proc, admin = spawn({"PGRELAY_DATABASE_URL": dead}, tmp_path / "log")
    try:
        wait_for(lambda: http_status(admin, "/healthz") == 200, 20, "/healthz")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("which", ["PGRELAY_LISTEN", "PGRELAY_ADMIN_LISTEN"])
def test_a_port_in_use_is_one_line_and_exit_2(db: Database, tmp_path: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, _ = spawn(
            {"PGRELAY_DATABASE_URL": db.dsn(DAEMON), which: f"127.0.0.1:{port}"},
            tmp_path / "log",
        )
        assert proc.wait(timeout=30) == 2
    lines = json_lines(tmp_path / "log")
    assert len(lines) == 1, lines
    assert lines[0]["level"] == "error" and which in lines[0]["error"]
    assert str(port) in lines[0]["error"]


def test_a_bad_setting_is_one_json_line_and_exit_2(tmp_path: Path) -> None:
    proc, _ = spawn({"PGRELAY_LISTEN": "8765", "PGRELAY_DATABASE_URL": "x"}, tmp_path / "log")
    assert proc.wait(timeout=30) == 2
    (line,) = json_lines(tmp_path / "log")
    assert line["event"] == "cannot start: bad setting" and "PGRELAY_LISTEN" in line["error"]


def test_an_origin_pattern_that_cannot_match_is_refused_at_start(tmp_path: Path) -> None:
    proc, _ = spawn(
        {"PGRELAY_ALLOWED_ORIGINS": "https://app.*.example.com", "PGRELAY_DATABASE_URL": "x"},
        tmp_path / "log",
    )
    assert proc.wait(timeout=30) == 2
    (line,) = json_lines(tmp_path / "log")
    assert "PGRELAY_ALLOWED_ORIGINS" in line["error"] and "leftmost" in line["error"]


# -- logs and refusals while serving ---------------------------------------------------


@pytest.fixture
def origins_relay(db: Database, tmp_path: Path) -> Iterator[RelayProcess]:
    relay = start_relay(db, tmp_path, allowed_origins="https://*.example.com")
    try:
        yield relay
    finally:
        relay.terminate()


async def test_origins_match_patterns_and_a_refused_origin_is_logged_and_counted(
    origins_relay: RelayProcess,
) -> None:
    relay = origins_relay
    async with connect(relay.ws_url, extra_headers=[("Origin", "https://app.example.com")]) as ws:
        await Client(ws).auth(relay.token([ORG]))
    for _ in range(3):
        with pytest.raises(Exception, match="403"):
            async with connect(relay.ws_url, extra_headers=[("Origin", "https://evil.test")]):
                pass
    await trio.sleep(0.3)
    refused = [ln for ln in relay.logs() if ln.get("event") == "connection refused"]
    assert len(refused) == 1  # logged once per cause ...
    assert refused[0]["reason"] == "origin" and "https://evil.test" in refused[0]["cause"]
    metrics = relay.admin_get("/metrics")[1]
    assert 'pgrelay_connections_rejected_total{reason="origin"} 3.0' in metrics  # ... all counted


async def test_every_log_line_is_json_and_each_connection_closes_in_one_line(
    relay: RelayProcess,
) -> None:
    for _ in range(3):
        async with connect(relay.ws_url) as ws:
            c = Client(ws)
            await c.auth(relay.token([ORG]))
            await c.subscribe(ORG)
    relay.terminate()
    lines = json_lines(relay.log_path)
    # At info (the fixture logs at debug): one line per connection, when it closes.
    per_connection = [
        ln for ln in lines if ln.get("level") != "debug" and ("connection_id" in ln or "peer" in ln)
    ]
    assert len(per_connection) == 3, per_connection
    assert {ln["event"] for ln in per_connection} == {"connection closed"}
    assert not any("*_created" in k for k in lines)


def test_metrics_an_sre_expects(relay: RelayProcess) -> None:
    text = relay.admin_get("/metrics")[1]
    for name in (
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
        "pgrelay_build_info{",
        "pgrelay_connections_rejected_total{",
        "pgrelay_catch_up_seconds_bucket",
        "pgrelay_listener_healthy 1.0",
        "pgrelay_schema_behind 0.0",
        "pgrelay_schema_version ",
    ):
        assert name in text, name
    assert "_created" not in text


# -- a LISTEN that goes deaf --------------------------------------------------------------


class FreezingProxy:
    """A TCP relay between the daemon and Postgres that can freeze chosen existing
    connections: bytes stop flowing both ways, the sockets stay open (a pooler or
    a dead path that swallows everything without a reset)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.links: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            link = {"first": b"", "frozen": threading.Event(), "socks": (client, upstream)}
            with self.lock:
                self.links.append(link)
            for a, b, first in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(link, a, b, first), daemon=True).start()

    def _pump(
        self, link: dict[str, Any], src: socket.socket, dst: socket.socket, first: bool
    ) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if first and len(link["first"]) < 4096:
                link["first"] += data
            while link["frozen"].is_set() and not self.closing:
                time.sleep(0.05)  # swallow: nothing forwarded, nothing closed
            try:
                dst.sendall(data)
            except OSError:
                return

    def freeze(self, marker: bytes) -> int:
        """Freeze the open connections whose startup packet contains `marker`."""
        with self.lock:
            hit = [link for link in self.links if marker in link["first"]]
        for link in hit:
            link["frozen"].set()
        return len(hit)

    def close(self) -> None:
        self.closing = True
        self.server.close()
        for link in self.links:
            for sock in link["socks"]:
                sock.close()


@contextmanager
def proxied(db: Database) -> Iterator[tuple[FreezingProxy, str]]:
    params = dict(part.split("=", 1) for part in db.dsn(DAEMON).split())
    proxy = FreezingProxy((params["host"], int(params["port"])))
    try:
        yield proxy, f"host=127.0.0.1 port={proxy.port} user={DAEMON} dbname={params['dbname']}"
    finally:
        proxy.close()


async def test_a_deaf_listener_is_found_by_its_probe_and_healed_losing_nothing(
    db: Database, tmp_path: Path
) -> None:
    with proxied(db) as (proxy, dsn):
        relay = start_relay(db, tmp_path, listener_probe_s="1", database_url=dsn)
        try:
            async with connect(relay.ws_url) as ws:
                c = Client(ws)
                await c.auth(relay.token([ORG]))
                await c.subscribe(ORG)
                assert proxy.freeze(b"pgrelay-listener") == 1
                frozen_at = time.monotonic()
                ids = []
                with db.connect(BACKEND) as conn:
                    for i in range(5):
                        row = conn.execute(
                            "SELECT relay.emit(%s, 'job.updated', 'job', %s)", (ORG, str(i))
                        ).fetchone()
                        assert row is not None
                        ids.append(row[0])
                        await trio.sleep(0.5)
                got = [e["id"] for e in await c.events(5, timeout_s=10)]
                assert got == ids  # the poll timer delivered meanwhile: nothing lost

                def healed() -> bool:
                    metrics = relay.admin_get("/metrics")[1]
                    return (
                        "pgrelay_listener_probe_failures_total 1.0" in metrics
                        and "pgrelay_listener_healthy 1.0" in metrics
                    )

                await trio.to_thread.run_sync(lambda: wait_for(healed, 10, "the listener healed"))
                # Found within two probe intervals, reconnected right after.
                assert time.monotonic() - frozen_at < 6
                assert relay.admin_get("/readyz")[0] == 200
                # The doorbell rings again: a new event arrives well before the poll timer.
                with db.connect(BACKEND) as conn:
                    conn.execute("SELECT relay.emit(%s, 'job.updated', 'job', 'after')", (ORG,))
                started = time.monotonic()
                (event,) = await c.events(1, timeout_s=5)
                assert event["entity_id"] == "after" and time.monotonic() - started < 0.9
            warnings = [
                ln for ln in relay.logs() if "probe did not come back" in str(ln.get("event"))
            ]
            assert len(warnings) == 1
        finally:
            relay.terminate()

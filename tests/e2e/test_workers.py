"""`pgrelay serve --workers 2`: two processes on one port, one supervisor.

The real command, real clients, the events table as the oracle. Which worker
holds a connection is read from `pgrelay_worker_connections{worker}` (the
kernel picks the worker by a hash of the connection's ports, so a test opens
connections until one lands where it wants).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from tests.e2e.conftest import Client, RelayProcess, connect, start_relay
from tests.e2e.test_operations import http_status, json_lines, spawn, stop_within, wait_for
from tests.pgharness import BACKEND, DAEMON, Database

ORG = uuid.UUID("00000000-0000-4000-8000-0000000000c1")
SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})? (\S+)$")


def metrics(relay: RelayProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics: (name, labels) -> value."""
    status, text = relay.admin_get("/metrics")
    assert status == 200
    found = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            name, labels, value = match.groups()
            pairs = frozenset(re.findall(r'(\w+)="([^"]*)"', labels or ""))
            found[(name, pairs)] = float(value)
    return found


def value(relay: RelayProcess, name: str, **labels: str) -> float:
    return metrics(relay)[(name, frozenset(labels.items()))]


def per_worker(relay: RelayProcess, name: str = "pgrelay_worker_connections") -> dict[str, float]:
    return {
        dict(labels)["worker"]: v
        for (n, labels), v in metrics(relay).items()
        if n == name and "worker" in dict(labels)
    }


def worker_pids(relay: RelayProcess) -> dict[int, int]:
    """The pid of each worker, from the supervisor's latest "worker started" lines."""
    pids = {}
    for line in relay.logs():
        if line.get("event") == "worker started":
            pids[line["worker"]] = line["pid"]
    return pids


def oracle(db: Database) -> list[int]:
    with db.connect() as conn:
        rows = conn.execute(
            "SELECT id FROM relay.events WHERE organization_id = %s ORDER BY id", (ORG,)
        ).fetchall()
    return [row[0] for row in rows]


def emit_many(db: Database, n: int) -> None:
    with db.connect(BACKEND) as conn:
        conn.execute(
            "SELECT relay.emit(%s, 'job.updated', 'job', g::text) FROM generate_series(1, %s) g",
            (ORG, n),
        )


async def settle(relay: RelayProcess, total: int) -> dict[str, float]:
    """Wait until the workers hold `total` connections in all; per worker."""
    deadline = trio.current_time() + 5
    while True:
        counts = per_worker(relay)
        if sum(counts.values()) == total:
            return counts
        assert trio.current_time() < deadline, (counts, total)
        await trio.sleep(0.02)


async def open_client(
    relay: RelayProcess, stack: AsyncExitStack, *, sub: str, held: int
) -> tuple[Client, str]:
    """A new authenticated client (`held`: connections already open); its worker."""
    before = await settle(relay, held)
    ws = await stack.enter_async_context(connect(relay.ws_url))
    client = Client(ws)
    await client.auth(relay.token([ORG], sub=sub))
    after = await settle(relay, held + 1)
    (worker,) = [w for w, n in after.items() if n > before.get(w, 0)]
    return client, worker


async def clients_on_every_worker(
    relay: RelayProcess, stack: AsyncExitStack, workers: int = 2, each: int = 2
) -> list[tuple[Client, str]]:
    """Open clients until every worker has `each` of them (at most 24)."""
    clients: list[tuple[Client, str]] = []
    while len(clients) < 24:
        client, worker = await open_client(relay, stack, sub=f"u{len(clients)}", held=len(clients))
        clients.append((client, worker))
        placed = [w for _, w in clients]
        if all(placed.count(str(n)) >= each for n in range(workers)):
            return clients
    raise AssertionError(f"the kernel put every connection on one worker: {placed}")


@pytest.fixture
def two_workers(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RelayProcess]:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the metrics directory goes
    relay = start_relay(db, tmp_path, workers="2", shutdown_timeout_s="3")
    try:
        yield relay
    finally:
        relay.terminate()


async def test_both_workers_serve_and_every_client_gets_every_event_once(
    two_workers: RelayProcess,
) -> None:
    relay = two_workers
    async with AsyncExitStack() as stack:
        clients = await clients_on_every_worker(relay, stack)
        for client, _ in clients:
            await client.subscribe(ORG)
        emit_many(relay.db, 30)
        ids = oracle(relay.db)
        assert len(ids) == 30
        for client, _ in clients:
            assert [e["id"] for e in await client.events(30)] == ids
        for client, _ in clients:
            await client.nothing_for(0.1)

        # /metrics: the sums over the workers, and each worker's share.
        n = len(clients)
        assert value(relay, "pgrelay_connections") == n
        assert value(relay, "pgrelay_subscriptions") == n
        placed = [w for _, w in clients]
        assert per_worker(relay) == {w: placed.count(w) for w in ("0", "1")}
        assert per_worker(relay, "pgrelay_listener_up") == {"0": 1, "1": 1}
        assert per_worker(relay, "pgrelay_worker_ready") == {"0": 1, "1": 1}
        assert per_worker(relay, "pgrelay_worker_restarts_total") == {"0": 0, "1": 0}

        def delivered() -> bool:  # workers copy their counters every half second
            return value(relay, "pgrelay_events_delivered_total") == n * 30

        await trio.to_thread.run_sync(lambda: wait_for(delivered, 5, "the delivered count"))
        assert value(relay, "pgrelay_events_read_total") == 2 * 30  # each worker tails
    text = relay.admin_get("/metrics")[1]
    for name in ("pgrelay_build_info{", "process_resident_memory_bytes{worker=", "_bucket{"):
        assert name in text, name
    assert text.count("# TYPE pgrelay_connections gauge") == 1
    assert "_created" not in text


async def test_a_client_resumes_exactly_on_the_other_worker(two_workers: RelayProcess) -> None:
    relay = two_workers
    async with AsyncExitStack() as first:
        client, was_on = await open_client(relay, first, sub="mobile", held=0)
        await client.subscribe(ORG)
        emit_many(relay.db, 5)
        seen = await client.events(5)
        cursor = seen[-1]["cursor"]
    emit_many(relay.db, 7)  # while away
    missed = oracle(relay.db)[5:]
    async with AsyncExitStack() as stack:
        held = 0
        while True:
            client, now_on = await open_client(relay, stack, sub=f"mobile-{held}", held=held)
            held += 1
            if now_on != was_on:
                break
            assert held < 24, "never reached the other worker"
        frames = await client.subscribe(ORG, cursor=cursor)
        assert [f["id"] for f in frames if f["type"] == "event"] == missed
        assert frames[-1]["type"] == "subscribed" and frames[-1]["replayed"] == 7
        live = relay.db.emit(ORG, entity_id="live")
        assert [e["id"] for e in await client.events(1)] == [live]


class Follower:
    """A client that keeps its cursor, and reconnects and resumes whenever its
    connection is cut."""

    def __init__(self, relay: RelayProcess, sub: str) -> None:
        self.relay, self.sub = relay, sub
        self.ids: list[int] = []
        self.cursor: str | None = None
        self.reconnects = 0

    async def run(self) -> None:
        while True:
            try:
                async with connect(self.relay.ws_url) as ws:
                    c = Client(ws)
                    await c.auth(self.relay.token([ORG], sub=self.sub))
                    for frame in await c.subscribe(ORG, cursor=self.cursor):
                        self._take(frame)
                    while True:
                        self._take(await c.recv(timeout_s=60))
            except (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError):
                self.reconnects += 1
                await trio.sleep(0.05)

    def _take(self, frame: dict[str, Any]) -> None:
        assert frame["type"] in ("event", "subscribed"), frame
        if frame["type"] == "event":
            self.ids.append(frame["id"])
        self.cursor = frame["cursor"]


async def test_a_killed_worker_is_restarted_and_its_clients_resume_losing_nothing(
    two_workers: RelayProcess,
) -> None:
    relay = two_workers
    pids = worker_pids(relay)
    followers: list[Follower] = []
    async with trio.open_nursery() as nursery:
        while len(followers) < 24:  # until each worker has two
            follower = Follower(relay, f"f{len(followers)}")
            followers.append(follower)
            nursery.start_soon(follower.run)
            counts = await settle(relay, len(followers))
            if min(counts.values(), default=0) >= 2 and len(counts) == 2:
                break
        writing = True

        async def write() -> None:
            with relay.db.connect(BACKEND) as conn:
                while writing:
                    conn.execute("SELECT relay.emit(%s, 'job.updated', 'job', 'x')", (ORG,))
                    await trio.sleep(0.01)

        nursery.start_soon(write)
        await trio.sleep(0.3)
        os.kill(pids[0], signal.SIGKILL)

        def restarted() -> bool:
            return worker_pids(relay)[0] != pids[0] and relay.admin_get("/readyz")[0] == 200

        await trio.to_thread.run_sync(lambda: wait_for(restarted, 10, "worker 0 restarted"))
        await trio.sleep(0.3)
        writing = False
        await trio.sleep(0.1)
        ids = oracle(relay.db)
        deadline = trio.current_time() + 10
        while any(set(f.ids) != set(ids) for f in followers):
            assert trio.current_time() < deadline, [len(set(f.ids)) for f in followers]
            await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    for f in followers:
        assert sorted(set(f.ids)) == ids  # nothing lost; a resume may repeat (same id)
    assert sum(f.reconnects for f in followers) >= 2  # worker 0's clients were cut
    assert per_worker(relay, "pgrelay_worker_restarts_total") == {"0": 1, "1": 0}
    exits = [ln for ln in relay.logs() if ln.get("event") == "worker exited"]
    assert len(exits) == 1 and exits[0]["status"] == "killed by SIGKILL", exits
    # The new worker 0 takes connections again.
    async with AsyncExitStack() as stack:
        for held in range(24):
            client, worker = await open_client(relay, stack, sub=f"after-{held}", held=held)
            if worker == "0":
                assert (await client.subscribe(ORG))[-1]["type"] == "subscribed"
                break
        else:
            raise AssertionError("the restarted worker never got a connection")


async def test_sigterm_closes_every_client_with_1012_and_exits_0(
    two_workers: RelayProcess,
) -> None:
    relay = two_workers
    async with AsyncExitStack() as stack:
        clients = await clients_on_every_worker(relay, stack, each=1)
        for client, _ in clients:
            await client.subscribe(ORG)
        started = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        for client, _ in clients:
            assert await client.close_code() == 1012
    code = await trio.to_thread.run_sync(lambda: relay.proc.wait(timeout=10))
    assert code == 0 and time.monotonic() - started < 3 + 2  # within the drain time
    lines = relay.logs()
    drained = [ln.get("worker") for ln in lines if ln.get("event") == "clients closed"]
    assert sorted(drained) == [0, 1]
    assert lines[-1]["event"] == "stopped" and "worker" not in lines[-1]
    assert not list(relay.log_path.parent.glob("pgrelay-metrics-*")), "metrics left behind"


def test_workers_stop_when_the_supervisor_is_killed(two_workers: RelayProcess) -> None:
    relay = two_workers
    pids = list(worker_pids(relay).values())
    relay.proc.kill()
    relay.proc.wait()

    def gone() -> bool:
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            return False
        return True

    wait_for(gone, 10, "the workers to stop")
    # (the metrics directory stays behind, in the test's TMPDIR: nobody was left to remove it)
    assert sum(ln.get("event") == "the supervisor is gone: stopping" for ln in relay.logs()) == 2


@pytest.mark.parametrize("which", ["PGRELAY_LISTEN", "PGRELAY_ADMIN_LISTEN", "reuseport"])
def test_a_port_in_use_is_one_line_and_exit_2(db: Database, tmp_path: Path, which: str) -> None:
    with socket.socket() as taken:
        if which == "reuseport":  # another pgrelay with workers, left running
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            which = "PGRELAY_LISTEN"
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, _ = spawn(
            {
                "PGRELAY_DATABASE_URL": db.dsn(DAEMON),
                "PGRELAY_WORKERS": "2",
                which: f"127.0.0.1:{port}",
            },
            tmp_path / "log",
        )
        assert proc.wait(timeout=30) == 2
    (line,) = json_lines(tmp_path / "log")
    assert line["level"] == "error" and which in line["error"] and str(port) in line["error"]


def test_sigterm_while_the_database_is_unreachable_exits_0_quickly(tmp_path: Path) -> None:
    from relay.dev.embedded import free_port

    dead = f"postgresql://{DAEMON}@127.0.0.1:{free_port()}/nowhere"
    proc, admin = spawn({"PGRELAY_DATABASE_URL": dead, "PGRELAY_WORKERS": "2"}, tmp_path / "log")
    try:
        wait_for(
            lambda: "listener cannot connect" in (tmp_path / "log").read_text(), 20, "a worker"
        )
        assert http_status(admin, "/readyz") == 503
    finally:
        code, took = stop_within(proc, 2.0)
    assert code == 0 and took < 2.0, (code, took)

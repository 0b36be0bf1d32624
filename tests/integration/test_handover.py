"""The handover from catch-up to live, in process against a real server.

The daemon runs in this trio run (`Daemon.run(shutdown_trigger=...)`), its
first reads behind a gate, so rows can be committed from another thread at
the worst moment. In SQL (`reads=`, a test seam; `PGRELAY_RECENT_EVENTS=0`):
after the catch-up took its snapshot S, before its rows went out. From the
recent rows (the default): after the subscription began following the tail,
while its authorization is held. The events table is the oracle.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from relay import config
from relay.core.cursor import Cursor, decode_cursor
from relay.core.subscription import CatchUpPage, CatchUpQuery
from relay.db.authorize import Answer
from relay.db.pool import Database as Pool
from relay.db.reads import SubscriberReads
from relay.server.app import Daemon
from relay.server.jwt import mint_token
from tests.pgharness import BACKEND, DAEMON, Database

ORG = uuid.UUID("00000000-0000-4000-8000-0000000000d1")
SECRET = "handover-" + "s" * 40


class GatedReads(SubscriberReads):
    """SubscriberReads that hold the answer of each round's first read (after S
    was taken) until the test opens the gate."""

    def __init__(self, db: Pool, role: str) -> None:
        super().__init__(db, role)
        self.taken = trio.Event()
        self.gate = trio.Event()

    async def catch_up(self, claims_json: str, query: CatchUpQuery) -> CatchUpPage:
        page = await super().catch_up(claims_json, query)
        if query.head is None and not self.gate.is_set():
            self.taken.set()
            await self.gate.wait()
        return page


@dataclass
class Running:
    daemon: Daemon
    reads: GatedReads
    url: str
    stop: trio.Event

    def token(self) -> str:
        return mint_token(SECRET, orgs=[str(ORG)], sub="user-1", lifetime_s=600)


@asynccontextmanager
async def running(db: Database, path: str = "sql", **settings: str) -> AsyncIterator[Running]:
    """`path`: where a round's first read is answered: "sql" or "memory"."""
    if path == "sql":
        settings.setdefault("recent_events", "0")
    env = {
        "PGRELAY_DATABASE_URL": db.dsn(DAEMON),
        "PGRELAY_LISTEN": "127.0.0.1:0",
        "PGRELAY_ADMIN_LISTEN": "127.0.0.1:0",
        "PGRELAY_JWT_SECRET": SECRET,
    } | {"PGRELAY_" + k.upper(): v for k, v in settings.items()}
    made: list[GatedReads] = []

    def gated(pool: Pool, role: str) -> GatedReads:
        made.append(GatedReads(pool, role))
        return made[0]

    daemon = Daemon(config.load({}, env), reads=gated)
    ask = daemon.authorizer.ask

    async def gated_ask(claims_json: str, org: uuid.UUID) -> Answer:
        answer = await ask(claims_json, org)
        gate = made[0]
        if not gate.gate.is_set():
            gate.taken.set()
            await gate.gate.wait()
        return answer

    daemon.authorizer.ask = gated_ask  # type: ignore[method-assign]
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(daemon.run, shutdown_trigger=stop.wait))
            try:
                yield Running(daemon, made[0], f"ws://127.0.0.1:{daemon.ws_port}/v1", stop)
            finally:
                stop.set()


def emit(db: Database, n: int, *, per_txn: int = 1) -> list[int]:
    ids: list[int] = []
    with db.connect(BACKEND, autocommit=False) as conn:
        for start in range(0, n, per_txn):
            for i in range(start, min(n, start + per_txn)):
                row = conn.execute(
                    "SELECT relay.emit(%s, 'job.updated', 'job', %s)", (ORG, str(i))
                ).fetchone()
                assert row is not None
                ids.append(row[0])
            conn.commit()
    return ids


def owed(db: Database, cursor: str) -> set[int]:
    decoded = decode_cursor(cursor)
    assert isinstance(decoded, Cursor)
    with db.connect() as owner:
        rows = owner.execute(
            "SELECT e.id, e.xid::text AS x FROM relay.events AS e WHERE e.organization_id = %s",
            (ORG,),
        ).fetchall()
    return {r[0] for r in rows if not decoded.snapshot.visible(int(r[1]))}


async def recv(ws: Any, timeout_s: float = 10) -> dict[str, Any]:
    with trio.fail_after(timeout_s):
        return json.loads(await ws.get_message())  # type: ignore[no-any-return]


async def cursor_now(r: Running) -> str:
    r.reads.gate.set()  # the first subscribe of a test is not the one under test
    async with open_websocket_url(r.url) as ws:
        await ws.send_message(json.dumps({"type": "auth", "token": r.token()}))
        assert (await recv(ws))["type"] == "ready"
        await ws.send_message(json.dumps({"type": "subscribe", "ref": "c", "org": str(ORG)}))
        frame = await recv(ws)
        assert frame["type"] == "subscribed", frame
    r.reads.gate = trio.Event()
    r.reads.taken = trio.Event()
    return str(frame["cursor"])


@pytest.mark.parametrize("path", ["sql", "memory"])
async def test_rows_committed_while_a_catch_up_is_open_arrive_once_no_gap(
    db: Database, path: str
) -> None:
    async with running(db, path) as r:
        cursor = await cursor_now(r)
        emit(db, 200)
        emit(db, 300, per_txn=100)
        async with open_websocket_url(r.url) as ws:
            await ws.send_message(json.dumps({"type": "auth", "token": r.token()}))
            assert (await recv(ws))["type"] == "ready"
            # A transaction open when S is taken, committed while the catch-up is held.
            late = db.connect(BACKEND, autocommit=False)
            late_id = late.execute(
                "SELECT relay.emit(%s, 'job.updated', 'job', 'late')", (ORG,)
            ).fetchone()
            await ws.send_message(
                json.dumps({"type": "subscribe", "ref": "r", "org": str(ORG), "cursor": cursor})
            )
            with trio.fail_after(10):
                await r.reads.taken.wait()  # S is taken (SQL) or about to be (memory)

            def commit_meanwhile() -> None:
                late.commit()
                late.close()
                emit(db, 50)
                emit(db, 100, per_txn=25)

            thread = threading.Thread(target=commit_meanwhile)
            thread.start()
            await trio.to_thread.run_sync(thread.join)
            r.daemon.tailer.ring()  # the live tail reads them while the catch-up waits
            await trio.sleep(0.5)
            r.reads.gate.set()
            replayed: list[int] = []
            live: list[int] = []
            subscribed: dict[str, Any] | None = None
            want = owed(db, cursor)
            with trio.fail_after(30):
                while subscribed is None or len(replayed) + len(live) < len(want):
                    frame = await recv(ws)
                    if frame["type"] == "subscribed":
                        subscribed = frame
                    elif frame["type"] == "event":
                        (live if subscribed else replayed).append(frame["id"])
                    else:
                        raise AssertionError(frame)
            with trio.move_on_after(1):  # nothing more may come: no repeat
                extra = await ws.get_message()
                raise AssertionError(f"a repeat: {extra}")
    assert subscribed is not None and subscribed["replayed"] == len(replayed)
    assert late_id is not None
    # (cursor_now's fresh subscribe is one more question in memory mode.)
    assert r.daemon.authorizer.asked == (0 if path == "sql" else 2)
    if path == "sql":
        assert len(replayed) == 500
        assert late_id[0] in live
    else:  # S is the tail's position once the gate opened: it saw the rows committed meanwhile
        assert len(replayed) == 651
        assert late_id[0] in replayed
    everything = replayed + live
    assert len(everything) == len(set(everything)) and set(everything) == want


@pytest.mark.parametrize("path", ["sql", "memory"])
async def test_a_tail_that_lags_behind_the_catch_up_repeats_nothing(
    db: Database, path: str
) -> None:
    with db.connect() as owner:  # poll mode, one step a minute: the tail stands still
        owner.execute("ALTER TABLE relay.events DISABLE TRIGGER events_doorbell")
    async with running(db, path, poll_interval_ms="60000") as r:
        cursor = await cursor_now(r)
        r.reads.gate.set()
        missed = emit(db, 40)
        async with open_websocket_url(r.url) as ws:
            await ws.send_message(json.dumps({"type": "auth", "token": r.token()}))
            assert (await recv(ws))["type"] == "ready"
            await ws.send_message(
                json.dumps({"type": "subscribe", "ref": "r", "org": str(ORG), "cursor": cursor})
            )
            got: list[int] = []
            while (frame := await recv(ws))["type"] != "subscribed":
                got.append(frame["id"])
            # From memory too: the subscribe makes the tail step, and S is that step's.
            assert got == missed
            r.daemon.tailer.ring()  # the tail now reaches the rows the catch-up replayed
            new = emit(db, 3)
            await trio.sleep(0.3)
            r.daemon.tailer.ring()
            got = [(await recv(ws))["id"] for _ in range(3)]
            assert got == new
            with trio.move_on_after(1):
                raise AssertionError(f"a repeat: {await ws.get_message()}")


async def test_a_shutdown_trigger_closes_clients_1012_and_returns(db: Database) -> None:
    codes: list[int | None] = []
    async with running(db, shutdown_timeout_s="5") as r, open_websocket_url(r.url) as ws:
        await ws.send_message(json.dumps({"type": "auth", "token": r.token()}))
        assert (await recv(ws))["type"] == "ready"
        r.stop.set()
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as exc:
            codes.append(exc.reason.code if exc.reason else None)
    # Leaving `running` waited for Daemon.run to return.
    assert codes == [1012]
    assert r.daemon.admission.stopping and r.daemon.connections == set()

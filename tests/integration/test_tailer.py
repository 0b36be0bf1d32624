"""The live tail in-process against a real server: doorbell, timer, pages,
and a listener that heals."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from relay.core.cursor import TailPosition
from relay.core.protocol import EventRow
from relay.db.pool import Database as Pool
from relay.db.tail import Tailer
from relay.server.metrics import Metrics
from tests.pgharness import BACKEND, DAEMON, Database, Server

ORG = uuid.UUID("00000000-0000-4000-8000-0000000000a1")


class Recorder:
    def __init__(self) -> None:
        self.rows: list[EventRow] = []
        self.pages: list[tuple[int, str, str | None]] = []
        self.arrived = trio.Event()

    async def deliver(
        self, page: list[EventRow], since_cursor: str, head_cursor: str | None
    ) -> None:
        self.rows += page
        self.pages.append((len(page), since_cursor, head_cursor))
        self.arrived.set()
        self.arrived = trio.Event()

    def database_changed(self) -> None:
        raise AssertionError("no epoch change expected")

    async def wait_for(self, n: int, timeout_s: float = 5) -> list[EventRow]:
        with trio.fail_after(timeout_s):
            while len(self.rows) < n:
                await self.arrived.wait()
        return self.rows


@asynccontextmanager
async def running_tailer(
    db: Database, *, poll_interval_s: float, page_rows: int = 2000
) -> AsyncIterator[tuple[Tailer, Recorder, Metrics]]:
    pool = Pool(db.dsn(DAEMON), size=2)
    await pool.open()
    recorder, metrics = Recorder(), Metrics()
    tailer = Tailer(
        pool,
        recorder,
        metrics,
        position=TailPosition(),
        poll_interval_s=poll_interval_s,
        page_rows=page_rows,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(tailer.run)
            yield tailer, recorder, metrics
            nursery.cancel_scope.cancel()
    finally:
        await pool.close()


async def test_the_doorbell_delivers_without_waiting_for_the_timer(db: Database) -> None:
    async with running_tailer(db, poll_interval_s=30) as (tailer, rec, _):
        assert tailer.listening
        start = trio.current_time()
        ids = [db.emit(ORG, entity_id=str(i)) for i in range(3)]
        rows = await rec.wait_for(3, timeout_s=5)
        assert [r.id for r in rows] == ids
        assert trio.current_time() - start < 5  # far below the 30 s timer


async def test_poll_mode_delivers_with_the_doorbell_switched_off(db: Database) -> None:
    with db.connect() as owner:
        owner.execute("ALTER TABLE relay.events DISABLE TRIGGER events_doorbell")
    async with running_tailer(db, poll_interval_s=0.1) as (_, rec, _m):
        new = db.emit(ORG)
        rows = await rec.wait_for(1, timeout_s=3)
        assert [r.id for r in rows] == [new]


async def test_a_burst_is_read_in_pages_and_only_the_last_page_carries_the_head(
    db: Database,
) -> None:
    async with running_tailer(db, poll_interval_s=30, page_rows=500) as (_, rec, _m):
        with db.connect(BACKEND) as conn:
            conn.execute(
                "SELECT relay.emit(%s, 'job.updated', 'job', g::text) "
                "FROM generate_series(1, 2200) AS g",
                (ORG,),
            )
        rows = await rec.wait_for(2200, timeout_s=10)
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert [n for n, _, _ in rec.pages] == [500, 500, 500, 500, 200]
    assert all(head is None for _, _, head in rec.pages[:-1]) and rec.pages[-1][2]


@pytest.mark.fault
async def test_a_killed_listener_reconnects_and_nothing_is_lost(
    fault_server: tuple[Server, Database],
) -> None:
    server, db = fault_server
    async with running_tailer(db, poll_interval_s=30) as (tailer, rec, metrics):
        first = db.emit(ORG, entity_id="before")
        await rec.wait_for(1)
        with server.admin() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'pgrelay-listener'"
            )
        during = db.emit(ORG, entity_id="while reconnecting")
        rows = await rec.wait_for(2, timeout_s=10)
        assert [r.id for r in rows] == [first, during]
        with trio.fail_after(10):
            while not tailer.listening:  # noqa: ASYNC110 (a test polling a flag)
                await trio.sleep(0.05)
        assert metrics.listener_reconnects._value.get() >= 1

"""The tail's own connection, driven from trio without worker threads.

A tail step is the hot path from a commit to the clients: a worker-thread hop
each way, a pooled connection's health check and a separate ROLLBACK once
cost more than the query itself. Here one dedicated connection runs in libpq's
non-blocking mode: the step's statements go out as one simple-query string
(one round trip), trio waits on the socket, and the results are parsed from
text as they are. The ROLLBACK that ends a step's transaction is sent without
waiting for it; its answer is read before the next step's query.

Simple-query text with the values inlined is safe here: every value is an
integer the tail computed itself (xids, ids, limits), formatted by `int`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

import psycopg
import trio
import trio.lowlevel
from psycopg import pq

from relay.core.cursor import Snapshot
from relay.core.protocol import EventRow
from relay.db.pool import Conn

__all__ = ["TailConnection", "step_sql"]

_COLUMNS = (
    "id, organization_id, event_type, entity_type, entity_id, actor_id, payload, created_at, "
    "xid::text"
)


def _xid_array(xids: Sequence[int]) -> str:
    return "'{" + ",".join(str(int(x)) for x in xids) + "}'::xid8[]"


def step_sql(since: Snapshot, *, after_id: int, limit: int, begin: bool, with_epoch: bool) -> bytes:
    """The statements of one tail read: with `begin`, the REPEATABLE READ
    transaction and its snapshot (and the epoch) first; then one page of
    `relay.tail_events` after `after_id`."""
    page = (
        f"SELECT {_COLUMNS} FROM relay.tail_events('{int(since.xmax)}'::xid8, "
        f"{_xid_array(since.xip)}, {int(after_id)}, {int(limit)})"
    )
    if not begin:
        return page.encode()
    head = "SELECT pg_current_snapshot()::text" + (", relay.database_epoch()" if with_epoch else "")
    return f"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {head}; {page}".encode()


def rows_of(result: pq.abc.PGresult) -> list[EventRow]:
    """EventRows from a text-format result of `_COLUMNS`."""
    rows = []
    get = result.get_value
    for i in range(result.ntuples):
        actor = get(i, 5)
        rows.append(
            EventRow(
                id=int(get(i, 0) or 0),
                org=uuid.UUID((get(i, 1) or b"").decode()),
                event_type=(get(i, 2) or b"").decode(),
                entity_type=(get(i, 3) or b"").decode(),
                entity_id=(get(i, 4) or b"").decode(),
                actor_id=None if actor is None else actor.decode(),
                payload_json=(get(i, 6) or b"{}").decode(),
                created_at=(get(i, 7) or b"").decode(),
                xid=int(get(i, 8) or 0),
            )
        )
    return rows


class TailConnection:
    """One connection for the tail, used from the trio thread only."""

    def __init__(self, connect: Callable[[], Conn]) -> None:
        """`connect` opens it (blocking; run in a worker thread)."""
        self._connect = connect
        self._conn: Conn | None = None
        self._owed = 0
        """Results of commands sent without waiting (the step's ROLLBACK)."""

    async def _pgconn(self) -> pq.abc.PGconn:
        if self._conn is None or self._conn.closed:
            conn = await trio.to_thread.run_sync(self._connect, abandon_on_cancel=True)
            conn.pgconn.nonblocking = 1
            self._conn, self._owed = conn, 0
        return self._conn.pgconn

    def close(self) -> None:
        """Drop the connection (the next query opens a new one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def query(self, text: bytes) -> list[pq.abc.PGresult]:
        """Run `text` (one or more statements) and return every result. Raises
        psycopg.Error (the connection is dropped when it is broken)."""
        try:
            pg = await self._pgconn()
            while self._owed:
                await self._results(pg)
                self._owed -= 1
            await self._send(pg, text)
            return await self._results(pg)
        except psycopg.Error:
            if self._conn is not None and (
                self._conn.broken or self._conn.pgconn.status != pq.ConnStatus.OK
            ):
                self.close()
            raise
        except BaseException:
            self.close()  # cancelled mid-query: the connection's state is unknown
            raise

    async def send_without_waiting(self, text: bytes) -> None:
        """Send `text` (e.g. ROLLBACK); its result is read before the next query."""
        try:
            pg = await self._pgconn()
            while self._owed:
                await self._results(pg)
                self._owed -= 1
            await self._send(pg, text)
            self._owed += 1
        except BaseException:
            self.close()
            raise

    async def _send(self, pg: pq.abc.PGconn, text: bytes) -> None:
        pg.send_query(text)
        while pg.flush():
            await trio.lowlevel.wait_writable(pg.socket)

    async def _results(self, pg: pq.abc.PGconn) -> list[pq.abc.PGresult]:
        """Every result of the command in flight, in order."""
        results: list[pq.abc.PGresult] = []
        error: str | None = None
        while True:
            while pg.is_busy():
                await trio.lowlevel.wait_readable(pg.socket)
                pg.consume_input()
            result = pg.get_result()
            if result is None:
                break
            if result.status == pq.ExecStatus.FATAL_ERROR:
                error = (result.error_message or b"").decode(errors="replace").strip()
            elif result.status in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
                results.append(result)
        if error is not None:
            raise psycopg.DatabaseError(error)
        return results

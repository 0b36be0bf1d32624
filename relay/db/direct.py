"""A connection of its own, driven from trio without worker threads.

The hot paths (a tail step, a batch of authorizations) cost more in a
worker-thread hop each way, a pooled connection's health check and a separate
ROLLBACK than in the query itself. Here one dedicated connection runs in
libpq's non-blocking mode: the statements go out as one simple-query string
(one round trip), trio waits on the socket, and the results are read as text.
A trailing command (ROLLBACK) can be sent without waiting for it; its answer
is read before the next query.

Simple-query text has its values inlined: callers format integers with `int`
and text with `quote_text` (an escape string literal, whatever
standard_conforming_strings says; the connection's client_encoding is UTF8).
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import trio
import trio.lowlevel
from psycopg import pq

from relay.db.pool import Conn

__all__ = ["DirectConnection", "quote_text"]


def quote_text(text: str) -> str:
    """`text` as an SQL escape string literal (E'...')."""
    if "\x00" in text:
        raise ValueError("text for Postgres cannot hold NUL")
    return "E'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class DirectConnection:
    """One connection of its own, used from the trio thread only."""

    def __init__(self, connect: Callable[[], Conn]) -> None:
        """`connect` opens it (blocking; run in a worker thread)."""
        self._connect = connect
        self._conn: Conn | None = None
        self._owed = 0
        """Results of commands sent without waiting (a ROLLBACK)."""

    async def _pgconn(self) -> pq.abc.PGconn:
        if self._conn is None or self._conn.closed:
            conn = await trio.to_thread.run_sync(self._connect, abandon_on_cancel=True)
            conn.pgconn.nonblocking = 1
            self._conn, self._owed = conn, 0
        return self._conn.pgconn

    @property
    def connected(self) -> bool:
        """Open (a failed query on a broken connection closed it)."""
        return self._conn is not None and not self._conn.closed

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

"""The daemon's connections to Postgres: a psycopg-pool pool whose blocking
calls run in worker threads, the dedicated LISTEN connection and the tail's
own connection.

psycopg's async API runs only under asyncio, so under trio every blocking
call goes through ``trio.to_thread.run_sync``, bounded by a capacity limiter
as large as the pool (a thread waiting for a pooled connection would only
hold a thread).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import psycopg
import trio
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool

#: A pooled connection is handed out within this, or the call fails.
POOL_TIMEOUT_S = 10.0
#: Closing the pool waits this long for its workers, then leaves them.
CLOSE_TIMEOUT_S = 1.0
#: Give up on an unreachable server after this (libpq connect_timeout).
CONNECT_TIMEOUT_S = 5
#: Detect a dead peer on an idle connection: keepalive probes after this idle
#: time, then every KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT times.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3
#: Unacknowledged data for this long means the peer is gone (tcp_user_timeout).
TCP_USER_TIMEOUT_MS = 30_000

LISTENER_APPLICATION_NAME = "pgrelay-listener"
TAIL_APPLICATION_NAME = "pgrelay-tail"
AUTHORIZER_APPLICATION_NAME = "pgrelay-auth"
#: A statement on a direct connection that takes longer is cut by the server.
DIRECT_STATEMENT_TIMEOUT_MS = 30_000
POOL_APPLICATION_NAME = "pgrelay"

P = ParamSpec("P")
T = TypeVar("T")
Conn = psycopg.Connection[Any]


def _keepalive_params() -> dict[str, Any]:
    return {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "keepalives": 1,
        "keepalives_idle": KEEPALIVE_IDLE_S,
        "keepalives_interval": KEEPALIVE_INTERVAL_S,
        "keepalives_count": KEEPALIVE_COUNT,
        "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
    }


def listener_conninfo(database_url: str) -> str:
    return make_conninfo(
        database_url, application_name=LISTENER_APPLICATION_NAME, **_keepalive_params()
    )


def connect_listener(database_url: str, channel: str) -> Conn:
    """Blocking: the autocommit connection that LISTENs on `channel`."""
    conn = psycopg.connect(listener_conninfo(database_url), autocommit=True)
    try:
        if conn.info.server_version >= 140000:
            # A LISTEN connection is idle by design; never let the server cut it.
            conn.execute("SET idle_session_timeout = 0")
        conn.execute("SET statement_timeout = 0")
        conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
    except BaseException:
        conn.close()
        raise
    return conn


def connect_direct(database_url: str, application_name: str) -> Conn:
    """Blocking: an autocommit connection of its own (see relay.db.direct): the
    tail's, the authorizer's. Text results are decoded as UTF-8."""
    conninfo = make_conninfo(
        database_url,
        application_name=application_name,
        client_encoding="UTF8",
        **_keepalive_params(),
    )
    conn = psycopg.connect(conninfo, autocommit=True)
    try:
        conn.execute(f"SET statement_timeout = {int(DIRECT_STATEMENT_TIMEOUT_MS)}")
    except BaseException:
        conn.close()
        raise
    return conn


class Database:
    """The pool, and a way to run blocking psycopg code on a pooled connection."""

    def __init__(self, database_url: str, *, size: int) -> None:
        self.database_url = database_url
        self.pool = ConnectionPool(
            make_conninfo(
                database_url, application_name=POOL_APPLICATION_NAME, **_keepalive_params()
            ),
            min_size=size,
            max_size=size,
            open=False,
            timeout=POOL_TIMEOUT_S,
            # autocommit: every read opens its own explicit transaction.
            # prepare_threshold None: unnamed statements are planned with their
            # values (no generic plans), and transaction-mode poolers work.
            kwargs={"autocommit": True, "prepare_threshold": None},
            check=ConnectionPool.check_connection,
            name="pgrelay",
        )
        self.limiter = trio.CapacityLimiter(size)

    async def open(self) -> None:
        await trio.to_thread.run_sync(lambda: self.pool.open(wait=False))

    async def close(self) -> None:
        """Close the pool; workers stuck connecting to an unreachable server are
        left behind (daemon threads) rather than waited for."""
        await trio.to_thread.run_sync(
            lambda: self.pool.close(timeout=CLOSE_TIMEOUT_S), abandon_on_cancel=True
        )

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(conn, *args, **kwargs)`` in a worker thread on a pooled connection."""

        def call() -> T:
            with self.pool.connection() as conn:
                return fn(conn, *args, **kwargs)

        # Abandoned when cancelled (a connection closing, a stop during start-up):
        # the thread finishes on its own and gives its connection back.
        return await trio.to_thread.run_sync(call, limiter=self.limiter, abandon_on_cancel=True)

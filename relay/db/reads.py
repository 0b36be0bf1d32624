"""The daemon's database reads: the live tail, catch-up and authorization.

Blocking psycopg code: the trio shell runs each call in
``trio.to_thread.run_sync`` on a pooled connection. Every function here takes
an idle connection (not in a transaction) and leaves it idle.

The tail and catch-up both read "rows not visible in snapshot P" inside a
``REPEATABLE READ, READ ONLY`` transaction, together with
``pg_current_snapshot()`` (S): exactly the rows that committed between P and
S, whatever their ids. See DESIGN.md, "The tail".
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from relay.core.cursor import Snapshot
from relay.core.protocol import EventRow
from relay.core.subscription import CatchUpPage, CatchUpQuery
from relay.db.pool import Database
from relay.errors import ReadFailed

#: Rows per page of the tail: a burst of 100,000 rows is read in pages, never
#: in one query. (A catch-up's pages are `CatchUpLimits.page_rows`.)
PAGE_ROWS = 2000

_ROW_COLUMNS = (
    "e.id, e.organization_id, e.event_type, e.entity_type, e.entity_id, e.actor_id, "
    "e.payload::text, to_json(e.created_at) #>> '{}', e.xid::text"
)

#: Catch-up for one organization: its rows not visible in the client's snapshot
#: (`since`) but visible in S, after a (xid, id) keyset position, in (xid, id)
#: order. Run as the subscriber role under the client's claims, so that
#: row-level security filters it for real. Two branches, each an ordered range
#: of events_org_xid_id_idx (checked by the test suite with EXPLAIN): the xids that
#: were in progress at `since` (all below since.xmax), then everything from
#: since.xmax on. Reading by xid makes each page's start a snapshot too, so a
#: client interrupted mid-replay resumes from the page it was on.
#: <head> restricts to rows visible in S; a round's first read leaves it out
#: and reads in S itself (a REPEATABLE READ snapshot taken with S).
_CATCH_UP_BRANCH = f"""
    SELECT {_ROW_COLUMNS}, e.xid AS order_xid
    FROM relay.events AS e
    WHERE e.organization_id = %(org)s
      AND <range>
      AND (e.xid, e.id) > (%(after_xid)s::xid8, %(after_id)s)
      <head>
    ORDER BY e.xid, e.id
    LIMIT %(limit)s
"""
_IN_SINCE_XIP = "e.xid = ANY (%(since_xip)s::xid8[])"
_FROM_SINCE_XMAX = "e.xid >= %(low)s::xid8"
_VISIBLE_IN_HEAD = "AND e.xid < %(head_xmax)s::xid8 AND NOT (e.xid = ANY (%(head_xip)s::xid8[]))"


def _catch_up_sql(head: str) -> str:
    a = _CATCH_UP_BRANCH.replace("<range>", _IN_SINCE_XIP).replace("<head>", head)
    b = _CATCH_UP_BRANCH.replace("<range>", _FROM_SINCE_XMAX).replace("<head>", head)
    return f"SELECT * FROM (({a}) UNION ALL ({b})) AS page ORDER BY order_xid, 1 LIMIT %(limit)s"


CATCH_UP_SQL = _catch_up_sql(_VISIBLE_IN_HEAD)
"""A later page of a catch-up (S given explicitly)."""
CATCH_UP_FIRST_SQL = _catch_up_sql("")
"""The first page, read in S's own REPEATABLE READ transaction."""

#: How many rows a catch-up replays (in S's transaction), counting no further
#: than `count_limit` per branch.
CATCH_UP_COUNT_SQL = """
SELECT (SELECT count(*) FROM (
            SELECT 1 FROM relay.events AS e
            WHERE e.organization_id = %(org)s AND e.xid = ANY (%(since_xip)s::xid8[])
            LIMIT %(count_limit)s) AS a)
     + (SELECT count(*) FROM (
            SELECT 1 FROM relay.events AS e
            WHERE e.organization_id = %(org)s AND e.xid >= %(since_xmax)s::xid8
            LIMIT %(count_limit)s) AS b)
"""

TAIL_SQL = """
SELECT id, organization_id, event_type, entity_type, entity_id, actor_id, payload, created_at,
       xid::text
FROM relay.tail_events(%(xmax)s::xid8, %(xip)s::xid8[], %(after)s, %(limit)s)
"""

_BEGIN_SNAPSHOT = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

Conn = psycopg.Connection[Any]


def _row(r: tuple[Any, ...]) -> EventRow:
    return EventRow(
        id=r[0],
        org=r[1],
        event_type=r[2],
        entity_type=r[3],
        entity_id=r[4],
        actor_id=r[5],
        payload_json=r[6],
        created_at=r[7],
        xid=int(r[8]),
    )


def _since_params(since: Snapshot) -> dict[str, Any]:
    return {"xmax": str(since.xmax), "xip": [str(x) for x in since.xip]}


def current_snapshot(conn: Conn) -> Snapshot:
    """The server's current snapshot, the starting point of a fresh tail."""
    row = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
    assert row is not None
    return Snapshot.parse(row[0])


def database_epoch(conn: Conn) -> str:
    """This database's epoch, as cursors carry it (see short_epoch)."""
    row = conn.execute("SELECT relay.database_epoch()").fetchone()
    assert row is not None
    return short_epoch(str(row[0]))


def _tail_pages(conn: Conn, since: Snapshot, page_rows: int) -> list[EventRow]:
    """In a REPEATABLE READ transaction: every row not visible in `since`."""
    rows: list[EventRow] = []
    after = 0
    while True:
        params = _since_params(since) | {"after": after, "limit": page_rows}
        page = [_row(r) for r in conn.execute(TAIL_SQL, params)]
        rows += page
        if len(page) < page_rows:
            return rows
        after = page[-1].id


def read_tail(
    conn: Conn, since: Snapshot, *, page_rows: int = PAGE_ROWS
) -> tuple[list[EventRow], Snapshot]:
    """Every row committed between `since` and now, in the tail's order, and the
    new snapshot (an autocommit `conn`; the daemon's tail reads the same SQL
    function on its own connection, see relay.db.tail)."""
    conn.execute(_BEGIN_SNAPSHOT)
    try:
        head = current_snapshot(conn)
        return _tail_pages(conn, since, page_rows), head
    finally:
        if not conn.broken:
            conn.execute("ROLLBACK")


@dataclass(frozen=True, slots=True)
class FirstPosition:
    """Where a starting tail stands, and the newest rows it remembers."""

    epoch: str
    head: Snapshot
    """The first snapshot (S0)."""
    start: Snapshot
    """R0: `rows` are every row not visible here but visible in `head`."""
    rows: list[EventRow]


def first_position(conn: Conn, keep: int, *, page_rows: int = PAGE_ROWS) -> FirstPosition:
    """The epoch and the first snapshot; with `keep`, the newest rows too (at
    most `keep`, read in the first snapshot's transaction; see 009). Without
    relay.recent_events_start (a schema before 009), no rows."""
    conn.execute(_BEGIN_SNAPSHOT)
    try:
        head = current_snapshot(conn)
        epoch = database_epoch(conn)
        if not keep:
            return FirstPosition(epoch, head, head, [])
        found = conn.execute(
            "SELECT to_regprocedure('relay.recent_events_start(integer)') IS NOT NULL"
        ).fetchone()
        if not found or not found[0]:
            return FirstPosition(epoch, head, head, [])
        row = conn.execute("SELECT relay.recent_events_start(%s)::text", (keep,)).fetchone()
        begin = 0 if row is None or row[0] is None else int(row[0]) + 1
        start = Snapshot(begin, begin)
        return FirstPosition(epoch, head, start, _tail_pages(conn, start, page_rows))
    finally:
        if not conn.broken:
            conn.execute("ROLLBACK")


@contextlib.contextmanager
def _as_subscriber(conn: Conn, role: str, claims_json: str) -> Iterator[None]:
    """Switch the current transaction to `role` with the client's claims. Fails closed:
    SET LOCAL ROLE raises if the daemon may not switch, and the daemon's own role has no
    SELECT on the table."""
    conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
    conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (claims_json,))
    yield
    conn.execute("RESET ROLE")


def authorized_orgs(
    conn: Conn, role: str, claims_json: str, orgs: list[uuid.UUID]
) -> set[uuid.UUID]:
    """Which of `orgs` these claims may read, asked of SQL under the subscriber role."""
    conn.execute("BEGIN READ ONLY")
    try:
        with _as_subscriber(conn, role, claims_json):
            rows = conn.execute(
                "SELECT o FROM unnest(%s::uuid[]) AS o "
                "WHERE o IN (SELECT relay.user_organizations())",
                ([str(o) for o in orgs],),
            ).fetchall()
        return {r[0] for r in rows}
    finally:
        conn.execute("ROLLBACK")


def read_catch_up(conn: Conn, role: str, claims_json: str, query: CatchUpQuery) -> CatchUpPage:
    """One catch-up read (see `relay.core.subscription.CatchUpQuery`), in a single
    pipelined round trip: the database's epoch and the org's retention horizon
    (as the daemon), then, as `role` under the client's claims, whether the org
    is allowed, and the page (and on a round's first read with `since`, the
    count). A first read runs in REPEATABLE READ and takes S with
    pg_current_snapshot(): the page is read in S itself."""
    first = query.head is None
    since = query.since
    org = query.org
    params: dict[str, Any] = {
        "org": org,
        "after_xid": str(query.after[0]),
        "after_id": query.after[1],
        "limit": query.page_rows,
        "count_limit": query.count_limit,
    }
    if since is not None:
        params |= {
            "since_xmax": str(since.xmax),
            "since_xip": [str(x) for x in since.xip],
            "low": str(max(since.xmax, query.after[0])),
        }
    if query.head is not None:
        params |= {
            "head_xmax": str(query.head.xmax),
            "head_xip": [str(x) for x in query.head.xip],
        }
    count = page = None
    try:
        with conn.pipeline():
            conn.execute(_BEGIN_SNAPSHOT if first else "BEGIN READ ONLY")
            facts = conn.execute(
                "SELECT pg_current_snapshot()::text, relay.database_epoch(), "
                "relay.retention_horizon(%s)::text",
                (org,),
            )
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
            conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (claims_json,))
            allowed = conn.execute("SELECT %s::uuid IN (SELECT relay.user_organizations())", (org,))
            if since is not None:
                if first and query.count_limit:
                    count = conn.execute(CATCH_UP_COUNT_SQL, params)
                page = conn.execute(CATCH_UP_FIRST_SQL if first else CATCH_UP_SQL, params)
            conn.execute("ROLLBACK")
        fact = facts.fetchone()
        ok = allowed.fetchone()
        assert fact is not None and ok is not None
        is_allowed = bool(ok[0])
        counted = count.fetchone() if count is not None else None
        rows = [_row(r) for r in page.fetchall()] if page is not None and is_allowed else []
    except BaseException:
        if not conn.broken and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
        raise
    return CatchUpPage(
        allowed=is_allowed,
        epoch=short_epoch(str(fact[1])),
        head=Snapshot.parse(fact[0]) if query.head is None else query.head,
        horizon=int(fact[2]) if fact[2] is not None else None,
        count=min(int(counted[0]), query.count_limit) if counted else 0,
        rows=rows,
    )


class SubscriberReads:
    """The reads a connection runs for its client, on the pool, in worker threads,
    as the subscriber role. Database failures become `ReadFailed`."""

    def __init__(self, db: Database, role: str) -> None:
        self.db = db
        self.role = role
        """The role per-client reads run as (`PGRELAY_SUBSCRIBER_ROLE`)."""

    async def catch_up(self, claims_json: str, query: CatchUpQuery) -> CatchUpPage:
        try:
            return await self.db.run(read_catch_up, self.role, claims_json, query)
        except psycopg.Error as exc:
            raise read_failed(exc) from exc

    async def authorized(self, claims_json: str, orgs: list[uuid.UUID]) -> set[uuid.UUID]:
        try:
            return await self.db.run(authorized_orgs, self.role, claims_json, orgs)
        except psycopg.Error as exc:
            raise read_failed(exc) from exc


def read_failed(exc: psycopg.Error) -> ReadFailed:
    """`exc` as a ReadFailed; transient when the connection failed (an operational
    error: a restart, a failover, a pool timeout), not when the database answered
    with an error or cut a statement that ran too long."""
    transient = isinstance(exc, psycopg.OperationalError) and not isinstance(
        exc, psycopg.errors.QueryCanceled
    )
    return ReadFailed(str(exc).strip(), transient=transient)


def short_epoch(raw: str) -> str:
    """The epoch as cursors carry it: a 12-character digest of relay.database_epoch()."""
    return base64.urlsafe_b64encode(hashlib.blake2b(raw.encode(), digest_size=9).digest()).decode()

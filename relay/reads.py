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
import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from relay.core.cursor import TOO_FAR_BEHIND, Replay, ResumePlan, Snapshot, plan_resume
from relay.core.protocol import EventRow

#: Rows per page of the tail and of catch-up: a burst of 100,000 rows is read
#: in pages, never in one query.
PAGE_ROWS = 2000

_ROW_COLUMNS = (
    "e.id, e.organization_id, e.event_type, e.entity_type, e.entity_id, e.actor_id, "
    "e.payload::text, to_json(e.created_at) #>> '{}', e.xid::text"
)

#: Catch-up for one organization, run as the subscriber role under the
#: client's claims, so that row-level security filters it for real.
#: Uses events_org_xid_idx (checked by the test suite with EXPLAIN).
CATCHUP_SQL = f"""
SELECT {_ROW_COLUMNS}
FROM relay.events AS e
WHERE e.organization_id = %(org)s
  AND (e.xid >= %(xmax)s::xid8 OR e.xid = ANY (%(xip)s::xid8[]))
  AND e.id > %(after)s
ORDER BY e.id
LIMIT %(limit)s
"""

#: How many rows a catch-up would replay, counting no further than `limit`.
CATCHUP_COUNT_SQL = """
SELECT count(*) FROM (
    SELECT 1 FROM relay.events AS e
    WHERE e.organization_id = %(org)s
      AND (e.xid >= %(xmax)s::xid8 OR e.xid = ANY (%(xip)s::xid8[]))
    LIMIT %(limit)s
) AS n
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


class TailRead:
    """One step of the live tail: the rows visible now (S) but not in `since`.

    `open` sends BEGIN, the snapshot query and the first page in one pipelined
    round trip, so that a typical step (one short page) costs a single trip to
    the server and a single hop to a worker thread. `next_page` reads further
    pages in the same snapshot. The transaction ends (and `release` gives the
    connection back) with the first short page, or with `close` on errors.
    """

    def __init__(
        self,
        conn: Conn,
        since: Snapshot,
        *,
        page_rows: int = PAGE_ROWS,
        release: Callable[[Conn], None] | None = None,
    ) -> None:
        self.conn = conn
        self.since = since
        self.page_rows = page_rows
        self.release = release
        self.snapshot: Snapshot
        self.epoch: str | None = None
        """relay.database_epoch() as cursors carry it, when `open` was asked for it."""
        self.done = False
        self.first_page: list[EventRow] = []
        """What `open` returned (kept for the caller that opened it in a thread)."""
        self._after_id = 0

    def open(self, *, with_epoch: bool = False) -> list[EventRow]:
        """Start the step; returns the first page."""
        head_sql = "SELECT pg_current_snapshot()::text" + (
            ", relay.database_epoch()" if with_epoch else ""
        )
        params = _since_params(self.since) | {"after": 0, "limit": self.page_rows}
        try:
            with self.conn.pipeline():
                self.conn.execute(_BEGIN_SNAPSHOT)
                head = self.conn.execute(head_sql)
                page = self.conn.execute(TAIL_SQL, params)
            row = head.fetchone()
            assert row is not None
            self.snapshot = Snapshot.parse(row[0])
            if with_epoch:
                self.epoch = short_epoch(str(row[1]))
            return self._paged([_row(r) for r in page.fetchall()])
        except BaseException:
            self.close()
            raise

    def next_page(self) -> list[EventRow]:
        """The next page of the same snapshot (only while not `done`)."""
        assert not self.done
        params = _since_params(self.since) | {"after": self._after_id, "limit": self.page_rows}
        try:
            return self._paged([_row(r) for r in self.conn.execute(TAIL_SQL, params)])
        except BaseException:
            self.close()
            raise

    def _paged(self, rows: list[EventRow]) -> list[EventRow]:
        if len(rows) < self.page_rows:
            self.close()
        else:
            self._after_id = rows[-1].id
        return rows

    def close(self) -> None:
        """End the transaction (read only: nothing to commit) and release the connection."""
        if self.done:
            return
        self.done = True
        try:
            if not self.conn.broken:
                self.conn.execute("ROLLBACK")
        finally:
            if self.release is not None:
                self.release(self.conn)


def read_tail(
    conn: Conn, since: Snapshot, *, page_rows: int = PAGE_ROWS
) -> tuple[list[EventRow], Snapshot]:
    """Every row committed between `since` and now, in id order, and the new snapshot."""
    step = TailRead(conn, since, page_rows=page_rows)
    rows = step.open()
    while not step.done:
        rows += step.next_page()
    return rows, step.snapshot


@dataclass(frozen=True)
class SubscribeRead:
    """What one subscribe (or resume) found, all read in one snapshot S."""

    allowed: bool
    """Whether the organization is among relay.user_organizations() for these claims."""
    snapshot: Snapshot
    """S: the live handover point. The org's rows visible in S are replayed or were
    visible in the cursor; live rows not visible in S follow."""
    epoch: str
    """The database epoch, for fresh cursors."""
    plan: ResumePlan
    """Fresh, Replay or Resync (TOO_FAR_BEHIND when the replay would exceed the limit)."""
    replay: list[EventRow]
    """With a Replay plan: the org's rows not visible in the cursor, in id order."""


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


def subscribe_read(
    conn: Conn,
    role: str,
    claims_json: str,
    org: uuid.UUID,
    cursor_text: str | None,
    *,
    replay_limit: int,
    page_rows: int = PAGE_ROWS,
) -> SubscribeRead:
    """Authorize `org` for these claims, plan the resume from `cursor_text`, and read
    the rows to replay, all in one REPEATABLE READ snapshot S (the live handover point)."""
    conn.execute(_BEGIN_SNAPSHOT)
    try:
        row = conn.execute(
            "SELECT pg_current_snapshot()::text, relay.database_epoch(), "
            "relay.retention_horizon(%s)::text",
            (org,),
        ).fetchone()
        assert row is not None
        snapshot = Snapshot.parse(row[0])
        epoch = short_epoch(str(row[1]))
        horizon = int(row[2]) if row[2] is not None else None
        plan = plan_resume(cursor_text, epoch=epoch, head=snapshot, retention_horizon=horizon)
        replay: list[EventRow] = []
        with _as_subscriber(conn, role, claims_json):
            ok = conn.execute(
                "SELECT %s::uuid IN (SELECT relay.user_organizations())", (org,)
            ).fetchone()
            allowed = bool(ok and ok[0])
            if allowed and isinstance(plan, Replay):
                params: dict[str, Any] = {"org": org} | _since_params(plan.since)
                counted = conn.execute(
                    CATCHUP_COUNT_SQL, params | {"limit": replay_limit + 1}
                ).fetchone()
                if counted is not None and counted[0] > replay_limit:
                    plan = TOO_FAR_BEHIND
                else:
                    after = 0
                    while True:
                        page = [
                            _row(r)
                            for r in conn.execute(
                                CATCHUP_SQL, params | {"after": after, "limit": page_rows}
                            )
                        ]
                        replay += page
                        if len(page) < page_rows:
                            break
                        after = page[-1].id
        return SubscribeRead(allowed, snapshot, epoch, plan, replay)
    finally:
        conn.execute("ROLLBACK")


def short_epoch(raw: str) -> str:
    """The epoch as cursors carry it: a 12-character digest of relay.database_epoch()."""
    return base64.urlsafe_b64encode(hashlib.blake2b(raw.encode(), digest_size=9).digest()).decode()


def claims_json(claims: Mapping[str, Any]) -> str:
    return json.dumps(claims, separators=(",", ":"), sort_keys=True)

"""The live tail: exact, in commit order, gap-free (docs/architecture.md).

Two tasks:
- the *listener* (`relay.db.listener`) holds the dedicated LISTEN connection,
  rings the doorbell, proves with a probe that it still receives, and heals;
  it rings once more after every reconnect;
- the *reader* runs one step whenever the doorbell rings, and at the latest
  every ``poll_interval`` (the fallback timer, or the only trigger in poll
  mode, with the doorbell trigger disabled in SQL);
- the *deliverer* hands the pages the reader read to the hub.

A step reads, on the tail's own connection (`relay.db.direct`: no worker
thread, one round trip), the rows visible now (S) but not in the
previous snapshot P, page by page. The reader may read the next step while
the deliverer still fans out the previous one (at most one page ahead), so
database time and fan-out overlap. The position the hub sees moves to S only
once the step's last page was delivered. A failed read is retried from the
same P, so a dropped connection or a restarted server costs latency, never
events. The content of a notification is ignored: anyone who can connect can
NOTIFY.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

import psycopg
import structlog
import trio
from psycopg import pq

from relay.core.cursor import Cursor, Snapshot, TailPosition
from relay.core.protocol import EventRow
from relay.core.recent import RecentRows
from relay.db.direct import DirectConnection
from relay.db.listener import PROBE_INTERVAL_S, Backoff, Listener
from relay.db.migrate import schema_state
from relay.db.pool import TAIL_APPLICATION_NAME, Conn, Database, connect_direct, connect_listener
from relay.db.reads import PAGE_ROWS, first_position, short_epoch
from relay.server.metrics import Metrics

#: The database epoch is re-read at least this often (and after every reconnect).
EPOCH_CHECK_INTERVAL_S = 10.0
#: After a failed tail step, wait this long before the next try.
STEP_RETRY_S = 0.5

log = structlog.get_logger("pgrelay.tail")


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


class Sink(Protocol):
    """Where the tail delivers: the hub."""

    async def deliver(
        self, page: list[EventRow], since_cursor: str, head_cursor: str | None
    ) -> None:
        """A page of rows in id order. `since_cursor` is safe for every row; on the last
        page of a step, `head_cursor` is safe after an organization's last row."""

    def database_changed(self) -> None:
        """The database changed under us (see `Tailer.position`): every
        subscription must resync."""


class _Page:
    """One page of a step, from the reader to the deliverer."""

    __slots__ = ("head", "head_cursor", "read", "rows", "since_cursor")

    def __init__(
        self,
        rows: list[EventRow],
        since_cursor: str,
        head_cursor: str | None,
        head: Snapshot | None,
        read: int = 0,
    ) -> None:
        self.rows = rows
        self.read = read
        """The step's read number (RecentRows.read_begins)."""
        self.since_cursor = since_cursor
        self.head_cursor = head_cursor
        """Set on the step's last page: the step's S as a cursor."""
        self.head = head
        """Set on the step's last page: S (the position moves there after it)."""


class _Changed:
    """The database's epoch changed (restore, failover): start over at `head`."""

    __slots__ = ("epoch", "head")

    def __init__(self, epoch: str, head: Snapshot) -> None:
        self.epoch = epoch
        self.head = head


class Tailer:
    def __init__(
        self,
        db: Database,
        sink: Sink,
        metrics: Metrics,
        *,
        position: TailPosition,
        poll_interval_s: float,
        page_rows: int = PAGE_ROWS,
        probe_interval_s: float = PROBE_INTERVAL_S,
        membership_changed: Callable[[str], None] = lambda _subject: None,
        connect: Callable[[str, str], Conn] = connect_listener,
        recent: RecentRows | None = None,
    ) -> None:
        """`recent`: kept up to date with every step (see relay.core.recent)."""
        self.db = db
        self.sink = sink
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self.page_rows = page_rows
        self._doorbell = trio.Event()
        self.listener = Listener(
            db.database_url,
            ring=self.ring,
            metrics=metrics,
            membership_changed=membership_changed,
            probe_interval_s=probe_interval_s,
            connect=connect,
        )
        self.position = position
        """Where the tail stands: epoch and the last step's snapshot (shared with the hub)."""
        self.recent = recent if recent is not None else RecentRows(0)
        self._stepped = trio.Event()
        self.connection = DirectConnection(
            lambda: connect_direct(db.database_url, TAIL_APPLICATION_NAME)
        )
        self._read_at: Snapshot | None = None
        """The reader's P: the last step it read (the deliverer may still be on it)."""
        self._epoch_due = True
        self._epoch_checked_at = 0.0
        self.heartbeat_at = 0.0
        """trio time of the tail loop's last turn (the systemd watchdog checks it)."""

    @property
    def listening(self) -> bool:
        """LISTEN is live and its last probe came back: ready to serve."""
        return self.listener.listening and self.listener.healthy

    def ring(self) -> None:
        self._doorbell.set()

    async def stepped(self) -> None:
        """Wait for the next step to be delivered."""
        await self._stepped.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start order: LISTEN live, then the first snapshot, then `started()`.

        While the database cannot be reached or has no relay schema, both keep
        retrying with backoff and say why once per attempt (`/readyz` stays 503)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.listener.run)
            nursery.start_soon(self._epoch_after_reconnects)
            position = self.position
            backoff = Backoff(initial_s=STEP_RETRY_S)
            recent = self.recent
            while position.snapshot is None:
                try:
                    first = await self.db.run(first_position, recent.capacity)
                    position.epoch, position.snapshot = first.epoch, first.head
                except psycopg.Error as exc:
                    wait = backoff.next()
                    log.warning(
                        "cannot take the first snapshot",
                        error=str(exc).strip(),
                        hint=await self._schema_hint(),
                        retry_in_s=round(wait, 2),
                    )
                    await trio.sleep(wait)
            # The newest rows, as if one step had brought them (read number 0).
            recent.reset(first.epoch, first.start)
            recent.add(first.rows)
            recent.step_done(first.head, 0)
            log.info("tail started", snapshot=str(first.head), recent_rows=recent.rows)
            self.heartbeat_at = trio.current_time()
            task_status.started()
            await self._tail_loop()

    async def _epoch_after_reconnects(self) -> None:
        """A reconnect may mean a failover: re-check the epoch on the next step."""
        while True:
            await self.listener.reconnected.wait()
            self._epoch_due = True

    async def _schema_hint(self) -> str | None:
        """Why the daemon's queries fail, when the schema is the reason."""
        try:
            state = await self.db.run(schema_state)
        except psycopg.Error:
            return None
        return state.describe() if state.behind else None

    # -- the tail loop ------------------------------------------------------
    async def _tail_loop(self) -> None:
        self._read_at = self.position.snapshot
        send, receive = trio.open_memory_channel[_Page | _Changed](1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_steps, send)
            await self._deliver_steps(receive)

    async def _read_steps(self, send: trio.MemorySendChannel[_Page | _Changed]) -> None:
        backoff = Backoff(initial_s=STEP_RETRY_S)
        while True:
            # Comes round at least once per poll interval, even while steps fail: a
            # stale heartbeat means a stuck step, not a database outage.
            self.heartbeat_at = trio.current_time()
            with trio.move_on_after(self.poll_interval_s):
                await self._doorbell.wait()
            # A new event before reading: a ring during the step means another step.
            self._doorbell = trio.Event()
            try:
                await self._read_step(send)
                backoff.reset()
            except psycopg.Error as exc:
                wait = backoff.next()
                log.warning("tail step failed; will retry", error=str(exc).strip(), retry_in_s=wait)
                await trio.sleep(wait)
                self.ring()

    async def _read_step(self, send: trio.MemorySendChannel[_Page | _Changed]) -> None:
        """Read every row committed since the reader's P, page by page, onto `send`.

        A typical step is one round trip on the tail's own connection. The database
        epoch is checked on the first step, after every listener reconnect, and
        every EPOCH_CHECK_INTERVAL_S."""
        since = self._read_at
        assert since is not None
        started_at = trio.current_time()
        with_epoch = self._epoch_due or started_at - self._epoch_checked_at > EPOCH_CHECK_INTERVAL_S
        connection = self.connection
        read = self.recent.read_begins()  # before the query goes out (RecentRows.mark)
        results = await connection.query(
            step_sql(since, after_id=0, limit=self.page_rows, begin=True, with_epoch=with_epoch)
        )
        try:
            head_result, page_result = results[1], results[2]
            head = Snapshot.parse((head_result.get_value(0, 0) or b"").decode())
            epoch = self.position.epoch
            if with_epoch:
                epoch = short_epoch((head_result.get_value(0, 1) or b"").decode())
                self._epoch_due = False
                self._epoch_checked_at = started_at
            if epoch != self.position.epoch or head.xmax < since.xmax:
                await connection.send_without_waiting(b"ROLLBACK")
                self._read_at = head
                await send.send(_Changed(epoch, head))
                return
            since_cursor = Cursor(epoch, since).encode()
            head_cursor = Cursor(epoch, head).encode()
            rows = rows_of(page_result)
            while len(rows) == self.page_rows:
                more = rows_of(
                    (
                        await connection.query(
                            step_sql(
                                since,
                                after_id=rows[-1].id,
                                limit=self.page_rows,
                                begin=False,
                                with_epoch=False,
                            )
                        )
                    )[0]
                )
                self.metrics.events_read.inc(len(rows))
                await send.send(_Page(rows, since_cursor, None, None))
                rows = more
            await connection.send_without_waiting(b"ROLLBACK")
        except BaseException:
            connection.close()  # mid-step: its transaction and results are unknown
            raise
        if rows:
            self.metrics.events_read.inc(len(rows))
        self.metrics.tail_query.observe(trio.current_time() - started_at)
        self._read_at = head
        await send.send(_Page(rows, since_cursor, head_cursor, head, read))

    async def _deliver_steps(self, receive: trio.MemoryReceiveChannel[_Page | _Changed]) -> int:
        """Hand what the reader read to the hub; returns how many rows."""
        delivered = 0
        async for item in receive:
            if isinstance(item, _Changed):
                self._database_changed(item.epoch, item.head)
            else:
                if item.rows:
                    delivered += len(item.rows)
                    self.recent.add(item.rows)  # before its fan-out begins
                    await self.sink.deliver(item.rows, item.since_cursor, item.head_cursor)
                if item.head is None:
                    continue
                self.position.snapshot = item.head
                self.recent.step_done(item.head, item.read)
            self._stepped.set()
            self._stepped = trio.Event()
        return delivered

    async def step(self) -> int:
        """Read and deliver every row committed since the last step; returns how
        many (tests and tools: the running tail loops over the same two parts)."""
        if self._read_at is None:
            self._read_at = self.position.snapshot
        send, receive = trio.open_memory_channel[_Page | _Changed](1)

        async def read() -> None:
            async with send:
                await self._read_step(send)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            return await self._deliver_steps(receive)

    def _database_changed(self, epoch: str, snapshot: Snapshot) -> None:
        """Restored, failed over to a diverged replica, or a different database: what
        clients hold no longer describes it. Start over at its current snapshot and
        tell every subscription to resync."""
        log.error(
            "database epoch changed; every subscription resyncs",
            old_epoch=self.position.epoch,
            new_epoch=epoch,
        )
        self.position.epoch = epoch
        self.position.snapshot = snapshot
        self.recent.reset(epoch, snapshot)
        self.sink.database_changed()

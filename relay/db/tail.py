"""The live tail: exact, in commit order, gap-free (docs/architecture.md).

Two tasks:
- the *listener* (`relay.db.listener`) holds the dedicated LISTEN connection,
  rings the doorbell, proves with a probe that it still receives, and heals;
  it rings once more after every reconnect;
- the *reader* runs one step whenever the doorbell rings, and at the latest
  every ``poll_interval`` (the fallback timer, or the only trigger in poll
  mode, with the doorbell trigger disabled in SQL);
- the *deliverer* hands the pages the reader read to the hub.

A step reads, on the tail's own connection (`relay.db.tail_connection`: no
worker thread, one round trip), the rows visible now (S) but not in the
previous snapshot P, page by page. The reader may read the next step while
the deliverer still fans out the previous one (at most one page ahead), so
database time and fan-out overlap. The position the hub sees moves to S only
once the step's last page was delivered. A failed read is retried from the
same P, so a dropped connection or a restarted server costs latency, never
events. The content of a notification is ignored: anyone who can connect can
NOTIFY.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import psycopg
import structlog
import trio

from relay.core.cursor import Cursor, Snapshot, TailPosition
from relay.core.protocol import EventRow
from relay.db.listener import PROBE_INTERVAL_S, Backoff, Listener
from relay.db.migrate import schema_state
from relay.db.pool import Conn, Database, connect_listener, connect_tail
from relay.db.reads import PAGE_ROWS, current_snapshot, database_epoch, short_epoch
from relay.db.tail_connection import TailConnection, rows_of, step_sql
from relay.server.metrics import Metrics

#: The database epoch is re-read at least this often (and after every reconnect).
EPOCH_CHECK_INTERVAL_S = 10.0
#: After a failed tail step, wait this long before the next try.
STEP_RETRY_S = 0.5

log = structlog.get_logger("pgrelay.tail")


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

    __slots__ = ("head", "head_cursor", "rows", "since_cursor")

    def __init__(
        self,
        rows: list[EventRow],
        since_cursor: str,
        head_cursor: str | None,
        head: Snapshot | None,
    ) -> None:
        self.rows = rows
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
    ) -> None:
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
        self.connection = TailConnection(lambda: connect_tail(db.database_url))
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

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start order: LISTEN live, then the first snapshot, then `started()`.

        While the database cannot be reached or has no relay schema, both keep
        retrying with backoff and say why once per attempt (`/readyz` stays 503)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.listener.run)
            nursery.start_soon(self._epoch_after_reconnects)
            position = self.position
            backoff = Backoff(initial_s=STEP_RETRY_S)
            while position.snapshot is None:
                try:
                    position.epoch, position.snapshot = await self.db.run(_epoch_and_snapshot)
                except psycopg.Error as exc:
                    wait = backoff.next()
                    log.warning(
                        "cannot take the first snapshot",
                        error=str(exc).strip(),
                        hint=await self._schema_hint(),
                        retry_in_s=round(wait, 2),
                    )
                    await trio.sleep(wait)
            log.info("tail started", snapshot=str(position.snapshot))
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
        await send.send(_Page(rows, since_cursor, head_cursor, head))

    async def _deliver_steps(self, receive: trio.MemoryReceiveChannel[_Page | _Changed]) -> int:
        """Hand what the reader read to the hub; returns how many rows."""
        delivered = 0
        async for item in receive:
            if isinstance(item, _Changed):
                self._database_changed(item.epoch, item.head)
                continue
            if item.rows:
                delivered += len(item.rows)
                await self.sink.deliver(item.rows, item.since_cursor, item.head_cursor)
            if item.head is not None:
                self.position.snapshot = item.head
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
        self.sink.database_changed()


def _epoch_and_snapshot(conn: Conn) -> tuple[str, Snapshot]:
    return database_epoch(conn), current_snapshot(conn)
